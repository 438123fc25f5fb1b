"""Failover, health and retry limits of one `Balancer`, over `httpx.MockTransport`.

A deterministic in-order algorithm keeps the picks predictable, so each test shows one
rule: which backend is tried next, what a failure costs its health, and when the
balancer stops trying.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence

import httpx
import pytest

from router import circuit_breaker
from router.algorithms.base import Choice, Observation, RequestContext
from router.backend_state import BackendState
from router.backends import BackendConfig, BackendKind
from router.balancer import Balancer
from router.classifier import KeywordClassifier
from router.health_policy import ConsecutiveFailures, HealthPolicy, ProductionHealth
from router.production_config import CircuitBreakerSettings, OutlierSettings
from router.record import ErrorKind
from router.retry_budget import RetryBudget

GENERAL = KeywordClassifier().classify("What is the reference interval of plasma glycine?")
PATHWAY = KeywordClassifier().classify("Which enzymes act in the urea cycle?")
assert GENERAL.category == "general" and PATHWAY.category == "pathway_mechanism"

Handler = Callable[[httpx.Request], Awaitable[httpx.Response]]


class InOrder:
    """Picks the first candidate in configuration order; scores are the positions."""

    name = "in_order"

    def choose(self, candidates: Sequence[BackendState], ctx: RequestContext) -> Choice:
        scores = {b.name: float(i) for i, b in enumerate(candidates)}
        return Choice(candidates[0], "first in order", scores)

    def observe(self, backend: BackendState, observation: Observation) -> None:
        return None


def lightrag(name: str) -> BackendConfig:
    return BackendConfig(name=name, kind=BackendKind.LIGHTRAG, base_url=f"http://{name}.test")


def perplexity(name: str) -> BackendConfig:
    return BackendConfig(name=name, kind=BackendKind.PERPLEXITY, base_url=f"http://{name}.test")


def ok(text: str = "fine") -> httpx.Response:
    return httpx.Response(200, json={"response": text})


class Fleet:
    """Per-backend scripted responses; records every call as (backend, request id)."""

    def __init__(self, behaviour: dict[str, Callable[[httpx.Request], object]]) -> None:
        self.behaviour = behaviour
        self.calls: list[tuple[str, str]] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        name = request.url.host.removesuffix(".test")
        self.calls.append((name, request.headers.get("x-request-id", "")))
        result = self.behaviour[name](request)
        if asyncio.iscoroutine(result):
            result = await result
        if isinstance(result, Exception):
            raise result
        assert isinstance(result, httpx.Response)
        return result

    def called(self) -> list[str]:
        return [name for name, _ in self.calls]


def balancer(
    fleet: Fleet,
    backends: Sequence[BackendConfig],
    *,
    max_attempts: int = 3,
    deadline_s: float = 10.0,
    budget: RetryBudget | None = None,
    threshold: int = 3,
    health: HealthPolicy | None = None,
    candidate_filter: Callable[[list[BackendState]], list[BackendState]] | None = None,
) -> Balancer:
    client = httpx.AsyncClient(transport=httpx.MockTransport(fleet))
    return Balancer(
        "production",
        backends,
        InOrder(),
        client,
        health or ConsecutiveFailures(threshold, rest_s=60.0),
        max_attempts=max_attempts,
        deadline_s=deadline_s,
        retry_budget=budget or RetryBudget(1.0, 100),
        candidate_filter=candidate_filter,
    )


async def route(b: Balancer, request_id: str = "r1", classification=GENERAL):
    return await b.route("q?", classification, headers={"X-Request-ID": request_id})


# -- failover -------------------------------------------------------------------------
async def test_failover_goes_to_the_next_untried_backend() -> None:
    fleet = Fleet({"a": lambda r: httpx.Response(503), "b": lambda r: ok("from b"), "c": ok})
    b = balancer(fleet, [lightrag("a"), lightrag("b"), lightrag("c")])
    outcome = await route(b)
    assert outcome.ok and outcome.answer is not None
    assert outcome.answer.text == "from b"
    assert fleet.called() == ["a", "b"]
    assert [a.error_kind for a in outcome.attempts] == [ErrorKind.SERVER_ERROR, None]
    assert outcome.explain()["stopped"] == "answered"


@pytest.mark.parametrize(
    "failure",
    [
        lambda r: httpx.ConnectError("refused"),
        lambda r: httpx.ReadTimeout("slow"),
        lambda r: httpx.Response(500),
        lambda r: httpx.Response(200, text="<html>"),
        lambda r: httpx.Response(429, headers={"Retry-After": "30"}),
    ],
    ids=["connect", "timeout", "500", "malformed", "429"],
)
async def test_every_retryable_failure_fails_over(failure: Callable) -> None:
    fleet = Fleet({"a": failure, "b": lambda r: ok()})
    outcome = await route(balancer(fleet, [lightrag("a"), lightrag("b")]))
    assert outcome.ok
    assert fleet.called() == ["a", "b"]


async def test_a_backend_is_never_tried_twice_for_one_request() -> None:
    fleet = Fleet({n: (lambda r: httpx.Response(500)) for n in "abc"})
    outcome = await route(balancer(fleet, [lightrag(n) for n in "abc"], max_attempts=10))
    assert not outcome.ok
    assert outcome.failure is not None and outcome.failure.kind is ErrorKind.SERVER_ERROR
    assert sorted(fleet.called()) == ["a", "b", "c"]
    assert outcome.explain()["stopped"] == "no untried backend available"


async def test_max_attempts_is_respected() -> None:
    fleet = Fleet({n: (lambda r: httpx.Response(500)) for n in "abcde"})
    outcome = await route(balancer(fleet, [lightrag(n) for n in "abcde"], max_attempts=2))
    assert fleet.called() == ["a", "b"]
    assert len(outcome.attempts) == 2
    assert outcome.explain()["stopped"] == "max attempts (2) reached"


async def test_failover_leaves_the_preferred_kind_only_when_it_is_exhausted() -> None:
    """A pathway question prefers LightRAG but may be answered by Perplexity: when every
    LightRAG fails, the user still gets an answer."""
    fleet = Fleet(
        {
            "lr1": lambda r: httpx.Response(500),
            "lr2": lambda r: httpx.Response(500),
            "px": lambda r: httpx.Response(
                200, json={"choices": [{"message": {"content": "from px"}}]}
            ),
        }
    )
    b = balancer(fleet, [perplexity("px"), lightrag("lr1"), lightrag("lr2")])
    outcome = await route(b, classification=PATHWAY)
    assert fleet.called() == ["lr1", "lr2", "px"]
    assert outcome.ok and outcome.answer is not None and outcome.answer.text == "from px"


# -- the caller's fault ----------------------------------------------------------------
@pytest.mark.parametrize("status", [400, 401, 422])
async def test_a_4xx_is_not_failed_over_and_costs_no_health(status: int) -> None:
    fleet = Fleet({"a": lambda r: httpx.Response(status), "b": lambda r: ok()})
    b = balancer(fleet, [lightrag("a"), lightrag("b")], threshold=3)
    for i in range(10):
        outcome = await route(b, f"r{i}")
        assert not outcome.ok
        assert outcome.failure is not None and outcome.failure.kind is ErrorKind.CLIENT_ERROR
        assert len(outcome.attempts) == 1
        assert outcome.explain()["stopped"] == "not retryable: client_error"
    assert set(fleet.called()) == {"a"}  # b never asked: it would refuse the same request
    a = b.by_name["a"]
    assert a.consecutive_failures == 0
    assert a.ejections == 0
    assert list(a.outcomes) == []  # no success-rate penalty either
    assert b.health_report()["a"]["available"] is True


async def test_server_errors_by_contrast_do_cost_health() -> None:
    fleet = Fleet({"a": lambda r: httpx.Response(500), "b": lambda r: ok()})
    b = balancer(fleet, [lightrag("a"), lightrag("b")], threshold=3)
    for i in range(3):
        await route(b, f"r{i}")
    assert b.by_name["a"].ejections == 1
    assert b.health_report()["a"]["available"] is False
    fleet.calls.clear()
    assert (await route(b, "after")).ok
    assert fleet.called() == ["b"]


# -- 429: unavailable until Retry-After, not unhealthy -------------------------------
async def test_429_marks_the_backend_unavailable_until_not_unhealthy() -> None:
    fleet = Fleet(
        {"a": lambda r: httpx.Response(429, headers={"Retry-After": "60"}), "b": lambda r: ok()}
    )
    b = balancer(fleet, [lightrag("a"), lightrag("b")], threshold=1)
    assert (await route(b, "first")).ok
    report = b.health_report()["a"]
    assert report["available"] is False
    assert 55 < report["rate_limited_for_s"] <= 60
    assert report["active_check_healthy"] is True
    assert report["ejected"] is False  # threshold=1: one health failure would have ejected it
    assert report["success_rate"] == 1.0
    fleet.calls.clear()
    for i in range(5):
        assert (await route(b, f"later-{i}")).ok
    assert fleet.called() == ["b"] * 5  # skipped, not hammered


async def test_the_legacy_arm_reports_a_rate_limited_backend_as_it_routes_to_it() -> None:
    """The legacy balancer ignores Retry-After when it routes (as the old router did);
    its health report must not call that backend unavailable (which marked the whole
    system degraded in legacy_only) while it keeps sending it requests."""
    fleet = Fleet({"a": lambda r: httpx.Response(429, headers={"Retry-After": "60"})})
    b = balancer(fleet, [lightrag("a")])
    b.honour_retry_after = False
    await route(b, "first")
    report = b.health_report()["a"]
    assert report["available"] is True and report["rate_limited_for_s"] > 55
    fleet.calls.clear()
    await route(b, "second")
    assert fleet.called() == ["a"]


async def test_a_short_retry_after_is_waited_for_when_no_other_backend_is_left() -> None:
    throttled_until = 0.0

    def limited(request: httpx.Request) -> httpx.Response:
        """Like a real rate limiter: 429 until the window it announced has passed."""
        nonlocal throttled_until
        if request.headers["x-request-id"] == "first" or time.monotonic() < throttled_until:
            throttled_until = time.monotonic() + 0.2
            return httpx.Response(429, headers={"Retry-After": "0.2"})
        return ok("after the wait")

    fleet = Fleet({"a": limited})
    b = balancer(fleet, [lightrag("a")])
    first = await route(b, "first")
    assert first.failure is not None and first.failure.kind is ErrorKind.RATE_LIMITED
    second = await route(b, "second")
    assert second.ok, second.failure
    assert len(second.attempts) == 1  # it waited instead of being refused again
    assert fleet.called() == ["a", "a"]


async def test_a_long_retry_after_fails_fast_without_calling_the_backend() -> None:
    fleet = Fleet({"a": lambda r: httpx.Response(429, headers={"Retry-After": "120"})})
    b = balancer(fleet, [lightrag("a")])
    await route(b, "first")
    outcome = await route(b, "second")
    assert outcome.failure is not None and outcome.failure.kind is ErrorKind.RATE_LIMITED
    assert outcome.attempts == []
    assert fleet.called() == ["a"]


# -- limits: budget, deadline ------------------------------------------------------------
def test_the_retry_budget_admits_its_share_of_requests_in_flight_exactly() -> None:
    """Envoy's rule: retries up to ratio x requests in flight (or the minimum); counting
    retries against their own limit admitted fewer than configured under mass failure."""
    budget = RetryBudget(0.1, 0)
    budget.requests_in_flight = 100
    admitted = sum(budget.try_acquire() for _ in range(20))
    assert (admitted, budget.denied) == (10, 10)
    floor = RetryBudget(0.1, 3)
    floor.requests_in_flight = 5
    assert sum(floor.try_acquire() for _ in range(5)) == 3


async def test_retry_budget_caps_concurrent_retries() -> None:
    """Mass failure: 60 concurrent requests, every first attempt fails. Retries in flight
    never exceed max(min_retries, ratio * requests in flight), and the rest are refused."""
    n, ratio, min_retries = 60, 0.1, 2
    seen: set[str] = set()
    retrying = 0
    peak = 0
    gate = asyncio.Event()

    async def failing_then_ok(request: httpx.Request) -> httpx.Response:
        nonlocal retrying, peak
        rid = request.headers["x-request-id"]
        if rid not in seen:
            seen.add(rid)
            if len(seen) == n:
                gate.set()
            await gate.wait()  # every request is in flight before any first attempt fails
            return httpx.Response(503)
        retrying += 1
        peak = max(peak, retrying)
        await asyncio.sleep(0.05)
        retrying -= 1
        return ok()

    fleet = Fleet({"a": failing_then_ok, "b": failing_then_ok, "c": failing_then_ok})
    budget = RetryBudget(ratio, min_retries)
    b = balancer(fleet, [lightrag(x) for x in "abc"], budget=budget)
    outcomes = await asyncio.wait_for(
        asyncio.gather(*(route(b, f"r{i}") for i in range(n))), timeout=20
    )
    limit = max(min_retries, ratio * n)
    assert 0 < peak <= limit
    retried = sum(1 for o in outcomes if len(o.attempts) > 1)
    assert budget.denied > 0
    assert retried + budget.denied == n
    denied = [o for o in outcomes if len(o.attempts) == 1]
    assert all(o.explain()["stopped"].startswith("retry budget exhausted") for o in denied)
    assert (budget.requests_in_flight, budget.retries_in_flight) == (0, 0)


async def test_an_isolated_failure_is_always_retried() -> None:
    fleet = Fleet({"a": lambda r: httpx.Response(503), "b": lambda r: ok()})
    budget = RetryBudget(0.0, 1)  # the minimum alone allows one retry at a time
    outcome = await route(balancer(fleet, [lightrag("a"), lightrag("b")], budget=budget))
    assert outcome.ok and len(outcome.attempts) == 2


async def test_the_request_deadline_stops_retries() -> None:
    async def slow_failure(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(0.25)
        return httpx.Response(500)

    fleet = Fleet({n: slow_failure for n in "abcdefgh"})
    b = balancer(fleet, [lightrag(n) for n in "abcdefgh"], max_attempts=8, deadline_s=1.0)
    outcome = await route(b)
    # At most 4 attempts fit in the deadline; the 8 allowed are never reached however
    # slow the machine is, and at least one retry happened.
    assert 2 <= len(outcome.attempts) <= 4
    assert outcome.failure is not None
    assert outcome.failure.kind in (ErrorKind.TIMEOUT, ErrorKind.SERVER_ERROR)


async def test_an_attempt_never_outlives_the_request_deadline() -> None:
    async def hang(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(30)
        return ok()

    async def quick(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(0.05)
        return ok()

    fleet = Fleet({"a": hang, "b": quick})
    b = balancer(fleet, [lightrag("a"), lightrag("b")], deadline_s=0.3)
    outcome = await asyncio.wait_for(route(b), timeout=5)
    assert outcome.failure is not None and outcome.failure.kind is ErrorKind.TIMEOUT
    assert outcome.attempts[0].backend == "a"
    assert outcome.attempts[0].error_kind is ErrorKind.TIMEOUT
    assert not outcome.ok  # no time was left to fail over


async def test_a_hung_backend_is_penalised_when_its_timeout_outlasts_the_deadline() -> None:
    """Backend timeout 30 s, request deadline 0.2 s: each first attempt times out at the
    deadline. That is the backend hanging, not the deadline cutting a late retry short,
    so it counts: after three, the backend is ejected and users reach the other one."""

    async def hang(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(30)
        return ok()

    fleet = Fleet({"a": hang, "b": lambda r: ok("answer")})
    b = balancer(fleet, [lightrag("a"), lightrag("b")], deadline_s=0.2, threshold=3)
    assert b.by_name["a"].config.timeout_s > 2 * 0.2
    for i in range(3):
        outcome = await asyncio.wait_for(route(b, f"r{i}"), timeout=5)
        assert not outcome.ok and outcome.failure is not None
        assert outcome.failure.kind is ErrorKind.TIMEOUT
    outcome = await route(b, "r3")
    assert outcome.ok and outcome.attempts[0].backend == "b"


@pytest.mark.parametrize(
    ("cancel_after_s", "slow_call_ms"), [(0.15, 100), (0.05, 2000)], ids=["slow", "quick"]
)
async def test_callers_who_give_up_on_a_hung_backend_open_its_breaker(
    cancel_after_s: float, slow_call_ms: float
) -> None:
    """A backend that hangs while every caller times out first never failed, so its
    breaker stayed closed and an algorithm blind to latency kept sending it users. A
    call cancelled after the slow-call threshold counts as slow; a quick cancel (a hedge,
    a client gone) says nothing about the backend."""

    async def hang(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(30)
        return ok()

    health = ProductionHealth(
        CircuitBreakerSettings(
            window_size=5, minimum_calls=5, open_wait_s=60.0, slow_call_ms=slow_call_ms
        ),
        OutlierSettings(consecutive_failures=100),
    )
    fleet = Fleet({"a": hang, "b": lambda r: ok("from b")})
    b = balancer(fleet, [lightrag("a"), lightrag("b")], health=health)  # always "a" first
    for i in range(5):
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(route(b, f"r{i}"), timeout=cancel_after_s)
    state = health.describe(b.states[0], time.monotonic())["breaker_state"]
    if cancel_after_s * 1000 > slow_call_ms:
        assert state == "open"
        outcome = await asyncio.wait_for(route(b, "r5"), timeout=5)
        assert outcome.ok and [a.backend for a in outcome.attempts] == ["b"]
    else:
        assert state == "closed"


# -- degraded --------------------------------------------------------------------------
async def test_degraded_mode_when_every_backend_is_ejected() -> None:
    """All ejected: try them anyway (an answer beats a certain error), and say so."""
    fleet = Fleet({"a": lambda r: ok("still here"), "b": lambda r: ok()})
    b = balancer(fleet, [lightrag("a"), lightrag("b")])
    for state in b.states:
        state.ejected_until = time.monotonic() + 60
    outcome = await route(b)
    assert outcome.ok
    assert outcome.degraded
    assert outcome.explain()["degraded"] is True


async def test_a_retry_never_degrades_to_an_ejected_backend() -> None:
    """Degrading is for a request that would otherwise get nothing; a retry after a
    failure on a usable backend must not go on to one health took out of rotation."""
    fleet = Fleet({"a": lambda r: ok("ejected"), "b": lambda r: httpx.Response(500)})
    b = balancer(fleet, [lightrag("a"), lightrag("b")])
    b.states[0].ejected_until = time.monotonic() + 60
    outcome = await route(b)
    assert fleet.called() == ["b"]
    assert outcome.failure is not None and outcome.failure.kind is ErrorKind.SERVER_ERROR
    assert not outcome.degraded


async def test_an_open_breaker_of_the_only_backend_lets_probes_through_after_a_second(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Just after a breaker opened its backend gets no call at all: requests fail at once
    (no backend) rather than each waiting on a backend known to be failing. But when no
    other backend could take a request, waiting out the whole open time (300 s migrated
    from a legacy config) failed every such user long after the backend was back: after
    `LAST_RESORT_AFTER_S` the request that would fail anyway is a half-open probe."""
    monkeypatch.setattr(circuit_breaker, "LAST_RESORT_AFTER_S", 0.2)
    health = ProductionHealth(
        CircuitBreakerSettings(
            window_size=5, minimum_calls=5, open_wait_s=300.0, half_open_probes=2
        ),
        OutlierSettings(consecutive_failures=100),
    )
    answers = {"a": httpx.Response(500)}
    fleet = Fleet({"a": lambda r: answers["a"]})
    b = balancer(fleet, [lightrag("a")], health=health)
    for i in range(5):
        await route(b, f"r{i}")
    assert health.describe(b.states[0], time.monotonic())["breaker_state"] == "open"
    calls = len(fleet.calls)
    outcome = await route(b, "while-open")
    assert len(fleet.calls) == calls
    assert outcome.failure is not None and outcome.failure.kind is ErrorKind.NO_BACKEND
    assert outcome.attempts == []

    await asyncio.sleep(0.25)
    answers["a"] = ok("back")
    probes = [await route(b, f"probe-{i}") for i in range(2)]
    assert all(o.ok for o in probes) and len(fleet.calls) == calls + 2
    assert health.describe(b.states[0], time.monotonic())["breaker_state"] == "closed"


async def test_a_candidate_filter_chooses_among_usable_backends() -> None:
    """The spent daily budget keeps only the cheapest backends: the cheapest that is up,
    not the cheapest overall while it is down."""
    fleet = Fleet({"a": lambda r: ok("down"), "b": lambda r: ok("up")})
    cheapest = lambda states: [min(states, key=lambda s: s.name)]  # noqa: E731
    b = balancer(fleet, [lightrag("a"), lightrag("b")], candidate_filter=cheapest)
    b.states[0].ejected_until = time.monotonic() + 60
    outcome = await route(b)
    assert outcome.ok and outcome.answer is not None and outcome.answer.text == "up"
    assert fleet.called() == ["b"] and not outcome.degraded


async def test_a_weight_of_zero_drains_a_backend_for_any_algorithm() -> None:
    """Weight 0 is how an operator drains a backend: no algorithm may pick it (this one
    always takes the first candidate), unless every candidate is drained."""
    fleet = Fleet({"a": lambda r: ok("drained"), "b": lambda r: ok("serving")})
    drained = lightrag("a").model_copy(update={"weight": 0.0})
    b = balancer(fleet, [drained, lightrag("b")])
    outcomes = [await route(b, f"r{i}") for i in range(5)]
    assert fleet.called() == ["b"] * 5 and all(o.ok for o in outcomes)
    fleet.calls.clear()
    everyone = balancer(fleet, [drained, lightrag("b").model_copy(update={"weight": 0.0})])
    assert (await route(everyone)).ok and fleet.called() == ["a"]


async def test_a_drained_backend_serves_when_every_weighted_one_is_down() -> None:
    """Drained (weight 0) but healthy beats weighted but ejected: the first attempt goes
    to the drained backend instead of failing or degrading to the ejected one."""
    fleet = Fleet({"a": lambda r: ok("ejected"), "b": lambda r: ok("drained")})
    b = balancer(fleet, [lightrag("a"), lightrag("b").model_copy(update={"weight": 0.0})])
    b.by_name["a"].ejected_until = time.monotonic() + 60
    outcome = await route(b)
    assert outcome.ok and fleet.called() == ["b"] and not outcome.degraded


async def test_no_backend_of_an_allowed_kind() -> None:
    recent = KeywordClassifier().classify("What is the latest guideline on newborn screening?")
    fleet = Fleet({"a": lambda r: ok()})
    outcome = await route(balancer(fleet, [lightrag("a")]), classification=recent)
    assert outcome.failure is not None and outcome.failure.kind is ErrorKind.NO_BACKEND
    assert fleet.calls == []


async def test_explanation_names_candidates_scores_and_reason() -> None:
    fleet = Fleet({"a": lambda r: ok(), "b": lambda r: ok()})
    outcome = await route(balancer(fleet, [lightrag("a"), lightrag("b")]))
    explanation = outcome.explain()
    assert explanation["candidate_scores"] == {"a": 0.0, "b": 1.0}
    assert explanation["reason"] == "first in order"
    assert Counter(a["backend"] for a in explanation["attempts"]) == {"a": 1}


async def test_draining_the_preferred_kind_moves_its_questions_to_the_other_kind() -> None:
    """Pathway questions prefer LightRAG but may go to Perplexity: with every LightRAG
    server drained (weight 0, e.g. for a reindex), Perplexity answers them."""
    answer = {"choices": [{"message": {"content": "live"}}]}
    fleet = Fleet(
        {"a": lambda r: ok(), "b": lambda r: ok(), "p": lambda r: httpx.Response(200, json=answer)}
    )
    drained = [lightrag(n).model_copy(update={"weight": 0.0}) for n in ("a", "b")]
    b = balancer(fleet, [*drained, perplexity("p")])
    for i in range(5):
        assert (await route(b, f"r{i}", classification=PATHWAY)).ok
    assert fleet.called() == ["p"] * 5
