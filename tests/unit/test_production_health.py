"""`ProductionHealth`: breaker + outlier ejection behind the `HealthPolicy` protocol."""

from __future__ import annotations

import json

import httpx

from router.algorithms.round_robin import RoundRobin
from router.backend_state import BackendState
from router.backends import BackendConfig, BackendKind
from router.balancer import Balancer
from router.classifier import EITHER, Classification
from router.failures import BackendFailure
from router.health_policy import HealthEvent, HealthPolicy, ProductionHealth
from router.production_config import CircuitBreakerSettings, OutlierSettings
from router.record import ErrorKind, EventKind

FAIL = BackendFailure(ErrorKind.SERVER_ERROR, "500", status=500)
CLIENT = BackendFailure(ErrorKind.CLIENT_ERROR, "400", status=400)
LIMITED = BackendFailure(ErrorKind.RATE_LIMITED, "429", status=429)

DESCRIBE_KEYS = [
    "breaker_state",
    "breaker_window_calls",
    "breaker_failure_rate",
    "breaker_slow_call_rate",
    "breaker_open_for_s",
    "breaker_probes_in_flight",
    "breaker_probes_completed",
    "breaker_times_opened",
    "breaker_reason",
    "ejected",
    "ejected_for_s",
    "ejections",
    "consecutive_failures",
    "outlier_window_calls",
    "outlier_failure_rate",
    "ejection_reason",
    "ejection_skipped",
]


def backend(name: str, kind: BackendKind = BackendKind.LIGHTRAG) -> BackendState:
    return BackendState(BackendConfig(name=name, kind=kind, base_url=f"http://{name}.test"))


def pool(n: int) -> list[BackendState]:
    return [backend(f"lightrag-{i}") for i in range(1, n + 1)]


def policy(
    breaker: dict[str, object] | None = None, outlier: dict[str, object] | None = None
) -> ProductionHealth:
    b: dict[str, object] = {"window_size": 10, "minimum_calls": 5, "open_wait_s": 30.0}
    o: dict[str, object] = {"consecutive_failures": 100, "base_ejection_s": 10.0}
    b.update(breaker or {})
    o.update(outlier or {})
    return ProductionHealth(CircuitBreakerSettings(**b), OutlierSettings(**o))  # type: ignore[arg-type]


def call(
    health: ProductionHealth,
    b: BackendState,
    members: list[BackendState],
    failure: BackendFailure | None,
    now: float,
    latency_ms: float = 100.0,
) -> HealthEvent | None:
    """One attempt the way the balancer makes it."""
    b.in_flight += 1
    health.on_start(b, now)
    b.in_flight -= 1
    return health.observe(b, members, failure, latency_ms, now)


def test_is_a_health_policy_and_allows_a_fresh_backend() -> None:
    health: HealthPolicy = policy()
    b = backend("lightrag-1")
    assert health.allows(b, 0.0)
    described = health.describe(b, 0.0)
    assert list(described) == DESCRIBE_KEYS
    json.dumps(described)  # JSON-friendly
    assert described["breaker_state"] == "closed"
    assert described["ejected"] is False


def test_breaker_opening_is_reported_with_its_numbers_and_blocks_the_backend() -> None:
    health, members = policy(), pool(3)
    b = members[1]
    events = [call(health, b, members, f, 1.0) for f in (None, None, FAIL, FAIL, FAIL)]
    assert events[:4] == [None] * 4
    opened = events[4]
    assert opened == HealthEvent(
        EventKind.BREAKER_OPENED,
        "lightrag-2",
        "lightrag-2 breaker opened: failure rate 60% over the last 5 calls >= 50%",
    )
    assert not health.allows(b, 1.0)
    d = health.describe(b, 11.0)
    assert d["breaker_state"] == "open"
    assert d["breaker_failure_rate"] == 0.6
    assert d["breaker_window_calls"] == 5
    assert d["breaker_open_for_s"] == 20.0
    assert d["breaker_reason"] == opened.message
    assert health.allows(members[0], 1.0)


def test_slow_calls_open_the_breaker() -> None:
    health, members = policy(), pool(2)
    b = members[0]
    events = [call(health, b, members, None, 0.0, latency_ms=5000.0) for _ in range(5)]
    assert events[-1] is not None
    assert events[-1].kind is EventKind.BREAKER_OPENED
    assert "slow-call rate 100%" in events[-1].message
    assert health.describe(b, 0.0)["breaker_slow_call_rate"] == 1.0


def test_half_open_probe_then_close_events_in_order() -> None:
    health, members = policy(breaker={"half_open_probes": 1}), pool(2)
    b = members[0]
    for _ in range(5):
        call(health, b, members, FAIL, 0.0)
    assert not health.allows(b, 29.0)
    assert health.allows(b, 30.0)  # turns half-open: queued until the next observe
    assert health.describe(b, 30.0)["breaker_state"] == "half_open"
    b.in_flight += 1
    health.on_start(b, 30.0)
    assert not health.allows(b, 30.0)  # the single probe is out
    assert health.describe(b, 30.0)["breaker_probes_in_flight"] == 1
    b.in_flight -= 1
    half_open = health.observe(b, members, None, 100.0, 31.0)
    assert half_open is not None
    assert half_open.kind is EventKind.BREAKER_HALF_OPEN
    closed = health.observe(members[1], members, None, 100.0, 31.0)  # next request, any backend
    assert closed is not None
    assert closed.kind is EventKind.BREAKER_CLOSED
    assert closed.backend == "lightrag-1"
    assert health.allows(b, 31.0)
    assert health.describe(b, 31.0)["breaker_state"] == "closed"


def test_cancelled_probe_does_not_hold_its_slot() -> None:
    health, members = policy(breaker={"half_open_probes": 1}), pool(2)
    b = members[0]
    for _ in range(5):
        call(health, b, members, FAIL, 0.0)
    assert health.allows(b, 30.0)
    b.in_flight += 1
    health.on_start(b, 30.0)
    assert not health.allows(b, 30.5)
    b.in_flight -= 1  # cancelled: the balancer never calls observe
    assert health.allows(b, 31.0)


def test_opening_beats_ejection_and_the_ejection_follows() -> None:
    health = policy(outlier={"consecutive_failures": 5})
    members = pool(3)
    b = members[0]
    events = [call(health, b, members, FAIL, 0.0) for _ in range(5)]
    assert [e.kind if e else None for e in events] == [None] * 4 + [EventKind.BREAKER_OPENED]
    assert b.ejections == 1  # both happened on the fifth failure
    following = health.observe(members[1], members, None, 100.0, 0.5)
    assert following is not None
    assert following.kind is EventKind.BACKEND_EJECTED
    assert following.message == "lightrag-1 ejected for 10s: 5 failures in a row (ejection #1)"
    assert health.observe(members[1], members, None, 100.0, 0.6) is None


def test_ejected_backend_is_not_allowed_and_returns_with_an_event() -> None:
    health = policy(outlier={"consecutive_failures": 3}, breaker={"minimum_calls": 10})
    members = pool(3)
    b = members[0]
    events = [call(health, b, members, FAIL, 0.0) for _ in range(3)]
    assert events[-1] is not None
    assert events[-1].kind is EventKind.BACKEND_EJECTED
    assert not health.allows(b, 9.9)
    d = health.describe(b, 4.0)
    assert d["ejected"] is True
    assert d["ejected_for_s"] == 6.0
    assert d["ejections"] == 1
    assert d["breaker_state"] == "closed"
    assert health.allows(b, 10.0)
    returned = health.observe(members[1], members, None, 100.0, 10.5)
    assert returned is not None
    assert returned.kind is EventKind.BACKEND_RETURNED
    assert returned.backend == "lightrag-1"
    assert health.describe(b, 10.5)["ejected"] is False


def test_skipped_ejection_of_the_last_backend_is_reported() -> None:
    health = policy(outlier={"consecutive_failures": 3}, breaker={"minimum_calls": 10})
    members = pool(1)
    b = members[0]
    events = [call(health, b, members, FAIL, 0.0) for _ in range(4)]
    kinds = [e.kind if e else None for e in events]
    assert kinds == [None, None, EventKind.BACKEND_UNHEALTHY, None]
    assert events[2] is not None
    assert "ejection skipped" in events[2].message
    assert health.allows(b, 0.0)
    assert (
        health.describe(b, 0.0)["ejection_skipped"] == "it is the last available lightrag backend"
    )


def test_a_peer_with_an_open_breaker_does_not_count_as_available() -> None:
    health = policy(
        outlier={"consecutive_failures": 5},
        breaker={"minimum_calls": 5, "failure_rate_threshold": 0.6},
    )
    members = pool(2)
    a, b = members
    for _ in range(5):
        call(health, a, members, None, 0.0)
    for _ in range(5):
        call(health, b, members, FAIL, 0.0)  # b: breaker open (and ejected)
    assert not health.allows(b, 1.0)
    events = [call(health, a, members, FAIL, 11.0) for _ in range(5)]
    about_a = [e.kind for e in events if e and e.backend == "lightrag-1"]
    assert about_a == [EventKind.BACKEND_UNHEALTHY]  # skipped: b is ejected-then-open
    assert a.ejected_until == 0.0


def test_client_errors_and_rate_limits_change_nothing() -> None:
    health, members = policy(outlier={"consecutive_failures": 3}), pool(2)
    b = members[0]
    for failure in (CLIENT, LIMITED) * 10:
        assert call(health, b, members, failure, 0.0) is None
    d = health.describe(b, 0.0)
    assert d["breaker_window_calls"] == 0
    assert d["outlier_window_calls"] == 0
    assert d["consecutive_failures"] == 0
    assert health.allows(b, 0.0)


def test_drain_events_returns_everything_most_important_first() -> None:
    health = policy(outlier={"consecutive_failures": 5})
    members = pool(3)
    a = members[0]
    for _ in range(5):
        call(health, a, members, FAIL, 0.0)  # returns the opening; the ejection waits
    assert health.allows(a, 30.0)  # half-open, and back from its 10 s ejection
    events = health.drain_events()
    assert [(e.kind, e.backend) for e in events] == [
        (EventKind.BACKEND_EJECTED, "lightrag-1"),
        (EventKind.BREAKER_HALF_OPEN, "lightrag-1"),
        (EventKind.BACKEND_RETURNED, "lightrag-1"),
    ]
    assert health.drain_events() == []
    assert health.observe(members[1], members, None, 100.0, 31.0) is None


async def test_through_the_balancer_a_failing_backend_is_cut_off() -> None:
    """Real attempts through `Balancer` with a fake clock: the failing backend's breaker
    opens, events reach the sink, and users keep getting answers from the healthy one."""
    now = [0.0]

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "lightrag-1.test":
            return httpx.Response(503, json={"detail": "down"})
        return httpx.Response(200, json={"response": "carnitine shuttle"})

    events: list[HealthEvent] = []
    health = policy(breaker={"minimum_calls": 3}, outlier={"consecutive_failures": 100})
    cfgs = [
        BackendConfig(
            name=f"lightrag-{i}", kind=BackendKind.LIGHTRAG, base_url=f"http://lightrag-{i}.test"
        )
        for i in (1, 2)
    ]
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        balancer = Balancer(
            "production",
            cfgs,
            RoundRobin(),
            client,
            health,
            max_attempts=2,
            deadline_s=30.0,
            on_event=events.append,
            clock=lambda: now[0],
        )
        classification = Classification("general", EITHER, None, 0.6, "any")
        for _ in range(10):
            outcome = await balancer.route("Which acylcarnitines rise?", classification)
            assert outcome.ok
            now[0] += 1.0
        assert [e.kind for e in events] == [EventKind.BREAKER_OPENED]
        report = balancer.health_report()
        assert report["lightrag-1"]["breaker_state"] == "open"
        assert report["lightrag-1"]["available"] is False
        assert report["lightrag-2"]["breaker_state"] == "closed"
        outcome = await balancer.route("Which acylcarnitines rise?", classification)
        assert [a.backend for a in outcome.attempts] == ["lightrag-2"]
