"""Retry and failover of the production router, with every backend mocked by respx.

The object under test is `ProductionIntelligentQueryRouter` in `production_only` mode,
built as a service builds it: it owns its `httpx.AsyncClient`, and respx intercepts
that client's calls, one route per backend base URL. Round robin makes the first pick
of a fresh router the first configured backend, so every attempt order is known. Where
time matters (Retry-After, the request deadline) the production balancer's clock is a
manual one, so nothing sleeps.

Each test checks what a user or an operator would notice: the answer and which backend
gave it, the attempts in order, the recorded row, and the backends' health.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
import respx

from router import BackendConfig, BackendKind, ProductionFeatureFlags
from router import ProductionIntelligentQueryRouter as Router
from router.algorithms.names import AlgorithmName
from router.production_config import (
    CircuitBreakerSettings,
    OutlierSettings,
    ProductionLoadBalancingConfig,
    RetrySettings,
)
from router.record import RequestRecord
from router.recorder import NullRecorder
from router.result import RoutingResult

pytestmark = pytest.mark.timeout(10)

QUESTION = "What is the reference interval of plasma glycine in adults?"  # any backend kind
INSTANCE = "failover-1"
T0 = 1_000.0

#: One penalised failure opens the breaker and ejects the backend, so a failure that is
#: *not* charged (429, 4xx) shows as an untouched breaker rather than a quiet counter.
STRICT_BREAKER = CircuitBreakerSettings(window_size=1, minimum_calls=1)
STRICT_OUTLIER = OutlierSettings(consecutive_failures=1, window=1, minimum_calls=1)


def lightrag(name: str, **kw: Any) -> BackendConfig:
    return BackendConfig(name=name, kind=BackendKind.LIGHTRAG, base_url=f"http://{name}.test", **kw)


ABC = (lightrag("a"), lightrag("b"), lightrag("c"))


def ok(text: str) -> httpx.Response:
    return httpx.Response(200, json={"response": text})


class ManualClock:
    """Stands in for `time.monotonic` in the balancer: moves only when told."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Rows(NullRecorder):
    """Keeps the request rows in memory (events still go to the segment folder)."""

    def __init__(self, segments: Path, instance: str) -> None:
        super().__init__(segments, instance)
        self.rows: list[RequestRecord] = []

    def record(self, row: RequestRecord) -> None:
        self.rows.append(row)


@pytest.fixture
def mock() -> Iterator[respx.MockRouter]:
    with respx.mock(assert_all_called=False, assert_all_mocked=True) as router:
        yield router


MakeRouter = Callable[..., Router]


@pytest.fixture
async def make_router(tmp_path: Path) -> AsyncIterator[MakeRouter]:
    made: list[Router] = []

    def make(
        backends: Sequence[BackendConfig] = ABC,
        *,
        retry: RetrySettings | None = None,
        strict: bool = False,
        max_bytes: int = 2_000_000,
        clock: ManualClock | None = None,
        algorithm: AlgorithmName = AlgorithmName.ROUND_ROBIN,
    ) -> Router:
        flags = ProductionFeatureFlags(
            enabled=True,
            deployment_mode="production_only",
            traffic_percent=100,
            auto_failback=False,  # the failback guard is not under test here
            data_dir=tmp_path,
            instance_id=INSTANCE,
            control_poll_s=60,
        )
        config = ProductionLoadBalancingConfig(
            algorithm=algorithm,
            backends=tuple(backends),
            retry=retry or RetrySettings(),
            circuit_breaker=STRICT_BREAKER if strict else CircuitBreakerSettings(),
            outlier=STRICT_OUTLIER if strict else OutlierSettings(),
            max_response_bytes=max_bytes,
        )
        router = Router(
            backends=backends,
            health_checks=False,
            flags=flags,
            production_config=config,
            control_store=None,
            recorder=Rows(tmp_path / "segments", INSTANCE),
            seed=7,
        )
        if clock is not None:
            router.production.clock = clock
        made.append(router)
        return router

    yield make
    for router in made:
        await router.shutdown()


def script(mock: respx.MockRouter, **behaviour: Any) -> dict[str, respx.Route]:
    """One respx route per backend `name=...`: a response, an exception (class or
    instance), a list of those (one per call), or a side-effect function."""
    routes = {}
    for name, effect in behaviour.items():
        route = mock.post(f"http://{name}.test/query")
        if isinstance(effect, httpx.Response):
            route.mock(return_value=effect)
        else:
            route.mock(side_effect=effect)
        routes[name] = route
    return routes


async def ask(router: Router, request_id: str = "r1") -> RoutingResult:
    return await router.route_query(QUESTION, {"user_id": "u-1", "request_id": request_id})


def attempts(result: RoutingResult) -> list[tuple[str, str | None]]:
    """(backend, error kind) of every attempt, in order."""
    return [(a["backend"], a["error"]) for a in result.explanation["attempts"]]


def row(router: Router) -> RequestRecord:
    rows = router.recorder.rows  # type: ignore[attr-defined]
    return rows[-1]


def calls(routes: dict[str, respx.Route]) -> dict[str, int]:
    return {name: route.call_count for name, route in routes.items()}


def health(router: Router, name: str) -> dict[str, Any]:
    return router.get_health_status()["production"][name]


def assert_charged(router: Router, name: str) -> None:
    """`name` took one failure against its health: breaker window, outlier streak and
    success rate all saw it."""
    h = health(router, name)
    assert h["breaker_window_calls"] == 1 or h["breaker_state"] == "open", h
    assert h["breaker_failure_rate"] == 1.0, h
    assert h["success_rate"] < 1.0, h
    assert h["consecutive_failures"] == 1 or h["ejected"], h


def assert_not_charged(router: Router, name: str) -> None:
    """Nothing about `name`'s health changed: no breaker call, no outlier outcome."""
    h = health(router, name)
    assert h["breaker_state"] == "closed", h
    assert h["breaker_window_calls"] == 0, h
    assert h["breaker_times_opened"] == 0, h
    assert (h["ejected"], h["ejections"], h["consecutive_failures"]) == (False, 0, 0), h
    assert h["outlier_window_calls"] == 0, h
    assert h["success_rate"] == 1.0, h
    assert h["active_check_healthy"] is True, h


# -- 1. connect errors ------------------------------------------------------------------
@pytest.mark.parametrize(
    "error",
    [httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError],
    ids=["refused", "disconnected", "reset"],
)
async def test_a_connect_error_fails_over_to_an_untried_backend_and_costs_health(
    mock: respx.MockRouter, make_router: MakeRouter, error: type[Exception]
) -> None:
    routes = script(mock, a=error, b=ok("from b"), c=ok("from c"))
    router = make_router()
    result = await ask(router)

    assert (result.ok, result.answer, result.backend, result.arm) == (
        True,
        "from b",
        "b",
        "production",
    )
    assert result.attempts == 2
    assert attempts(result) == [("a", "connect"), ("b", None)]
    assert result.explanation["stopped"] == "answered"
    assert "failed over after 1 failed attempt(s)" in result.reasoning
    assert calls(routes) == {"a": 1, "b": 1, "c": 0}
    recorded = row(router)
    assert (recorded.backend, recorded.attempts, recorded.fallback_used) == ("b", 2, True)
    assert (recorded.outcome, recorded.error_kind, recorded.http_status) == ("ok", None, 200)

    assert_charged(router, "a")
    a = health(router, "a")
    assert (a["breaker_window_calls"], a["consecutive_failures"]) == (1, 1)
    assert (a["outlier_window_calls"], a["outlier_failure_rate"]) == (1, 1.0)
    b = health(router, "b")
    assert (b["breaker_window_calls"], b["breaker_failure_rate"], b["success_rate"]) == (
        1,
        0.0,
        1.0,
    )


# -- 2. timeouts ------------------------------------------------------------------------
ATTEMPT_TIMEOUT_S = 0.05


async def hang(request: httpx.Request) -> httpx.Response:
    await asyncio.sleep(30)  # cancelled by the attempt timeout long before
    return ok("too late")


@pytest.mark.parametrize(
    "slow", [httpx.ReadTimeout, httpx.ConnectTimeout, hang], ids=["read", "connect", "hangs"]
)
async def test_a_timeout_fails_over_within_the_attempt_timeout(
    mock: respx.MockRouter, make_router: MakeRouter, slow: Any
) -> None:
    routes = script(mock, a=slow, b=ok("from b"), c=ok("from c"))
    router = make_router([lightrag("a", timeout_s=ATTEMPT_TIMEOUT_S), lightrag("b"), lightrag("c")])
    result = await ask(router)

    assert (result.ok, result.answer, result.backend, result.attempts) == (True, "from b", "b", 2)
    assert attempts(result) == [("a", "timeout"), ("b", None)]
    assert calls(routes)["c"] == 0
    first = result.explanation["attempts"][0]["latency_ms"]
    assert first < ATTEMPT_TIMEOUT_S * 1000 + 450  # bounded by a's timeout, not by a
    if slow is hang:
        assert first >= ATTEMPT_TIMEOUT_S * 1000 * 0.9  # it really waited for a
    assert result.latency_ms < 2_000  # the user did not wait 30 s for the hanging backend
    assert (row(router).outcome, row(router).attempts) == ("ok", 2)
    assert_charged(router, "a")


# -- 3. 5xx -----------------------------------------------------------------------------
@pytest.mark.parametrize("status", [500, 502, 503, 504])
async def test_a_5xx_fails_over_and_the_broken_backend_is_avoided_afterwards(
    mock: respx.MockRouter, make_router: MakeRouter, status: int
) -> None:
    routes = script(
        mock,
        a=lambda r: httpx.Response(status),
        b=lambda r: ok("from b"),
        c=lambda r: ok("from c"),
    )
    router = make_router(strict=True)
    result = await ask(router)

    assert (result.ok, result.answer, result.backend, result.attempts) == (True, "from b", "b", 2)
    assert attempts(result) == [("a", "server_error"), ("b", None)]
    assert (row(router).outcome, row(router).http_status) == ("ok", 200)
    a = health(router, "a")
    assert (a["breaker_state"], a["available"]) == ("open", False)

    later = [await ask(router, f"later-{i}") for i in range(4)]
    assert all(r.ok and r.attempts == 1 for r in later)
    assert {r.backend for r in later} == {"b", "c"}
    assert calls(routes)["a"] == 1  # not asked again while its breaker is open


# -- 4. 429 with Retry-After ------------------------------------------------------------
async def test_a_429_fails_over_waits_out_retry_after_and_is_not_ill_health(
    mock: respx.MockRouter, make_router: MakeRouter
) -> None:
    clock = ManualClock()
    routes = script(
        mock,
        a=[httpx.Response(429, headers={"Retry-After": "30"}), ok("from a")],
        b=lambda r: ok("from b"),
    )
    router = make_router([lightrag("a"), lightrag("b")], strict=True, clock=clock)

    first = await ask(router, "first")
    assert (first.ok, first.answer, first.backend, first.attempts) == (True, "from b", "b", 2)
    assert attempts(first) == [("a", "rate_limited"), ("b", None)]
    recorded = row(router)
    assert (recorded.outcome, recorded.error_kind, recorded.fallback_used) == ("ok", None, True)

    a = health(router, "a")
    assert a["available"] is False
    assert a["rate_limited_for_s"] == 30.0
    # Strict settings: one penalised failure would have opened the breaker and ejected a.
    assert_not_charged(router, "a")

    # Round robin would alternate a and b; a is skipped while it asked us to wait.
    for seconds in (0.0, 10.0, 29.999):
        clock.now = T0 + seconds
        waiting = await ask(router, f"at-{seconds}")
        assert (waiting.backend, waiting.attempts) == ("b", 1)
    assert calls(routes)["a"] == 1

    clock.now = T0 + 30.0  # Retry-After has passed
    assert health(router, "a")["available"] is True
    back = await ask(router, "after")
    assert (back.ok, back.answer, back.backend, back.attempts) == (True, "from a", "a", 1)
    assert calls(routes)["a"] == 2
    assert health(router, "a")["breaker_state"] == "closed"


async def test_a_503_with_retry_after_is_left_alone_until_then(
    mock: respx.MockRouter, make_router: MakeRouter
) -> None:
    """Maintenance or overload announced with Retry-After: fail over, and do not ask that
    backend again before the time it gave. Unlike a 429 it is still a server error."""
    clock = ManualClock()
    routes = script(
        mock,
        a=[httpx.Response(503, headers={"Retry-After": "20"}), ok("from a")],
        b=lambda r: ok("from b"),
    )
    router = make_router([lightrag("a"), lightrag("b")], clock=clock)

    first = await ask(router, "first")
    assert (first.ok, first.backend, first.attempts) == (True, "b", 2)
    assert attempts(first) == [("a", "server_error"), ("b", None)]
    assert health(router, "a")["retry_after_503_for_s"] == 20.0
    assert health(router, "a")["rate_limited_for_s"] == 0.0
    for seconds in (0.0, 10.0, 19.999):
        clock.now = T0 + seconds
        assert (await ask(router, f"at-{seconds}")).backend == "b"
    assert calls(routes)["a"] == 1

    clock.now = T0 + 20.0
    back = await ask(router, "after")
    assert (back.answer, back.backend) == ("from a", "a")


async def test_a_503_retry_after_on_the_only_backend_is_an_outage_not_a_rate_limit(
    mock: respx.MockRouter, make_router: MakeRouter
) -> None:
    """While the only backend is out after a 503, requests fail as an outage: a rate
    limit is the caller's business and the failback guard ignores it; an outage is not."""
    clock = ManualClock()
    script(mock, a=[httpx.Response(503, headers={"Retry-After": "300"}), ok("from a")])
    router = make_router([lightrag("a")], clock=clock)
    await ask(router, "first")
    later = await ask(router, "second")
    assert (later.ok, later.outcome, later.attempts) == (False, "error", 0)
    assert row(router).error_kind == "no_backend"
    assert "503" in (later.error or "")


async def test_a_503_without_retry_after_may_be_asked_again_at_once(
    mock: respx.MockRouter, make_router: MakeRouter
) -> None:
    clock = ManualClock()
    routes = script(
        mock,
        a=[httpx.Response(503), ok("from a")],
        b=lambda r: ok("from b"),
    )
    router = make_router([lightrag("a"), lightrag("b")], clock=clock)
    await ask(router, "first")
    assert health(router, "a")["available"] is True
    await ask(router, "second")  # round robin comes back to a, which answers now
    assert calls(routes)["a"] == 2


async def test_when_every_backend_rate_limits_the_user_gets_rate_limited_not_an_outage(
    mock: respx.MockRouter, make_router: MakeRouter
) -> None:
    clock = ManualClock()
    limited = httpx.Response(429, headers={"Retry-After": "60"})
    routes = script(mock, a=limited, b=limited, c=limited)
    router = make_router(strict=True, clock=clock)

    result = await ask(router)
    assert (result.ok, result.outcome, result.attempts) == (False, "rate_limited", 3)
    assert attempts(result) == [("a", "rate_limited"), ("b", "rate_limited"), ("c", "rate_limited")]
    assert (row(router).error_kind, row(router).http_status) == ("rate_limited", 429)
    for name in "abc":
        assert_not_charged(router, name)

    # Too long to wait for (over max_retry_after_wait_s): refused at once, nobody called.
    again = await ask(router, "again")
    assert (again.outcome, again.attempts, again.backend) == ("rate_limited", 0, None)
    assert "Retry-After" in (again.error or "")
    assert calls(routes) == {"a": 1, "b": 1, "c": 1}


# -- 5. other 4xx: the caller's error ----------------------------------------------------
@pytest.mark.parametrize("status", [400, 404, 422])
async def test_a_4xx_is_the_callers_error_no_retry_no_failover_no_penalty(
    mock: respx.MockRouter, make_router: MakeRouter, status: int
) -> None:
    routes = script(mock, a=httpx.Response(status), b=ok("from b"), c=ok("from c"))
    router = make_router(strict=True)
    result = await ask(router)

    assert (result.ok, result.answer, result.backend) == (False, None, "a")
    assert (result.outcome, result.attempts) == ("rejected", 1)
    assert str(status) in (result.error or "")
    assert attempts(result) == [("a", "client_error")]
    assert result.explanation["stopped"] == "not retryable: client_error"
    assert calls(routes) == {"a": 1, "b": 0, "c": 0}  # b would refuse the same request
    recorded = row(router)
    assert (recorded.outcome, recorded.error_kind, recorded.http_status) == (
        "rejected",
        "client_error",
        status,
    )
    assert (recorded.attempts, recorded.fallback_used) == (1, False)
    assert_not_charged(router, "a")
    assert health(router, "a")["available"] is True


# -- 6. malformed and oversized bodies ----------------------------------------------------
MAX_BYTES = 1_000


async def chunks() -> AsyncIterator[bytes]:
    yield b'{"response": "'
    for _ in range(10):
        yield b"x" * 200  # no Content-Length: counted while reading
    yield b'"}'


BAD_BODIES: dict[str, tuple[Callable[[httpx.Request], httpx.Response], str]] = {
    "not_json": (lambda r: httpx.Response(200, text="<html>gateway</html>"), "malformed"),
    "wrong_shape": (lambda r: httpx.Response(200, json={"answer": "x"}), "malformed"),
    "text_not_a_string": (lambda r: httpx.Response(200, json={"response": 42}), "malformed"),
    "declared_too_big": (
        lambda r: httpx.Response(200, json={"response": "x" * (2 * MAX_BYTES)}),
        "oversized",
    ),
    "streamed_too_big": (lambda r: httpx.Response(200, content=chunks()), "oversized"),
}


@pytest.mark.parametrize("shape", list(BAD_BODIES))
async def test_a_malformed_or_oversized_body_fails_over_and_costs_health(
    mock: respx.MockRouter, make_router: MakeRouter, shape: str
) -> None:
    respond, kind = BAD_BODIES[shape]
    routes = script(mock, a=respond, b=ok("from b"), c=ok("from c"))
    router = make_router(max_bytes=MAX_BYTES)
    result = await ask(router)

    assert (result.ok, result.answer, result.backend, result.attempts) == (True, "from b", "b", 2)
    assert attempts(result) == [("a", kind), ("b", None)]
    assert calls(routes) == {"a": 1, "b": 1, "c": 0}
    assert (row(router).outcome, row(router).fallback_used) == ("ok", True)
    assert_charged(router, "a")


# -- 7. never the same backend twice ------------------------------------------------------
async def test_every_backend_failing_is_tried_once_each_then_a_typed_failure(
    mock: respx.MockRouter, make_router: MakeRouter
) -> None:
    routes = script(
        mock,
        a=lambda r: httpx.Response(200, text="not json"),
        b=httpx.ConnectError,
        c=lambda r: httpx.Response(503),
    )
    router = make_router(retry=RetrySettings(max_attempts=10))
    result = await ask(router)

    assert (result.ok, result.answer, result.outcome, result.attempts) == (False, None, "error", 3)
    assert attempts(result) == [("a", "malformed"), ("b", "connect"), ("c", "server_error")]
    assert result.explanation["stopped"] == "no untried backend available"
    assert calls(routes) == {"a": 1, "b": 1, "c": 1}
    recorded = row(router)
    assert (recorded.outcome, recorded.error_kind, recorded.http_status) == (
        "error",
        "server_error",
        503,
    )
    for name in "abc":
        assert_charged(router, name)


async def test_failover_wraps_around_the_rotation_without_repeating_a_backend(
    mock: respx.MockRouter, make_router: MakeRouter
) -> None:
    """The second request starts at b (round robin): b, c, then a — never b again,
    although seven more attempts were allowed."""
    routes = script(
        mock,
        a=[ok("from a"), httpx.Response(500)],
        b=lambda r: httpx.Response(500),
        c=lambda r: httpx.Response(500),
    )
    router = make_router(retry=RetrySettings(max_attempts=10))
    assert (await ask(router, "warm")).backend == "a"

    result = await ask(router, "second")
    assert attempts(result) == [("b", "server_error"), ("c", "server_error"), ("a", "server_error")]
    assert (result.outcome, result.attempts) == ("error", 3)
    assert calls(routes) == {"a": 2, "b": 1, "c": 1}


async def test_max_attempts_caps_failover(mock: respx.MockRouter, make_router: MakeRouter) -> None:
    backends = [lightrag(n) for n in "abcd"]
    routes = script(mock, **{n: (lambda r: httpx.Response(502)) for n in "abcd"})
    router = make_router(backends, retry=RetrySettings(max_attempts=2))
    result = await ask(router)

    assert attempts(result) == [("a", "server_error"), ("b", "server_error")]
    assert result.explanation["stopped"] == "max attempts (2) reached"
    assert (result.outcome, row(router).error_kind) == ("error", "server_error")
    assert calls(routes) == {"a": 1, "b": 1, "c": 0, "d": 0}


@pytest.mark.parametrize(
    "algorithm",
    [
        AlgorithmName.ROUND_ROBIN,
        AlgorithmName.WEIGHTED_ROUND_ROBIN,
        AlgorithmName.LEAST_CONNECTIONS,
        AlgorithmName.RESPONSE_TIME,
        AlgorithmName.HEALTH_AWARE,
    ],
)
async def test_no_algorithm_can_send_a_retry_to_a_backend_already_tried(
    mock: respx.MockRouter, make_router: MakeRouter, algorithm: AlgorithmName
) -> None:
    """The rule belongs to the balancer, not to the pick: whatever the algorithm (seeded),
    five failing backends get one attempt each."""
    names = "abcde"
    routes = script(mock, **{n: (lambda r: httpx.Response(503)) for n in names})
    router = make_router([lightrag(n) for n in names], retry=RetrySettings(max_attempts=10))
    result = await ask(router)

    tried = [backend for backend, _ in attempts(result)]
    assert sorted(tried) == list(names)  # each exactly once
    assert set(calls(routes).values()) == {1}
    assert (result.outcome, result.attempts) == ("error", 5)
    assert result.explanation["stopped"] == "no untried backend available"


# -- 8. the retry budget ------------------------------------------------------------------
async def test_no_retry_when_the_budget_allows_none(
    mock: respx.MockRouter, make_router: MakeRouter
) -> None:
    routes = script(mock, a=httpx.Response(503), b=ok("from b"), c=ok("from c"))
    router = make_router(retry=RetrySettings(budget_ratio=0.0, min_retries_in_flight=0))
    result = await ask(router)

    assert (result.ok, result.backend, result.outcome, result.attempts) == (False, "a", "error", 1)
    assert attempts(result) == [("a", "server_error")]
    assert result.explanation["stopped"] == "retry budget exhausted (0 retries in flight)"
    assert calls(routes) == {"a": 1, "b": 0, "c": 0}
    # The row keeps the failure the user got; the budget is named in the explanation.
    assert (row(router).error_kind, row(router).http_status) == ("server_error", 503)
    budget = router.production.retry_budget
    assert (budget.denied, budget.requests_in_flight, budget.retries_in_flight) == (1, 0, 0)


@pytest.mark.parametrize(
    ("ratio", "minimum"),
    [(0.0, 1), (0.5, 0)],
    ids=["minimum-of-one", "half-of-two-in-flight"],
)
async def test_a_second_concurrent_retry_is_refused_by_the_budget(
    mock: respx.MockRouter, make_router: MakeRouter, ratio: float, minimum: int
) -> None:
    """Two requests in flight, both first attempts fail. The budget allows one retry at a
    time (a minimum of one, or half of two in flight): r1 retries, r2 is refused while
    r1's retry runs, and r2's user gets its first failure, not a pile-on retry."""
    seen: dict[str, int] = {}
    r2_in_flight = asyncio.Event()
    r1_retrying = asyncio.Event()
    release = asyncio.Event()

    async def fleet(request: httpx.Request) -> httpx.Response:
        rid = request.headers["x-request-id"]
        seen[rid] = attempt = seen.get(rid, 0) + 1
        if attempt == 1 and rid == "r1":
            await r2_in_flight.wait()  # so two requests are in flight when r1 fails
            return httpx.Response(503)
        if attempt == 1:
            r2_in_flight.set()
            await r1_retrying.wait()  # r2 fails while r1's retry holds the budget
            return httpx.Response(503)
        r1_retrying.set()
        await release.wait()
        return ok(f"retry of {rid}")

    script(mock, a=fleet, b=fleet, c=fleet)
    router = make_router(retry=RetrySettings(budget_ratio=ratio, min_retries_in_flight=minimum))
    budget = router.production.retry_budget
    r1 = asyncio.create_task(ask(router, "r1"))
    r2 = asyncio.create_task(ask(router, "r2"))

    refused = await asyncio.wait_for(r2, timeout=5)
    assert (refused.ok, refused.outcome, refused.attempts) == (False, "error", 1)
    assert attempts(refused) == [(refused.backend, "server_error")]
    assert refused.explanation["stopped"] == "retry budget exhausted (1 retries in flight)"
    assert (budget.retries_in_flight, budget.denied) == (1, 1)

    release.set()
    retried = await asyncio.wait_for(r1, timeout=5)
    assert (retried.ok, retried.answer, retried.attempts) == (True, "retry of r1", 2)
    assert seen == {"r1": 2, "r2": 1}
    assert (budget.requests_in_flight, budget.retries_in_flight, budget.denied) == (0, 0, 1)


# -- 9. the request deadline --------------------------------------------------------------
DEADLINE_S = 5.0


@pytest.mark.parametrize("elapsed", [DEADLINE_S, DEADLINE_S + 1.0], ids=["at", "past"])
async def test_no_retry_is_started_once_the_request_deadline_has_passed(
    mock: respx.MockRouter, make_router: MakeRouter, elapsed: float
) -> None:
    clock = ManualClock()

    def slow_failure(request: httpx.Request) -> httpx.Response:
        clock.advance(elapsed)  # a took the whole deadline before failing
        return httpx.Response(503)

    routes = script(mock, a=slow_failure, b=ok("from b"), c=ok("from c"))
    router = make_router(retry=RetrySettings(deadline_s=DEADLINE_S), clock=clock)
    result = await ask(router)

    assert (result.ok, result.outcome, result.attempts) == (False, "timeout", 1)
    assert result.error == "request deadline passed"
    assert attempts(result) == [("a", "server_error")]
    assert result.explanation["stopped"] == "request deadline passed"
    assert calls(routes) == {"a": 1, "b": 0, "c": 0}
    # the user's failure is the deadline: no HTTP status, not a's 503 from before
    assert (row(router).error_kind, row(router).http_status) == ("timeout", None)


async def test_a_retry_the_deadline_cut_short_times_out_without_costing_health(
    mock: respx.MockRouter, make_router: MakeRouter
) -> None:
    """a fails after 4.95 s of a 5 s deadline; b gets 50 ms (its own timeout is 30 s)
    and cannot answer in time. The user gets a timeout; b is not charged for it: even
    under strict settings (one failure opens the breaker) it stays in service."""
    clock = ManualClock()

    def slow_failure(request: httpx.Request) -> httpx.Response:
        clock.advance(DEADLINE_S - 0.05)
        return httpx.Response(503)

    def too_late(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("no answer in the 50 ms left", request=request)

    script(mock, a=slow_failure, b=too_late)
    router = make_router(
        [lightrag("a"), lightrag("b")],
        retry=RetrySettings(deadline_s=DEADLINE_S),
        strict=True,
        clock=clock,
    )
    result = await ask(router)

    assert (result.ok, result.outcome) == (False, "timeout")
    assert attempts(result) == [("a", "server_error"), ("b", "timeout")]
    assert_charged(router, "a")
    assert_not_charged(router, "b")
    assert health(router, "b")["available"] is True


async def test_a_retry_after_of_a_year_is_cut_to_five_minutes(
    mock: respx.MockRouter, make_router: MakeRouter
) -> None:
    clock = ManualClock()
    routes = script(
        mock,
        a=[httpx.Response(429, headers={"Retry-After": "31536000"}), ok("from a")],
        b=lambda r: ok("from b"),
    )
    router = make_router([lightrag("a"), lightrag("b")], clock=clock)
    assert (await ask(router, "first")).backend == "b"
    assert health(router, "a")["rate_limited_for_s"] == 300.0
    clock.now = T0 + 300.0
    back = await ask(router, "later")
    assert (back.backend, back.answer) == ("a", "from a")
    assert calls(routes)["a"] == 2


async def test_refused_retries_are_counted_for_prometheus(
    mock: respx.MockRouter, make_router: MakeRouter
) -> None:
    script(mock, a=httpx.Response(503), b=httpx.Response(503), c=httpx.Response(503))
    router = make_router(retry=RetrySettings(budget_ratio=0.0, min_retries_in_flight=0))
    for i in range(3):  # each first attempt fails, and its retry is refused
        assert (await ask(router, f"r{i}")).attempts == 1
    registry = router.metrics.registry
    denied = registry.get_sample_value("router_retries_denied_total", {"arm": "production"})
    assert denied == 3.0


async def test_a_retry_gets_only_the_time_left_before_the_deadline(
    mock: respx.MockRouter, make_router: MakeRouter
) -> None:
    """Each attempt's HTTP timeout is min(backend timeout, time left): the first attempt
    gets the whole deadline (below the backend's 30 s), the retry only what a left."""
    clock = ManualClock()
    timeouts: dict[str, dict[str, float]] = {}

    def slow_failure(request: httpx.Request) -> httpx.Response:
        timeouts["a"] = request.extensions["timeout"]
        clock.advance(DEADLINE_S - 0.25)
        return httpx.Response(503)

    def answer(request: httpx.Request) -> httpx.Response:
        timeouts["b"] = request.extensions["timeout"]
        return ok("from b")

    routes = script(mock, a=slow_failure, b=answer)
    router = make_router(retry=RetrySettings(deadline_s=DEADLINE_S), clock=clock)
    result = await ask(router)

    assert (result.ok, result.answer, result.attempts) == (True, "from b", 2)
    assert timeouts["a"]["read"] == pytest.approx(DEADLINE_S)
    assert timeouts["b"]["read"] == pytest.approx(0.25)
    assert calls(routes) == {"a": 1, "b": 1}
