"""The control store over HTTP: exact failure shapes with respx, and the whole path on
loopback (flows publish to `rollout control serve`, a router polls it and heartbeats)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import respx
from pydantic import ValidationError

from flows.control import CONTROL_URL_ENV, control_store
from flows.paths import DataPaths
from router import BackendConfig, BackendKind, ProductionFeatureFlags
from router import ProductionIntelligentQueryRouter as Router
from router.http_control_store import HttpControlStore
from router.modes import DeploymentMode
from router.recorder import NullRecorder
from router.router_config import RouterConfig
from tests.conftest import cli_server

URL = "http://control.test"


@respx.mock
def test_a_missing_document_is_none_and_the_etag_is_the_change_token() -> None:
    respx.get(f"{URL}/config").mock(
        side_effect=[
            httpx.Response(404),
            httpx.Response(200, text='{"version": 3}', headers={"etag": "abc"}),
        ]
    )
    store = HttpControlStore(URL)
    assert store.read_document() is None
    assert store.read_document() == ("abc", '{"version": 3}')


@respx.mock
def test_a_document_that_is_not_utf8_reads_as_invalid_not_as_a_guess() -> None:
    """`response.text` would guess a charset or replace what it cannot decode, and a
    corrupt document would be applied; the bytes as sent are refused instead."""
    config = RouterConfig(version=2, mode=DeploymentMode.CANARY, traffic_percent=5)
    body = config.model_copy(update={"reason": "café"}).model_dump_json().encode("latin-1")
    respx.get(f"{URL}/config").mock(return_value=httpx.Response(200, content=body))
    store = HttpControlStore(URL)
    found = store.read_document()
    assert found is not None
    with pytest.raises(ValidationError):
        RouterConfig.model_validate_json(found[1])
    assert store.current_or_none() is None


@respx.mock
def test_heartbeats_that_are_not_utf8_are_an_error_not_a_crash() -> None:
    respx.get(f"{URL}/acks").mock(return_value=httpx.Response(200, content=b'["caf\xe9"]'))
    with pytest.raises(OSError, match="not a JSON list"):
        HttpControlStore(URL).read_acks()


@pytest.mark.parametrize("endpoint_ahead_s", [-20.0, 20.0], ids=["behind", "ahead"])
@respx.mock
def test_heartbeat_ages_are_by_the_readers_clock_whatever_the_endpoints(
    endpoint_ahead_s: float,
) -> None:
    """`received_at` is by the endpoint's clock. A flows host 20 s ahead of it saw every
    router as gone; one 20 s behind kept a router dead for 16 s "live" (and a phase
    waiting for it was restored at its ack timeout)."""
    from datetime import UTC, datetime, timedelta

    from tests.conftest import heartbeat

    endpoint_now = datetime.now(UTC) + timedelta(seconds=endpoint_ahead_s)
    arrived = {"fresh": 1.0, "dead": 16.0}  # seconds ago, by the endpoint's clock
    acks = [
        heartbeat(name, 2)
        .model_copy(update={"received_at": endpoint_now - timedelta(seconds=ago)})
        .model_dump(mode="json")
        for name, ago in arrived.items()
    ]
    respx.get(f"{URL}/acks").mock(
        return_value=httpx.Response(
            200, json=acks, headers={"x-store-time": endpoint_now.isoformat()}
        )
    )
    ages = {a.instance: a.age_s() for a in HttpControlStore(URL).read_acks()}
    assert ages == pytest.approx(arrived, abs=1.0)


@pytest.mark.parametrize(
    "failure",
    [httpx.ConnectError("refused"), httpx.ReadTimeout("slow"), httpx.Response(500)],
    ids=["refused", "timeout", "500"],
)
@respx.mock
def test_an_unreachable_or_failing_endpoint_is_an_os_error(failure: object) -> None:
    """The router treats OSError as "unreadable this time" and keeps what it runs."""
    route = respx.get(f"{URL}/config")
    if isinstance(failure, httpx.Response):
        route.mock(return_value=failure)
    else:
        route.mock(side_effect=failure)
    with pytest.raises(OSError, match="control endpoint"):
        HttpControlStore(URL).read_document()


def loopback_router(
    data_dir: Path, instance: str, store: object = "env", **flags: object
) -> Router:
    """A router with one answering backend; its control store from `control_url` in
    `flags`, or `store`."""
    return Router(
        backends=[BackendConfig(name="a", kind=BackendKind.LIGHTRAG, base_url="http://a.test")],
        transport=httpx.MockTransport(lambda r: httpx.Response(200, json={"response": "ok"})),
        health_checks=False,
        flags=ProductionFeatureFlags(
            enabled=True, data_dir=data_dir, instance_id=instance, **flags
        ),
        control_store=store,  # type: ignore[arg-type]
        recorder=NullRecorder(data_dir / "segments", instance),
    )


@pytest.fixture
def endpoint(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[str], DataPaths]]:
    paths = DataPaths.at(tmp_path / "control-host").ensure()
    with cli_server("control", "serve", "--port", "0", "--data-dir", str(paths.root)) as (
        process,
        line,
    ):
        assert line.startswith("control endpoint: http://127.0.0.1:"), line
        yield line.split()[2], process, paths


async def wait_for(predicate, what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


@pytest.mark.timeout(60)
async def test_flows_publish_and_a_router_applies_through_the_endpoint(
    endpoint: tuple[str, subprocess.Popen[str], DataPaths],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url, process, served = endpoint
    monkeypatch.setenv(CONTROL_URL_ENV, url)
    flows_side = control_store(DataPaths.at(tmp_path / "flows-host"))  # no shared folder
    assert isinstance(flows_side, HttpControlStore)
    router = loopback_router(
        tmp_path / "router-host", "http-1", control_poll_s=0.1, control_url=url
    )
    await router.start()
    try:
        flows_side.publish(
            RouterConfig(version=1, mode=DeploymentMode.CANARY, traffic_percent=5, phase="c5")
        )
        await wait_for(lambda: router.config.version == 1, "the router to apply v1")
        await wait_for(
            lambda: any(a.applied_version == 1 for a in flows_side.read_acks()), "a heartbeat"
        )
        # what the endpoint stores is the folder the file store reads
        assert served.control.joinpath("acks", "http-1.json").exists()

        # an invalid document is refused by the router, and the refusal comes back
        garbage = b'{"version": 2, "mode": "sideways"}'
        await asyncio.to_thread(httpx.put, f"{url}/config", content=garbage)
        await wait_for(
            lambda: any(a.refused_version == 2 for a in flows_side.read_acks()), "the refusal"
        )
        assert router.config.version == 1

        # the endpoint goes away: the router keeps v1 and keeps answering
        os.killpg(process.pid, signal.SIGTERM)
        assert process.wait(15) == 0
        await asyncio.sleep(0.3)  # a few failed polls
        result = await router.route_query("What is glycine?", {"user_id": "u1"})
        assert result.ok and router.config.version == 1
    finally:
        await router.shutdown()
    # the store the router built from PROD_LB_CONTROL_URL is closed with it
    assert isinstance(router.control_store, HttpControlStore)
    assert router.control_store.client.is_closed


@pytest.mark.timeout(60)
async def test_async_with_applies_the_endpoints_document_before_the_first_request(
    endpoint: tuple[str, subprocess.Popen[str], DataPaths],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The legacy idiom `async with router:` started the control loop, which read the
    endpoint some time later: the first requests ran under the environment's config."""
    url, _, _ = endpoint
    monkeypatch.setenv(CONTROL_URL_ENV, url)
    control_store(DataPaths.at(tmp_path / "flows-host")).publish(
        RouterConfig(version=4, mode=DeploymentMode.SHADOW, phase="shadow")
    )
    router = loopback_router(tmp_path / "router-host", "http-2", control_url=url)
    async with router:
        assert (router.config.version, router.config.mode) == (4, DeploymentMode.SHADOW)


def test_a_heartbeat_for_another_instance_or_a_bad_name_is_refused(
    endpoint: tuple[str, subprocess.Popen[str], DataPaths],
) -> None:
    url, _, served = endpoint
    ack = {
        "instance": "a",
        "applied_version": 1,
        "effective_mode": "legacy_only",
        "configured_mode": "legacy_only",
        "traffic_percent": 0,
        "heartbeat_at": "2026-11-27T00:00:00Z",
        "started_at": "2026-11-27T00:00:00Z",
    }
    assert httpx.put(f"{url}/acks/b", json=ack).status_code == 400
    assert httpx.put(f"{url}/acks/..%2Fx", json=ack | {"instance": "../x"}).status_code in (
        400,
        404,
    )
    assert httpx.put(f"{url}/acks/a", json={"instance": "a"}).status_code == 422
    assert httpx.put(f"{url}/acks/a", json=ack).status_code == 204
    assert [p.name for p in served.control.joinpath("acks").iterdir()] == ["a.json"]


def test_concurrent_publishers_never_corrupt_the_document_and_versions_only_grow(
    endpoint: tuple[str, subprocess.Popen[str], DataPaths],
) -> None:
    """Sixteen publishers at once, each with its own version: the document is always
    one of theirs, whole, and a version not above the stored one is refused with 409
    (two publishers who both read v6 must not both publish a 7)."""
    url, _, served = endpoint
    store = HttpControlStore(url)
    configs = [RouterConfig(version=v, reason="x" * 5_000) for v in range(1, 17)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda c: _publish_or_conflict(store, c), configs))
    current = store.current()
    assert current is not None and current.version == 16  # the highest always lands
    assert RouterConfig.model_validate_json(
        served.control.joinpath("router_config.json").read_text()
    )
    assert not list(served.control.glob(".*.tmp"))

    with pytest.raises(OSError, match="409: version 3 is not above the published version"):
        store.publish(RouterConfig(version=3))
    store.publish(RouterConfig(version=17))  # a newer one is taken
    latest = store.current()
    assert latest is not None and latest.version == 17


def _publish_or_conflict(store: HttpControlStore, config: RouterConfig) -> None:
    try:
        store.publish(config)
    except OSError as exc:
        assert "409" in str(exc), exc  # a lower version lost the race: refused, not lost


def test_an_oversized_heartbeat_is_refused_before_it_is_read(
    endpoint: tuple[str, subprocess.Popen[str], DataPaths],
) -> None:
    url, _, _ = endpoint
    response = httpx.put(f"{url}/acks/a", content=b"{" + b" " * 2_000_000 + b"}")
    assert response.status_code == 413


@respx.mock
@pytest.mark.parametrize(
    ("url", "header"),
    [
        ("http://ops:hunter2@control.test", httpx.BasicAuth("ops", "hunter2")),
        ("http://hunter2@control.test", httpx.BasicAuth("hunter2", "")),  # a token alone
    ],
)
def test_credentials_in_the_url_are_sent_as_a_header_and_never_logged(
    url: str, header: httpx.BasicAuth, caplog: pytest.LogCaptureFixture
) -> None:
    """httpx logs every request's URL at INFO, and routers poll this one for ever."""
    route = respx.get("http://control.test/acks").mock(return_value=httpx.Response(503))
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.INFO, logger="httpx")  # an earlier test may have quietened it
    with pytest.raises(OSError) as caught:
        HttpControlStore(url).read_acks()
    (call,) = route.calls
    expected = header.auth_flow(httpx.Request("GET", "http://control.test")).__next__()
    assert call.request.headers["Authorization"] == expected.headers["Authorization"]
    assert call.request.url.userinfo == b""
    assert "hunter2" not in str(caught.value) and "http://control.test/acks" in str(caught.value)
    assert caplog.records and "hunter2" not in caplog.text


@respx.mock
def test_heartbeats_that_are_not_a_list_are_an_error_not_an_empty_fleet() -> None:
    respx.get(f"{URL}/acks").mock(return_value=httpx.Response(200, json={"a": 1}))
    with pytest.raises(OSError, match="not a JSON list"):
        HttpControlStore(URL).read_acks()


class _HangingStore(HttpControlStore):
    """An endpoint that answers only once the test lets it (or after 5 s)."""

    def __init__(self) -> None:
        super().__init__(URL)
        self.release = threading.Event()
        self.answered_late = False

    def read_document(self) -> tuple[object, str] | None:
        if not self.release.wait(5):
            self.answered_late = True
        return None

    def read_acks(self) -> list:  # type: ignore[override]
        return []

    def write_ack(self, ack: object) -> None:  # type: ignore[override]
        self.release.wait(5)


async def test_an_unreachable_endpoint_never_holds_up_a_request(tmp_path: Path) -> None:
    """Used as a drop-in (no `start()`), the router's first request does not wait for the
    control endpoint: the read runs in the background, so the event loop stays free
    (here, free to release the read itself)."""
    store = _HangingStore()
    router = loopback_router(tmp_path, "hang-1", store, control_poll_s=60)
    result = await router.route_query("What is glycine?", {"user_id": "u1"})
    store.release.set()
    await router.shutdown()
    assert result.ok and result.arm == "legacy"
    assert not store.answered_late


def test_a_version_that_is_not_a_json_integer_is_refused(
    endpoint: tuple[str, subprocess.Popen[str], DataPaths],
) -> None:
    """ "6" and 6.0 skipped the versions-only-grow rule: a new router applied a second
    document as v6 while the running ones kept the first, a fleet split under one
    version. Routers refuse them too."""
    url, _, served = endpoint
    store = HttpControlStore(url)
    store.publish(RouterConfig(version=6, mode=DeploymentMode.CANARY, traffic_percent=5))
    for version in ('"6"', "6.0", "7.0"):
        body = f'{{"version": {version}, "mode": "ab_test", "traffic_percent": 50}}'
        answer = httpx.put(f"{url}/config", content=body)
        assert answer.status_code == 422 and "JSON integer" in answer.json()["error"]
        with pytest.raises(ValidationError):
            RouterConfig.model_validate_json(body)
    current = store.current()
    assert current is not None and current.mode is DeploymentMode.CANARY
    with pytest.raises(OSError, match="409"):
        store.publish(RouterConfig(version=2))
    # a stored document with no readable version (a hand edit) can still be replaced:
    # a rollback must always go out
    served.control.joinpath("router_config.json").write_text("[" * 100_000)
    assert httpx.put(f"{url}/config", content="[" * 100_000).status_code == 422
    store.publish(RouterConfig(version=8))
    latest = store.current()
    assert latest is not None and latest.version == 8


async def test_a_corrupt_stored_document_reaches_routers_to_refuse_and_report(
    endpoint: tuple[str, subprocess.Popen[str], DataPaths], tmp_path: Path
) -> None:
    """A document that is not UTF-8 on the endpoint's disk was a 500, which routers read
    as an outage: they never reported a refusal."""
    url, _, served = endpoint
    body = RouterConfig(version=2, reason="café").model_dump_json().encode("latin-1")
    served.control.joinpath("router_config.json").write_bytes(body)
    answer = await asyncio.to_thread(httpx.get, f"{url}/config")
    assert answer.status_code == 200 and answer.content == body
    router = loopback_router(tmp_path, "c-1", control_url=url)
    await router.start()
    await router.shutdown()
    assert router.refused is not None and router.refused[0] == 2
    (ack,) = HttpControlStore(url).read_acks()
    assert ack.refused_version == 2 and "unicode" in (ack.refused_reason or "")


def test_liveness_follows_the_endpoints_clock_not_the_replicas(
    endpoint: tuple[str, subprocess.Popen[str], DataPaths],
) -> None:
    """A replica whose clock ran 20 s behind was dropped from the fleet the moment it
    heartbeated (a live replica still on v1 did not hold the wait back); one an hour
    ahead stayed "live" for an hour after it died."""
    from datetime import UTC, datetime, timedelta

    from flows.control import ack_status

    url, _, _ = endpoint

    def heartbeat(instance: str, applied: int, skew_s: float) -> dict[str, object]:
        at = (datetime.now(UTC) + timedelta(seconds=skew_s)).isoformat()
        return {
            "instance": instance,
            "applied_version": applied,
            "effective_mode": "legacy_only",
            "configured_mode": "legacy_only",
            "traffic_percent": 0,
            "heartbeat_at": at,
            "started_at": at,
        }

    assert httpx.put(f"{url}/acks/on-time", json=heartbeat("on-time", 2, 0)).status_code == 204
    assert httpx.put(f"{url}/acks/behind", json=heartbeat("behind", 1, -20)).status_code == 204
    status = ack_status(HttpControlStore(url), 2)
    assert sorted(a.instance for a in status.live) == ["behind", "on-time"]
    assert status.pending == ["behind"] and not status.complete


def test_waiting_for_routers_outlasts_an_endpoint_that_is_down(tmp_path: Path) -> None:
    """One failed read of the heartbeats (an endpoint restarting) ended the wait at once
    with an OSError, and the flow restored the previous phase."""
    from flows.control import wait_for_ack

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    store = HttpControlStore(f"http://127.0.0.1:{port}", timeout_s=0.2)
    started = time.monotonic()
    status = wait_for_ack(store, 3, timeout_s=0.6, poll_s=0.05)
    assert time.monotonic() - started >= 0.6  # waited out the timeout
    assert not status.complete and status.describe().startswith("heartbeats unreadable")


def test_a_control_url_with_a_query_is_refused() -> None:
    """`?token=x` became `?token=x/config`: every read a 404, read as "nothing published"."""
    with pytest.raises(ValueError, match=r"token=\*\*\*.*query or fragment"):
        HttpControlStore("http://control.test/?token=secret")
    with pytest.raises(ValidationError, match="at most 128 characters"):
        ProductionFeatureFlags(instance_id="a" * 129)


async def test_start_and_shutdown_give_up_on_an_endpoint_that_never_finishes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An endpoint trickling its answer (each byte within the read timeout) held start()
    and shutdown() for as long as it liked."""
    import router.production_router as production_router

    monkeypatch.setattr(production_router, "CONTROL_CALL_S", 0.2)
    store = _HangingStore()
    router = loopback_router(tmp_path, "hang-2", store, control_poll_s=60)
    await router.start()  # returns while the read still hangs
    assert not store.release.is_set()
    await router.shutdown()  # and so does the last heartbeat
    assert not store.release.is_set()
    store.release.set()
