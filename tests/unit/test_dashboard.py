"""`rollout dashboard`: what an operator sees matches the SQL views, many viewers cost one
read, a writer's lock never blanks the page, and the server runs on loopback only until
stopped."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette

from flows import lifecycle
from flows.bench.synthetic import write_request_segments
from flows.dashboard.server import make_app
from flows.dashboard.view import bucket_seconds
from flows.demo.runner import DEMO_PLAN as DEMO_PLAN_FILE
from flows.paths import DataPaths
from flows.plan import load_plan
from flows.store.database import connect
from flows.store.ingest import collect
from flows.store.rollouts import get_rollout, record_decision, record_evaluations
from tests.conftest import ROOT, cli_server


def _evaluation(rid: str, metric: str, decision: str, reason: str) -> dict[str, object]:
    return {
        "evaluation_id": "ev-1",
        "rollout_id": rid,
        "phase_index": 0,
        "config_version": 1,
        "evaluated_at": datetime.now(UTC),
        "check_kind": "sequential",
        "metric": metric,
        "estimate": 0.0123,
        "lower_bound": 0.001,
        "upper_bound": 0.02,
        "e_value": 150.0,
        "n_legacy": 400,
        "n_production": 600,
        "threshold": 100.0,
        "decision": decision,
        "metric_mode": "abort",
        "reason": reason,
    }


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[DataPaths, str]:
    """A running demo rollout in phase 1 with 1,000 collected rows, one decision and one
    gate evaluation whose texts carry HTML that must be escaped."""
    paths = DataPaths.at(tmp_path_factory.mktemp("dash") / "data").ensure()
    published = lifecycle.start(paths, load_plan(DEMO_PLAN_FILE), actor="test")
    rid = published.rollout.rollout_id
    start = datetime.now(UTC) - timedelta(minutes=10)
    write_request_segments(
        paths.segments, "app-1", files=2, rows=500, config_version=1, start=start
    )
    assert collect(paths).rows == 1_000
    with connect(paths.database) as con:
        rollout = get_rollout(con, rid)
        record_decision(
            con,
            decision_id="d-1",
            rollout=rollout,
            config_version=1,
            verdict="HOLD",
            action="none",
            actor="test",
            reason="waiting <script>alert(1)</script>",
        )
        record_evaluations(
            con,
            [
                _evaluation(rid, "error_rate", "pass", "fine"),
                _evaluation(rid, "latency", "harm", "p95 up <b>40 %</b>"),
            ],
        )
    return paths, rid


def get(app: Starlette, path: str) -> httpx.Response:
    """One request to the app in process (what a browser's refresh does)."""

    async def send() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://dash") as client:
            return await client.get(path)

    return asyncio.run(send())


def expected_arms(paths: DataPaths) -> dict[str, int]:
    with connect(paths.database, read_only=True) as con:
        return dict(
            con.execute(
                "SELECT arm, sum(requests) FROM arm_summary WHERE phase_index = 0 GROUP BY arm"
            ).fetchall()
        )


def test_page_shows_the_phase_arms_gate_and_decisions_escaped(
    store: tuple[DataPaths, str],
) -> None:
    paths, rid = store
    response = get(make_app(paths), "/")
    assert response.status_code == 200
    html = response.text
    assert rid in html
    assert "phase 1/5 <b>shadow</b>" in html
    for arm, requests in expected_arms(paths).items():
        assert f'>{arm}</span></td><td class="n">{requests:,}</td>' in html
    # the metric that found harm is listed before the one that passed
    assert html.index("p95 up &lt;b&gt;40 %&lt;/b&gt;") < html.index(">fine<")
    assert "<script>alert(1)</script>" not in html
    assert "waiting &lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "const every = 2000;" in html  # the page refreshes itself


def test_status_json_agrees_with_the_sql_views(store: tuple[DataPaths, str]) -> None:
    paths, rid = store
    status = get(make_app(paths), "/api/status").json()
    assert status["rollout"]["rollout_id"] == rid
    assert status["rollout"]["phase"] == "shadow"
    arms = {a["arm"]: a["requests"] for a in status["arms"]}
    assert arms == expected_arms(paths)
    assert sum(arms.values()) == 1_000
    # every row lands in exactly one chart bucket
    per_arm: dict[str, int] = {}
    for point in status["series"]:
        per_arm[point["arm"]] = per_arm.get(point["arm"], 0) + point["requests"]
    assert per_arm == arms
    assert status["ingest"]["rows"] == 1_000
    # per backend, over the last five minutes of rows: those rows' backends, nothing else
    with connect(paths.database, read_only=True) as con:
        recent = dict(
            con.execute(
                "SELECT backend, count(*) FROM requests WHERE backend IS NOT NULL AND ts >= "
                "(SELECT max(ts) FROM requests) - INTERVAL 300 SECOND GROUP BY backend"
            ).fetchall()
        )
    shown: dict[str, int] = {}
    for b in status["backends"]:
        shown[b["backend"]] = shown.get(b["backend"], 0) + b["requests"]
    assert shown == recent and recent
    assert status["problem"] is None
    assert "sim-" not in json.dumps(status)  # no API key can be in what it shows


def test_many_viewers_cost_one_database_read_per_refresh(store: tuple[DataPaths, str]) -> None:
    paths, _ = store
    app = make_app(paths, refresh_s=60)
    for _ in range(10):
        assert get(app, "/fragment").status_code == 200
    assert app.state.cache.reads == 1


def test_a_writer_holding_the_lock_keeps_the_last_snapshot_on_screen(
    store: tuple[DataPaths, str],
) -> None:
    paths, rid = store
    app = make_app(paths, refresh_s=0.5)
    holder_code = (
        "import duckdb, sys, time\n"
        "con = duckdb.connect(sys.argv[1])\n"
        "print('locked', flush=True)\n"
        "time.sleep(30)\n"
    )
    assert rid in get(app, "/fragment").text
    holder = subprocess.Popen(
        [sys.executable, "-c", holder_code, str(paths.database)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        time.sleep(0.6)  # past the refresh interval: the next view must re-read
        held = get(app, "/fragment").text
    finally:
        holder.kill()
        holder.wait(10)
    assert "showing the snapshot of" in held and "is locked by another process" in held
    assert rid in held  # still the last good numbers, not an empty page
    time.sleep(0.6)
    assert "showing the snapshot of" not in get(app, "/fragment").text


def test_an_empty_data_folder_says_what_to_run(tmp_path: Path) -> None:
    paths = DataPaths.at(tmp_path / "data").ensure()
    response = get(make_app(paths), "/")
    assert response.status_code == 200
    assert "no metrics database at" in response.text
    assert "rollout demo" in response.text


@pytest.mark.parametrize(
    ("span_s", "bucket"), [(0, 1), (30, 1), (100, 5), (600, 15), (3_600, 120), (86_400 * 7, 21600)]
)
def test_chart_buckets_keep_about_forty_points(span_s: float, bucket: int) -> None:
    assert bucket_seconds(span_s) == bucket


def rollout_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", "dashboard", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


def test_bad_options_are_refused_with_what_is_allowed(tmp_path: Path) -> None:
    bad_port = rollout_cli("--port", "70000", "--data-dir", str(tmp_path))
    assert bad_port.returncode == 2
    assert "--port 70000: allowed is 0-65535" in bad_port.stderr
    bad_refresh = rollout_cli("--refresh", "0.1", "--data-dir", str(tmp_path))
    assert bad_refresh.returncode == 2
    assert "allowed is 0.5 to 300 seconds" in bad_refresh.stderr
    missing = rollout_cli("--data-dir", str(tmp_path / "nope"))
    assert missing.returncode == 2 and "no data directory at" in missing.stderr


@pytest.fixture
def served(store: tuple[DataPaths, str]) -> Iterator[tuple[subprocess.Popen[str], str]]:
    paths, _ = store
    args = ("dashboard", "--port", "0", "--refresh", "0.5", "--data-dir", str(paths.root))
    with cli_server(*args) as (process, first):
        assert first.startswith("dashboard: http://127.0.0.1:"), first
        yield process, first.split()[1]


def test_served_on_loopback_while_the_flows_keep_writing(
    store: tuple[DataPaths, str], served: tuple[subprocess.Popen[str], str]
) -> None:
    paths, rid = store
    process, url = served
    assert httpx.get(url + "healthz", timeout=10).text == "ok"
    stop = threading.Event()
    polls: list[int] = []

    def poll() -> None:  # a browser refreshing as fast as the server allows
        with httpx.Client(timeout=10) as client:
            while not stop.is_set():
                polls.append(client.get(url + "fragment").status_code)

    viewer = threading.Thread(target=poll)
    viewer.start()
    try:
        for seed in range(3):  # the tick's collector, three times, while it is watched
            write_request_segments(
                paths.segments,
                f"app-w{seed}",
                files=1,
                rows=100,
                seed=10 + seed,
                config_version=1,
            )
            assert collect(paths).rows == 100
    finally:
        stop.set()
        viewer.join(30)
    assert polls and set(polls) == {200}
    time.sleep(0.6)
    status = httpx.get(url + "api/status", timeout=10).json()
    assert status["rollout"]["rollout_id"] == rid
    assert sum(a["requests"] for a in status["arms"]) == 1_300
    os.killpg(process.pid, signal.SIGTERM)
    assert process.wait(15) == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "healthz", timeout=2)
