"""The deployment path for real: a local Prefect server, `rollout deploy` from
deployments/prefect.yaml, and the nightly-comparison deployment run by a process worker."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from flows.demo.processes import ChildProcess
from flows.paths import DataPaths
from flows.store.database import connect
from flows.store.ingest import collect
from router.record import RequestRecord
from router.recorder import SegmentRecorder
from tests.conftest import ROOT
from tests.integration.conftest import LiveApp

pytestmark = pytest.mark.prefect


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    home = tmp_path_factory.mktemp("prefect-server-home")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(
        PREFECT_HOME=str(home),
        DO_NOT_TRACK="1",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_LOGGING_LEVEL="WARNING",
        PREFECT_WORKER_QUERY_SECONDS="1",
    )
    process = ChildProcess(
        "prefect server",
        [
            sys.executable,
            "-m",
            "prefect",
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        home / "server.log",
        {k: v for k, v in env.items() if k.startswith(("PREFECT_", "DO_NOT"))},
    ).start()
    api = f"http://127.0.0.1:{port}/api"

    def healthy() -> bool:
        try:
            return httpx.get(f"{api}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        process.wait_until(healthy, 120, "Prefect API health")
        yield {**env, "PREFECT_API_URL": api}
    finally:
        process.stop()


def run(args: list[str], env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def some_rows(paths: DataPaths) -> None:
    recorder = SegmentRecorder(paths.segments, "server-test")
    now = datetime.now(UTC)
    for i in range(40):
        arm = "production" if i % 4 == 0 else "legacy"
        recorder.record(
            RequestRecord(
                f"r{i}",
                now,
                "server-test",
                1,
                "canary",
                arm,
                False,
                None,
                i,
                "general",
                "response_time",
                "lightrag-1" if i % 2 else "lightrag-2",
                1,
                False,
                "ok",
                200,
                None,
                100.0 + i,
                10,
                50,
                0.001,
                0.8,
                "h",
                40,
            )
        )
    recorder.close()
    collect(paths)


def test_deploy_and_run_the_nightly_comparison(server: dict[str, str], tmp_path: Path) -> None:
    paths = DataPaths.at(tmp_path / "data").ensure()
    some_rows(paths)
    deployed = run(
        [
            sys.executable,
            "-m",
            "flows.cli",
            "deploy",
            "--pool",
            "test-pool",
            "--timezone",
            "Europe/Berlin",
            "--data-dir",
            str(paths.root),
        ],
        server,
    )
    assert deployed.returncode == 0, deployed.stdout[-2000:] + deployed.stderr[-2000:]

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with (
        temporary_settings(updates={PREFECT_API_URL: server["PREFECT_API_URL"]}),
        get_client(sync_client=True) as client,
    ):
        deployments = {d.name: d for d in client.read_deployments()}
        assert set(deployments) >= {
            "rollout-start",
            "rollout-tick",
            "rollout-approve",
            "rollout-rollback",
            "nightly-comparison",
        }
        nightly = deployments["nightly-comparison"]
        schedule = nightly.schedules[0].schedule
        assert schedule.cron == "0 2 * * *" and schedule.timezone == "Europe/Berlin"
        assert deployments["rollout-tick"].global_concurrency_limit.limit == 1
        # a paused approval form outlives Prefect's lease renewals only without a limit
        assert deployments["rollout-approve"].global_concurrency_limit is None
        hours = nightly.parameter_openapi_schema["properties"]["hours"]
        assert hours["exclusiveMinimum"] == 0  # the UI refuses an inverted window
        assert "window" in hours["description"]  # the form says what each field is
        assert nightly.parameters["data_dir"] == str(paths.root.resolve())

    started = run(
        [
            sys.executable,
            "-m",
            "prefect",
            "deployment",
            "run",
            "nightly-comparison/nightly-comparison",
            "--param",
            "hours=1",
        ],
        server,
    )
    assert started.returncode == 0, started.stderr[-2000:]
    worker = run(
        [sys.executable, "-m", "prefect", "worker", "start", "--pool", "test-pool", "--run-once"],
        server,
        timeout=240,
    )
    assert worker.returncode == 0, worker.stdout[-2000:] + worker.stderr[-2000:]

    with (
        temporary_settings(updates={PREFECT_API_URL: server["PREFECT_API_URL"]}),
        get_client(sync_client=True) as client,
    ):
        runs = client.read_flow_runs()
        # The cron schedule adds future runs of its own, in no particular order: the
        # one this test triggered is the one that is no longer scheduled.
        triggered = [
            r for r in runs if r.deployment_id == nightly.id and not r.state.is_scheduled()
        ]
        assert len(triggered) == 1 and triggered[0].state.is_completed(), triggered
    with connect(paths.database, read_only=True) as con:
        stored = con.execute(
            "SELECT count(*), sum(legacy_requests), sum(production_requests) "
            "FROM nightly_comparisons"
        ).fetchall()[0]
    assert stored[0] >= 2 and stored[1] == 30 and stored[2] == 10


def test_cli_rollback_emits_the_event_an_automation_listens_for(
    server: dict[str, str], live_app: LiveApp
) -> None:
    """`rollout rollback` acts without a flow run; an automation on `rollout.rolled-back`
    must still fire, so the CLI emits the event to the server itself."""
    data = live_app.paths.root
    plan = ROOT / "deployments/plans/demo.yaml"
    cli = [sys.executable, "-m", "flows.cli"]
    started = run([*cli, "start", "--plan", str(plan), "--data-dir", str(data)], server)
    assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
    rolled = run(
        [*cli, "rollback", "--reason", "on-call saw bad answers", "--data-dir", str(data)], server
    )
    assert rolled.returncode == 0, rolled.stdout[-2000:] + rolled.stderr[-2000:]
    with connect(DataPaths.at(data).database, read_only=True) as con:
        (rollout_id,) = con.execute("SELECT rollout_id FROM rollouts").fetchone()

    def rolled_back_events() -> list[dict]:
        response = httpx.post(
            f"{server['PREFECT_API_URL']}/events/filter",
            json={"filter": {"event": {"name": ["rollout.rolled-back"]}}, "limit": 10},
            timeout=10,
        )
        response.raise_for_status()
        return response.json()["events"]

    deadline = time.monotonic() + 60
    events = rolled_back_events()
    while not events and time.monotonic() < deadline:  # the server persists events async
        time.sleep(1)
        events = rolled_back_events()
    assert len(events) == 1, events
    (event,) = events
    assert event["resource"]["prefect.resource.id"] == "rollout.group.demo"
    assert event["payload"]["rollout_id"] == rollout_id
    assert event["payload"]["reason"] == "on-call saw bad answers"
    assert event["payload"]["source"] == "cli"

    # rollback is safe to repeat: the routers stay on legacy, nobody is paged twice
    again = run([*cli, "rollback", "--reason", "pressed it again", "--data-dir", str(data)], server)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert "rollout: rolled_back (already)" in again.stdout
    time.sleep(5)  # what the first event needed to be persisted, and more
    assert len(rolled_back_events()) == 1
