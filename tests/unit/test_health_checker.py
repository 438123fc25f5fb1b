"""Active health checks (`ActiveHealthChecker`), tested twice as every network path is.

respx pins the exact shapes: where each backend kind is probed, with which credentials,
and what each probe outcome (pass, 5xx, connect error, timeout, 429) does to the
backend's routability. Loopback servers pin the whole path: a probe that hangs past
`timeout_s` on a real socket, and the simulated fleet losing and regaining a backend.

Rounds are driven with `check_once()`; the loopback fleet test runs the real loop with a
tiny interval and waits on state, never on wall time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path

import httpx
import pytest
import respx

from flows.sim.fleet import SIM_API_KEY_ENV, Fleet, demo_fleet
from router.backend_state import BackendState
from router.backends import BackendConfig, BackendKind
from router.circuit_breaker import BreakerState, CircuitBreaker
from router.failures import BackendFailure
from router.health_checker import ActiveHealthChecker, health_url
from router.production_config import CircuitBreakerSettings, HealthCheckSettings
from router.record import ErrorKind

pytestmark = pytest.mark.timeout(30)

KEY_ENV = "TEST_HEALTH_CHECKER_PPLX_KEY"
SECRET = "pplx-health-secret-0123456789abcdef"
LR = BackendConfig(name="lr-1", kind=BackendKind.LIGHTRAG, base_url="http://lr.test")
PX = BackendConfig(
    name="px-1", kind=BackendKind.PERPLEXITY, base_url="http://px.test", api_key_env=KEY_ENV
)
LR_HEALTH = "http://lr.test/health"
PX_MODELS = "http://px.test/models"

Change = tuple[str, bool, str]


class Harness:
    """A checker wired the way a router wires it: two balancers' views per backend
    (legacy and production) and an `on_change` sink that records what would be logged."""

    def __init__(
        self, client: httpx.AsyncClient, backends: Sequence[BackendConfig], **settings: float
    ) -> None:
        self.views = {b.name: [BackendState(b), BackendState(b)] for b in backends}
        self.changes: list[Change] = []
        self.checker = ActiveHealthChecker(
            client,
            backends,
            lambda name: self.views[name],
            HealthCheckSettings(**settings),
            lambda name, healthy, reason: self.changes.append((name, healthy, reason)),
        )

    def routable(self, name: str) -> bool:
        """What every balancer sees; the views must never disagree."""
        now = time.monotonic()
        seen = {state.available(now) for state in self.views[name]}
        assert len(seen) == 1, f"balancers disagree about {name}: {self.views[name]}"
        assert seen == {self.checker.healthy[name]}
        return seen.pop()

    async def rounds(self, count: int) -> None:
        for _ in range(count):
            await self.checker.check_once()


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as http:
        yield http


@pytest.fixture
def mock() -> Iterator[respx.MockRouter]:
    with respx.mock(assert_all_mocked=True, assert_all_called=False) as router:
        yield router


@pytest.fixture
def secret(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(KEY_ENV, SECRET)
    return SECRET


async def wait_until(predicate: Callable[[], bool], what: str, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(0.01)


# -- where and how each kind is probed ------------------------------------------------
@pytest.mark.parametrize(
    ("base_url", "expected"),
    [
        ("http://lr.test", "http://lr.test/health"),
        ("http://lr.test/", "http://lr.test/health"),
        ("http://lr.test/rag/", "http://lr.test/rag/health"),
    ],
)
async def test_lightrag_is_probed_with_get_health_and_no_credentials(
    client: httpx.AsyncClient, mock: respx.MockRouter, secret: str, base_url: str, expected: str
) -> None:
    backend = BackendConfig(name="lr-x", kind=BackendKind.LIGHTRAG, base_url=base_url)
    route = mock.get(expected).mock(return_value=httpx.Response(200, json={"status": "ok"}))
    assert health_url(backend) == expected

    harness = Harness(client, [backend])
    await harness.checker.check_once()

    assert route.call_count == 1
    request = route.calls.last.request
    assert request.method == "GET"
    assert "authorization" not in request.headers
    assert harness.routable("lr-x")


async def test_perplexity_is_probed_with_get_models_and_its_bearer_key(
    client: httpx.AsyncClient, mock: respx.MockRouter, secret: str
) -> None:
    route = mock.get(PX_MODELS).mock(return_value=httpx.Response(200, json={"data": []}))

    assert await Harness(client, [PX]).checker.probe(PX) is True

    assert route.call_count == 1
    assert route.calls.last.request.method == "GET"
    assert route.calls.last.request.headers["authorization"] == f"Bearer {secret}"


async def test_perplexity_without_a_key_in_the_environment_is_probed_without_one(
    client: httpx.AsyncClient, mock: respx.MockRouter, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    route = mock.get(PX_MODELS).mock(return_value=httpx.Response(401))

    harness = Harness(client, [PX], unhealthy_after=1)
    await harness.checker.check_once()

    assert "authorization" not in route.calls.last.request.headers
    # No usable key: the backend cannot answer anyone, so it must not be routed to.
    assert not harness.routable("px-1")


async def test_every_backend_is_probed_each_round_and_judged_alone(
    client: httpx.AsyncClient, mock: respx.MockRouter, secret: str
) -> None:
    lr = mock.get(LR_HEALTH).mock(return_value=httpx.Response(503))
    px = mock.get(PX_MODELS).mock(return_value=httpx.Response(200))

    harness = Harness(client, [LR, PX], unhealthy_after=2)
    await harness.rounds(2)

    assert (lr.call_count, px.call_count) == (2, 2)
    assert not harness.routable("lr-1")
    assert harness.routable("px-1")
    assert harness.changes == [("lr-1", False, "2 check(s) failed")]


# -- failures, recovery ---------------------------------------------------------------
FAILURES = {
    "500": httpx.Response(500),
    "502": httpx.Response(502),
    "503": httpx.Response(503, json={"status": "degraded"}),
    "504": httpx.Response(504),
    "401": httpx.Response(401),
    "404": httpx.Response(404),
    "connect-refused": httpx.ConnectError("connection refused"),
    "read-timeout": httpx.ReadTimeout("timed out"),
    "connect-timeout": httpx.ConnectTimeout("timed out"),
    "pool-timeout": httpx.PoolTimeout("no connection"),
    "remote-protocol": httpx.RemoteProtocolError("server disconnected"),
}


@pytest.mark.parametrize("failure", list(FAILURES.values()), ids=list(FAILURES))
@pytest.mark.parametrize("backend", [LR, PX], ids=["lightrag", "perplexity"])
async def test_backend_is_unrouted_after_the_configured_number_of_failed_probes(
    client: httpx.AsyncClient,
    mock: respx.MockRouter,
    secret: str,
    backend: BackendConfig,
    failure: httpx.Response | Exception,
) -> None:
    route = mock.get(health_url(backend))
    if isinstance(failure, Exception):
        route.mock(side_effect=failure)
    else:
        route.mock(return_value=failure)
    harness = Harness(client, [backend], unhealthy_after=3)

    assert await harness.checker.probe(backend) is False
    for _ in range(2):
        await harness.checker.check_once()
        assert harness.routable(backend.name), "one failure short of the threshold"
        assert harness.changes == []

    await harness.checker.check_once()
    assert not harness.routable(backend.name)
    assert harness.changes == [(backend.name, False, "3 check(s) failed")]

    await harness.rounds(3)  # still failing: no second report
    assert not harness.routable(backend.name)
    assert len(harness.changes) == 1


async def test_backend_is_routed_again_after_the_configured_number_of_passed_probes(
    client: httpx.AsyncClient, mock: respx.MockRouter
) -> None:
    route = mock.get(LR_HEALTH).mock(return_value=httpx.Response(500))
    harness = Harness(client, [LR], unhealthy_after=1, healthy_after=3)
    await harness.checker.check_once()
    assert not harness.routable("lr-1")

    route.mock(return_value=httpx.Response(200))
    for _ in range(2):
        await harness.checker.check_once()
        assert not harness.routable("lr-1"), "one pass short of the threshold"

    await harness.checker.check_once()
    assert harness.routable("lr-1")
    assert harness.changes == [
        ("lr-1", False, "1 check(s) failed"),
        ("lr-1", True, "3 check(s) passed"),
    ]


async def test_a_pass_lets_an_open_breaker_probe_before_its_wait_ends(
    client: httpx.AsyncClient, mock: respx.MockRouter
) -> None:
    """A category whose only backend was down for seconds failed for the breaker's whole
    open wait after the backend was back (the active check already said healthy)."""
    route = mock.get(PX_MODELS).mock(return_value=httpx.Response(503))
    harness = Harness(client, [PX], unhealthy_after=3, healthy_after=1)
    production = harness.views["px-1"][1]
    production.breaker = CircuitBreaker(CircuitBreakerSettings(open_wait_s=300.0), "px-1")
    for _ in range(production.breaker.minimum_calls):
        production.breaker.record(
            BackendFailure(ErrorKind.SERVER_ERROR, "503", status=503), 5.0, time.monotonic()
        )
    assert production.breaker.blocks(time.monotonic())
    await harness.checker.check_once()  # a failing check changes nothing
    assert production.breaker.blocks(time.monotonic())
    route.mock(return_value=httpx.Response(200))
    await harness.checker.check_once()
    assert production.breaker.state is BreakerState.HALF_OPEN
    assert production.breaker.permits(time.monotonic())


async def test_a_pass_breaks_a_failure_streak(
    client: httpx.AsyncClient, mock: respx.MockRouter
) -> None:
    mock.get(LR_HEALTH).mock(
        side_effect=[httpx.Response(500), httpx.Response(200), httpx.Response(500)]
    )
    harness = Harness(client, [LR], unhealthy_after=2)

    await harness.rounds(3)

    assert harness.routable("lr-1"), "two failures, but not in a row"
    assert harness.changes == []


async def test_a_failure_breaks_a_recovery_streak(
    client: httpx.AsyncClient, mock: respx.MockRouter
) -> None:
    mock.get(LR_HEALTH).mock(
        side_effect=[
            httpx.Response(500),  # unhealthy
            httpx.Response(200),
            httpx.Response(500),
            httpx.Response(200),  # two passes, but not in a row
            httpx.Response(200),  # now two in a row
        ]
    )
    harness = Harness(client, [LR], unhealthy_after=1, healthy_after=2)

    await harness.rounds(4)
    assert not harness.routable("lr-1")

    await harness.checker.check_once()
    assert harness.routable("lr-1")
    assert [healthy for _, healthy, _ in harness.changes] == [False, True]


# -- 429: busy, no verdict ------------------------------------------------------------
async def test_429_on_a_healthy_backend_never_marks_it_unhealthy(
    client: httpx.AsyncClient, mock: respx.MockRouter, secret: str
) -> None:
    mock.get(PX_MODELS).mock(return_value=httpx.Response(429, headers={"Retry-After": "30"}))
    harness = Harness(client, [PX], unhealthy_after=1)

    assert await harness.checker.probe(PX) is None
    await harness.rounds(5)

    assert harness.routable("px-1")
    assert harness.changes == []


async def test_429_on_an_unhealthy_backend_never_marks_it_healthy(
    client: httpx.AsyncClient, mock: respx.MockRouter
) -> None:
    route = mock.get(LR_HEALTH).mock(return_value=httpx.Response(503))
    harness = Harness(client, [LR], unhealthy_after=1, healthy_after=1)
    await harness.checker.check_once()
    assert not harness.routable("lr-1")

    route.mock(return_value=httpx.Response(429))
    await harness.rounds(5)

    assert not harness.routable("lr-1")
    assert harness.changes == [("lr-1", False, "1 check(s) failed")]


STREAKS_ACROSS_429 = {
    # responses, settings, verdict after the last response (one round earlier: the other)
    "failure-streak": ([500, 429, 500], {"unhealthy_after": 2}, False),
    "pass-streak": ([500, 200, 429, 200], {"unhealthy_after": 1, "healthy_after": 2}, True),
}


@pytest.mark.parametrize(
    ("statuses", "settings", "verdict"),
    list(STREAKS_ACROSS_429.values()),
    ids=list(STREAKS_ACROSS_429),
)
async def test_429_neither_breaks_nor_resets_a_streak(
    client: httpx.AsyncClient,
    mock: respx.MockRouter,
    statuses: list[int],
    settings: dict[str, int],
    verdict: bool,
) -> None:
    """What the code does: a 429 is skipped entirely, so X, 429, X counts as two Xs in a
    row (the streak neither restarts nor ends)."""
    mock.get(LR_HEALTH).mock(side_effect=[httpx.Response(s) for s in statuses])
    harness = Harness(client, [LR], **settings)

    await harness.rounds(len(statuses) - 1)
    assert harness.routable("lr-1") is not verdict, "one short: the 429 did not count"

    await harness.checker.check_once()
    assert harness.routable("lr-1") is verdict
    assert harness.changes[-1][:2] == ("lr-1", verdict)


# -- timeout ---------------------------------------------------------------------------
async def test_probe_timeout_setting_is_sent_with_every_probe(
    client: httpx.AsyncClient, mock: respx.MockRouter, secret: str
) -> None:
    """respx answers above the transport, where httpx enforces timeouts, so a slow mock
    is never cut off; here only the setting is pinned. The hang itself is cut on a real
    socket in `test_a_probe_that_hangs_past_the_timeout_is_a_failure_on_loopback`."""
    lr = mock.get(LR_HEALTH).mock(return_value=httpx.Response(200))
    px = mock.get(PX_MODELS).mock(return_value=httpx.Response(200))

    await Harness(client, [LR, PX], timeout_s=0.05).checker.check_once()

    expected = {"connect": 0.05, "read": 0.05, "write": 0.05, "pool": 0.05}
    assert lr.calls.last.request.extensions["timeout"] == expected
    assert px.calls.last.request.extensions["timeout"] == expected


# -- secrets and logs -----------------------------------------------------------------
async def test_the_api_key_never_appears_in_reasons_or_logs(
    client: httpx.AsyncClient,
    mock: respx.MockRouter,
    secret: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    mock.get(PX_MODELS).mock(
        side_effect=[
            httpx.Response(401, json={"error": "bad key"}),
            httpx.ConnectError("refused"),
            httpx.Response(200),
        ]
    )
    harness = Harness(client, [PX], unhealthy_after=2, healthy_after=1)

    await harness.rounds(3)

    assert [healthy for _, healthy, _ in harness.changes] == [False, True]
    recorded = " ".join(reason for _, _, reason in harness.changes) + caplog.text
    assert secret not in recorded
    assert secret[-8:] not in recorded


async def test_the_loop_survives_a_round_that_raises_and_keeps_judging(
    client: httpx.AsyncClient,
    mock: respx.MockRouter,
    secret: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """ "A checker must never die": an unexpected error in a probe is a failed check for
    that backend, logged (without the key), and the loop keeps judging."""
    caplog.set_level(logging.DEBUG, logger="router.health_checker")
    mock.get(PX_MODELS).mock(
        side_effect=[RuntimeError("unexpected"), httpx.Response(503), httpx.Response(503)]
    )
    harness = Harness(client, [PX], unhealthy_after=1, interval_s=0.01)

    task = asyncio.create_task(harness.checker.run())
    try:
        await wait_until(lambda: bool(harness.changes), "the round after the error")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    assert harness.changes[0] == ("px-1", False, "1 check(s) failed")
    assert "health check of px-1 failed: RuntimeError" in caplog.text
    assert secret not in caplog.text


async def test_one_backends_unexpected_error_does_not_blind_the_checker_to_the_others(
    client: httpx.AsyncClient, mock: respx.MockRouter, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEY_ENV, "pplx-pasted-with-a-smart-quote\u2019")
    mock.get(LR_HEALTH).mock(return_value=httpx.Response(503))
    mock.get(PX_MODELS).mock(return_value=httpx.Response(200))
    harness = Harness(client, [LR, PX], unhealthy_after=1)

    with contextlib.suppress(Exception):  # the round may report the error, but...
        await harness.checker.check_once()

    assert not harness.routable("lr-1")  # ...the failing LightRAG must still be judged


async def test_a_key_with_a_line_break_fails_the_probe_unsent_and_unlogged(
    client: httpx.AsyncClient,
    mock: respx.MockRouter,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A two-line secret file: on a real connection httpcore logged the illegal header,
    key and all, at DEBUG on every probe. It is refused before anything is sent."""
    monkeypatch.setenv(KEY_ENV, "pplx-first-line-secret\nsecond-line")
    route = mock.get(PX_MODELS).mock(return_value=httpx.Response(200))
    harness = Harness(client, [PX], unhealthy_after=1)

    await harness.checker.check_once()

    assert not harness.routable("px-1") and not route.called


# -- loopback: real sockets -----------------------------------------------------------
class RawServer:
    """A TCP server on 127.0.0.1 that reads one HTTP request and then does `behaviour`."""

    def __init__(self, behaviour: Callable[[asyncio.StreamWriter], Awaitable[None]]) -> None:
        self.behaviour = behaviour
        self.release = asyncio.Event()
        self.server: asyncio.Server | None = None
        self.requests = 0

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            self.requests += 1
            await self.behaviour(writer)
            await asyncio.wait_for(self.release.wait(), 5)
        except (OSError, asyncio.IncompleteReadError, TimeoutError):
            pass
        finally:
            writer.close()

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def __aexit__(self, *exc: object) -> None:
        self.release.set()
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()
        await asyncio.sleep(0)  # let released handlers close their sockets


async def _hang(writer: asyncio.StreamWriter) -> None:
    return None  # never answer


async def _trickle(writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\n")
    for _ in range(8):  # each byte within the timeout, the whole body well past it
        await writer.drain()
        await asyncio.sleep(0.03)
        writer.write(b"x")
    await writer.drain()


async def test_a_probe_that_hangs_past_the_timeout_is_a_failure_on_loopback(
    client: httpx.AsyncClient,
) -> None:
    async with RawServer(_hang) as url:
        backend = BackendConfig(name="hung", kind=BackendKind.LIGHTRAG, base_url=url)
        harness = Harness(client, [backend], timeout_s=0.05, unhealthy_after=1)

        # Bounded so a probe that ignores its timeout fails here instead of hanging.
        await asyncio.wait_for(harness.checker.check_once(), 2)

    assert not harness.routable("hung")
    assert harness.changes == [("hung", False, "1 check(s) failed")]


async def test_a_probe_that_trickles_past_the_timeout_is_a_failure_on_loopback(
    client: httpx.AsyncClient,
) -> None:
    async with RawServer(_trickle) as url:
        backend = BackendConfig(name="trickle", kind=BackendKind.LIGHTRAG, base_url=url)
        harness = Harness(client, [backend], timeout_s=0.05)

        verdict = await asyncio.wait_for(harness.checker.probe(backend), 2)

    assert verdict is False


async def test_simulated_fleet_loses_and_regains_backends_on_loopback(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The real loop against the simulated LightRAG/Perplexity servers: all healthy;
    a LightRAG server stops answering and is unrouted; Perplexity's key is revoked
    (401 on /models) and restored, and it follows."""
    caplog.set_level(logging.DEBUG)
    key = "sim-health-key-0123456789"
    monkeypatch.setenv(SIM_API_KEY_ENV, key)
    fleet = Fleet(demo_fleet(api_key=key))
    info = await fleet.start()
    try:
        async with httpx.AsyncClient() as http:
            harness = Harness(
                http,
                info.backend_configs(),
                interval_s=0.02,
                timeout_s=1.0,
                unhealthy_after=2,
                healthy_after=1,
            )
            checker = harness.checker
            task = asyncio.create_task(checker.run())
            try:
                await wait_until(
                    lambda: all(n >= 2 for n in checker.passes.values()), "two passing rounds"
                )
                assert all(harness.routable(b.name) for b in info.backend_configs())
                assert harness.changes == []

                # A LightRAG instance stops answering (its server shuts down).
                stopped = fleet.running["lightrag-2"]
                stopped.server.should_exit = True
                await asyncio.wait_for(stopped.task, 5)
                await wait_until(lambda: not checker.healthy["lightrag-2"], "lightrag-2 down")
                assert not harness.routable("lightrag-2")
                assert harness.routable("lightrag-1")
                assert harness.routable("perplexity-1")

                # An outage injected through the admin API is seen by the checks too,
                # and so is its end.
                admin = info.member("lightrag-1").admin_url
                (await http.put(admin, json={"down": True})).raise_for_status()
                await wait_until(lambda: not checker.healthy["lightrag-1"], "lightrag-1 down")
                assert not harness.routable("lightrag-1")
                (await http.put(admin, json={"down": False})).raise_for_status()
                await wait_until(lambda: checker.healthy["lightrag-1"], "lightrag-1 back")
                assert harness.routable("lightrag-1")

                # Perplexity rejects the key, then gets the right one back.
                monkeypatch.setenv(SIM_API_KEY_ENV, "revoked-key")
                await wait_until(lambda: not checker.healthy["perplexity-1"], "perplexity down")
                assert not harness.routable("perplexity-1")
                monkeypatch.setenv(SIM_API_KEY_ENV, key)
                await wait_until(lambda: checker.healthy["perplexity-1"], "perplexity back")
                assert harness.routable("perplexity-1")
                assert harness.routable("lightrag-1")
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
    finally:
        await fleet.stop()

    assert harness.changes == [
        ("lightrag-2", False, "2 check(s) failed"),
        ("lightrag-1", False, "2 check(s) failed"),
        ("lightrag-1", True, "1 check(s) passed"),
        ("perplexity-1", False, "2 check(s) failed"),
        ("perplexity-1", True, "1 check(s) passed"),
    ]
    assert key not in caplog.text
    assert all(key not in reason for _, _, reason in harness.changes)


@pytest.mark.parametrize("enabled", [True, False])
async def test_health_check_enabled_false_in_the_config_stops_active_checks(
    tmp_path: Path, enabled: bool
) -> None:
    """`health_check.enabled: false` in a production config means no probes at all."""
    from router.feature_flags import ProductionFeatureFlags
    from router.production_config import ProductionLoadBalancingConfig
    from router.production_router import ProductionIntelligentQueryRouter

    probed: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        probed.append(request.url.path)
        return httpx.Response(200, json={"status": "healthy"})

    router = ProductionIntelligentQueryRouter(
        backends=[LR],
        transport=httpx.MockTransport(handler),
        flags=ProductionFeatureFlags(
            enabled=True, data_dir=tmp_path, instance_id="hc", control_poll_s=60
        ),
        production_config=ProductionLoadBalancingConfig(
            backends=(LR,),
            health_check=HealthCheckSettings(enabled=enabled, interval_s=0.01, timeout_s=0.5),
        ),
        control_store=None,
    )
    await router.start()
    for _ in range(50):
        if probed:
            break
        await asyncio.sleep(0.01)
    await router.shutdown()
    assert bool(probed) is enabled, probed
