"""What each load-balancing rule promises, checked on `BackendState` objects (no network).

Shares are counted over many seeded picks; bounds are loose enough for any seed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import pytest

from router.algorithms.adaptive import Adaptive
from router.algorithms.base import Algorithm, Choice, Observation, RequestContext
from router.algorithms.cost_aware import CostAware
from router.algorithms.custom import CustomAlgorithm, load_custom_algorithm
from router.algorithms.geographic import (
    DEFAULT_REGION_DISTANCES_MS,
    UNKNOWN_DISTANCE_MS,
    Geographic,
)
from router.algorithms.health_aware import HealthAware
from router.algorithms.names import AlgorithmName
from router.algorithms.quality_aware import QualityAware
from router.algorithms.registry import build_algorithm
from router.backend_state import BackendState, PeakEwma
from router.backends import BackendConfig, BackendKind, CostModel
from router.budget import SECONDS_PER_DAY, DailyBudget
from router.production_config import (
    AdaptiveSettings,
    CostSettings,
    ProductionLoadBalancingConfig,
)
from tests import fixtures_custom_algorithm as fixtures

NOW = 1_000.0
CTX = RequestContext(now=NOW)


def backend(
    name: str,
    *,
    kind: BackendKind = BackendKind.LIGHTRAG,
    weight: float = 1.0,
    region: str = "eu-central",
    per_request_usd: float | None = None,
    quality: float | None = None,
    latency_ms: float | None = None,
) -> BackendState:
    cost = None if per_request_usd is None else CostModel(per_request_usd=per_request_usd)
    state = BackendState(
        BackendConfig(
            name=name,
            kind=kind,
            base_url="http://127.0.0.1:9000",
            weight=weight,
            region=region,
            cost=cost,
        )
    )
    state.quality = quality
    if latency_ms is not None:
        state.latency = PeakEwma(latency_ms, now=NOW)
    return state


def shares(algorithm: Algorithm, candidates: Sequence[BackendState], n: int) -> dict[str, float]:
    counts = Counter(algorithm.choose(candidates, CTX).backend.name for _ in range(n))
    return {b.name: counts[b.name] / n for b in candidates}


# -- health_aware -----------------------------------------------------------------------


def test_health_aware_sends_fewer_picks_to_a_poor_success_rate() -> None:
    good, poor = backend("good"), backend("poor")
    good.outcomes.extend([True] * 50)
    poor.outcomes.extend([True, False] * 25)
    share = shares(HealthAware(seed=1), [good, poor], 4000)
    # Scores 1.0 and (27/52)^2 = 0.27: the poor one gets about 21 %.
    assert 0.14 < share["poor"] < 0.28
    assert share["good"] > 0.72


def test_health_aware_never_picks_an_ejected_backend() -> None:
    a, b, ejected = backend("a"), backend("b"), backend("ejected")
    ejected.ejected_until = NOW + 30
    algorithm = HealthAware(seed=2)
    for _ in range(1000):
        choice = algorithm.choose([a, b, ejected], CTX)
        assert choice.backend is not ejected
        assert choice.scores["ejected"] == 0.0
        assert "degraded" not in choice.reason


def test_health_aware_degraded_mode_when_every_candidate_is_ejected() -> None:
    a, b = backend("a"), backend("b")
    a.ejected_until = b.ejected_until = NOW + 30
    a.outcomes.extend([True] * 50)
    b.outcomes.extend([False] * 50)
    algorithm = HealthAware(seed=3)
    choice = algorithm.choose([a, b], CTX)
    assert "degraded" in choice.reason
    assert shares(algorithm, [a, b], 2000)["a"] > 0.9


def test_health_aware_honours_weights_between_equally_healthy_backends() -> None:
    a, b = backend("a"), backend("b")
    share = shares(HealthAware({"a": 3.0, "b": 1.0}, seed=4), [a, b], 4000)
    assert 0.70 < share["a"] < 0.80
    zero = HealthAware({"a": 0.0, "b": 0.0}, seed=4)  # all zero: uniform, no crash
    assert 0.4 < shares(zero, [a, b], 2000)["a"] < 0.6


# -- cost_aware -------------------------------------------------------------------------


def priced() -> tuple[BackendState, BackendState, BackendState]:
    return (
        backend("cheap", per_request_usd=0.001, latency_ms=400),
        backend("mid", per_request_usd=0.002, latency_ms=400),
        backend("pricey", kind=BackendKind.PERPLEXITY, per_request_usd=0.01, latency_ms=400),
    )


def test_cost_aware_picks_the_cheapest_acceptable_backend() -> None:
    cheap, _mid, _pricey = candidates = priced()
    choice = CostAware(CostSettings(), seed=0).choose(candidates, CTX)
    assert choice.backend is cheap
    assert choice.scores == {"cheap": 0.001, "mid": 0.002, "pricey": 0.01}
    assert "relaxed" not in choice.reason


def test_cost_aware_uses_observed_tokens_in_expected_cost() -> None:
    lightrag = backend("lightrag")  # default cost model: per request + output tokens
    sonar = backend("sonar", kind=BackendKind.PERPLEXITY)
    choice = CostAware(seed=0).choose([sonar, lightrag], CTX)
    assert choice.backend is lightrag
    assert choice.scores["lightrag"] == pytest.approx(0.0004 + 250 * 0.0002 / 1000)
    lightrag.tokens_out_avg = 1000.0
    assert CostAware(seed=0).choose([lightrag], CTX).scores["lightrag"] == pytest.approx(0.0006)


def test_cost_aware_respects_min_quality_and_unknown_quality_counts_as_acceptable() -> None:
    cheap, mid, _pricey = candidates = priced()
    algorithm = CostAware(CostSettings(min_quality=0.5), seed=0)
    cheap.quality, mid.quality = 0.3, 0.8
    assert algorithm.choose(candidates, CTX).backend is mid
    cheap.quality = None
    assert algorithm.choose(candidates, CTX).backend is cheap


def test_cost_aware_respects_the_latency_target() -> None:
    cheap, mid, _pricey = candidates = priced()
    cheap.latency = PeakEwma(9_000, now=NOW)
    choice = CostAware(CostSettings(latency_target_ms=5_000), seed=0).choose(candidates, CTX)
    assert choice.backend is mid


def test_cost_aware_relaxes_latency_before_quality() -> None:
    cheap, mid, pricey = candidates = priced()
    for b in candidates:
        b.latency = PeakEwma(9_000, now=NOW)  # nobody meets the latency target
    cheap.quality, mid.quality, pricey.quality = 0.2, 0.9, 0.9
    choice = CostAware(CostSettings(min_quality=0.5), seed=0).choose(candidates, CTX)
    assert choice.backend is mid
    assert "latency target relaxed" in choice.reason


def test_cost_aware_relaxes_quality_when_no_backend_meets_it() -> None:
    cheap, mid, _pricey = candidates = priced()
    for b in candidates:
        b.quality = 0.2  # nobody meets the quality minimum
    cheap.latency = PeakEwma(9_000, now=NOW)
    algorithm = CostAware(CostSettings(min_quality=0.5), seed=0)
    choice = algorithm.choose(candidates, CTX)
    assert choice.backend is mid  # latency target still held
    assert "min quality relaxed" in choice.reason
    for b in candidates:
        b.latency = PeakEwma(9_000, now=NOW)
    choice = algorithm.choose(candidates, CTX)
    assert choice.backend is cheap
    assert "latency target and min quality relaxed" in choice.reason


def test_cost_aware_moves_to_free_backends_once_the_daily_budget_is_spent() -> None:
    cheap, mid, pricey = priced()
    free = backend("free", per_request_usd=0.0, quality=0.1)  # free but below min quality
    candidates = [free, cheap, mid, pricey]
    algorithm = CostAware(CostSettings(daily_budget_usd=0.01, min_quality=0.5), seed=0)
    assert algorithm.choose(candidates, CTX).backend is cheap
    spent = 0.0
    while spent < 0.01:  # the router feeds each answer's cost through observe
        algorithm.observe(cheap, Observation(ok=True, latency_ms=400, cost_usd=0.001))
        spent += 0.001
    assert algorithm.budget.exhausted
    assert algorithm.budget.remaining() == 0.0
    choice = algorithm.choose(candidates, CTX)
    assert choice.backend is free
    assert "budget exhausted" in choice.reason


def test_cost_aware_exhausted_budget_without_free_backend_takes_the_cheapest() -> None:
    cheap, mid, pricey = candidates = priced()
    cheap.quality = 0.1  # the cheapest fails quality, yet the budget wins
    algorithm = CostAware(CostSettings(daily_budget_usd=0.005, min_quality=0.5), seed=0)
    assert algorithm.choose(candidates, CTX).backend is mid
    algorithm.observe(pricey, Observation(ok=True, latency_ms=400, cost_usd=0.01))
    choice = algorithm.choose(candidates, CTX)
    assert choice.backend is cheap
    assert "budget exhausted" in choice.reason


def test_cost_aware_without_budget_is_never_exhausted() -> None:
    algorithm = CostAware(CostSettings(daily_budget_usd=None), seed=0)
    _cheap, _mid, pricey = candidates = priced()
    algorithm.observe(pricey, Observation(ok=True, latency_ms=1, cost_usd=1e6))
    assert not algorithm.budget.exhausted
    assert "budget" not in algorithm.choose(candidates, CTX).reason


def test_cost_aware_balances_equally_priced_backends_by_load() -> None:
    one, two = backend("one", per_request_usd=0.001), backend("two", per_request_usd=0.001)
    algorithm = CostAware(seed=5)
    share = shares(algorithm, [one, two], 2000)  # idle and identical: random among ties
    assert 0.4 < share["one"] < 0.6
    one.in_flight = 3
    assert algorithm.choose([one, two], CTX).backend is two


def test_daily_budget_tracks_one_utc_day() -> None:
    clock = [10 * SECONDS_PER_DAY + 3_600.0]
    budget = DailyBudget(1.0, clock=lambda: clock[0])
    budget.add(0.4)
    budget.add(-5.0)  # never a refund
    budget.add(float("nan"))
    assert budget.spent == pytest.approx(0.4)
    assert budget.remaining() == pytest.approx(0.6)
    budget.add(0.6)
    assert budget.exhausted
    clock[0] = 11 * SECONDS_PER_DAY - 1  # 23:59:59 UTC, same day
    assert budget.exhausted
    clock[0] = 11 * SECONDS_PER_DAY  # midnight UTC: a new day
    assert not budget.exhausted
    assert budget.remaining() == 1.0
    unlimited = DailyBudget(None)
    unlimited.add(1e9)
    assert not unlimited.exhausted and unlimited.remaining() == float("inf")
    with pytest.raises(ValueError, match="daily budget"):
        DailyBudget(0.0)


# -- quality_aware ----------------------------------------------------------------------


def measured(*qualities: float) -> list[BackendState]:
    states = [backend(f"q{i}", quality=q) for i, q in enumerate(qualities)]
    for state in states:
        state.calls = 20
    return states


def test_quality_aware_prefers_the_best_quality() -> None:
    candidates = measured(0.6, 0.9, 0.7)
    algorithm = QualityAware(exploration=0.0, seed=0)
    for _ in range(200):
        choice = algorithm.choose(candidates, CTX)
        assert choice.backend.name == "q1"
    assert choice.scores == {"q0": 0.6, "q1": 0.9, "q2": 0.7}


def test_quality_aware_explores_with_about_the_configured_probability() -> None:
    candidates = measured(0.6, 0.9, 0.7)
    algorithm = QualityAware(exploration=0.2, seed=7)
    n = 6000
    choices = [algorithm.choose(candidates, CTX) for _ in range(n)]
    explored = sum(c.reason.startswith("exploring") for c in choices) / n
    assert 0.17 < explored < 0.23
    best = sum(c.backend.name == "q1" for c in choices) / n
    assert 0.83 < best < 0.90  # 0.8 exploit + 0.2 / 3 explore
    for name in ("q0", "q2"):  # exploration reaches every candidate
        assert 0.04 < sum(c.backend.name == name for c in choices) / n < 0.10


def test_quality_aware_measures_unknown_backends_first_but_not_forever() -> None:
    q0, q1 = measured(0.6, 0.9)
    new = backend("new")
    algorithm = QualityAware(exploration=0.0, seed=0, probe_calls=3)
    choice = algorithm.choose([q0, q1, new], CTX)
    assert choice.backend is new
    assert "measuring" in choice.reason
    new.calls = 3  # tried three times, still no quality (it keeps failing)
    assert algorithm.choose([q0, q1, new], CTX).backend is q1


def test_quality_aware_says_when_no_backend_meets_the_minimum() -> None:
    candidates = measured(0.3, 0.4)
    choice = QualityAware(quality_min=0.5, exploration=0.0, seed=0).choose(candidates, CTX)
    assert choice.backend.name == "q1"
    assert "below minimum" in choice.reason


def test_quality_aware_is_reproducible_with_a_seed() -> None:
    candidates = measured(0.6, 0.9, 0.7)
    first = QualityAware(exploration=0.5, seed=11)
    second = QualityAware(exploration=0.5, seed=11)
    runs = [[a.choose(candidates, CTX).backend.name for _ in range(100)] for a in (first, second)]
    assert runs[0] == runs[1]


# -- geographic -------------------------------------------------------------------------


def regional() -> list[BackendState]:
    return [
        backend("fra", region="eu-central"),
        backend("dub", region="eu-west"),
        backend("iad", region="us-east"),
        backend("pdx", region="us-west"),
    ]


def test_geographic_prefers_the_requests_region() -> None:
    algorithm = Geographic("eu-central", seed=0)
    choice = algorithm.choose(regional(), RequestContext(region="us-east", now=NOW))
    assert choice.backend.name == "iad"
    assert "same region" in choice.reason
    assert choice.scores["iad"] == 0.0
    assert choice.scores["fra"] == DEFAULT_REGION_DISTANCES_MS[("eu-central", "us-east")]


def test_geographic_uses_the_routers_region_when_the_request_names_none() -> None:
    choice = Geographic("eu-west", seed=0).choose(regional(), CTX)
    assert choice.backend.name == "dub"


def test_geographic_falls_back_to_the_nearest_healthy_region() -> None:
    candidates = regional()
    fra, dub, _iad, pdx = candidates
    algorithm = Geographic("eu-central", seed=0)
    ctx = RequestContext(region="eu-north", now=NOW)  # no backend there
    choice = algorithm.choose(candidates, ctx)
    assert choice.backend is fra  # 25 ms, nearer than eu-west (40)
    assert "nearest region eu-central" in choice.reason
    fra.healthy = False
    assert algorithm.choose(candidates, ctx).backend is dub
    tokyo = RequestContext(region="ap-northeast", now=NOW)
    assert algorithm.choose(candidates, tokyo).backend is pdx


def test_geographic_counts_unknown_regions_as_farthest() -> None:
    mars, pdx = backend("mars", region="mars-1"), backend("pdx", region="us-west")
    algorithm = Geographic("eu-central", seed=0)
    choice = algorithm.choose([mars, pdx], CTX)
    assert choice.backend is pdx
    assert choice.scores["mars"] == UNKNOWN_DISTANCE_MS
    same = algorithm.choose([mars, pdx], RequestContext(region="mars-1", now=NOW))
    assert same.backend is mars


def test_geographic_balances_within_the_region_by_in_flight_per_weight() -> None:
    a, b = backend("a", weight=3.0), backend("b", weight=1.0)
    far = backend("far", region="ap-southeast")
    algorithm = Geographic("eu-central", seed=9)
    share = shares(algorithm, [a, b, far], 4000)
    assert share["far"] == 0.0
    assert 0.70 < share["a"] < 0.80  # idle: ties go by weight
    a.in_flight, b.in_flight = 4, 1  # 4/3 > 1/1
    assert algorithm.choose([a, b, far], CTX).backend is b
    a.in_flight = 2  # 2/3 < 1/1
    assert algorithm.choose([a, b, far], CTX).backend is a


def test_default_region_distances_cover_every_pair() -> None:
    regions = {r for pair in DEFAULT_REGION_DISTANCES_MS for r in pair}
    assert len(regions) == 7
    algorithm = Geographic()
    for x in regions:
        assert algorithm.distance(x, x) == 0.0
        for y in regions - {x}:
            assert 0 < algorithm.distance(x, y) == algorithm.distance(y, x) < UNKNOWN_DISTANCE_MS


# -- adaptive ---------------------------------------------------------------------------


def test_adaptive_reward_combines_success_latency_cost_and_quality() -> None:
    s = AdaptiveSettings(
        latency_weight=1.0,
        cost_weight=1.0,
        quality_weight=1.0,
        latency_target_ms=1000.0,
        cost_target_usd=0.01,
    )
    algorithm = Adaptive(s, seed=0)
    at_target = Observation(ok=True, latency_ms=1000.0, cost_usd=0.01, quality=0.5)
    assert algorithm.reward(at_target) == pytest.approx(0.5 * 0.5 * 0.5)
    no_quality = Observation(ok=True, latency_ms=1000.0, cost_usd=0.01, quality=None)
    assert algorithm.reward(no_quality) == pytest.approx(0.5 * 0.5)
    ten_times_slower = Observation(ok=True, latency_ms=10_000.0, cost_usd=0.01, quality=None)
    assert algorithm.reward(ten_times_slower) < algorithm.reward(no_quality) / 4
    assert algorithm.reward(Observation(ok=False, latency_ms=1.0)) == 0.0
    perfect = Observation(ok=True, latency_ms=0.0, cost_usd=0.0, quality=1.0)
    assert algorithm.reward(perfect) == pytest.approx(1.0)


def run_adaptive(seed: int) -> list[str]:
    """3,000 requests: `a` is the fastest, fails from request 1,000 to 2,000, recovers."""
    candidates = [backend("a"), backend("b"), backend("c")]
    algorithm = Adaptive(AdaptiveSettings(), seed=seed)
    picks = []
    for step in range(3000):
        choice = algorithm.choose(candidates, RequestContext(now=float(step)))
        name = choice.backend.name
        picks.append(name)
        if name == "a":
            observation = Observation(
                ok=not 1000 <= step < 2000, latency_ms=300.0, cost_usd=0.0005, quality=0.7
            )
        else:
            observation = Observation(ok=True, latency_ms=1500.0, cost_usd=0.0005, quality=0.7)
        algorithm.observe(choice.backend, observation)
    return picks


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_adaptive_moves_away_from_a_degraded_backend_and_back_after_recovery(seed: int) -> None:
    picks = run_adaptive(seed)

    def share_of_a(start: int, end: int) -> float:
        return picks[start:end].count("a") / (end - start)

    assert share_of_a(500, 1000) > 0.5  # learned that `a` is best
    assert share_of_a(1200, 2000) < 0.10  # `a` fails: traffic moves away quickly
    assert share_of_a(2500, 3000) > 0.5  # `a` recovered: traffic comes back


def test_adaptive_ignores_failures_that_are_not_the_backends_fault() -> None:
    a = backend("a")
    algorithm = Adaptive(seed=0)
    algorithm.observe(a, Observation(ok=False, latency_ms=5.0, health_penalty=False))
    assert algorithm.posterior_mean("a") == 0.5
    algorithm.observe(a, Observation(ok=False, latency_ms=5.0))
    assert algorithm.posterior_mean("a") < 0.5


def test_adaptive_tries_a_backend_it_has_never_seen() -> None:
    known, new = backend("known"), backend("new")
    algorithm = Adaptive(seed=0)
    for _ in range(50):  # `known` is mediocre
        algorithm.observe(known, Observation(ok=True, latency_ms=4000.0, cost_usd=0.02))
    assert shares(algorithm, [known, new], 500)["new"] > 0.05


# -- custom -----------------------------------------------------------------------------


def custom_config(spec: str = fixtures.SPEC) -> ProductionLoadBalancingConfig:
    return ProductionLoadBalancingConfig(algorithm=AlgorithmName.CUSTOM, custom_algorithm=spec)


def test_custom_loads_a_class_and_passes_the_config() -> None:
    config = custom_config()
    algorithm = build_algorithm(AlgorithmName.CUSTOM, config)
    assert isinstance(algorithm, CustomAlgorithm)
    assert isinstance(algorithm.inner, fixtures.FewestCalls)
    assert algorithm.inner.config is config
    assert algorithm.name == "custom:fewest_calls"
    a, b = backend("a"), backend("b")
    choice = algorithm.choose([a, b], CTX)
    assert choice.backend is a
    algorithm.observe(a, Observation(ok=True, latency_ms=1.0))
    assert algorithm.choose([a, b], CTX).backend is b


def test_custom_instantiates_a_class_without_arguments() -> None:
    algorithm = load_custom_algorithm(
        "tests.fixtures_custom_algorithm:NoArguments", custom_config()
    )
    assert isinstance(algorithm, fixtures.NoArguments)
    assert algorithm.built


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ("nope:Nope", "cannot import module 'nope'"),
        ("json:nothing", "module 'json' has no attribute 'nothing'"),
        ("json:dumps", "'dumps' is a function, not a class"),
        ("no-colon", "must have the form 'module:Class'"),
        ("json:", "must have the form 'module:Class'"),
        ("tests.fixtures_custom_algorithm:NoObserve", "lacks method(s) observe"),
        ("tests.fixtures_custom_algorithm:NoName", "attribute 'name'"),
        ("tests.fixtures_custom_algorithm:BrokenConstructor", "missing model file"),
    ],
)
def test_custom_gives_a_clear_error_naming_the_string(spec: str, problem: str) -> None:
    with pytest.raises(ValueError) as caught:
        build_algorithm(AlgorithmName.CUSTOM, custom_config(spec))
    message = str(caught.value)
    assert repr(spec) in message
    assert problem in message


def test_custom_without_a_string_is_refused() -> None:
    with pytest.raises(ValueError, match="custom_algorithm"):
        build_algorithm(AlgorithmName.CUSTOM, ProductionLoadBalancingConfig())


def test_custom_pick_outside_the_candidates_falls_back_to_a_candidate() -> None:
    algorithm = build_algorithm(
        AlgorithmName.CUSTOM, custom_config("tests.fixtures_custom_algorithm:Rogue")
    )
    a = backend("a")
    choice = algorithm.choose([a], CTX)
    assert choice.backend is a
    assert "not a candidate" in choice.reason


# -- every algorithm --------------------------------------------------------------------


@pytest.mark.parametrize("name", list(AlgorithmName))
def test_every_algorithm_name_can_be_built_and_keeps_the_contract(name: AlgorithmName) -> None:
    config = ProductionLoadBalancingConfig(custom_algorithm=fixtures.SPEC)
    algorithm = build_algorithm(name, config, {"a": 1.0, "b": 2.0}, seed=1)
    assert isinstance(algorithm, Algorithm)
    assert isinstance(algorithm.name, str) and algorithm.name
    candidates = [
        backend("a", quality=0.8),
        backend("b", region="us-east"),
        backend("c", kind=BackendKind.PERPLEXITY),
    ]
    for step in range(50):
        choice = algorithm.choose(candidates, RequestContext(now=NOW + step))
        assert isinstance(choice, Choice)
        assert any(choice.backend is c for c in candidates)
        assert choice.reason
        assert set(choice.scores) <= {c.name for c in candidates}
        algorithm.observe(
            choice.backend, Observation(ok=step % 5 != 0, latency_ms=200.0, cost_usd=0.001)
        )


def test_a_custom_algorithm_that_raises_falls_back_and_logs_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A bug in the user's class must not fail the user's request: the first candidate
    serves, the reason says what was raised, and the traceback is logged once."""
    algorithm = build_algorithm(
        AlgorithmName.CUSTOM, custom_config("tests.fixtures_custom_algorithm:Crashing")
    )
    a, b = backend("a"), backend("b")
    with caplog.at_level("ERROR", logger="router.algorithms.custom"):
        for _ in range(3):
            choice = algorithm.choose([a, b], CTX)
            assert choice.backend is a
            assert "raised KeyError" in choice.reason and "fell back to a" in choice.reason
            algorithm.observe(a, Observation(ok=True, latency_ms=1.0))
    assert len(caplog.records) == 2  # choose's KeyError and observe's ZeroDivisionError
