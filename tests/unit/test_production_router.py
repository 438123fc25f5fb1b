"""`ProductionIntelligentQueryRouter` as a service owner sees it: arms, config changes,
refusals, auto-failback, the drop-in surface and what lands on disk.

Backends are an `httpx.MockTransport`; the control store and segments live in tmp_path.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import json
import math
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from statistics import NormalDist
from typing import Any

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router import (
    BackendConfig,
    BackendKind,
    DeploymentMode,
    FileControlStore,
    GuardLimits,
    IntelligentQueryRouter,
    LoadBalancingConfig,
    ProductionFeatureFlags,
    ProductionIntelligentQueryRouter,
    RouterConfig,
)
from router.algorithms import AlgorithmName
from router.bucketing import bucket_of, in_production
from router.classifier import Classification
from router.control_store import Acknowledgement, atomic_write
from router.failback_guard import FailbackGuard, wilson_lower
from router.recorder import SegmentRecorder

KEY_ENV = "TEST_PPLX_KEY"
BACKENDS = [
    BackendConfig(name="lightrag-1", kind=BackendKind.LIGHTRAG, base_url="http://lightrag-1.test"),
    BackendConfig(name="lightrag-2", kind=BackendKind.LIGHTRAG, base_url="http://lightrag-2.test"),
    BackendConfig(
        name="perplexity-1",
        kind=BackendKind.PERPLEXITY,
        base_url="http://perplexity-1.test",
        api_key_env=KEY_ENV,
    ),
]
QUESTION = "What is the reference interval of plasma glycine in adults?"
RECENT = "What is the latest news on newborn screening this week?"  # Perplexity only
SALT = "rollout-v1"

Fault = Callable[[httpx.Request], "httpx.Response | Awaitable[httpx.Response]"]


class Backends:
    """Answers `arm|backend|n`, unless the request's arm has a fault; counts calls."""

    def __init__(self) -> None:
        self.faults: dict[str, Fault] = {}
        self.calls: list[tuple[str, str]] = []
        self.gate: asyncio.Event | None = None  # holds questions containing "slow"

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        backend = request.url.host.removesuffix(".test")
        arm = request.headers.get("x-router-arm", "")
        self.calls.append((backend, arm))
        if arm in self.faults:
            response = self.faults[arm](request)
            return await response if inspect.isawaitable(response) else response
        body = json.loads(request.content)
        query = body.get("query") or body["messages"][-1]["content"]
        if "slow" in query and self.gate is not None:
            await self.gate.wait()
        return answer(request, f"ANSWER {arm}|{backend}|{len(self.calls)}")


def answer(request: httpx.Request, text: str) -> httpx.Response:
    """A 200 in the API shape of the backend the request went to."""
    if request.url.host.startswith("perplexity"):
        return httpx.Response(
            200,
            json={
                "choices": [{"message": {"content": text}}],
                "usage": {"prompt_tokens": 12, "completion_tokens": 40},
                "citations": ["https://ref.example/1"],
            },
        )
    return httpx.Response(200, json={"response": text})


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, "test-key")


@pytest.fixture
def backends() -> Backends:
    return Backends()


def make_router(tmp_path: Path, backends: Backends, instance: str = "test-1", **flags_kw: Any):
    flags = ProductionFeatureFlags(
        enabled=True, data_dir=tmp_path, instance_id=instance, control_poll_s=60, **flags_kw
    )
    return ProductionIntelligentQueryRouter(
        backends=BACKENDS,
        transport=httpx.MockTransport(backends),
        health_checks=False,
        flags=flags,
        control_store=FileControlStore(tmp_path / "control"),
        recorder=SegmentRecorder(tmp_path / "segments", instance),
        seed=7,
    )


def publish(tmp_path: Path, version: int, mode: str, percent: float = 0, **kw: Any) -> None:
    FileControlStore(tmp_path / "control").publish(
        RouterConfig(version=version, mode=DeploymentMode(mode), traffic_percent=percent, **kw)
    )


async def started(tmp_path: Path, backends: Backends, version: int, mode: str, percent=0, **kw):
    """A router that has applied the published document `version`."""
    publish(tmp_path, version, mode, percent, **kw)
    router = await make_router(tmp_path, backends).start()
    assert router.config.version == version
    return router


def read_segments(tmp_path: Path, stream: str, instance: str = "test-1") -> list[dict[str, Any]]:
    files = sorted((tmp_path / "segments" / instance).glob(f"{stream}-*.parquet"))
    if not files:
        return []
    return pa.concat_tables([pq.read_table(f) for f in files]).to_pylist()


def production_guard(**kw: Any) -> GuardLimits:
    return GuardLimits(**{"min_requests": 10, "error_rate": 0.2, "p95_latency_ms": 10_000, **kw})


# -- modes and arms -------------------------------------------------------------------
async def test_legacy_only_serves_everyone_from_legacy(tmp_path: Path, backends: Backends) -> None:
    router = await started(tmp_path, backends, 1, "legacy_only")
    results = [await router.route_query(QUESTION, {"user_id": f"u{i}"}) for i in range(30)]
    await router.shutdown()
    assert {(r.arm, r.mode, r.config_version, r.outcome) for r in results} == {
        ("legacy", "legacy_only", 1, "ok")
    }
    assert {arm for _, arm in backends.calls} == {"legacy"}
    assert all(r.answer and r.answer.startswith("ANSWER legacy|") for r in results)


async def test_perplexity_citations_reach_the_caller(tmp_path: Path, backends: Backends) -> None:
    router = await started(tmp_path, backends, 1, "production_only", 100)
    recent = await router.route_query(RECENT)
    assert recent.backend == "perplexity-1"
    assert recent.metadata["citations"] == ["https://ref.example/1"]
    await router.shutdown()


async def test_production_only_serves_everyone_from_production(
    tmp_path: Path, backends: Backends
) -> None:
    router = await started(tmp_path, backends, 1, "production_only", 100)
    results = [await router.route_query(QUESTION, {"user_id": f"u{i}"}) for i in range(30)]
    await router.shutdown()
    assert {(r.arm, r.mode, r.outcome) for r in results} == {
        ("production", "production_only", "ok")
    }
    assert {r.algorithm for r in results} == {router.config.algorithm.value}


@pytest.mark.parametrize(("mode", "percent"), [("canary", 5), ("canary", 15), ("ab_test", 50)])
async def test_split_follows_the_sticky_bucket_of_each_user(
    tmp_path: Path, backends: Backends, mode: str, percent: float
) -> None:
    router = await started(tmp_path, backends, 1, mode, percent)
    arms: dict[str, set[str]] = {}
    for round_ in range(2):
        for i in range(300):
            user = f"user-{i}"
            result = await router.route_query(QUESTION, {"user_id": user, "round": round_})
            arms.setdefault(user, set()).add(result.arm)
    await router.shutdown()
    assert all(len(seen) == 1 for seen in arms.values())  # sticky: one arm per user
    for user, (arm,) in arms.items():
        expected = in_production(bucket_of(user, SALT), percent)
        assert arm == ("production" if expected else "legacy")
    share = sum(a == {"production"} for a in arms.values()) / len(arms)
    assert abs(share - percent / 100) < 0.08


async def test_raising_the_canary_never_moves_a_user_back(
    tmp_path: Path, backends: Backends
) -> None:
    router = await started(tmp_path, backends, 1, "canary", 5)
    users = [f"user-{i}" for i in range(400)]

    async def production_users() -> set[str]:
        return {
            u
            for u in users
            if (await router.route_query(QUESTION, {"user_id": u})).arm == "production"
        }

    at_5 = await production_users()
    publish(tmp_path, 2, "canary", 15)
    router.poll_control_store()
    at_15 = await production_users()
    publish(tmp_path, 3, "ab_test", 50)
    router.poll_control_store()
    at_50 = await production_users()
    await router.shutdown()
    assert at_5 and at_5 < at_15 < at_50


async def test_a_plans_salt_decides_who_is_in_the_canary(
    tmp_path: Path, backends: Backends
) -> None:
    """Every test used the default salt: bucketing that ignored it (or a cache keyed by
    user alone) would put the same users in every rollout's canary."""
    router = await started(tmp_path, backends, 1, "ab_test", 50, salt="plan-a")
    users = [f"user-{i}" for i in range(200)]

    async def arms() -> list[str]:
        return [(await router.route_query(QUESTION, {"user_id": u})).arm for u in users]

    under_a = await arms()
    publish(tmp_path, 2, "ab_test", 50, salt="plan-b")
    router.poll_control_store()
    under_b = await arms()
    await router.shutdown()
    for salt, seen in (("plan-a", under_a), ("plan-b", under_b)):
        expected = [
            "production" if in_production(bucket_of(u, salt), 50) else "legacy" for u in users
        ]
        assert seen == expected, salt
    assert under_a != under_b


async def test_without_a_user_the_session_keeps_the_arm(tmp_path: Path, backends: Backends) -> None:
    router = await started(tmp_path, backends, 1, "ab_test", 50)
    for s in range(20):
        arms = {(await router.route_query(QUESTION, {"session_id": f"s{s}"})).arm for _ in range(3)}
        assert len(arms) == 1
    await router.shutdown()


# -- configuration --------------------------------------------------------------------
async def test_a_new_config_does_not_drop_in_flight_requests(
    tmp_path: Path, backends: Backends
) -> None:
    backends.gate = asyncio.Event()
    router = await started(tmp_path, backends, 1, "legacy_only")
    slow = [
        asyncio.create_task(router.route_query(f"slow question {i}", {"user_id": f"u{i}"}))
        for i in range(8)
    ]
    for _ in range(500):  # until all eight are waiting inside a backend
        if len(backends.calls) == 8:
            break
        await asyncio.sleep(0.01)
    assert len(backends.calls) == 8
    publish(tmp_path, 2, "production_only", 100)
    router.poll_control_store()
    fresh = [await router.route_query(QUESTION, {"user_id": f"n{i}"}) for i in range(5)]
    backends.gate.set()
    held = await asyncio.wait_for(asyncio.gather(*slow), timeout=10)
    await router.shutdown()
    assert {(r.outcome, r.arm, r.config_version) for r in held} == {("ok", "legacy", 1)}
    assert {(r.outcome, r.arm, r.config_version) for r in fresh} == {("ok", "production", 2)}
    rows = read_segments(tmp_path, "requests")
    assert sorted(r["config_version"] for r in rows) == [1] * 8 + [2] * 5


async def test_a_request_reports_the_algorithm_it_was_routed_with(
    tmp_path: Path, backends: Backends
) -> None:
    """Swapping the algorithm mid-request must not relabel requests already running:
    their rows would otherwise credit the new algorithm with the old one's latency."""
    backends.gate = asyncio.Event()
    router = await started(tmp_path, backends, 1, "production_only", 100)
    assert router.config.algorithm.value == "least_connections"
    held = asyncio.create_task(router.route_query("a slow question", {"user_id": "u"}))
    for _ in range(500):
        if backends.calls:
            break
        await asyncio.sleep(0.01)
    publish(tmp_path, 2, "production_only", 100, algorithm="round_robin")
    router.poll_control_store()
    fresh = await router.route_query(QUESTION, {"user_id": "v"})
    backends.gate.set()
    old = await asyncio.wait_for(held, timeout=10)
    await router.shutdown()
    assert (old.config_version, old.algorithm) == (1, "least_connections")
    assert (fresh.config_version, fresh.algorithm) == (2, "round_robin")


INVALID_DOCUMENTS = {
    "not json": "{this is not json",
    "unknown mode": json.dumps({"version": 5, "mode": "turbo"}),
    "percent 150": json.dumps({"version": 5, "mode": "canary", "traffic_percent": 150}),
    "percent for shadow": json.dumps({"version": 5, "mode": "shadow", "traffic_percent": 5}),
    "negative weight": json.dumps(
        {"version": 5, "mode": "canary", "traffic_percent": 5, "legacy_weights": {"lightrag-1": -1}}
    ),
    "unknown backend weight": json.dumps(
        {"version": 5, "mode": "canary", "traffic_percent": 5, "legacy_weights": {"nope": 2}}
    ),
    "advanced algorithm not enabled": json.dumps(
        {"version": 5, "mode": "canary", "traffic_percent": 5, "algorithm": "cost_aware"}
    ),
    "unknown field": json.dumps({"version": 5, "mode": "canary", "traffic_percent": 5, "x": 1}),
    "older version": json.dumps({"version": 0, "mode": "production_only", "traffic_percent": 100}),
    # A hand-written time without its offset cannot be compared with the router's clock:
    # applied, it stopped every heartbeat (TypeError in the time-limit check).
    "published_at without a UTC offset": json.dumps(
        {"version": 5, "mode": "canary", "traffic_percent": 5, "published_at": "2026-12-07T10:09"}
    ),
    # Two publishers chose the same number: the applied document stays.
    "another document as v1": json.dumps(
        {"version": 1, "mode": "production_only", "traffic_percent": 100}
    ),
}


@pytest.mark.parametrize("text", INVALID_DOCUMENTS.values(), ids=INVALID_DOCUMENTS.keys())
async def test_an_invalid_document_is_refused_and_the_last_good_one_kept(
    tmp_path: Path, backends: Backends, text: str
) -> None:
    store = FileControlStore(tmp_path / "control")
    router = await started(tmp_path, backends, 1, "canary", 50, legacy_weights={"lightrag-1": 3})
    good = router.config
    atomic_write(store.config_path, text)
    router.poll_control_store()
    assert router.config == good
    assert router.legacy.by_name["lightrag-1"].weight == 3  # nothing half-applied
    results = [await router.route_query(QUESTION, {"user_id": f"u{i}"}) for i in range(20)]
    assert {r.config_version for r in results} == {1}
    assert {r.arm for r in results} == {"legacy", "production"}
    router.heartbeat()
    (ack,) = store.read_acks()
    assert ack.applied_version == 1
    assert ack.refused_reason
    assert ack.refused_version in (None, 0, 1, 5)
    # A good document later is applied and clears the refusal.
    publish(tmp_path, 6, "legacy_only")
    router.poll_control_store()
    router.heartbeat()
    (ack,) = store.read_acks()
    assert (ack.applied_version, ack.refused_reason) == (6, None)
    await router.shutdown()
    events = read_segments(tmp_path, "events")
    refused = [e for e in events if e["kind"] == "config_refused"]
    assert len(refused) == 1
    assert "keeping v1" in refused[0]["detail"]


async def test_a_host_with_prod_lb_enabled_false_stays_legacy_whatever_is_published(
    tmp_path: Path, backends: Backends
) -> None:
    """PROD_LB_ENABLED=false is the host's own switch ("forces legacy_only"): a rollout's
    canary document is refused on that host, said in its heartbeat, and every user keeps
    being served by legacy; a legacy_only document is still applied."""
    store = FileControlStore(tmp_path / "control")
    router = ProductionIntelligentQueryRouter(
        backends=BACKENDS,
        transport=httpx.MockTransport(backends),
        health_checks=False,
        flags=ProductionFeatureFlags(data_dir=tmp_path, instance_id="off-1", control_poll_s=60),
        control_store=store,
        recorder=SegmentRecorder(tmp_path / "segments", "off-1"),
    )
    publish(tmp_path, 1, "canary", 50)
    router.poll_control_store()
    results = [await router.route_query(QUESTION, {"user_id": f"u{i}"}) for i in range(20)]
    assert {r.arm for r in results} == {"legacy"}
    router.heartbeat()
    (ack,) = store.read_acks()
    assert (ack.applied_version, ack.refused_version) == (0, 1)
    assert "PROD_LB_ENABLED=false" in (ack.refused_reason or "")
    publish(tmp_path, 2, "legacy_only")
    router.poll_control_store()
    assert router.config.version == 2
    await router.shutdown()


def test_a_custom_algorithm_typo_stops_start_up_even_when_another_algorithm_runs_first(
    tmp_path: Path,
) -> None:
    """PROD_LB_CUSTOM_ALGORITHM is checked when the router starts, not when a rollout
    later switches to `custom` (and has its document refused on every instance)."""
    flags = ProductionFeatureFlags(
        enabled=True,
        data_dir=tmp_path,
        instance_id="typo",
        primary_algorithm="round_robin",
        custom_algorithm="no_such_module:Typo",
    )
    with pytest.raises(ValueError, match="cannot import module 'no_such_module'"):
        ProductionIntelligentQueryRouter(
            backends=BACKENDS, health_checks=False, flags=flags, control_store=None
        )


async def test_a_documents_breaker_thresholds_apply_and_a_document_without_restores_the_hosts(
    tmp_path: Path, backends: Backends
) -> None:
    """DESIGN: a RouterConfig carries breaker thresholds. A breaker keeps its calls when
    only thresholds change; a document without them gives the host's back."""
    from router.production_config import CircuitBreakerSettings

    tight = CircuitBreakerSettings(minimum_calls=2, open_wait_s=60)
    router = await started(
        tmp_path, backends, 1, "production_only", 100, guard=GuardLimits(enabled=False)
    )
    backends.faults["production"] = lambda r: httpx.Response(500)
    await router.route_query(QUESTION, {"user_id": "u1"})  # one failure per backend tried
    publish(tmp_path, 2, "production_only", 100, breaker=tight, guard=GuardLimits(enabled=False))
    router.poll_control_store()
    assert router.config.version == 2
    await router.route_query(QUESTION, {"user_id": "u2"})  # the second: over 2 calls, 100 %
    states = {n: b["breaker_state"] for n, b in router.get_health_status()["production"].items()}
    assert "open" in states.values()
    publish(tmp_path, 3, "production_only", 100, guard=GuardLimits(enabled=False))
    router.poll_control_store()
    assert router.production.health.breaker_settings == router.production_config.circuit_breaker
    assert '"breaker"' not in (tmp_path / "control" / "router_config.json").read_text()
    await router.shutdown()


async def test_an_operators_drain_outlives_the_next_document(
    tmp_path: Path, backends: Backends
) -> None:
    """A legacy caller drains a backend for maintenance with update_backend_weights; the
    next phase's document (absolute weights) put it back into service on production."""
    router = await started(tmp_path, backends, 1, "production_only", 100)
    router.update_backend_weights({"lightrag-1": 0})
    publish(tmp_path, 2, "production_only", 100, production_weights={"lightrag-2": 2.0})
    router.poll_control_store()
    assert router.config.version == 2
    for i in range(20):
        await router.route_query(QUESTION, {"user_id": f"u{i}"})
    assert ("lightrag-1", "production") not in backends.calls
    health = router.get_health_status()
    assert health["production"]["lightrag-1"]["weight"] == 0
    assert health["production"]["lightrag-2"]["weight"] == 2.0  # the document's, applied
    router.update_backend_weights({"lightrag-1": 1.0})  # back from maintenance
    publish(tmp_path, 3, "production_only", 100)
    router.poll_control_store()
    for i in range(20):
        await router.route_query(QUESTION, {"user_id": f"v{i}"})
    await router.shutdown()
    assert ("lightrag-1", "production") in backends.calls


async def test_heartbeat_carries_the_applied_version(tmp_path: Path, backends: Backends) -> None:
    store = FileControlStore(tmp_path / "control")
    router = await started(tmp_path, backends, 3, "canary", 5)
    await router.route_query(QUESTION, {"user_id": "u1"})
    router.heartbeat()
    (ack,) = store.read_acks()
    assert (ack.instance, ack.applied_version, ack.configured_mode, ack.routed) == (
        "test-1",
        3,
        DeploymentMode.CANARY,
        1,
    )
    publish(tmp_path, 4, "ab_test", 50)
    router.poll_control_store()
    await router.shutdown()  # the last heartbeat is written on the way out
    (ack,) = store.read_acks()
    assert (ack.applied_version, ack.effective_mode) == (4, DeploymentMode.AB_TEST)
    applied = [e for e in read_segments(tmp_path, "events") if e["kind"] == "config_applied"]
    assert [e["config_version"] for e in applied] == [3, 4]


async def test_a_router_polling_slowly_is_not_reported_gone_between_heartbeats(
    tmp_path: Path, backends: Backends
) -> None:
    """Liveness allowed 15 s whatever the poll (up to 60 s): a router polling every 20 s
    read as gone a quarter of the time, and ticks skipped their evaluations waiting."""
    from flows.control import ack_status

    store = FileControlStore(tmp_path / "control")
    router = await started(tmp_path, backends, 3, "canary", 5)  # polls every 60 s
    router.heartbeat()
    (ack,) = store.read_acks()
    assert ack.poll_s == 60
    later = datetime.now(UTC) + timedelta(seconds=100)  # 100 s without a heartbeat
    assert not ack.is_stale(later) and ack.is_stale(later + timedelta(seconds=90))
    assert ack_status(store, 3).applied == ["test-1"]
    one_second = ack.model_copy(update={"poll_s": 1.0})
    assert one_second.is_stale(datetime.now(UTC) + timedelta(seconds=16))
    await router.shutdown()


async def test_export_analytics_reads_a_naive_window_as_the_hosts_local_time(
    tmp_path: Path, backends: Backends, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The legacy router's callers pass `datetime.now() - timedelta(...)`, which is local
    time: read as UTC, the last five minutes were empty on a host east of UTC."""
    import time as clock

    monkeypatch.setenv("TZ", "Asia/Kolkata")  # UTC+05:30
    clock.tzset()
    try:
        router = await started(tmp_path, backends, 1, "legacy_only")
        for i in range(3):
            await router.route_query(QUESTION, {"user_id": f"u{i}"})
        recent = router.export_analytics(datetime.now() - timedelta(minutes=5))
        until_now = router.export_analytics(end_time=datetime.now())
        await router.shutdown()
    finally:
        monkeypatch.undo()
        clock.tzset()
    assert len(recent) == 3 and len(until_now) == 3


class SlowDiskStore(FileControlStore):
    """A control store on a stalled disk: the first ack write hangs until released."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.release = threading.Event()
        self.entered = threading.Event()
        self.released_in_time: bool | None = None

    def write_ack(self, ack: Acknowledgement) -> None:
        if self.released_in_time is None:
            self.entered.set()
            self.released_in_time = self.release.wait(timeout=5)
        super().write_ack(ack)


async def test_a_stalled_control_store_never_stalls_requests(
    tmp_path: Path, backends: Backends
) -> None:
    store = SlowDiskStore(tmp_path / "control")
    store.publish(RouterConfig(version=1, mode=DeploymentMode.AB_TEST, traffic_percent=50))
    router = ProductionIntelligentQueryRouter(
        backends=BACKENDS,
        transport=httpx.MockTransport(backends),
        health_checks=False,
        flags=ProductionFeatureFlags(enabled=True, data_dir=tmp_path, instance_id="test-1"),
        control_store=store,
        recorder=SegmentRecorder(tmp_path / "segments", "test-1"),
    )
    await router.start()  # the control loop's first heartbeat now hangs on the disk
    assert await asyncio.to_thread(store.entered.wait, 5)
    results = [await router.route_query(QUESTION, {"user_id": f"u{i}"}) for i in range(5)]
    store.release.set()  # only now, after five answers, does the disk come back
    await router.shutdown()
    assert {r.outcome for r in results} == {"ok"}
    assert store.released_in_time is True  # the loop was free while the write hung
    (ack,) = store.read_acks()
    assert (ack.applied_version, ack.routed) == (1, 5)  # the final ack, not the stale one


def latin1_document(version: int) -> bytes:
    """A document as a Latin-1 editor saves it: valid JSON, but not UTF-8."""
    config = RouterConfig(version=version, mode=DeploymentMode.AB_TEST, traffic_percent=50)
    return config.model_copy(update={"reason": "café"}).model_dump_json().encode("latin-1")


async def test_a_document_that_is_not_utf8_is_refused_not_fatal(
    tmp_path: Path, backends: Backends
) -> None:
    store = FileControlStore(tmp_path / "control")
    store.config_path.parent.mkdir(parents=True)
    store.config_path.write_bytes(latin1_document(1))
    router = await make_router(tmp_path, backends).start()  # boots on its initial config
    assert router.config.version == 0 and router.refused and router.refused[0] == 1
    publish(tmp_path, 2, "canary", 50)
    router.poll_control_store()
    assert router.config.version == 2
    store.config_path.write_bytes(latin1_document(3))  # while running
    router.poll_control_store()
    router.heartbeat()
    (ack,) = store.read_acks()
    assert (ack.applied_version, ack.refused_version) == (2, 3)
    assert ack.refused_reason and "unicode" in ack.refused_reason
    await router.shutdown()
    refused = [e for e in read_segments(tmp_path, "events") if e["kind"] == "config_refused"]
    assert [e["config_version"] for e in refused] == [1, 3]
    assert "keeping v2" in refused[1]["detail"]


class CountingStore(FileControlStore):
    """Signals each heartbeat written."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.acks = 0
        self.third_ack = threading.Event()

    def write_ack(self, ack: Acknowledgement) -> None:
        super().write_ack(ack)
        self.acks += 1
        if self.acks >= 3:
            self.third_ack.set()


async def test_heartbeats_go_on_when_documents_cannot_be_read_or_applied(
    tmp_path: Path, backends: Backends
) -> None:
    store = CountingStore(tmp_path / "control")
    store.publish(RouterConfig(version=1, mode=DeploymentMode.CANARY, traffic_percent=5))
    router = ProductionIntelligentQueryRouter(
        backends=BACKENDS,
        transport=httpx.MockTransport(backends),
        health_checks=False,
        flags=ProductionFeatureFlags(
            enabled=True, data_dir=tmp_path, instance_id="test-1", control_poll_s=0.01
        ),
        control_store=store,
        recorder=SegmentRecorder(tmp_path / "segments", "test-1"),
    )
    await router.start()

    def broken(found: object) -> None:
        raise RuntimeError("a bug while applying a document")

    router._consider = broken  # type: ignore[method-assign]
    assert await asyncio.to_thread(store.third_ack.wait, 5)
    await router.shutdown()


def test_heartbeats_of_instances_gone_for_a_day_are_deleted_at_the_next_publish(
    tmp_path: Path,
) -> None:
    """One file per process ever started (the default id is host and pid), never
    deleted: 20,000 of them made each read of the fleet take over a second."""
    import os

    from tests.conftest import heartbeat

    store = FileControlStore(tmp_path / "control")
    for name in ("gone-1", "quiet-1", "live-1"):
        store.write_ack(heartbeat(name, 1))
    day = 24 * 3600
    os.utime(store.acks_dir / "gone-1.json", (time.time() - day - 60,) * 2)
    os.utime(store.acks_dir / "quiet-1.json", (time.time() - day + 600,) * 2)
    store.publish(RouterConfig(version=2, mode=DeploymentMode.LEGACY_ONLY, traffic_percent=0))
    assert sorted(a.instance for a in store.read_acks()) == ["live-1", "quiet-1"]


def test_a_heartbeat_file_that_is_not_utf8_is_skipped(tmp_path: Path) -> None:
    store = FileControlStore(tmp_path / "control")
    now = datetime.now(UTC)
    good = Acknowledgement(
        instance="good-1",
        applied_version=1,
        effective_mode=DeploymentMode.CANARY,
        configured_mode=DeploymentMode.CANARY,
        traffic_percent=5,
        heartbeat_at=now,
        started_at=now,
    )
    store.write_ack(good)
    (store.acks_dir / "torn-1.json").write_bytes(b'{"instance": "caf\xe9"')
    assert [a.instance for a in store.read_acks()] == ["good-1"]


# -- auto-failback --------------------------------------------------------------------
async def test_guard_trips_on_error_rate_after_min_requests(
    tmp_path: Path, backends: Backends
) -> None:
    backends.faults["production"] = lambda r: httpx.Response(500)
    store = FileControlStore(tmp_path / "control")
    router = await started(tmp_path, backends, 1, "production_only", 100, guard=production_guard())
    for i in range(9):
        result = await router.route_query(QUESTION, {"user_id": f"u{i}"})
        assert (result.arm, result.outcome) == ("production", "error")
    assert router.effective_mode is DeploymentMode.PRODUCTION_ONLY  # 9 < min_requests
    await router.route_query(QUESTION, {"user_id": "u9"})
    assert router.effective_mode is DeploymentMode.LEGACY_ONLY  # at once, on the 10th
    after = await router.route_query(QUESTION, {"user_id": "u10"})
    assert (after.arm, after.mode, after.outcome) == ("legacy", "legacy_only", "ok")
    # The failback is reported without waiting for the control loop (written off the
    # request path, in a thread). The loop's first heartbeat, taken before the trip,
    # may land first: wait for the newer one, which replaces it.
    for _ in range(100):
        acks = store.read_acks()
        if acks and acks[0].effective_mode is DeploymentMode.LEGACY_ONLY:
            break
        await asyncio.sleep(0.02)
    (ack,) = store.read_acks()
    assert ack.effective_mode is DeploymentMode.LEGACY_ONLY
    assert ack.configured_mode is DeploymentMode.PRODUCTION_ONLY
    assert ack.failback_reason and "error rate" in ack.failback_reason
    # A newer config that does not re-arm keeps the failback: a flow that has not seen
    # it yet must not switch production back on.
    backends.faults.clear()
    publish(tmp_path, 2, "production_only", 100, guard=production_guard())
    router.poll_control_store()
    kept = await router.route_query(QUESTION, {"user_id": "u12"})
    assert kept.arm == "legacy" and router.guard.tripped
    # Only a document that re-arms (a new rollout's first phase) lets production serve.
    publish(tmp_path, 3, "production_only", 100, guard=production_guard(), rearm_guard=True)
    router.poll_control_store()
    again = await router.route_query(QUESTION, {"user_id": "u11"})
    assert (again.arm, again.config_version) == ("production", 3)
    # The breakers the failures opened still hold for their open wait: the request
    # fails at once instead of reaching a backend they protect.
    assert again.outcome == "error" and again.attempts == 0
    await router.shutdown()
    failbacks = [e for e in read_segments(tmp_path, "events") if e["kind"] == "failback"]
    assert len(failbacks) == 1
    assert "error rate 100.0% over the last 10 requests" in failbacks[0]["detail"]


async def test_guard_trips_on_p95_latency_not_on_one_outlier(
    tmp_path: Path, backends: Backends
) -> None:
    async def slow_when_asked(request: httpx.Request) -> httpx.Response:
        if b"slow" in request.content:
            await asyncio.sleep(0.6)
        return answer(request, "fine")

    # Fast answers are well under a millisecond; a 300 ms limit leaves a loaded machine
    # two orders of magnitude of room before a fast request could count as slow.
    backends.faults["production"] = slow_when_asked
    # confidence 0.5: the bare nearest-rank rule, to pin its exact boundary.
    guard = production_guard(min_requests=20, p95_latency_ms=300, error_rate=0.5, confidence=0.5)
    router = await started(tmp_path, backends, 1, "production_only", 100, guard=guard)
    for i in range(19):
        await router.route_query(QUESTION, {"user_id": i})
    # 1 slow in 20: the p95 (nearest rank: the 19th of 20) is still fast.
    first = await router.route_query("a slow question", {"user_id": 19})
    assert first.arm == "production" and not router.guard.tripped
    # 2 slow in 21: now the p95 is over the limit, and the guard trips on this request.
    await router.route_query("another slow question", {"user_id": 20})
    assert router.guard.tripped
    assert "p95 latency" in (router.guard.reason or "")
    after = await router.route_query(QUESTION, {"user_id": "next"})
    assert after.arm == "legacy"
    await router.shutdown()
    failbacks = [e for e in read_segments(tmp_path, "events") if e["kind"] == "failback"]
    assert len(failbacks) == 1
    assert "over the last 21 requests exceeds the hard limit 300 ms" in failbacks[0]["detail"]


@settings(max_examples=200, deadline=None)
@given(
    samples=st.lists(
        st.tuples(st.booleans(), st.sampled_from([5.0, 50.0, 100.0, 150.0])), max_size=80
    ),
    window=st.integers(1, 30),
    min_requests=st.integers(1, 30),
)
def test_guard_decides_as_the_window_statistics_say(
    samples: list[tuple[bool, float]], window: int, min_requests: int
) -> None:
    """The guard's running counts agree with recomputing error rate and nearest-rank p95
    over the last `window` requests, and it trips on the first request that crosses."""
    min_requests = min(min_requests, window)  # a larger one is refused (it never trips)
    limits = GuardLimits(
        error_rate=0.25,
        p95_latency_ms=100.0,
        min_requests=min_requests,
        window=window,
        confidence=0.5,  # the observed statistics alone
    )
    guard = FailbackGuard(limits)
    for i, (ok, latency) in enumerate(samples):
        recent = samples[max(0, i + 1 - window) : i + 1]
        n = len(recent)
        ranked = sorted(lat for _, lat in recent)
        p95 = ranked[math.ceil(0.95 * n) - 1] if n else 0.0
        error_rate = sum(not good for good, _ in recent) / n
        should = n >= min_requests and (error_rate > 0.25 or p95 > 100.0)
        reason = guard.observe(ok, latency)
        assert (reason is not None) == should, (i, recent, reason)
        if should:
            break


@pytest.mark.parametrize(("k", "n"), [(3, 20), (7, 20), (10, 10), (19, 200), (0, 5)])
def test_wilson_lower_bound_matches_scipy(k: int, n: int) -> None:
    from scipy.stats import binomtest

    expected = binomtest(k, n).proportion_ci(confidence_level=0.98, method="wilson").low
    assert wilson_lower(k, n, NormalDist().inv_cdf(0.99)) == pytest.approx(expected, abs=1e-12)


def test_guard_ignores_a_blip_but_trips_on_a_breakdown() -> None:
    """Checked on every request, a bare rate over 20 requests trips on noise: 3 timeouts
    in 20 on a busy machine is 15 %. The evidence rule waits for a real breakdown."""
    limits = GuardLimits(error_rate=0.10, min_requests=20)
    blip = FailbackGuard(limits)
    outcomes = [False] * 3 + [True] * 17  # 15 % observed, lower bound 4.4 %
    assert [blip.observe(ok, 50.0) for ok in outcomes] == [None] * 20
    assert blip.observe(True, 50.0) is None and not blip.tripped
    bare = FailbackGuard(limits.model_copy(update={"confidence": 0.5}))
    assert [bare.observe(ok, 50.0) for ok in outcomes][-1] is not None  # the old rule trips
    breakdown = FailbackGuard(limits)
    pattern = [False, True, True]  # 33 % errors, the demo's injected regression
    trips = [i for i in range(60) if breakdown.observe(pattern[i % 3], 50.0)]
    assert trips == [19]  # on the first request the window allows
    assert "99.99% lower bound" in (breakdown.reason or "")


def test_guard_checked_on_every_request_rarely_trips_below_its_limit() -> None:
    """The flow rolls back on any failback, and the window is re-tested on every request
    (thousands of looks a phase): the bound must hold across them. At the old 99 % level,
    an arm erring at 2 % against a 3 % limit tripped in about half of the phases."""
    import random

    limits = GuardLimits(error_rate=0.03, min_requests=30)
    rng = random.Random(11)
    tripped = 0
    for _ in range(20):
        guard = FailbackGuard(limits, clock=lambda: 0.0)
        if any(guard.observe(rng.random() >= 0.02, 50.0) for _ in range(30_000)):
            tripped += 1
    assert tripped <= 2, f"{tripped} of 20 phases failed back below the limit"


def test_guard_holds_when_legacy_breaks_down_as_badly() -> None:
    """A starved host or dead backends fail both arms: failing back to legacy would not
    help users, so a breach legacy shares (as badly or worse) does not trip the guard.
    A breach of production alone still does, and so does one without legacy traffic."""
    limits = GuardLimits(error_rate=0.10, p95_latency_ms=1_000.0, min_requests=20)
    pattern = [False, True, True]  # 33 % errors
    shared = FailbackGuard(limits)
    for i in range(120):
        shared.observe_legacy(i % 2 == 0, 4_000.0)  # legacy: 50 % errors, all slow
        assert shared.observe(pattern[i % 3], 4_000.0) is None
    assert not shared.tripped

    # legacy healthy (under the limit): nothing is shared, the breach trips as soon as
    # there are min_requests, whatever the split
    for legacy_share, trips_at in ((19, 19), (1, 19)):
        alone = FailbackGuard(limits)
        tripped = []
        for i in range(100):
            for _ in range(legacy_share):
                alone.observe_legacy(True, 100.0)
            if alone.observe(pattern[i % 3], 100.0):
                tripped.append(i)
        assert tripped == [trips_at] and "error rate" in (alone.reason or "")

    slow_alone = FailbackGuard(limits)
    for _ in range(60):
        slow_alone.observe_legacy(True, 100.0)  # legacy fast
        slow_alone.observe(True, 4_000.0)  # production slow: its own doing
    assert slow_alone.tripped and "p95" in (slow_alone.reason or "")

    no_legacy = FailbackGuard(limits)
    assert [i for i in range(60) if no_legacy.observe(pattern[i % 3], 100.0)] == [19]


def test_guard_compares_legacy_over_the_same_stretch_of_time() -> None:
    """Legacy carries fifty times production's traffic. After a stall that failed both
    arms, legacy's most recent thousands of requests are all healthy again while
    production's last 200 still include the stall: compared request for request,
    production would look worse and fail back. Compared over the same ten seconds,
    legacy did worse, and the guard holds."""
    limits = GuardLimits(error_rate=0.10, min_requests=20, window=200)
    now = [0.0]

    def run(guard: FailbackGuard, legacy_fails_in_stall: bool) -> list[int]:
        trips = []
        phases = [(20, False), (100, True), (100, False)]  # (production requests, stall)
        i = 0
        for count, stall in phases:
            for _ in range(count):
                for j in range(50):
                    guard.observe_legacy(not (stall and legacy_fails_in_stall and j % 2), 100.0)
                now[0] += 0.05  # production: 20 requests per second
                if guard.observe(not (stall and i % 5 < 2), 100.0):  # stall: 40 % errors
                    trips.append(i)
                i += 1
        return trips

    shared = FailbackGuard(limits, clock=lambda: now[0])
    assert run(shared, legacy_fails_in_stall=True) == []
    assert not shared.tripped

    # The same production stream beside a legacy arm that stayed healthy throughout.
    alone = FailbackGuard(limits, clock=lambda: now[0])
    assert run(alone, legacy_fails_in_stall=False)
    assert alone.tripped and "error rate" in (alone.reason or "")


def test_guard_keeps_bounded_legacy_history_whatever_the_traffic() -> None:
    """An hour of legacy at 100 requests per second is 3,600 per-second totals, not
    360,000 outcomes; a comparison beyond that hour uses the hour it has."""
    now = [0.0]
    guard = FailbackGuard(GuardLimits(), clock=lambda: now[0])
    for second in range(7_200):
        now[0] = float(second)
        ok = second >= 3_600 and second % 4 != 0  # first hour all failing, then 25 %
        for _ in range(100):
            guard.observe_legacy(ok, 100.0)
    assert len(guard.legacy.seconds) == 3_600
    assert guard.legacy.since(-math.inf)[:2] == (360_000, 0.25)  # the last hour only
    assert guard.legacy.since(7_000.5)[:2] == (20_000, 0.25)  # from second 7,000 on


async def test_legacy_requests_from_before_a_switch_do_not_excuse_production(
    tmp_path: Path, backends: Backends
) -> None:
    """Legacy requests still in flight when routers move to production_only finish
    failing afterwards. They describe the old config, not the new one: they must not
    count as "legacy breaks down as badly" and hold back a failing production arm."""
    router = await started(tmp_path, backends, 1, "legacy_only", guard=production_guard())
    backends.gate = asyncio.Event()

    async def legacy_fails_when_released(request: httpx.Request) -> httpx.Response:
        assert backends.gate is not None
        await backends.gate.wait()
        return httpx.Response(500)

    backends.faults["legacy"] = legacy_fails_when_released
    in_flight = [
        asyncio.create_task(router.route_query(f"slow {i}", {"user_id": f"u{i}"}))
        for i in range(30)
    ]
    await asyncio.sleep(0.05)
    publish(tmp_path, 2, "production_only", 100, guard=production_guard())
    router.poll_control_store()
    backends.gate.set()
    finished = await asyncio.gather(*in_flight)
    assert {(r.arm, r.ok, r.config_version) for r in finished} == {("legacy", False, 1)}

    backends.faults["production"] = lambda request: httpx.Response(500)
    for i in range(40):
        await router.route_query(QUESTION, {"user_id": f"p{i}"})
    assert router.guard.tripped and "error rate" in (router.guard.reason or "")
    await router.shutdown()


async def test_a_bug_in_the_production_path_fails_back_instead_of_raising(
    tmp_path: Path, backends: Backends
) -> None:
    """An unexpected exception on the production arm is a failed result for that user
    (the facade never raises where legacy would have answered) and counts for the guard."""

    def crash(request: httpx.Request) -> httpx.Response:
        raise RuntimeError("bug in the production path")

    backends.faults["production"] = crash
    router = await started(tmp_path, backends, 1, "canary", 50, guard=production_guard())
    results = [await router.route_query(QUESTION, {"user_id": f"u{i}"}) for i in range(60)]
    await router.shutdown()
    failed = [r for r in results if r.outcome != "ok"]
    assert failed and {(r.arm, r.outcome) for r in failed} == {("production", "error")}
    assert all("production balancer failed: RuntimeError" in (r.error or "") for r in failed)
    assert router.guard.tripped
    assert {(r.arm, r.outcome) for r in results[-10:]} == {("legacy", "ok")}


async def test_a_bug_in_the_legacy_path_is_a_failed_result_with_its_row(
    tmp_path: Path, backends: Backends
) -> None:
    """The legacy arm is wrapped like the production one: every request yields a result
    and a row, never an exception to the caller."""

    def crash(request: httpx.Request) -> httpx.Response:
        raise RuntimeError("bug in the legacy path")

    backends.faults["legacy"] = crash
    router = await started(tmp_path, backends, 1, "legacy_only")
    results = [await router.route_query(QUESTION, {"user_id": f"u{i}"}) for i in range(5)]
    await router.shutdown()
    assert {(r.arm, r.outcome) for r in results} == {("legacy", "error")}
    assert all("legacy balancer failed: RuntimeError" in (r.error or "") for r in results)
    rows = read_segments(tmp_path, "requests")
    assert sorted(r["request_id"] for r in rows) == sorted(r.request_id for r in results)
    assert {(r["arm"], r["error_kind"]) for r in rows} == {("legacy", "server_error")}


async def test_the_callers_4xx_does_not_count_against_production(
    tmp_path: Path, backends: Backends
) -> None:
    backends.faults["production"] = lambda r: httpx.Response(400)
    router = await started(tmp_path, backends, 1, "production_only", 100, guard=production_guard())
    results = [await router.route_query(QUESTION, {"user_id": f"u{i}"}) for i in range(30)]
    await router.shutdown()
    assert {(r.arm, r.outcome, r.attempts) for r in results} == {("production", "rejected", 1)}
    assert not router.guard.tripped


async def test_force_rollback(tmp_path: Path, backends: Backends) -> None:
    router = await started(tmp_path, backends, 1, "production_only", 100)
    assert router.force_rollback("on-call saw bad answers") is True
    assert router.force_rollback("again") is False  # already rolled back
    result = await router.route_query(QUESTION, {"user_id": "u1"})
    assert (result.arm, result.mode) == ("legacy", "legacy_only")
    status = router.get_system_health_status()
    assert status["mode"] == "legacy_only" and status["configured_mode"] == "production_only"
    assert "on-call saw bad answers" in status["failback_reason"]
    publish(tmp_path, 2, "production_only", 100)  # a routine document keeps the failback
    router.poll_control_store()
    assert (await router.route_query(QUESTION, {"user_id": "u1"})).arm == "legacy"
    publish(tmp_path, 3, "production_only", 100, rearm_guard=True)  # a new rollout re-arms
    router.poll_control_store()
    assert (await router.route_query(QUESTION, {"user_id": "u1"})).arm == "production"
    await router.shutdown()
    failbacks = [e for e in read_segments(tmp_path, "events") if e["kind"] == "failback"]
    assert [e["detail"] for e in failbacks] == ["forced: on-call saw bad answers"]


async def test_a_failback_of_the_last_rollout_ends_with_a_document_of_the_next(
    tmp_path: Path, backends: Backends
) -> None:
    """Only a new rollout's first document re-armed the guard: an instance that missed it
    (down, or its store unreachable, through a short first phase) stayed on legacy for
    the whole next rollout, on the previous rollout's failback."""
    router = await started(tmp_path, backends, 1, "canary", 50, rollout_id="r-a")
    router.force_rollback("bad answers in r-a")
    publish(tmp_path, 2, "canary", 50, rollout_id="r-a")  # the same rollout: kept
    router.poll_control_store()
    assert router.guard.tripped
    publish(tmp_path, 4, "ab_test", 50, rollout_id="r-b", phase="ab-50")  # r-b's 2nd phase
    router.poll_control_store()
    assert not router.guard.tripped
    assert router.effective_mode is DeploymentMode.AB_TEST
    await router.shutdown()


# -- the drop-in surface --------------------------------------------------------------
SURFACE = [
    "__init__",
    "route_query",
    "update_backend_weights",
    "update_load_balancing_weights",
    "export_analytics",
    "get_health_status",
    "get_system_health_status",
    "get_performance_report",
    "force_rollback",
    "shutdown",
]


@pytest.mark.parametrize("name", SURFACE)
def test_every_legacy_method_has_a_compatible_signature(name: str) -> None:
    """Every way of calling the legacy method binds to the production one the same way."""
    legacy = getattr(IntelligentQueryRouter, name)
    production = getattr(ProductionIntelligentQueryRouter, name)
    assert inspect.iscoroutinefunction(legacy) == inspect.iscoroutinefunction(production)
    old = list(inspect.signature(legacy).parameters.values())
    new = list(inspect.signature(production).parameters.values())
    assert [(p.name, p.kind) for p in new[: len(old)]] == [(p.name, p.kind) for p in old]
    for before, after in zip(old, new, strict=False):
        if before.default is not inspect.Parameter.empty:
            assert after.default is not inspect.Parameter.empty, f"{name}({after.name})"
    assert all(p.default is not inspect.Parameter.empty for p in new[len(old) :])


async def a_caller_written_for_the_legacy_router(router: IntelligentQueryRouter) -> dict:
    """What an existing service does with the legacy router, unchanged."""
    result = await router.route_query(
        "Which enzymes act in the urea cycle?", {"user_id": "u-123", "session_id": "s-1"}
    )
    assert result.routing_decision == "lightrag"
    assert 0 < result.confidence <= 1
    assert result.reasoning and all(isinstance(line, str) for line in result.reasoning)
    assert result.metadata["selected_backend"] in {"lightrag-1", "lightrag-2"}
    assert result.answer and result.ok
    assert result.attempts == 1 and result.latency_ms >= 0 and result.cost_usd > 0
    router.update_backend_weights({"lightrag-1": 2.0, "lightrag-2": 1.0})
    router.update_load_balancing_weights({"lightrag-1": 3.0})
    for i in range(5):
        await router.route_query(QUESTION, {"user_id": f"u{i}"})
    exported = router.export_analytics()
    assert len(exported) == 6 and all("answer" not in row for row in exported)
    health = router.get_health_status()
    assert set(health["legacy"]) == {"lightrag-1", "lightrag-2", "perplexity-1"}
    system = router.get_system_health_status()
    assert system["status"] == "healthy" and system["total_backends"] == 3
    report = router.get_performance_report()
    assert report["arms"]["legacy"]["requests"] == 6
    assert isinstance(router.force_rollback(), bool)
    await router.shutdown()
    return {"arm": result.arm, "mode": result.mode, "answer": result.answer}


@pytest.mark.parametrize("cls", [IntelligentQueryRouter, ProductionIntelligentQueryRouter])
async def test_the_production_router_is_a_drop_in_replacement(
    cls: type[IntelligentQueryRouter],
    backends: Backends,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PROD_LB_LIGHTRAG_URLS", "http://lightrag-1.test,http://lightrag-2.test")
    monkeypatch.setenv("PROD_LB_PERPLEXITY_URL", "http://perplexity-1.test")
    monkeypatch.setenv("PROD_LB_PERPLEXITY_API_KEY_ENV", KEY_ENV)
    monkeypatch.setenv("PROD_LB_DATA_DIR", str(tmp_path))
    router = cls(
        LoadBalancingConfig(strategy="weighted_round_robin"),
        transport=httpx.MockTransport(backends),
        health_checks=False,
    )
    seen = await a_caller_written_for_the_legacy_router(router)
    assert seen["arm"] == "legacy" and seen["mode"] == "legacy_only"


# -- explanations, analytics and rows ---------------------------------------------------
async def test_a_production_decision_explains_itself(tmp_path: Path, backends: Backends) -> None:
    router = await started(tmp_path, backends, 1, "production_only", 100)
    result = await router.route_query(QUESTION, {"user_id": "u1"})
    await router.shutdown()
    explanation = result.explanation
    assert set(explanation["candidate_scores"]) == {"lightrag-1", "lightrag-2", "perplexity-1"}
    assert explanation["reason"] and explanation["stopped"] == "answered"
    assert explanation["attempts"][0]["backend"] == result.backend
    assert any(line.startswith("least_connections:") for line in result.reasoning)
    assert result.metadata["selected_backend"] == result.backend


async def test_export_analytics_never_contains_answers_or_questions(
    tmp_path: Path, backends: Backends
) -> None:
    router = await started(tmp_path, backends, 1, "ab_test", 50)
    question = "Does patient Jane Roe (DOB 1961-04-02) have MCAD deficiency?"
    results = [await router.route_query(question, {"user_id": f"u{i}"}) for i in range(10)]
    exported = json.dumps(router.export_analytics(), default=str)
    await router.shutdown()
    assert len(json.loads(exported)) == 10
    assert "ANSWER" not in exported
    assert all(r.answer and r.answer not in exported for r in results)
    assert "Jane Roe" not in exported


async def test_one_row_per_request_without_the_question(tmp_path: Path, backends: Backends) -> None:
    router = await started(tmp_path, backends, 1, "ab_test", 50)
    question = "Does patient Jane Roe (DOB 1961-04-02) have MCAD deficiency?"
    results = [await router.route_query(question, {"user_id": f"user-{i}"}) for i in range(25)]
    await router.shutdown()
    rows = read_segments(tmp_path, "requests")
    assert sorted(r["request_id"] for r in rows) == sorted(r.request_id for r in results)
    by_id = {r["request_id"]: r for r in rows}
    for result in results:
        row = by_id[result.request_id]
        assert (row["arm"], row["outcome"], row["config_version"]) == (
            result.arm,
            result.outcome,
            1,
        )
        assert row["is_shadow"] is False and row["primary_request_id"] is None
    assert {r["query_hash"] for r in rows} == {hashlib.sha256(question.encode()).hexdigest()[:16]}
    assert {r["query_length"] for r in rows} == {len(question)}
    dumped = json.dumps(rows, default=str)
    assert "Jane Roe" not in dumped and "user-1" not in dumped and "ANSWER" not in dumped


# -- shadow -----------------------------------------------------------------------------
async def wait_for_shadows(router: ProductionIntelligentQueryRouter) -> None:
    for _ in range(500):
        if not router._shadow_tasks:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("shadow executions did not finish")


async def test_shadow_rows_are_paired_with_their_primary(
    tmp_path: Path, backends: Backends
) -> None:
    async def slower(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(0.02)
        return answer(request, "shadow answer")

    backends.faults["production"] = slower
    router = await started(tmp_path, backends, 1, "shadow", shadow_max_concurrency=64)
    results = [await router.route_query(QUESTION, {"user_id": f"u{i}"}) for i in range(20)]
    await wait_for_shadows(router)
    await router.shutdown()
    assert {(r.arm, r.mode, r.outcome) for r in results} == {("legacy", "shadow", "ok")}
    assert all(r.answer and r.answer.startswith("ANSWER legacy|") for r in results)
    rows = read_segments(tmp_path, "requests")
    primaries = {r["request_id"]: r for r in rows if not r["is_shadow"]}
    shadows = [r for r in rows if r["is_shadow"]]
    assert set(primaries) == {r.request_id for r in results}
    assert sorted(r["primary_request_id"] for r in shadows) == sorted(primaries)
    for shadow in shadows:
        primary = primaries[shadow["primary_request_id"]]
        assert (shadow["arm"], shadow["mode"], shadow["outcome"]) == ("production", "shadow", "ok")
        assert shadow["request_id"] != primary["request_id"]
        assert shadow["subject_bucket"] == primary["subject_bucket"]
        assert shadow["query_hash"] == primary["query_hash"]


async def test_shadow_concurrency_cap_skips_and_counts(tmp_path: Path, backends: Backends) -> None:
    release = asyncio.Event()

    async def stuck(request: httpx.Request) -> httpx.Response:
        await release.wait()
        return httpx.Response(500)

    backends.faults["production"] = stuck
    guard = GuardLimits(enabled=False)
    router = await started(tmp_path, backends, 1, "shadow", shadow_max_concurrency=3, guard=guard)
    results = [await router.route_query(QUESTION, {"user_id": f"u{i}"}) for i in range(12)]
    assert len(router._shadow_tasks) == 3
    assert router.shadow_skipped == 9
    assert {(r.arm, r.outcome) for r in results} == {("legacy", "ok")}
    release.set()
    await wait_for_shadows(router)
    await router.shutdown()
    shadows = [r for r in read_segments(tmp_path, "requests") if r["is_shadow"]]
    assert len(shadows) == 3 and {s["outcome"] for s in shadows} == {"error"}
    # Said at each control tick that saw new skips, and at shutdown: together, all nine.
    skipped = [e for e in read_segments(tmp_path, "events") if e["kind"] == "shadows_skipped"]
    counts = [int(e["detail"].split(" shadow execution(s) skipped")[0]) for e in skipped]
    assert sum(counts) == 9 and all(n > 0 for n in counts)


def perplexity_rate_limited(request: httpx.Request) -> httpx.Response:
    """Perplexity's limiter says wait 30 s to every caller; LightRAG answers."""
    if request.url.host.startswith("perplexity"):
        return httpx.Response(429, headers={"Retry-After": "30"})
    return answer(request, "ANSWER")


async def test_no_shadow_spends_a_rate_limit_users_are_waiting_on(
    tmp_path: Path, backends: Backends
) -> None:
    """A 429's quota is the API key's, shared with the users' arm: a shadow sent into the
    window takes an answer a user needs. Only questions that no other backend may answer
    are held back; the rest are shadowed to LightRAG. Each hold is counted per config
    version, for the gate's coverage."""
    backends.faults["legacy"] = backends.faults["production"] = perplexity_rate_limited
    router = await started(tmp_path, backends, 1, "shadow", guard=GuardLimits(enabled=False))
    first = await router.route_query(RECENT, {"user_id": "u0"})
    await wait_for_shadows(router)
    assert first.arm == "legacy" and first.outcome == "rate_limited"
    sent = Counter(backends.calls)
    recent = [await router.route_query(RECENT, {"user_id": f"u{i}"}) for i in range(1, 10)]
    general = [await router.route_query(QUESTION, {"user_id": f"g{i}"}) for i in range(5)]
    await wait_for_shadows(router)
    await router.shutdown()
    new = Counter(backends.calls) - sent
    assert new[("perplexity-1", "production")] == 0
    assert new[("perplexity-1", "legacy")] >= 9  # legacy keeps its own ways: it never waits
    assert sum(n for (name, arm), n in new.items() if arm == "production") == 5
    assert router.shadows_yielded == 9 and router.shadow_skipped == 0
    assert {r.outcome for r in recent} == {"rate_limited"} and {r.outcome for r in general} == {
        "ok"
    }
    events = [e for e in read_segments(tmp_path, "events") if e["kind"] == "shadows_yielded"]
    assert [(e["config_version"], int(e["detail"].split(" ")[0])) for e in events] == [(1, 9)]


async def test_a_429_given_to_legacy_keeps_production_off_that_backend(
    tmp_path: Path, backends: Backends
) -> None:
    """Both arms call Perplexity with the same key: a Retry-After legacy is given is the
    production arm's too, which then does not spend the window's quota either."""
    backends.faults["legacy"] = backends.faults["production"] = perplexity_rate_limited
    router = await started(tmp_path, backends, 1, "ab_test", 50)
    users = [f"u{i}" for i in range(40)]
    production = [u for u in users if in_production(bucket_of(u, SALT), 50)]
    legacy = [u for u in users if u not in production]
    told = await router.route_query(RECENT, {"user_id": legacy[0]})
    assert told.arm == "legacy" and told.outcome == "rate_limited"
    held = [await router.route_query(RECENT, {"user_id": u}) for u in production[:5]]
    await router.shutdown()
    assert {(r.arm, r.outcome) for r in held} == {("production", "rate_limited")}
    assert ("perplexity-1", "production") not in backends.calls


async def test_a_crashing_shadow_never_reaches_the_user(tmp_path: Path, backends: Backends) -> None:
    def crash(request: httpx.Request) -> httpx.Response:
        raise RuntimeError("bug in the production path")

    backends.faults["production"] = crash
    router = await started(tmp_path, backends, 1, "shadow")
    results = [await router.route_query(QUESTION, {"user_id": f"u{i}"}) for i in range(10)]
    await wait_for_shadows(router)
    await router.shutdown()
    assert {(r.arm, r.outcome) for r in results} == {("legacy", "ok")}


async def test_an_unexpected_error_quoting_the_key_is_logged_masked(
    tmp_path: Path, backends: Backends, caplog: pytest.LogCaptureFixture
) -> None:
    """A custom transport (or any code under the balancer) whose error quotes the
    request's Authorization header: the traceback went to the log, key and all."""

    def leaky(request: httpx.Request) -> httpx.Response:
        raise RuntimeError(f"proxy refused {request.headers.get('authorization')!r}")

    backends.faults["production"] = leaky
    router = await started(tmp_path, backends, 1, "production_only", 100)
    result = await router.route_query(RECENT, {"user_id": "u0"})
    await router.shutdown()
    assert result.outcome == "error" and result.error == "production balancer failed: RuntimeError"
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "proxy refused 'Bearer **********'" in logged and "Traceback" in logged
    assert "test-key" not in logged + caplog.text


async def wait_until(predicate: Callable[[], bool], what: str) -> None:
    for _ in range(500):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


async def test_shutdown_lets_requests_finish_and_leaves_no_shadow_running(
    tmp_path: Path, backends: Backends
) -> None:
    backends.gate = asyncio.Event()  # holds questions containing "slow", shadows too
    router = await started(tmp_path, backends, 1, "shadow", shadow_sample_rate=1.0)
    first = asyncio.create_task(router.route_query("a slow question", {"user_id": "a"}))
    await wait_until(lambda: len(backends.calls) == 2, "the request and its shadow")
    down = asyncio.create_task(router.shutdown())
    await asyncio.sleep(0)  # shutdown is now cancelling the shadow it found
    late = asyncio.create_task(router.route_query("another slow question", {"user_id": "b"}))
    await wait_until(lambda: len(backends.calls) == 3, "the late request")
    backends.gate.set()
    await down
    assert not router._shadow_tasks  # the late request started no shadow
    results = [await first, await late]
    assert {(r.arm, r.outcome) for r in results} == {("legacy", "ok")}
    rows = read_segments(tmp_path, "requests")
    assert sorted(r["request_id"] for r in rows) == sorted(r.request_id for r in results)
    assert router.recorder.requests.dropped == 0 and not router.recorder.requests.buffer


async def test_a_shutdown_cut_short_still_stops_background_work(
    tmp_path: Path, backends: Backends
) -> None:
    """A host's own timeout around shutdown() (shorter than the drain) left the control
    loop writing heartbeats for a stopped instance and the legacy pool open."""
    backends.gate = asyncio.Event()
    router = await started(tmp_path, backends, 1, "production_only", 100)
    slow = asyncio.create_task(router.route_query("a slow question", {"user_id": "a"}))
    await wait_until(lambda: len(backends.calls) == 1, "the request")
    background = list(router._tasks)  # the control loop
    assert background
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(router.shutdown(), 0.1)
    assert all(task.done() for task in background) and router._client.is_closed
    backends.gate.set()
    await slow


async def test_two_shutdowns_at_once_both_end_when_the_requests_do(
    tmp_path: Path, backends: Backends
) -> None:
    """Each shutdown() replaced the drain's event: the first waited out its whole drain
    timeout (10 s by default) and then warned of requests that had finished long ago."""
    backends.gate = asyncio.Event()
    router = await started(tmp_path, backends, 1, "production_only", 100)
    slow = asyncio.create_task(router.route_query("a slow question", {"user_id": "a"}))
    await wait_until(lambda: len(backends.calls) == 1, "the request")
    first = asyncio.create_task(router.shutdown(drain_timeout_s=60))
    second = asyncio.create_task(router.shutdown(drain_timeout_s=60))
    await asyncio.sleep(0.05)
    backends.gate.set()
    await asyncio.wait_for(asyncio.gather(first, second), 30)  # not the drain's 60 s
    assert (await slow).outcome == "ok"


async def test_a_request_after_shutdown_is_told_so_without_a_traceback(
    tmp_path: Path, backends: Backends, caplog: pytest.LogCaptureFixture
) -> None:
    """Each call logged a RuntimeError traceback from the closed HTTP client."""
    router = await started(tmp_path, backends, 1, "production_only", 100)
    await router.shutdown()
    calls = len(backends.calls)
    for i in range(25):  # over min_requests: a stopped router has nothing to fail back
        result = await router.route_query(QUESTION, {"user_id": f"u{i}"})
        assert not result.ok and result.error == "the router is shut down"
    assert len(backends.calls) == calls and not router.guard.tripped
    assert not any(r.exc_info for r in caplog.records)
    assert [r.getMessage() for r in caplog.records if "after shutdown" in r.getMessage()] == [
        "route_query after shutdown(): answered with an error"
    ]


async def test_two_processes_under_one_instance_id_are_told_so(
    tmp_path: Path, backends: Backends, caplog: pytest.LogCaptureFixture
) -> None:
    """`gunicorn -w 4` with one PROD_LB_INSTANCE_ID: the workers overwrote each other's
    heartbeat and the fleet's view of which version runs flipped between them, silently."""

    def told() -> list[str]:
        return [r.getMessage() for r in caplog.records if "is also used by" in r.getMessage()]

    first = make_router(tmp_path, backends, instance="api-1")
    first.heartbeat()
    await first.shutdown()
    # A restart under the same id finds its predecessor's fresh heartbeat: no twin (the
    # first look comes SHARED_ID_CHECK_S later, when that heartbeat is stale).
    second = make_router(tmp_path, backends, instance="api-1")
    second.heartbeat()
    assert told() == []
    # A twin running alongside: found at the next look, and told once.
    twin = make_router(tmp_path, backends, instance="api-1")
    twin.heartbeat()
    for _ in range(2):
        second._next_shared_check = 0.0  # the next look is due
        second.heartbeat()
    (message,) = told()
    assert message.startswith("instance id 'api-1' is also used by")
    assert "PROD_LB_INSTANCE_ID" in message

    # A store whose heartbeat list cannot be read never costs the heartbeat itself.
    def unreadable() -> list[Acknowledgement]:
        raise OSError("GET /acks: 403")

    store = second.control_store
    assert isinstance(store, FileControlStore)
    store.read_acks = unreadable  # type: ignore[method-assign]
    second._next_shared_check = 0.0
    heartbeat_file = tmp_path / "control" / "acks" / "api-1.json"
    heartbeat_file.unlink()
    second.heartbeat()
    assert heartbeat_file.exists()
    await second.shutdown()
    await twin.shutdown()
    events = read_segments(tmp_path, "events", instance="api-1")
    assert [e["kind"] for e in events].count("instance_shared") == 1


class SlowCloseRecorder(SegmentRecorder):
    """close() waits for the event loop to release it (as a slow disk would hold it)."""

    def __init__(self, segments_dir: Path, instance: str) -> None:
        super().__init__(segments_dir, instance)
        self.closing = threading.Event()
        self.release = threading.Event()
        self.released_in_time: bool | None = None

    def close(self, timeout_s: float = 30.0) -> None:
        self.closing.set()
        self.released_in_time = self.release.wait(timeout=2)
        super().close(timeout_s)


async def test_shutdown_closes_the_recorder_off_the_event_loop(
    tmp_path: Path, backends: Backends
) -> None:
    recorder = SlowCloseRecorder(tmp_path / "segments", "test-1")
    router = ProductionIntelligentQueryRouter(
        backends=BACKENDS,
        transport=httpx.MockTransport(backends),
        health_checks=False,
        flags=ProductionFeatureFlags(enabled=True, data_dir=tmp_path, instance_id="test-1"),
        control_store=None,
        recorder=recorder,
    )

    async def release_once_closing() -> None:  # runs only if the loop is free
        await wait_until(recorder.closing.is_set, "close()")
        recorder.release.set()

    await asyncio.gather(router.shutdown(), release_once_closing())
    assert recorder.released_in_time is True


# -- weights, budget and health through the facade ---------------------------------------
async def test_document_weights_are_absolute(tmp_path: Path, backends: Backends) -> None:
    """A backend a newer document does not name gets its configured weight back."""
    router = await started(
        tmp_path, backends, 1, "production_only", 100, production_weights={BACKENDS[0].name: 0.0}
    )
    assert router.production.by_name[BACKENDS[0].name].weight == 0.0
    publish(tmp_path, 2, "production_only", 100)
    router.poll_control_store()
    assert router.production.by_name[BACKENDS[0].name].weight == BACKENDS[0].weight
    await router.shutdown()


async def test_spent_daily_budget_keeps_only_the_cheapest_backends(
    tmp_path: Path, backends: Backends
) -> None:
    from router.production_config import CostSettings, ProductionLoadBalancingConfig

    flags = ProductionFeatureFlags(
        enabled=True, data_dir=tmp_path, instance_id="b-1", control_poll_s=60
    )
    config = ProductionLoadBalancingConfig(
        backends=tuple(BACKENDS), cost=CostSettings(daily_budget_usd=0.01)
    )
    router = ProductionIntelligentQueryRouter(
        backends=BACKENDS,
        transport=httpx.MockTransport(backends),
        health_checks=False,
        flags=flags,
        production_config=config,
        control_store=None,
        recorder=SegmentRecorder(tmp_path / "segments", "b-1"),
        seed=3,
    )
    router.config = router.config.model_copy(
        update={"mode": DeploymentMode.PRODUCTION_ONLY, "traffic_percent": 100.0}
    )
    assert router.budget is not None
    router.budget.add(0.02)  # today's budget is gone
    picked = {
        (await router.route_query("What is the general idea?", {"user_id": f"u{i}"})).backend
        for i in range(30)
    }
    paid = {b.name for b in BACKENDS if b.kind.value == "perplexity"}
    assert picked and not picked & paid
    await router.shutdown()


async def test_health_status_shows_an_open_breaker(tmp_path: Path, backends: Backends) -> None:
    backends.faults["production"] = lambda r: httpx.Response(503)
    router = await started(
        tmp_path, backends, 1, "production_only", 100, guard=GuardLimits(enabled=False)
    )
    before = router.get_health_status()["production"]
    assert {r["breaker_state"] for r in before.values()} == {"closed"}
    for i in range(40):  # every production backend fails: breakers open
        await router.route_query(QUESTION, {"user_id": f"u{i}"})
    after = router.get_health_status()["production"]
    assert "open" in {r["breaker_state"] for r in after.values()}

    # reading the status again changes no state (a scrape must not advance breakers;
    # countdowns and decaying estimates do move with time)
    def states(report: dict) -> dict:
        return {n: (r["breaker_state"], r["ejected"], r["available"]) for n, r in report.items()}

    assert states(router.get_health_status()["production"]) == states(after)
    assert router.get_system_health_status()["status"] in ("degraded", "critical")
    await router.shutdown()


class BrokenStore(FileControlStore):
    """A pluggable store whose writes fail with something other than OSError."""

    def write_ack(self, ack) -> None:
        raise RuntimeError("control service unavailable")


async def test_a_failing_control_store_never_fails_a_request(
    tmp_path: Path, backends: Backends
) -> None:
    backends.faults["production"] = lambda r: httpx.Response(500)
    FileControlStore(tmp_path / "control").publish(
        RouterConfig(
            version=1,
            mode=DeploymentMode.PRODUCTION_ONLY,
            traffic_percent=100,
            guard=production_guard(),
        )
    )
    flags = ProductionFeatureFlags(
        enabled=True, data_dir=tmp_path, instance_id="test-1", control_poll_s=60
    )
    router = await ProductionIntelligentQueryRouter(
        backends=BACKENDS,
        transport=httpx.MockTransport(backends),
        health_checks=False,
        flags=flags,
        control_store=BrokenStore(tmp_path / "control"),
        recorder=SegmentRecorder(tmp_path / "segments", "test-1"),
        seed=7,
    ).start()
    for i in range(12):  # the guard trips on the 10th: its ack write fails in the background
        result = await router.route_query(QUESTION, {"user_id": f"u{i}"})
    assert router.guard.tripped and result.arm == "legacy"
    await router.shutdown()  # does not raise, and flushes the rows
    assert len(read_segments(tmp_path, "requests")) == 12


async def test_an_unwritable_row_is_dropped_and_counted_not_fatal(
    tmp_path: Path, backends: Backends
) -> None:
    router = await started(tmp_path, backends, 1, "production_only", 100)
    await router.route_query(QUESTION, {"user_id": "u1"})
    good = router.recorder.requests.buffer[0]
    router.recorder.record(good._replace(request_id=None, ts="not a time"))
    await router.route_query(QUESTION, {"user_id": "u2"})
    await router.shutdown()
    assert len(read_segments(tmp_path, "requests")) == 2
    dropped = [e for e in read_segments(tmp_path, "events") if e["kind"] == "rows_dropped"]
    assert dropped and "1 requests row(s) dropped" in dropped[0]["detail"]


async def test_out_of_range_token_counts_are_clamped_not_dropped(
    tmp_path: Path, backends: Backends
) -> None:
    def nonsense_usage(request: httpx.Request) -> httpx.Response:
        usage = {"prompt_tokens": -5, "completion_tokens": -(2**40)}
        return httpx.Response(
            200, json={"choices": [{"message": {"content": "x"}}], "usage": usage}
        )

    backends.faults["production"] = nonsense_usage
    drained = {"lightrag-1": 0.0, "lightrag-2": 0.0}  # only perplexity-1 answers
    router = await started(
        tmp_path, backends, 1, "production_only", 100, production_weights=drained
    )
    for i in range(3):
        await router.route_query(QUESTION, {"user_id": f"u{i}"})
    await router.shutdown()
    rows = read_segments(tmp_path, "requests")
    assert [(r["backend"], r["tokens_in"], r["tokens_out"]) for r in rows] == [
        ("perplexity-1", 0, 0)
    ] * 3


async def test_a_cancelled_request_still_leaves_its_row(tmp_path: Path, backends: Backends) -> None:
    backends.gate = asyncio.Event()  # holds questions containing "slow"
    router = await started(tmp_path, backends, 1, "production_only", 100)
    task = asyncio.create_task(router.route_query("a slow question", {"user_id": "u1"}))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await router.shutdown()
    (row,) = read_segments(tmp_path, "requests")
    assert (row["outcome"], row["error_kind"], row["arm"]) == ("timeout", "cancelled", "production")
    # the attempt it was waiting on counts (it read 0); no backend is charged with it
    assert (row["attempts"], row["backend"]) == (1, None)


async def test_callers_that_cancel_never_trip_the_guard(tmp_path: Path, backends: Backends) -> None:
    """A host hedging its calls (here every third, cancelled after 20 ms) tripped the
    guard in production_only: each cancel counted as a production error. Its rows stay."""
    backends.gate = asyncio.Event()  # "slow" questions wait until the caller gives up
    guard = production_guard(error_rate=0.1)
    router = await started(tmp_path, backends, 1, "production_only", 100, guard=guard)
    for i in range(60):
        if i % 3:
            await router.route_query(QUESTION, {"user_id": f"u{i}"})
            continue
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.02):
                await router.route_query("a slow question", {"user_id": f"u{i}"})
    assert not router.guard.tripped
    assert router.effective_mode is DeploymentMode.PRODUCTION_ONLY
    await router.shutdown()
    kinds = Counter(r["error_kind"] for r in read_segments(tmp_path, "requests"))
    assert kinds == {"cancelled": 20, None: 40}


async def test_a_hung_production_arm_trips_the_guard_though_its_callers_give_up_first(
    tmp_path: Path, backends: Backends
) -> None:
    """Cancels are no errors while production answers; once it answers none of the last
    `min_requests`, its callers' cancels are what its failures look like."""
    backends.gate = asyncio.Event()  # never set: every question hangs
    router = await started(tmp_path, backends, 1, "production_only", 100, guard=production_guard())
    for i in range(12):
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.01):
                await router.route_query("a slow question", {"user_id": f"u{i}"})
    assert not router.guard.tripped  # cancels alone, at first: as a hedging host's look
    for i in range(12, 40):
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.01):
                await router.route_query("a slow question", {"user_id": f"u{i}"})
    assert router.guard.tripped and router.effective_mode is DeploymentMode.LEGACY_ONLY
    backends.gate.set()
    await router.shutdown()


async def test_a_burst_of_cancels_while_production_answers_is_no_failure(
    tmp_path: Path, backends: Backends
) -> None:
    """One client going away cancels all its requests at once: 40 cancels in a row, while
    production kept answering everyone else. They are no production failures."""
    backends.gate = asyncio.Event()  # "slow" questions wait (until their caller leaves)
    guard = production_guard(error_rate=0.1)
    router = await started(tmp_path, backends, 1, "production_only", 100, guard=guard)
    waiting = [
        asyncio.create_task(router.route_query("a slow question", {"user_id": f"s{i}"}))
        for i in range(40)
    ]
    await wait_until(lambda: len(backends.calls) == 40, "40 requests waiting")
    for i in range(20):  # the other users' answers keep arriving meanwhile
        assert (await router.route_query(QUESTION, {"user_id": f"u{i}"})).ok
    for task in waiting:
        task.cancel()
    await asyncio.gather(*waiting, return_exceptions=True)
    assert router._cancels_in_a_row == 40  # the burst did reach the guard
    assert not router.guard.tripped
    assert router.effective_mode is DeploymentMode.PRODUCTION_ONLY
    backends.gate.set()
    await router.shutdown()


async def test_a_backend_that_hangs_while_callers_give_up_is_avoided(
    tmp_path: Path, backends: Backends
) -> None:
    """Attempts the caller cancelled were never learned from: a backend whose answers
    hang (its health check fine) kept response_time's lowest estimate, and every user
    request went to it and timed out."""
    hung = asyncio.Event()

    async def hangs_on_lightrag_2(request: httpx.Request) -> httpx.Response:
        if request.url.host == "lightrag-2.test" and hung.is_set():
            await asyncio.Event().wait()
        if request.url.host == "lightrag-1.test":
            await asyncio.sleep(0.02)  # lightrag-2 is the fast one, until it hangs
        return answer(request, "fine")

    backends.faults["production"] = hangs_on_lightrag_2
    router = await started(
        tmp_path, backends, 1, "production_only", 100, algorithm=AlgorithmName.ROUND_ROBIN
    )
    for i in range(20):  # every backend answers, and gets latency samples
        await router.route_query(QUESTION, {"user_id": f"w{i}"})
    publish(tmp_path, 2, "production_only", 100, algorithm=AlgorithmName.RESPONSE_TIME)
    router.poll_control_store()
    hung.set()
    lost = 0
    for i in range(30):
        try:
            async with asyncio.timeout(0.2):
                await router.route_query(QUESTION, {"user_id": f"u{i}"})
        except TimeoutError:
            lost += 1
    await router.shutdown()
    assert lost <= 2  # charged the time it kept its caller waiting, it is left alone


def test_cost_optimisation_and_region_come_from_the_flags(tmp_path: Path) -> None:
    flags = ProductionFeatureFlags(
        enabled=True,
        data_dir=tmp_path,
        cost_optimization=True,
        daily_budget_usd=12.5,
        region="us-east",
        primary_algorithm="cost_aware",
        advanced_algorithms=True,
    )
    router = ProductionIntelligentQueryRouter(
        backends=BACKENDS,
        health_checks=False,
        flags=flags,
        control_store=None,
        recorder=SegmentRecorder(tmp_path / "segments", "flags-1"),
    )
    assert router.budget is not None and router.budget.limit_usd == 12.5
    assert router.production_config.region == "us-east"
    assert router.production.algorithm.name == "cost_aware"
    router.recorder.close()


def test_a_data_dir_the_router_cannot_write_stops_start_up(tmp_path: Path) -> None:
    """A read-only root filesystem under the default ./data let the router start, log
    every poll and flush (612 lines in 21 s), and never write a row or a heartbeat."""
    from router.settings_errors import SettingsError

    not_a_folder = tmp_path / "data"
    not_a_folder.write_text("a file where the data folder belongs")
    with pytest.raises(SettingsError) as refused:
        ProductionIntelligentQueryRouter(
            backends=BACKENDS,
            health_checks=False,
            flags=ProductionFeatureFlags(enabled=True, data_dir=not_a_folder, instance_id="ro"),
        )
    (line,) = refused.value.lines
    assert line.startswith(f"PROD_LB_DATA_DIR={str(not_a_folder)!r}: cannot write ")
    assert "give a folder it can write" in line


async def test_prometheus_metrics_count_requests_and_show_state(
    tmp_path: Path, backends: Backends
) -> None:
    from prometheus_client import generate_latest

    router = await started(tmp_path, backends, 3, "canary", 50)
    for i in range(20):
        await router.route_query(QUESTION, {"user_id": f"user-{i}"})
    text = generate_latest(router.metrics.registry).decode()
    served = sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("router_requests_total{")
    )
    assert served == 20
    assert 'router_request_latency_seconds_bucket{arm="production"' in text
    assert "router_config_version 3.0" in text
    assert 'router_breaker_state{arm="production",backend="lightrag-1"} 0.0' in text
    await router.shutdown()


def scrape(router: ProductionIntelligentQueryRouter) -> dict[tuple[str, frozenset], float]:
    """Every sample of a scrape: (name, labels) -> value."""
    from prometheus_client.exposition import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    text = generate_latest(router.metrics.registry).decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def sample(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


async def test_failed_attempts_that_failover_saved_still_show(
    tmp_path: Path, backends: Backends
) -> None:
    """A request is counted once, under the backend that answered it: a backend failing
    or rate-limiting every call while failover saved the users had no series at all."""

    def lightrag_1_down(request: httpx.Request) -> httpx.Response:
        if request.url.host == "lightrag-1.test":
            return httpx.Response(503)
        if request.url.host == "lightrag-2.test":
            return httpx.Response(429, headers={"Retry-After": "0"})
        return answer(request, "ANSWER")

    backends.faults["production"] = lightrag_1_down
    router = await started(
        tmp_path, backends, 1, "production_only", 100, guard=GuardLimits(enabled=False)
    )
    results = [await router.route_query(QUESTION, {"user_id": f"u{i}"}) for i in range(12)]
    samples = scrape(router)
    await router.shutdown()
    assert {r.backend for r in results if r.ok} == {"perplexity-1"}
    tried = Counter(name for name, arm in backends.calls if arm == "production")
    attempts = "router_backend_attempts_total"
    failed_1 = sample(
        samples, attempts, arm="production", backend="lightrag-1", result="server_error"
    )
    limited_2 = sample(
        samples, attempts, arm="production", backend="lightrag-2", result="rate_limited"
    )
    assert failed_1 == tried["lightrag-1"] > 0 and limited_2 == tried["lightrag-2"] > 0
    assert sample(samples, attempts, arm="production", backend="perplexity-1", result="ok") == 12


async def test_every_series_exists_from_the_start_and_shadows_are_apart(
    tmp_path: Path, backends: Backends
) -> None:
    """Prometheus takes a series' first value as its start: errors arriving with a new
    series never showed in increase(). The histogram had no shadow label, so a
    throughput or p95 panel counted shadow executions as users."""
    router = await started(tmp_path, backends, 1, "shadow", guard=GuardLimits(enabled=False))
    fresh = scrape(router)
    for i in range(10):
        await router.route_query(QUESTION, {"user_id": f"u{i}"})
    await wait_for_shadows(router)
    router.force_rollback("drill")
    samples = scrape(router)
    await router.shutdown()
    errors = ("router_requests_total", "production", "lightrag-1", "error", "false")
    name, arm, backend, outcome, shadow = errors
    labels = {"arm": arm, "backend": backend, "outcome": outcome, "shadow": shadow}
    assert sample(fresh, name, **labels) == 0
    assert (
        sample(
            fresh,
            "router_backend_attempts_total",
            arm="production",
            backend="lightrag-1",
            result="timeout",
        )
        == 0
    )

    def users_and_shadows(metric: str) -> tuple[float, float]:
        return tuple(
            sum(v for (n, labels), v in samples.items() if n == metric and ("shadow", s) in labels)
            for s in ("false", "true")
        )

    assert users_and_shadows("router_request_latency_seconds_count") == (10, 10)
    assert users_and_shadows("router_requests_total") == (10, 10)
    assert sample(samples, "router_failbacks_total") == 1
    assert sample(samples, "router_shadows_not_run_total", reason="rate_limited") == 0
    buckets = {dict(labels)["le"] for (n, labels) in samples if n.endswith("_bucket")}
    assert {"60.0", "120.0", "+Inf"} <= buckets  # legacy's deadline reaches past 30 s


async def test_a_breaker_that_opened_between_two_scrapes_is_counted(
    tmp_path: Path, backends: Backends
) -> None:
    from router.production_config import CircuitBreakerSettings

    tight = CircuitBreakerSettings(minimum_calls=2, open_wait_s=0.05)
    failing = {"on": True}

    def flaky(request: httpx.Request) -> httpx.Response:
        return httpx.Response(500) if failing["on"] else answer(request, "ANSWER")

    backends.faults["production"] = flaky
    router = await started(
        tmp_path,
        backends,
        1,
        "production_only",
        100,
        breaker=tight,
        guard=GuardLimits(enabled=False),
    )
    for i in range(4):
        await router.route_query(QUESTION, {"user_id": f"u{i}"})
    failing["on"] = False
    await asyncio.sleep(0.1)
    for i in range(20):
        await router.route_query(QUESTION, {"user_id": f"v{i}"})
    states = {n: b["breaker_state"] for n, b in router.get_health_status()["production"].items()}
    samples = scrape(router)
    await router.shutdown()
    assert set(states.values()) == {"closed"}
    opened = sum(
        v
        for (n, labels), v in samples.items()
        if n == "router_breaker_opened_total" and ("arm", "production") in labels
    )
    assert opened >= 1


async def test_a_scrape_racing_a_request_retries_instead_of_failing(
    tmp_path: Path, backends: Backends
) -> None:
    """The exporter's thread reads the breakers' windows while the event loop appends
    to them: "deque mutated during iteration" failed the scrape (an HTTP 500 to
    Prometheus, a gap in every graph). It is read again; a lasting error still shows."""
    from prometheus_client import generate_latest

    router = await started(tmp_path, backends, 3, "canary", 50)
    real, calls = router._metrics_state, []

    def racing() -> dict[str, Any]:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("deque mutated during iteration")
        return real()

    collector = next(c for c in router.metrics._collectors if hasattr(c, "state"))
    collector.state = racing
    assert "router_config_version 3.0" in generate_latest(router.metrics.registry).decode()
    assert len(calls) == 2

    def broken() -> dict[str, Any]:
        raise RuntimeError("deque mutated during iteration")

    collector.state = broken
    with pytest.raises(RuntimeError):
        generate_latest(router.metrics.registry)
    await router.shutdown()


@pytest.mark.parametrize("auto_describe", [True, False])
async def test_a_shared_registry_takes_a_new_router_once_the_old_one_shut_down(
    tmp_path: Path, backends: Backends, auto_describe: bool
) -> None:
    """One live router per registry (e.g. prometheus_client.REGISTRY): shutdown()
    unregisters, so a restarted router in the same process can register. A plain
    `CollectorRegistry()` (auto_describe off) took a second router, and its exposition
    repeated every family, which fails the whole OpenMetrics scrape."""
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=auto_describe)  # True: as REGISTRY

    def build(instance: str) -> ProductionIntelligentQueryRouter:
        return ProductionIntelligentQueryRouter(
            backends=BACKENDS,
            transport=httpx.MockTransport(backends),
            health_checks=False,
            flags=ProductionFeatureFlags(enabled=True, data_dir=tmp_path, instance_id=instance),
            control_store=None,
            recorder=SegmentRecorder(tmp_path / "segments", instance),
            metrics_registry=registry,
        )

    first = build("first")
    with pytest.raises(ValueError, match="one live router per registry"):
        build("second")
    await first.shutdown()
    second = build("second")
    await second.route_query(QUESTION, {"user_id": "u1"})
    assert "router_requests_total{" in generate_latest(registry).decode()
    await second.shutdown()
    assert "router_requests" not in generate_latest(registry).decode()


@pytest.mark.parametrize(("documents_limit", "trips"), [(1.0, True), (None, False)])
async def test_a_split_older_than_its_canary_max_hours_fails_back(
    tmp_path: Path, backends: Backends, documents_limit: float | None, trips: bool
) -> None:
    """The dead-man's switch ends a split nobody re-published. A rollout's documents
    carry no limit (a phase lasts as its plan says): the host's PROD_LB_CANARY_MAX_HOURS
    must not end it (the shipped 336 h equals the plan's 14-day maximum, when the gate
    asks a human)."""
    publish(
        tmp_path,
        1,
        "canary",
        5,
        published_at=datetime.now(UTC) - timedelta(hours=5),
        guard=GuardLimits(canary_max_hours=documents_limit),
    )
    router = make_router(tmp_path, backends, "old", canary_max_hours=1)
    await router.start()
    router.heartbeat()
    await router.shutdown()
    assert router.config.version == 1
    assert router.guard.tripped is trips
    if trips:
        assert router.effective_mode is DeploymentMode.LEGACY_ONLY
        assert "PROD_LB_CANARY_MAX_HOURS" in (router.guard.reason or "")


@pytest.mark.parametrize(("since_hours_ago", "trips"), [(None, False), (5.0, True)])
async def test_an_environment_split_counts_its_age_from_split_since_not_from_start(
    tmp_path: Path, backends: Backends, since_hours_ago: float | None, trips: bool
) -> None:
    """Version 0 (the PROD_LB_* split) was stamped at process start: every restart reset
    PROD_LB_CANARY_MAX_HOURS, so a fleet deployed more often than that never ended its
    split. PROD_LB_SPLIT_SINCE gives the split's real start."""
    since = (
        None if since_hours_ago is None else datetime.now(UTC) - timedelta(hours=since_hours_ago)
    )
    router = make_router(
        tmp_path,
        backends,
        "env-split",
        deployment_mode="canary",
        traffic_percent=5,
        canary_max_hours=1,
        split_since=since,
    )
    await router.start()  # nothing published: the environment's split (version 0) runs
    router.heartbeat()
    await router.shutdown()
    assert router.config.version == 0 and router.guard.tripped is trips
    if trips:
        assert "5.0 h old" in (router.guard.reason or "")


def test_a_split_since_in_the_future_or_without_offset_is_refused() -> None:
    with pytest.raises(ValueError, match="PROD_LB_SPLIT_SINCE=2999-01-01T00:00:00\\+00:00 is in"):
        ProductionFeatureFlags(split_since="2999-01-01T00:00:00Z")
    with pytest.raises(ValueError, match="timezone"):
        ProductionFeatureFlags(split_since="2026-01-01T00:00:00")


@pytest.mark.parametrize("production", [False, True])
async def test_a_lightrag_only_deployment_answers_recent_events_questions(
    tmp_path: Path, backends: Backends, production: bool
) -> None:
    """Questions naming a year or "the latest" need live search, yet with no Perplexity
    configured every one of them failed ("no backend of ['perplexity']") while the
    system reported healthy: the configured backends answer, and the reasoning says why."""
    lightrag_only = BACKENDS[:2]
    if production:
        flags = ProductionFeatureFlags(enabled=True, data_dir=tmp_path, control_poll_s=60)
        router: IntelligentQueryRouter = ProductionIntelligentQueryRouter(
            backends=lightrag_only,
            transport=httpx.MockTransport(backends),
            health_checks=False,
            flags=flags,
            control_store=None,
            recorder=SegmentRecorder(tmp_path / "segments", "lr"),
        )
    else:
        router = IntelligentQueryRouter(
            backends=lightrag_only, transport=httpx.MockTransport(backends), health_checks=False
        )
    result = await router.route_query("What did the 2025 newborn screening guideline change?")
    await router.shutdown()
    assert result.outcome == "ok" and result.backend in {"lightrag-1", "lightrag-2"}
    assert result.category == "recent_events"
    assert "no perplexity backend is configured" in " ".join(result.reasoning)


async def test_long_prompts_are_routed_but_never_held_in_the_question_cache(
    tmp_path: Path, backends: Backends
) -> None:
    """The cache of question facts is bounded by count: 4,096 prompts of 50 KB held
    236 MB of a host's memory."""
    from router.production_router import FACTS_CACHE_MAX_CHARS

    router = await started(tmp_path, backends, 1, "production_only", 100)
    long_prompt = QUESTION + " context" * (FACTS_CACHE_MAX_CHARS // 8 + 1)
    first = await router.route_query(long_prompt, {"user_id": "u1"})
    again = await router.route_query(long_prompt, {"user_id": "u1"})
    await router.route_query(QUESTION, {"user_id": "u1"})
    await router.shutdown()
    assert first.ok and again.ok and first.routing_decision == again.routing_decision
    assert list(router._facts_cache) == [QUESTION]


async def test_a_new_classifier_applies_to_questions_already_seen(
    tmp_path: Path, backends: Backends
) -> None:
    """The production router caches classifications per question; swapping the public
    `classifier` attribute (as legacy callers do) must take effect at once."""

    class OnlyPerplexity:
        def classify(self, text: str) -> Classification:
            return Classification(
                "live", frozenset({BackendKind.PERPLEXITY}), None, 1.0, "live only"
            )

    router = await started(tmp_path, backends, 1, "production_only", 100)
    before = await router.route_query(QUESTION, {"user_id": "u1"})
    router.classifier = OnlyPerplexity()
    after = await router.route_query(QUESTION, {"user_id": "u1"})
    await router.shutdown()
    assert before.category == "general"
    assert (after.category, after.backend) == ("live", "perplexity-1")


@pytest.mark.parametrize(
    ("legacy", "explicit", "expected"),
    [
        (LoadBalancingConfig(strategy="response_time"), None, "response_time"),
        (LoadBalancingConfig(strategy="response_time"), "round_robin", "round_robin"),
        (None, None, "least_connections"),
    ],
)
def test_the_callers_legacy_strategy_picks_the_production_algorithm(
    tmp_path: Path, legacy: LoadBalancingConfig | None, explicit: str | None, expected: str
) -> None:
    """Drop-in: `LoadBalancingConfig(strategy=...)` kept meaning something; it was ignored
    for the flags' default algorithm. PROD_LB_PRIMARY_ALGORITHM, when set, still wins."""
    chosen = {"primary_algorithm": explicit} if explicit else {}
    flags = ProductionFeatureFlags(enabled=True, data_dir=tmp_path, **chosen)
    router = ProductionIntelligentQueryRouter(
        legacy, backends=BACKENDS, health_checks=False, flags=flags, control_store=None
    )
    assert router.production.algorithm.name == expected
    assert router.config.algorithm.value == expected
