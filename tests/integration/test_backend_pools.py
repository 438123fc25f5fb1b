"""Each backend has its own connection pool, on real loopback servers: a backend that
holds every connection it is allowed cannot make users of another backend wait."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import pytest

from flows.sim.fleet import FleetThread, bench_fleet, set_profile
from router.backend_client import BackendHttpClient, call_backend
from router.backends import BackendConfig
from router.failures import BackendFailure
from router.record import ErrorKind

pytestmark = pytest.mark.timeout(60)

SLOW_S = 2.0


@pytest.fixture
def fleet() -> Iterator[FleetThread]:
    with FleetThread(bench_fleet()) as running:
        assert running.info is not None
        set_profile(
            running.info.member("slow").admin_url, {"latency_ms": SLOW_S * 1000, "latency_sigma": 0}
        )
        set_profile(running.info.member("fast").admin_url, {"latency_sigma": 0})
        yield running


def backend(fleet: FleetThread, name: str) -> BackendConfig:
    assert fleet.info is not None
    config = next(b for b in fleet.info.backend_configs() if b.name == name)
    return config.model_copy(update={"max_connections": 2})


async def fast_answer_while_slow_backend_is_saturated(
    client: httpx.AsyncClient, slow: BackendConfig, fast: BackendConfig
) -> float:
    busy = [
        asyncio.create_task(call_backend(client, slow, "q", timeout_s=10, max_bytes=100_000))
        for _ in range(2)
    ]
    try:
        await asyncio.sleep(0.3)  # both slow calls hold their connections now
        started = time.perf_counter()
        # the pool wait counts against this call's timeout: well under the slow backend's 2 s
        answer = await call_backend(client, fast, "q", timeout_s=1.0, max_bytes=100_000)
        waited = time.perf_counter() - started
        assert answer.text
        return waited
    finally:
        slow_answers = await asyncio.gather(*busy, return_exceptions=True)
        assert all(not isinstance(a, BaseException) for a in slow_answers), slow_answers


async def test_a_saturated_backend_leaves_other_backends_connections_free(
    fleet: FleetThread,
) -> None:
    # each backend's `max_connections` sizes its own pool
    slow, fast = backend(fleet, "slow"), backend(fleet, "fast")
    assert (slow.max_connections, fast.max_connections) == (2, 2)
    async with BackendHttpClient([slow, fast]) as client:
        waited = await fast_answer_while_slow_backend_is_saturated(client, slow, fast)
    assert waited < SLOW_S / 2


async def test_one_shared_pool_would_make_them_wait(fleet: FleetThread) -> None:
    """The same scenario through one pool for both backends: the fast backend's call
    cannot get a connection before its timeout. This is what the per-backend pools fix
    (and shows the test above can fail)."""
    slow, fast = backend(fleet, "slow"), backend(fleet, "fast")
    shared = httpx.AsyncHTTPTransport(
        limits=httpx.Limits(max_connections=2, max_keepalive_connections=2)
    )
    async with BackendHttpClient([slow, fast], transport=shared) as client:
        with pytest.raises(BackendFailure) as failed:
            await fast_answer_while_slow_backend_is_saturated(client, slow, fast)
    assert failed.value.kind is ErrorKind.TIMEOUT


async def test_shadow_calls_never_take_the_users_connections(fleet: FleetThread, tmp_path) -> None:
    """Shadow mode on one backend allowed two connections, its production path slowed
    to 2 s: the shadows of two questions hold two connections for 2 s, and the next
    user's answer (legacy, the primary) must not wait for one. The production arm has
    pools of its own, so a shadow can never delay the user's answer."""
    from router.feature_flags import ProductionFeatureFlags
    from router.production_router import ProductionIntelligentQueryRouter
    from router.recorder import NullRecorder

    assert fleet.info is not None
    fast = backend(fleet, "fast")
    set_profile(
        fleet.info.member("fast").admin_url,
        {"latency_ms": SLOW_S * 1000, "latency_sigma": 0},
        arm="production",
    )
    flags = ProductionFeatureFlags(
        data_dir=tmp_path, instance_id="pools", enabled=True, deployment_mode="shadow"
    )
    router = ProductionIntelligentQueryRouter(
        backends=[fast],
        health_checks=False,
        flags=flags,
        control_store=None,
        recorder=NullRecorder(tmp_path, "pools"),
    )
    try:
        first = await asyncio.gather(*(router.route_query(f"q{i}", {}) for i in range(2)))
        assert all(r.ok and r.arm == "legacy" for r in first), first
        await asyncio.sleep(0.3)  # both shadows hold their production connections now
        assert len(router._shadow_tasks) == 2  # the two shadows are still running
        started = time.perf_counter()
        result = await router.route_query("the next user's question", {})
        waited = time.perf_counter() - started
        assert result.ok and result.arm == "legacy", result
        assert waited < SLOW_S / 2, waited
    finally:
        await router.shutdown(drain_timeout_s=0.1)
