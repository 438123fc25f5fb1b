"""The `rollout` CLI as an operator runs it: one subprocess per command, no Prefect server
(each command that runs a flow starts its own ephemeral API), against a live application
process. Walks start, status, tick, promote, approve, report and abort, and checks exit
codes, what the commands print and what they leave in DuckDB."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from flows.cli.rollout_cmd import _actor
from flows.store.database import connect
from tests.integration.conftest import ROOT, LiveApp, wait_for

pytestmark = pytest.mark.prefect

# Phase 1 never promotes by itself (the test promotes it by hand); phase 2 passes its
# gate within seconds and then asks a human; phase 3 just runs until it is aborted.
# This tests the CLI, not the gate's statistics: on a busy machine the simulated backends
# time out now and then, so no metric may roll back (modes `warn`) and the router's own
# guard is out of reach (it trips at twice max_error_rate and max_p95_latency_ms).
THRESHOLDS = (
    "{max_error_rate: 0.6, max_p95_latency_ms: 30000, max_error_rate_diff: 0.5, "
    "metric_modes: {error_rate: warn, latency: warn, latency_p95: warn, cost: warn, "
    "error_rate_limit: warn, p95_latency_ms: warn}}"
)
PLAN = textwrap.dedent("""
    name: cli-small
    router_group: cli-test
    ack_timeout: 20s
    phases:
      - name: shadow
        mode: shadow
        traffic_percent: 0
        shadow_sample_rate: 0.25
        min_duration: 600s
        max_duration: 1200s
        evaluation_interval: 1s
        min_samples: 30
        thresholds: THRESHOLDS
      - name: canary-50
        mode: canary
        traffic_percent: 50
        min_duration: 1s
        max_duration: 600s
        evaluation_interval: 1s
        min_samples: 30
        requires_approval: true
        thresholds: THRESHOLDS
      - name: full
        mode: production_only
        traffic_percent: 100
        min_duration: 600s
        max_duration: 1200s
        evaluation_interval: 1s
        min_samples: 30
        thresholds: THRESHOLDS
""").replace("THRESHOLDS", THRESHOLDS)

#: Commands that run a flow start an ephemeral Prefect API first (~10 s each).
FLOW_TIMEOUT_S = 150
QUICK_TIMEOUT_S = 60


@pytest.fixture
def cli_env(tmp_path: Path) -> dict[str, str]:
    """No Prefect server: every flow-running command starts its own ephemeral API, all
    sharing one PREFECT_HOME (its database is migrated once, by the first command)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    return env


def rollout(
    env: dict[str, str], *args: str, timeout: float = QUICK_TIMEOUT_S
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def explain(result: subprocess.CompletedProcess[str]) -> str:
    return (
        f"{result.args[3:]} exited {result.returncode}\n"
        f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}"
    )


def succeeded(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, explain(result)
    return result.stdout


def last_json(stdout: str) -> dict[str, Any]:
    """The one JSON object a `--json` command prints (its last non-empty line)."""
    line = [ln for ln in stdout.splitlines() if ln.strip()][-1]
    return json.loads(line)


def rows(live: LiveApp, sql: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
    with connect(live.paths.database, read_only=True) as con:
        return con.execute(sql, params or []).fetchall()


def router_applied(live: LiveApp, version: int) -> bool:
    return any(
        a.instance == live.instance and a.applied_version >= version for a in live.store.read_acks()
    )


def test_cli_walks_a_rollout_without_a_prefect_server(
    live_app: LiveApp, cli_env: dict[str, str], tmp_path: Path
) -> None:
    data = str(live_app.paths.root)
    actor = _actor()  # the subprocesses run as the same user
    plan = tmp_path / "plan.yaml"
    plan.write_text(PLAN)

    # 1. start: phase 1 is published and acknowledged; status shows it
    out = succeeded(
        rollout(cli_env, "start", "--plan", str(plan), "--data-dir", data, timeout=FLOW_TIMEOUT_S)
    )
    assert "started rollout" in out and "phase 1 is config v1" in out, out
    ((rid, state, phase_index),) = rows(
        live_app, "SELECT rollout_id, state, phase_index FROM rollouts"
    )
    assert (state, phase_index) == ("running", 0)
    assert rid in out
    assert live_app.store.current().phase == "shadow"

    out = succeeded(rollout(cli_env, "status", "--data-dir", data))
    assert f"rollout {rid} (cli-small): running, phase 1/3 shadow" in out, out
    assert live_app.instance in out  # the router table lists the live instance
    status = last_json(succeeded(rollout(cli_env, "status", "--json", "--data-dir", data)))
    assert status["rollout_id"] == rid
    assert (status["state"], status["phase_index"], status["phase"]) == ("running", 0, "shadow")
    assert [t["name"] for t in status["timeline"]] == ["shadow", "canary-50", "full"]
    assert any(r["instance"] == live_app.instance for r in status["routers"])

    # 2. tick: one evaluation per call, recorded as a decision by the CLI user; phase 1's
    # ten-minute minimum keeps it in phase 1. Tick again until the app's rows were collected.
    deadline = time.monotonic() + 60
    ticks = 0
    while True:
        out = succeeded(rollout(cli_env, "tick", "--data-dir", data, timeout=FLOW_TIMEOUT_S))
        ticks += 1
        assert out.startswith(f"{rid}: "), out
        assert " -> none (" in out, out
        collected = rows(live_app, "SELECT count(*) FROM requests")[0][0]
        if collected > 0 or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert collected > 0, "no request rows were collected by `rollout tick`"
    decisions = rows(
        live_app,
        "SELECT verdict, actor, phase_index FROM decisions WHERE rollout_id = ?",
        [rid],
    )
    assert len(decisions) == ticks
    assert {(d[1], d[2]) for d in decisions} == {(actor, 0)}
    assert {d[0] for d in decisions} <= {"HOLD", "INSUFFICIENT_DATA"}, decisions
    assert rows(live_app, "SELECT state, phase_index FROM rollouts")[0] == ("running", 0)

    # 3. promote: overrides the gate, publishes phase 2, waits for the router (saying so)
    promoted = rollout(
        cli_env,
        "promote",
        "--reason",
        "shadow looks clean",
        "--data-dir",
        data,
        timeout=FLOW_TIMEOUT_S,
    )
    out = succeeded(promoted)
    assert "promoted to phase 2 (canary-50) as v2" in out, out
    assert "published v2; waiting up to" in promoted.stderr, promoted.stderr
    assert rows(live_app, "SELECT state, phase_index FROM rollouts")[0] == ("running", 1)
    (step,) = rows(
        live_app,
        "SELECT from_state, to_state, phase_index, cause, actor FROM rollout_transitions "
        "WHERE rollout_id = ? ORDER BY seq DESC LIMIT 1",
        [rid],
    )
    assert step[:3] == ("running", "running", 1)
    assert "promoted to phase 2 (canary-50) as v2" in step[3]
    assert "manual: shadow looks clean" in step[3]
    assert step[4] == actor
    assert rows(
        live_app, "SELECT outcome FROM phases WHERE rollout_id = ? AND phase_index = 0", [rid]
    ) == [("promoted",)]
    # the override is a decision on record, next to the gate's, under the person's name
    ((verdict, who, why, version),) = rows(
        live_app,
        "SELECT verdict, actor, reason, config_version FROM decisions "
        "WHERE rollout_id = ? AND action = 'manual override of the gate'",
        [rid],
    )
    assert (verdict, who, version) == ("PROMOTE", actor, 1)
    assert why == "manual: shadow looks clean"
    assert live_app.store.current().phase == "canary-50"
    wait_for(lambda: router_applied(live_app, 2), 10, "router applies phase 2")

    # 4. approval: phase 2 passes its gate and asks a human; `approve` promotes
    time.sleep(2)  # phase 2's minimum duration, and rows under v2
    deadline = time.monotonic() + 90
    last: dict[str, Any] = {}
    while time.monotonic() < deadline:
        last = last_json(
            succeeded(
                rollout(cli_env, "tick", "--json", "--data-dir", data, timeout=FLOW_TIMEOUT_S)
            )
        )
        assert last["rollout_id"] == rid
        if last["state"] != "running":
            break
        time.sleep(1)
    assert last.get("state") == "awaiting_approval", last
    assert last["verdict"] == "NEEDS_APPROVAL" and last["action"] == "awaiting approval", last
    assert rows(live_app, "SELECT state, phase_index FROM rollouts")[0] == (
        "awaiting_approval",
        1,
    )

    out = succeeded(
        rollout(
            cli_env,
            "approve",
            "--comment",
            "canary numbers look fine",
            "--data-dir",
            data,
            timeout=FLOW_TIMEOUT_S,
        )
    )
    assert f"rollout {rid} is now running" in out, out
    assert rows(live_app, "SELECT state, phase_index FROM rollouts")[0] == ("running", 2)
    assert rows(
        live_app,
        "SELECT verdict, action, actor, reason FROM decisions "
        "WHERE rollout_id = ? AND verdict = 'APPROVED'",
        [rid],
    ) == [("APPROVED", "promote", actor, f"approved by {actor}: canary numbers look fine")]
    assert live_app.store.current().phase == "full"
    assert router_applied(live_app, live_app.store.current().version)

    # 5. report: the whole story, human-readable and as JSON
    out = succeeded(rollout(cli_env, "report", "--data-dir", data))
    assert rid in out and "transitions" in out and "legacy vs production" in out, out
    report = last_json(succeeded(rollout(cli_env, "report", "--json", "--data-dir", data)))
    assert report["rollout_id"] == rid and report["state"] == "running"
    assert [t["to_state"] for t in report["transitions"]] == [
        "started",
        "running",
        "running",
        "awaiting_approval",
        "running",
    ]

    # 6. abort: routers go back to legacy, the rollout ends aborted
    out = succeeded(rollout(cli_env, "abort", "--reason", "change freeze", "--data-dir", data))
    assert f"rollout {rid} aborted; routers told to use legacy" in out, out
    state, ended = rows(live_app, "SELECT state, ended_at IS NOT NULL FROM rollouts")[0]
    assert (state, ended) == ("aborted", True)
    assert rows(
        live_app,
        "SELECT to_state, cause, actor FROM rollout_transitions "
        "WHERE rollout_id = ? ORDER BY seq DESC LIMIT 1",
        [rid],
    ) == [("aborted", "aborted: change freeze", actor)]
    assert rows(
        live_app,
        "SELECT action, actor, reason FROM decisions WHERE rollout_id = ? AND verdict = 'ABORT'",
        [rid],
    ) == [("published legacy_only", actor, "change freeze")]
    assert rows(
        live_app, "SELECT outcome FROM phases WHERE rollout_id = ? AND phase_index = 2", [rid]
    ) == [("aborted",)]
    legacy = live_app.store.current()
    assert legacy.mode.value == "legacy_only" and legacy.rollout_id == rid
    wait_for(lambda: router_applied(live_app, legacy.version), 10, "router applies legacy_only")

    # ... and a second abort is refused: nothing is active, nothing is republished
    again = rollout(cli_env, "abort", "--reason", "twice", "--data-dir", data)
    assert again.returncode == 2, explain(again)
    assert again.stderr.strip() == "error: no active rollout to abort", explain(again)
    assert rows(live_app, "SELECT state FROM rollouts")[0][0] == "aborted"
    assert rows(
        live_app,
        "SELECT count(*) FROM rollout_transitions WHERE rollout_id = ? AND to_state = 'aborted'",
        [rid],
    ) == [(1,)]
    assert live_app.store.current().version == legacy.version

    final = last_json(succeeded(rollout(cli_env, "status", "--json", "--data-dir", data)))
    assert (final["state"], final["phase"]) == ("aborted", "full")


def test_promote_without_an_active_rollout_fails_with_one_line(
    tmp_path: Path, cli_env: dict[str, str]
) -> None:
    empty = tmp_path / "empty-data"
    empty.mkdir()
    result = rollout(cli_env, "promote", "--reason", "just because", "--data-dir", str(empty))
    assert result.returncode == 2, explain(result)
    assert result.stdout == "", explain(result)
    assert result.stderr.strip() == (
        f"error: no active rollout to promote: {empty} has no metrics database (pass --data-dir)"
    ), explain(result)
    # A mistyped folder is not created (and nothing acts on nobody) ...
    typo = tmp_path / "dta"
    result = rollout(cli_env, "promote", "--reason", "just because", "--data-dir", str(typo))
    assert result.returncode == 2 and "no data directory at" in result.stderr, explain(result)
    assert not typo.exists()
    # ... and an abort with nothing to abort publishes nothing for the routers.
    result = rollout(cli_env, "abort", "--reason", "oops", "--data-dir", str(empty))
    assert result.returncode == 2, explain(result)
    assert result.stderr.strip().startswith("error: no active rollout to abort: "), explain(result)
    assert not (empty / "control").exists() or not any((empty / "control").iterdir())
    # ... and an answer with nothing awaiting it is one line too, no flow-run traceback.
    result = rollout(cli_env, "approve", "--data-dir", str(empty))
    assert result.returncode == 2, explain(result)
    assert result.stdout == "", explain(result)
    assert result.stderr.strip().startswith(
        "error: nothing awaits approval (state: no active rollout): "
    ), explain(result)
    assert list(empty.iterdir()) == []  # nothing created on the way
