"""The rules of `round_robin`, `least_connections` and `response_time`, as a user sees them.

Each test pins the backend a request goes to. Rules are checked on `BackendState`
objects like `test_algorithms.py` does; where the balancer takes part (unhealthy
backends, the charge for a failed attempt) requests go through `Balancer.route` over
`httpx.MockTransport`, as in `test_balancer.py`, with a fake clock that each backend
advances by its scripted latency: no sleeping and no timing assertions.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from collections.abc import Callable, Sequence

import httpx
import pytest

from router.algorithms.base import Algorithm, RequestContext
from router.algorithms.least_connections import LeastConnections
from router.algorithms.response_time import ResponseTime
from router.algorithms.round_robin import RoundRobin
from router.backend_state import BackendState, PeakEwma
from router.backends import BackendConfig, BackendKind
from router.balancer import Balancer, RouteOutcome
from router.classifier import KeywordClassifier
from router.health_policy import ConsecutiveFailures
from router.retry_budget import RetryBudget

NOW = 1_000.0
CTX = RequestContext(now=NOW)

GENERAL = KeywordClassifier().classify("What is the reference interval of plasma glycine?")
PATHWAY = KeywordClassifier().classify("Which enzymes act in the urea cycle?")
assert GENERAL.category == "general" and PATHWAY.category == "pathway_mechanism"


def backend(
    name: str,
    *,
    weight: float = 1.0,
    in_flight: int = 0,
    latency_ms: float | None = None,
) -> BackendState:
    state = BackendState(
        BackendConfig(
            name=name, kind=BackendKind.LIGHTRAG, base_url=f"http://{name}.test", weight=weight
        )
    )
    state.in_flight = in_flight
    if latency_ms is not None:
        state.latency = PeakEwma(latency_ms, now=NOW)
    return state


def picks(
    algorithm: Algorithm, candidates: Sequence[BackendState], n: int, ctx: RequestContext = CTX
) -> list[str]:
    return [algorithm.choose(candidates, ctx).backend.name for _ in range(n)]


def shares(algorithm: Algorithm, candidates: Sequence[BackendState], n: int) -> dict[str, float]:
    counts = Counter(picks(algorithm, candidates, n))
    return {b.name: counts[b.name] / n for b in candidates}


# -- balancer plumbing: scripted backends on a fake clock -------------------------------


class Clock:
    def __init__(self, start: float = NOW) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


Result = Callable[[], httpx.Response | Exception]


def answer(text: str = "fine") -> Result:
    return lambda: httpx.Response(200, json={"response": text})


def perplexity_answer() -> Result:
    return lambda: httpx.Response(200, json={"choices": [{"message": {"content": "px"}}]})


def refused() -> Result:
    return lambda: httpx.ConnectError("connection refused")


class Fleet:
    """Each backend takes its scripted seconds on the fake clock, then answers or fails."""

    def __init__(self, clock: Clock, script: dict[str, tuple[float, Result]]) -> None:
        self.clock = clock
        self.script = script
        self.calls: list[str] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        name = request.url.host.removesuffix(".test")
        self.calls.append(name)
        seconds, result = self.script[name]
        self.clock.now += seconds
        outcome = result()
        if isinstance(outcome, Exception):
            raise outcome
        return outcome


def config(name: str, kind: BackendKind = BackendKind.LIGHTRAG) -> BackendConfig:
    return BackendConfig(name=name, kind=kind, base_url=f"http://{name}.test")


def balancer(
    fleet: Fleet,
    backends: Sequence[BackendConfig],
    algorithm: Algorithm,
    *,
    max_attempts: int = 2,
) -> Balancer:
    """Ejection needs 1,000 consecutive failures here, so a backend that keeps failing
    stays a candidate: whatever keeps requests away from it is the algorithm's doing."""
    return Balancer(
        "production",
        backends,
        algorithm,
        httpx.AsyncClient(transport=httpx.MockTransport(fleet)),
        ConsecutiveFailures(1_000, rest_s=60.0),
        max_attempts=max_attempts,
        deadline_s=30.0,
        retry_budget=RetryBudget(1.0, 100),
        clock=fleet.clock,
    )


async def first_picks(b: Balancer, n: int, classification=GENERAL, gap_s: float = 1.0) -> list[str]:
    """The backend each of `n` requests, one second apart, went to first."""
    chosen = []
    for _ in range(n):
        outcome: RouteOutcome = await b.route("q?", classification)
        assert outcome.ok, outcome.failure
        chosen.append(outcome.attempts[0].backend)
        assert isinstance(b.clock, Clock)
        b.clock.now += gap_s
    return chosen


# -- round_robin ------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_round_robin_gives_each_backend_k_of_k_times_n_picks_in_rotation(n: int) -> None:
    candidates = [backend(f"b{i}") for i in range(n)]
    candidates[0].in_flight = 50  # load, weight and latency play no part
    candidates[-1].latency = PeakEwma(9_000, now=NOW)
    k = 4
    sequence = picks(RoundRobin(), candidates, k * n)
    assert sequence == [b.name for b in candidates] * k
    assert Counter(sequence) == {b.name: k for b in candidates}


async def test_round_robin_skips_an_unhealthy_backend_and_rotates_the_rest() -> None:
    clock = Clock()
    fleet = Fleet(clock, {name: (0.05, answer(name)) for name in "abc"})
    b = balancer(fleet, [config(n) for n in "abc"], RoundRobin())
    b.by_name["b"].healthy = False  # failed its active health check
    assert await first_picks(b, 6) == ["a", "c"] * 3
    assert "b" not in fleet.calls

    b.by_name["b"].healthy = True  # back: it rejoins the rotation
    sequence = await first_picks(b, 9)
    for start in range(len(sequence) - 2):  # every three consecutive picks: each once
        assert sorted(sequence[start : start + 3]) == ["a", "b", "c"]


def test_round_robin_backend_dropping_out_mid_rotation_costs_no_one_a_turn() -> None:
    a, b, c = backend("a"), backend("b"), backend("c")
    rr = RoundRobin()
    assert picks(rr, [a, b, c], 4) == ["a", "b", "c", "a"]
    # b is ejected: after `a` comes `c` (b skipped), then a, c, ... (today: a again).
    assert picks(rr, [a, c], 4) == ["c", "a", "c", "a"]


async def test_round_robin_rotates_pathway_questions_among_lightrag_backends() -> None:
    clock = Clock()
    fleet = Fleet(
        clock,
        {
            "lr1": (0.05, answer()),
            "lr2": (0.05, answer()),
            "px": (0.05, perplexity_answer()),
        },
    )
    b = balancer(
        fleet,
        [config("lr1"), config("lr2"), config("px", BackendKind.PERPLEXITY)],
        RoundRobin(),
    )
    pathway = []
    for _ in range(6):  # a pathway question, then a general one, and so on
        pathway += await first_picks(b, 1, PATHWAY)
        await first_picks(b, 1, GENERAL)
    assert Counter(pathway) == {"lr1": 3, "lr2": 3}


# -- least_connections ------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3])
def test_least_connections_scans_up_to_three_and_always_takes_the_fewest(n: int) -> None:
    algorithm = LeastConnections(seed=0)
    for loads in itertools.product(range(4), repeat=n):
        if loads.count(min(loads)) > 1:
            continue  # ties: next test
        candidates = [backend(f"b{i}", in_flight=x) for i, x in enumerate(loads)]
        fewest = f"b{loads.index(min(loads))}"
        for _ in range(5):  # deterministic: no randomness without a tie
            choice = algorithm.choose(candidates, CTX)
            assert choice.backend.name == fewest, loads
            assert "full scan" in choice.reason
            assert set(choice.scores) == {b.name for b in candidates}  # every one looked at


def test_least_connections_breaks_ties_at_random_among_the_fewest_only() -> None:
    a, b, c = backend("a", in_flight=1), backend("b", in_flight=1), backend("c", in_flight=2)
    share = shares(LeastConnections(seed=3), [a, b, c], 2_000)
    assert share["c"] == 0.0
    assert 0.4 < share["a"] < 0.6  # the two tied share the picks
    first = picks(LeastConnections(seed=3), [a, b, c], 50)
    assert first == picks(LeastConnections(seed=3), [a, b, c], 50)  # reproducible by seed


def test_least_connections_counts_in_flight_per_unit_of_weight() -> None:
    heavy = backend("heavy", weight=3.0, in_flight=2)  # 2/3 per unit of weight
    light = backend("light", weight=1.0, in_flight=1)  # 1/1
    drained = backend("drained", weight=0.0, in_flight=0)  # weight 0: never preferred
    assert set(picks(LeastConnections(seed=0), [heavy, light, drained], 20)) == {"heavy"}
    heavy.in_flight = 4  # 4/3 > 1
    assert set(picks(LeastConnections(seed=0), [heavy, light, drained], 20)) == {"light"}


def test_least_connections_switches_to_two_random_choices_above_three_backends() -> None:
    three = [backend(f"b{i}", in_flight=i) for i in range(3)]
    assert set(picks(LeastConnections(seed=1), three, 200)) == {"b0"}
    four = [backend(f"b{i}", in_flight=i) for i in range(4)]
    choice = LeastConnections(seed=1).choose(four, CTX)
    assert "power of two choices" in choice.reason
    # b0 is picked only when it is one of the two drawn: 2 of 4 backends, half the time.
    assert 0.44 < shares(LeastConnections(seed=1), four, 4_000)["b0"] < 0.56


def test_least_connections_two_choices_never_takes_the_busier_of_the_pair() -> None:
    """What P2C guarantees: two distinct backends are drawn and the less loaded of them
    is picked. So a backend strictly busier than all others is never picked, and the
    backend of rank r (0 = least loaded) among n with distinct loads gets
    P(drawn) * P(the other is busier) = 2/n * (n-1-r)/(n-1) of the picks:
    0.4, 0.3, 0.2, 0.1, 0 for n = 5. The least loaded is chosen most often, yet not
    always, which keeps every router from herding onto the same backend."""
    candidates = [backend(f"b{i}", in_flight=3 * i) for i in range(5)]
    algorithm = LeastConnections(seed=7)
    n = 5_000
    counts: Counter[str] = Counter()
    for _ in range(n):
        choice = algorithm.choose(candidates, CTX)
        assert len(choice.scores) == 2  # two distinct backends drawn
        assert choice.scores[choice.backend.name] == min(choice.scores.values())
        counts[choice.backend.name] += 1
    assert counts["b4"] == 0  # the single busiest: never
    share = {name: counts[name] / n for name in ("b0", "b1", "b2", "b3")}
    for name, expected in zip(share, (0.4, 0.3, 0.2, 0.1), strict=True):
        assert abs(share[name] - expected) < 0.04, share
    assert max(share, key=share.__getitem__) == "b0"


def test_least_connections_two_choices_picks_busiest_only_when_tied_pair_is_drawn() -> None:
    # Two backends tied at the top: picked only when both are drawn, 1 pair in C(4,2)=6.
    candidates = [
        backend("idle", in_flight=0),
        backend("some", in_flight=1),
        backend("busy1", in_flight=5),
        backend("busy2", in_flight=5),
    ]
    share = shares(LeastConnections(seed=11), candidates, 6_000)
    assert 0.13 < share["busy1"] + share["busy2"] < 0.20


async def test_least_connections_spreads_concurrent_requests_over_the_balancer() -> None:
    """Through the balancer, in-flight counts are the requests being answered right now:
    three held requests land on three different backends, and while a and b are busy
    the next one goes to the backend that just finished (c)."""
    gates = {name: asyncio.Event() for name in "abc"}
    arrived: list[str] = []
    arrival = asyncio.Event()

    async def held(request: httpx.Request) -> httpx.Response:
        name = request.url.host.removesuffix(".test")
        arrived.append(name)
        arrival.set()
        await gates[name].wait()
        gates[name].clear()
        return httpx.Response(200, json={"response": name})

    b = Balancer(
        "production",
        [config(n) for n in "abc"],
        LeastConnections(seed=5),
        httpx.AsyncClient(transport=httpx.MockTransport(held)),
        ConsecutiveFailures(1_000, rest_s=60.0),
        max_attempts=1,
        deadline_s=30.0,
    )

    async def start() -> asyncio.Task[RouteOutcome]:
        arrival.clear()
        task = asyncio.create_task(b.route("q?", GENERAL))
        await asyncio.wait_for(arrival.wait(), 5)  # the request reached its backend
        return task

    first = [await start() for _ in range(3)]
    assert sorted(arrived) == ["a", "b", "c"]
    gates["c"].set()
    await first[arrived.index("c")]
    fourth = await start()
    assert arrived[-1] == "c"
    for gate in gates.values():
        gate.set()
    await asyncio.gather(*first, fourth)


# -- response_time ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fast", "slow", "expected"),
    [
        # (latency ms, in flight, weight) of each: the lower latency x (in_flight + 1) wins
        ((100, 0, 1.0), (300, 0, 1.0), "fast"),  # 100 < 300
        ((100, 3, 1.0), (300, 0, 1.0), "slow"),  # 400 > 300: a fast backend that is busy
        ((100, 1, 1.0), (300, 0, 1.0), "fast"),  # 200 < 300
        ((100, 5, 3.0), (300, 0, 1.0), "fast"),  # 600 / 3 = 200 < 300: per unit of weight
    ],
)
def test_response_time_prefers_lowest_latency_times_load(
    fast: tuple[float, int, float], slow: tuple[float, int, float], expected: str
) -> None:
    candidates = [
        backend(name, latency_ms=ms, in_flight=load, weight=w)
        for name, (ms, load, w) in (("slow", slow), ("fast", fast))
    ]
    assert set(picks(ResponseTime(seed=0), candidates, 10)) == {expected}


def steady(name: str, ms: float) -> BackendState:
    """A backend with real samples of `ms`, the last one at NOW."""
    state = backend(name)
    state.latency = PeakEwma(500.0, now=NOW - 60)
    for t in range(-50, 1, 10):
        state.latency.observe(ms, NOW + t)
    return state


def _serve(algorithm: ResponseTime, fleet: dict[str, tuple[BackendState, float]], t: float) -> str:
    """One request at NOW + t: pick, and feed the pick its usual latency."""
    candidates = [state for state, _ in fleet.values()]
    picked = algorithm.choose(candidates, RequestContext(now=NOW + t)).backend.name
    state, ms = fleet[picked]
    state.latency.observe(ms, NOW + t)
    return picked


def test_response_time_avoids_a_latency_spike_at_once_and_returns_as_it_fades() -> None:
    usual, other = steady("usual", 100.0), steady("other", 300.0)
    algorithm = ResponseTime(seed=0)
    fleet = {"usual": (usual, 100.0), "other": (other, 300.0)}
    assert _serve(algorithm, fleet, 1) == "usual"
    usual.latency.observe(2_000.0, NOW + 2)  # one answer took 2 s ...
    assert _serve(algorithm, fleet, 2) == "other"  # peak sensitivity: avoided at once
    usual.latency.observe(100.0, NOW + 3)  # ... the next (a straggler) its usual 100 ms
    # The traffic goes to `other` (refreshing its estimate) while the spike fades
    # (tau = 10 s) toward 100 ms, then comes back.
    timeline = [_serve(algorithm, fleet, 3 + 0.5 * k) for k in range(240)]
    assert timeline[:4] == ["other"] * 4
    switch = timeline.index("usual")
    assert 5 < switch * 0.5 < 60  # tens of seconds: neither at once nor never
    assert timeline[switch:].count("usual") >= 0.8 * len(timeline[switch:])  # and it stays


def test_response_time_above_three_backends_never_takes_the_costlier_of_the_pair() -> None:
    candidates = [backend(f"b{i}", latency_ms=100.0 * (i + 1)) for i in range(5)]
    algorithm = ResponseTime(seed=4)
    counts: Counter[str] = Counter()
    for _ in range(2_000):
        choice = algorithm.choose(candidates, CTX)
        assert len(choice.scores) == 2
        assert choice.scores[choice.backend.name] == min(choice.scores.values())
        counts[choice.backend.name] += 1
    assert counts["b4"] == 0  # the slowest is never picked
    assert counts.most_common(1)[0][0] == "b0"


async def test_response_time_a_backend_failing_fast_does_not_look_fast() -> None:
    """`flaky` answers in 100 ms and is preferred over `steady` (300 ms); then it starts
    refusing connections in 1 ms. The balancer charges a failed attempt the time until
    the request's end, failover included (301 ms), so `flaky` stops being preferred
    although each of its failures took only 1 ms. Ejection is out of reach (1,000
    failures), so the latency charge alone moves the traffic."""
    clock = Clock()
    fleet = Fleet(clock, {"flaky": (0.1, answer()), "steady": (0.3, answer())})
    b = balancer(fleet, [config("flaky"), config("steady")], ResponseTime(seed=0))
    warm_up = await first_picks(b, 5)  # an untried backend looks free: it gets one probe
    assert warm_up[-3:] == ["flaky"] * 3 and warm_up.count("steady") <= 1

    fleet.script["flaky"] = (0.001, refused())
    fleet.calls.clear()
    assert await first_picks(b, 10) == ["flaky"] + ["steady"] * 9  # one failure is enough
    assert fleet.calls == ["flaky", "steady"] + ["steady"] * 9  # failed over, then avoided
    assert b.health_report()["flaky"]["available"] is True  # not ejected: avoided


async def test_response_time_a_fast_failure_without_failover_does_not_look_fast() -> None:
    """With no failover the 1 ms refusal is all the balancer can charge; it must not pull
    the estimate down, and the success rate divides the score."""
    clock = Clock()
    fleet = Fleet(clock, {"flaky": (0.001, refused()), "steady": (0.3, answer())})
    b = balancer(fleet, [config("flaky"), config("steady")], ResponseTime(seed=0), max_attempts=1)
    for _ in range(10):
        await b.route("q?", GENERAL)  # no failover: each request is one attempt
        clock.now += 1.0
    assert fleet.calls.count("steady") >= 8


def test_response_time_retries_an_idle_backend_after_a_slow_answer_eventually() -> None:
    usual, other = steady("usual", 100.0), steady("other", 300.0)
    usual.latency.observe(2_000.0, NOW + 1)  # one slow answer, then no traffic to it
    algorithm = ResponseTime(seed=0)
    fleet = {"usual": (usual, 100.0), "other": (other, 300.0)}
    picks_over_an_hour = [_serve(algorithm, fleet, 2 + t) for t in range(3_600)]
    assert "usual" in picks_over_an_hour


@pytest.mark.parametrize(
    "setback",
    [
        lambda s: s.latency.observe(5_000.0, NOW + 1),  # one very slow answer
        lambda s: s.latency.observe_failure(10_000.0, NOW + 1),  # a timeout and a detour
    ],
    ids=["slow answer", "failure"],
)
def test_response_time_a_backend_set_back_once_gets_its_traffic_back(setback) -> None:
    """A setback lifts the floor the estimate decays to; nothing but answers used to
    lower it, and an avoided backend gets none, so it stayed starved after recovering.
    The floor now relaxes toward the backend's best level over `recover_s` (60 s)."""
    usual, other = steady("usual", 100.0), steady("other", 300.0)
    setback(usual)
    algorithm = ResponseTime(seed=0)
    fleet = {"usual": (usual, 100.0), "other": (other, 300.0)}
    picks = [_serve(algorithm, fleet, 2 + t) for t in range(600)]
    assert picks[0] == "other"  # avoided at once
    assert picks[-60:].count("usual") == 60  # and back within ten minutes, for good


def test_response_time_an_idle_slow_backend_does_not_start_to_look_fast() -> None:
    """Decay goes toward the backend's own baseline, not toward zero: a backend that
    answers in 2 s is not probed just because nobody used it for an hour."""
    fast, slow = steady("fast", 100.0), steady("slow", 2_000.0)
    algorithm = ResponseTime(seed=0)
    fleet = {"fast": (fast, 100.0), "slow": (slow, 2_000.0)}
    assert "slow" not in [_serve(algorithm, fleet, 2 + t) for t in range(3_600)]


def test_weighted_round_robin_never_picks_a_drained_backend_when_the_set_changes() -> None:
    """When a backend leaves the candidates (ejected, or tried on a retry), the others'
    running scores can all be negative; a weight-0 backend's score of 0 then won."""
    from router.algorithms.weighted_round_robin import WeightedRoundRobin

    drained, a, c = backend("drained", weight=0.0), backend("a"), backend("c", weight=9.0)
    algorithm = WeightedRoundRobin()
    picks(algorithm, [drained, a, c], 5)
    assert picks(algorithm, [drained, a], 20) == ["a"] * 20
