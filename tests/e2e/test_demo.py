"""The demo end to end, fastest mode: real loopback servers, a real app process, Prefect,
DuckDB and GX. Asserts on what lands in DuckDB, not on printed text."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import duckdb
import httpx
import pytest
from rich.console import Console

from tests.conftest import ROOT

pytestmark = pytest.mark.e2e

PHASES = ["shadow", "canary-5", "canary-15", "ab-50", "full"]


def _db(data_dir: Path) -> duckdb.DuckDBPyConnection:
    return duckdb.connect(str(data_dir / "metrics.duckdb"), read_only=True)


@pytest.mark.timeout(900)  # above the subprocess's own 600 s, so that one fires first
def test_healthy_demo_completes_all_five_phases(tmp_path: Path) -> None:
    """Through the CLI, as `make demo` runs it: its own ephemeral Prefect API, and a
    data folder given relative to the working directory (`data/` by default)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "ROLLOUT_DATA_DIR")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    env["PYTHONPATH"] = str(ROOT)
    result = subprocess.run(
        [sys.executable, "-m", "flows.cli", "demo", "--fast", "--data-dir", "data"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "legacy vs production" in result.stdout
    # the app's own counts close the run
    assert "application: " in result.stdout and " questions sent, " in result.stdout
    data = tmp_path / "data"
    con = _db(data)
    (state,) = con.execute("SELECT state FROM rollouts").fetchall()[0]
    assert state == "completed"
    per_phase = dict(
        ((name, arm), n)
        for name, arm, n in con.execute(
            "SELECT phase_name, arm, requests FROM arm_summary WHERE rollout_id IS NOT NULL"
        ).fetchall()
    )
    for name in PHASES:
        assert per_phase.get((name, "production"), 0) > 0, (name, per_phase)
    for name in PHASES[:-1]:
        assert per_phase.get((name, "legacy"), 0) > 0, (name, per_phase)
    assert per_phase.get(("full", "legacy"), 0) == 0
    # shadow rows are paired with the user's primary request
    pairs = con.execute("SELECT count(*) FROM shadow_pairs").fetchall()[0][0]
    assert pairs > 0
    promotions = con.execute(
        "SELECT phase_index FROM decisions WHERE verdict = 'PROMOTE' ORDER BY phase_index"
    ).fetchall()
    assert [p for (p,) in promotions] == [0, 1, 2, 3, 4]
    transitions = [
        s
        for (s,) in con.execute("SELECT to_state FROM rollout_transitions ORDER BY seq").fetchall()
    ]
    assert transitions[0] == "started" and transitions[-1] == "completed"
    # nothing lost between the app and DuckDB: every segment was ingested
    assert (
        con.execute("SELECT count(*) FROM ingested_segments WHERE status <> 'ingested'").fetchall()[
            0
        ][0]
        == 0
    )
    # the simulated Perplexity key never reaches the metrics database or the logs
    key_hits = con.execute(
        "SELECT count(*) FROM config_versions WHERE document LIKE '%sim-%'"
    ).fetchall()[0][0]
    assert key_hits == 0
    for log in (data / "runs").glob("*.log"):
        assert "Bearer sim-" not in log.read_text()
    # the live dashboard was served on loopback during the run and stopped with the demo
    served = (data / "runs" / "dashboard.log").read_text()
    url = next(w for w in served.split() if w.startswith("http://127.0.0.1:"))
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "healthz", timeout=2)


@pytest.mark.timeout(600)
def test_injected_regression_ends_in_recorded_rollback(
    tmp_path: Path, prefect_harness: None
) -> None:
    from flows.demo.runner import DemoSettings, run_demo

    outcome = run_demo(
        DemoSettings(tmp_path, fast=True, inject_regression="canary"),
        Console(file=open(os.devnull, "w"), width=120),  # noqa: SIM115
    )
    assert outcome.state == "rolled_back", outcome
    assert outcome.regression_injected_at == "canary-5"
    con = _db(tmp_path)
    assert con.execute("SELECT state FROM rollouts").fetchall()[0][0] == "rolled_back"
    (rollback,) = con.execute(
        "SELECT phase_index, reason FROM decisions WHERE verdict = 'ROLLBACK'"
    ).fetchall()
    assert rollback[0] == 1  # canary-5, never later
    assert rollback[1]
    # the routers were told: the last published config is legacy_only
    (mode,) = con.execute(
        "SELECT mode FROM config_versions ORDER BY version DESC LIMIT 1"
    ).fetchall()[0]
    assert mode == "legacy_only"
    assert (
        con.execute(
            "SELECT count(*) FROM phases WHERE phase_index >= 2 AND started_at IS NOT NULL"
        ).fetchall()[0][0]
        == 0
    )
