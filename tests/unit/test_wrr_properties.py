"""Properties of nginx's smooth weighted round robin (`weighted_round_robin`).

With integer weights w_i, total W and a stable candidate set, the rule adds each w_i to
a running score, picks the highest and subtracts W from it. Scores always sum to zero,
so after W picks every score is back to zero: the pick sequence is periodic with period
W. The properties checked here:

1. Exact proportions: any W consecutive picks (from any offset) hold backend i exactly
   w_i times.
2. A zero weight is never picked unless every weight is zero (then: plain rotation).
3. Smoothness, the "no bursts" property: from the start of a period, no backend is ever
   a whole pick ahead of its share, i.e. picks_i(k) < k * w_i / W + 1 for every prefix
   length k. (Proof: the picked score is the maximum of scores summing to W, so at
   least W/n, and drops to at least W/n - W > -W; unpicked scores only grow. A score
   s_i = k*w_i - W*picks_i > -W is exactly the bound.) Being *behind* one's share is
   bounded less tightly (by more than one pick with many backends), so it is not
   claimed; neither is a run-length bound like ceil(w_i / min_w), which fails for
   weights such as (1, 1, 5).
4. Scaling every weight by the same factor changes nothing (shown for exact binary
   factors, where float arithmetic is exact).
"""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from router.algorithms.base import RequestContext
from router.algorithms.weighted_round_robin import WeightedRoundRobin
from router.backend_state import BackendState
from router.backends import BackendConfig, BackendKind

CTX = RequestContext()

weights_lists = st.lists(st.integers(0, 12), min_size=1, max_size=7)
positive_weights = weights_lists.filter(lambda ws: sum(ws) > 0)


def states(weights: list[float]) -> list[BackendState]:
    return [
        BackendState(
            BackendConfig(
                name=f"b{i}", kind=BackendKind.LIGHTRAG, base_url=f"http://b{i}.test", weight=w
            )
        )
        for i, w in enumerate(weights)
    ]


def picks(weights: list[float], count: int) -> list[str]:
    wrr = WeightedRoundRobin()
    candidates = states(weights)
    return [wrr.choose(candidates, CTX).backend.name for _ in range(count)]


@settings(max_examples=150, deadline=None)
@given(weights=positive_weights)
def test_every_window_of_total_weight_picks_has_exact_proportions(weights: list[int]) -> None:
    total = sum(weights)
    sequence = picks(weights, 3 * total)
    expected = {f"b{i}": w for i, w in enumerate(weights) if w}
    for offset in range(2 * total + 1):
        assert Counter(sequence[offset : offset + total]) == expected


@settings(max_examples=150, deadline=None)
@given(weights=weights_lists)
def test_a_zero_weight_is_never_picked_unless_all_are_zero(weights: list[int]) -> None:
    n = len(weights)
    sequence = picks(weights, 4 * max(sum(weights), n))
    if sum(weights) == 0:
        # plain rotation: every candidate in turn
        assert sequence == [f"b{i % n}" for i in range(len(sequence))]
    else:
        assert {int(name[1:]) for name in sequence} == {i for i, w in enumerate(weights) if w}


@settings(max_examples=150, deadline=None)
@given(weights=positive_weights)
def test_no_backend_is_ever_a_whole_pick_ahead_of_its_share(weights: list[int]) -> None:
    total = sum(weights)
    sequence = picks(weights, 2 * total)
    counts = Counter[str]()
    for k, name in enumerate(sequence, start=1):
        counts[name] += 1
        for i, w in enumerate(weights):
            # integer form of picks_i(k) < k * w_i / W + 1
            assert counts[f"b{i}"] * total < k * w + total


@settings(max_examples=100, deadline=None)
@given(weights=positive_weights, factor=st.sampled_from([0.25, 0.5, 2.0, 8.0]))
def test_scaling_all_weights_changes_nothing(weights: list[int], factor: float) -> None:
    total = sum(weights)
    assert picks([w * factor for w in weights], 2 * total) == picks(weights, 2 * total)


def test_smooth_not_bursty_example() -> None:
    """The example from nginx's commit message: weights 5, 1, 1."""
    assert picks([5, 1, 1], 7) == ["b0", "b0", "b1", "b0", "b2", "b0", "b0"]
