"""Each rollout flow under the shared Prefect test harness, against a real application
process and loopback backends. Assertions read DuckDB and the control store."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from flows.plan import RolloutPlan, validate_plan
from flows.store.database import connect
from tests.integration.conftest import ROOT, LiveApp, wait_for

pytestmark = pytest.mark.usefixtures("prefect_harness")


def small_plan(approval_on: int | None = None, min_samples: int = 30) -> RolloutPlan:
    phases: list[dict[str, Any]] = [
        {"name": "shadow", "mode": "shadow", "traffic_percent": 0},
        {"name": "canary-50", "mode": "canary", "traffic_percent": 50},
    ]
    for i, phase in enumerate(phases):
        phase.update(
            min_duration="2s",
            max_duration="90s",
            evaluation_interval="1s",
            min_samples=min_samples,
            requires_approval=i == approval_on,
            thresholds={"max_error_rate_diff": 0.05},
        )
    return validate_plan(
        {"name": "small", "router_group": "test", "ack_timeout": "10s", "phases": phases}
    )


def rows(live: LiveApp, sql: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
    with connect(live.paths.database, read_only=True) as con:
        return con.execute(sql, params or []).fetchall()


def tick_until(live: LiveApp, states: set[str], limit_s: float = 90) -> dict[str, Any]:
    from flows.rollout_flows import rollout_tick

    deadline = time.monotonic() + limit_s
    last: dict[str, Any] = {}
    while time.monotonic() < deadline:
        last = rollout_tick(str(live.paths.root), ack_timeout_s=10)
        if last["state"] in states:
            return last
        time.sleep(0.5)
    raise AssertionError(f"rollout never reached {states}; last tick: {last}")


def test_start_and_ticks_complete_a_plan(live_app: LiveApp) -> None:
    from flows.rollout_flows import rollout_start

    started = rollout_start(small_plan(), str(live_app.paths.root))
    assert started["version"] == 1
    assert live_app.store.current().phase == "shadow"
    last = tick_until(live_app, {"completed", "rolled_back"})
    assert last["state"] == "completed", (last["reason"], last)
    transitions = [
        r[0] for r in rows(live_app, "SELECT to_state FROM rollout_transitions ORDER BY seq")
    ]
    assert transitions == ["started", "running", "running", "completed"]
    verdicts = [r[0] for r in rows(live_app, "SELECT verdict FROM decisions ORDER BY decided_at")]
    assert verdicts.count("PROMOTE") == 2
    # every evaluation left its decision record
    assert rows(live_app, "SELECT count(DISTINCT evaluation_id) FROM gate_evaluations")[0][
        0
    ] == len(verdicts)
    # the router runs what the database says
    ack = next(a for a in live_app.store.read_acks() if a.instance == live_app.instance)
    assert ack.applied_version == live_app.store.current().version == 2


def test_only_one_rollout_per_router_group(live_app: LiveApp) -> None:
    from flows.lifecycle import RolloutError
    from flows.rollout_flows import rollout_start

    rollout_start(small_plan(), str(live_app.paths.root))
    with pytest.raises(RolloutError, match="already running"):
        rollout_start(small_plan(), str(live_app.paths.root))


def test_approval_accepted_promotes(live_app: LiveApp) -> None:
    from flows import lifecycle
    from flows.rollout_flows import rollout_approve, rollout_start

    rollout_start(small_plan(approval_on=0), str(live_app.paths.root))
    tick_until(live_app, {"awaiting_approval"})
    # An answer given for another phase (a form paused since an earlier question) is
    # refused and leaves nothing behind.
    with pytest.raises(lifecycle.RolloutError, match="answer again"):
        lifecycle.approve(live_app.paths, approved=True, actor="mallory", phase_index=1)
    result = rollout_approve(
        str(live_app.paths.root), approve=True, comment="looks good", approver="alice"
    )
    assert result["state"] == "running" and result["phase_index"] == 1
    assert live_app.store.current().phase == "canary-50"
    decided = rows(
        live_app, "SELECT verdict, actor, reason FROM decisions WHERE verdict = 'APPROVED'"
    )
    assert decided == [("APPROVED", "alice", "approved by alice: looks good")]


def test_approval_rejected_rolls_back(live_app: LiveApp) -> None:
    from flows.rollout_flows import rollout_approve, rollout_start

    rollout_start(small_plan(approval_on=0), str(live_app.paths.root))
    tick_until(live_app, {"awaiting_approval"})
    result = rollout_approve(str(live_app.paths.root), approve=False, approver="bob")
    assert result["state"] == "rolled_back"
    assert live_app.store.current().mode.value == "legacy_only"
    wait_for(
        lambda: any(
            a.applied_version == live_app.store.current().version
            for a in live_app.store.read_acks()
        ),
        10,
        "router applies legacy",
    )


def test_harm_found_while_awaiting_approval_rolls_back_without_the_human(
    live_app: LiveApp,
) -> None:
    """A question to a human can stay open for hours; users must not wait that long for
    a rollback. Other verdicts leave the question open."""
    from flows import lifecycle
    from flows.rollout_flows import rollout_start, rollout_tick
    from flows.sim.fleet import set_profile

    root = str(live_app.paths.root)
    started = rollout_start(small_plan(approval_on=0), root)
    tick_until(live_app, {"awaiting_approval"})
    asked = rows(live_app, "SELECT count(*) FROM decisions")[0][0]
    waiting = rollout_tick(root, ack_timeout_s=10)
    assert waiting["state"] == "awaiting_approval", waiting
    assert waiting["action"] == "still awaiting approval", waiting
    assert waiting["evaluation_id"] and waiting["reason"].startswith("waiting for a human decision")
    assert rows(live_app, "SELECT count(*) FROM decisions")[0][0] == asked + 1

    assert live_app.fleet.info is not None
    for member in live_app.fleet.info.members:
        set_profile(member.admin_url, {"error_rate": 1.0}, arm="production")
    last = tick_until(live_app, {"rolled_back"}, limit_s=60)
    assert last["verdict"] == "ROLLBACK", last
    assert live_app.store.current().mode.value == "legacy_only"
    (step,) = rows(
        live_app,
        "SELECT from_state, actor FROM rollout_transitions WHERE to_state = 'rolled_back' "
        "AND rollout_id = ?",
        [started["rollout_id"]],
    )
    assert step == ("awaiting_approval", "gate")
    # the human's late answer finds nothing to approve, and changes nothing
    with pytest.raises(lifecycle.RolloutError):
        lifecycle.approve(live_app.paths, approved=True, actor="alice")
    assert live_app.store.current().mode.value == "legacy_only"


def test_approval_through_the_paused_form(live_app: LiveApp) -> None:
    """The UI path: the flow pauses with a form; a resume with input decides."""
    from prefect.exceptions import ParameterTypeError

    from flows import lifecycle
    from flows.cli.rollout_cmd import _resume_paused_approval
    from flows.rollout_flows import _approval_question, rollout_approve, rollout_start
    from flows.status import md

    rollout_start(small_plan(approval_on=0), str(live_app.paths.root))
    tick_until(live_app, {"awaiting_approval"})
    with pytest.raises(ParameterTypeError, match="approver"):  # a decision names someone
        rollout_approve(str(live_app.paths.root), approve=True, approver="  ")
    # the form says which rollout, which move and why the gate asked
    asked = lifecycle.awaiting_approval(live_app.paths, None)
    question = _approval_question(live_app.paths, asked)
    assert question.startswith(f"Rollout {md(asked.rollout_id)}: promote phase 1 (")
    assert "The gate asked because:" in question
    outcome: dict[str, Any] = {}
    waiter = threading.Thread(
        target=lambda: outcome.update(rollout_approve(str(live_app.paths.root), timeout_s=60))
    )
    waiter.start()
    resumed: list[str | None] = []
    wait_for(
        lambda: (
            resumed.append(
                _resume_paused_approval(
                    {"approve": True, "comment": "from the form", "approver": "ui-user"},
                    live_app.paths.root,
                )
            )
            or resumed[-1]
        ),
        30,
        "a paused approval run",
        interval_s=1,
    )
    waiter.join(60)
    assert outcome.get("approved") is True and outcome.get("state") == "running"


def test_double_rollback_is_one_rollback(live_app: LiveApp) -> None:
    from flows.rollout_flows import rollout_rollback, rollout_start

    rollout_start(small_plan(), str(live_app.paths.root))
    first = rollout_rollback("operator saw errors", str(live_app.paths.root))
    second = rollout_rollback("operator saw errors", str(live_app.paths.root))
    assert first["state"] == second["state"] == "rolled_back"
    assert first["version"] == second["version"]
    assert live_app.store.current().mode.value == "legacy_only"
    assert rows(live_app, "SELECT count(*) FROM decisions WHERE verdict = 'ROLLBACK'")[0][0] == 1
    assert (
        rows(live_app, "SELECT count(*) FROM rollout_transitions WHERE to_state = 'rolled_back'")[
            0
        ][0]
        == 1
    )


def test_a_rollback_event_for_another_router_group_moves_nothing(
    live_app: LiveApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The deployment's trigger matches `rollout.group.*`: an alert about another group's
    rollout must not send this group's users back to legacy."""
    from flows.rollout_flows import rollout_rollback, rollout_start

    data = str(live_app.paths.root)
    rollout_start(small_plan(), data)
    before = live_app.store.current()
    other = rollout_rollback("payments alert", data, router_group="rollout.group.payments")
    assert other["skipped"] is not None and "'payments'" in other["skipped"]
    assert "'test'" in other["skipped"]  # names the group the rollout here belongs to
    assert live_app.store.current() == before
    assert rows(live_app, "SELECT count(*) FROM decisions WHERE verdict = 'ROLLBACK'")[0][0] == 0

    # a database busy past the check's short wait never holds the rollback back
    from flows import lifecycle
    from flows.store.database import StoreLocked

    def busy(*args: object) -> None:
        raise StoreLocked("database is locked by a tick")

    monkeypatch.setattr(lifecycle, "rollback_target_group", busy)
    ours = rollout_rollback("test alert", data, router_group="rollout.group.test")
    assert ours["skipped"] is None and ours["state"] == "rolled_back"
    assert live_app.store.current().mode.value == "legacy_only"


def test_a_rollback_run_that_a_live_router_refuses_fails(live_app: LiveApp) -> None:
    """Recorded all the same, but a completed run would tell the on-call that users are
    back on legacy while that router still serves the canary."""
    from flows.rollout_flows import RollbackRefused, rollout_rollback, rollout_start
    from tests.conftest import heartbeat

    data = str(live_app.paths.root)
    rollout_start(small_plan(), data)
    current = live_app.store.current().version
    refusal = "rearm_guard: Extra inputs are not permitted"
    live_app.store.write_ack(heartbeat("app-old", current, "canary"))

    def old_router_refuses_the_next_document() -> None:
        deadline = time.monotonic() + 30
        while live_app.store.current().version == current and time.monotonic() < deadline:
            time.sleep(0.02)
        published = live_app.store.current().version
        live_app.store.write_ack(
            heartbeat(
                "app-old", current, "canary", refused_version=published, refused_reason=refusal
            )
        )

    old_router = threading.Thread(target=old_router_refuses_the_next_document)
    old_router.start()
    try:
        with pytest.raises(RollbackRefused, match=f"app-old \\({refusal}\\)"):
            rollout_rollback("operator saw errors", data)
    finally:
        old_router.join()
    assert live_app.store.current().mode.value == "legacy_only"
    assert rows(live_app, "SELECT state FROM rollouts") == [("rolled_back",)]


CRASH_AFTER_PUBLISH = textwrap.dedent("""
    import os, sys
    from router.control_store import FileControlStore
    original = FileControlStore.publish
    def publish_then_die(self, config):
        original(self, config)
        os._exit(137)  # the process dies after telling the routers, before recording it
    FileControlStore.publish = publish_then_die
    from checks.gx_suites import GxRunner
    from flows.paths import DataPaths
    from flows.tick import tick
    paths = DataPaths.at(sys.argv[1])
    tick(paths, GxRunner())
    sys.exit(3)  # not reached when the tick promotes
""")


def test_crash_between_publish_and_commit_is_resumed(live_app: LiveApp) -> None:
    from flows.rollout_flows import rollout_start

    rollout_start(small_plan(), str(live_app.paths.root))
    # once the gate would promote, a tick crashes in the middle of promoting
    for _ in range(30):
        crashed = subprocess.run(
            [sys.executable, "-c", CRASH_AFTER_PUBLISH, str(live_app.paths.root)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if crashed.returncode == 137:
            break
        time.sleep(1)
    assert crashed.returncode == 137, crashed.stderr[-2000:]
    published = live_app.store.current()
    assert published.phase == "canary-50"
    # the database never heard of it ...
    assert (
        rows(
            live_app, "SELECT count(*) FROM config_versions WHERE version = ?", [published.version]
        )[0][0]
        == 0
    )
    # ... until the next tick reconciles: same version, phase 2 running, cause recorded
    result = tick_until(live_app, {"running", "completed"}, limit_s=30)
    assert result["reconciled"] and "adopted promotion" in result["reconciled"]
    phase = rows(
        live_app, "SELECT config_version, started_at IS NOT NULL FROM phases WHERE phase_index = 1"
    )[0]
    assert phase == (published.version, True)
    causes = [r[0] for r in rows(live_app, "SELECT cause FROM rollout_transitions ORDER BY seq")]
    assert any("recovered after a crash" in c for c in causes)


def test_unacknowledged_promotion_restores_the_previous_phase(live_app: LiveApp) -> None:
    """A stuck instance never applies the new phase: the transaction puts phase 1 back."""
    from flows.rollout_flows import AcknowledgementFailed, rollout_start, rollout_tick
    from router.control_store import Acknowledgement

    rollout_start(small_plan(), str(live_app.paths.root))
    shadow = live_app.store.current()

    def stuck_heartbeat() -> None:  # alive, but forever on the shadow phase's version
        now = datetime.now(UTC)
        live_app.store.write_ack(
            Acknowledgement(
                instance="stuck-1",
                applied_version=shadow.version,
                effective_mode=shadow.mode,
                configured_mode=shadow.mode,
                traffic_percent=shadow.traffic_percent,
                heartbeat_at=now,
                started_at=now,
            )
        )

    failed = None
    deadline = time.monotonic() + 90
    while failed is None and time.monotonic() < deadline:  # tick until the gate promotes
        stuck_heartbeat()
        ticked_at = datetime.now(UTC)
        try:
            rollout_tick(str(live_app.paths.root), ack_timeout_s=2)
        except AcknowledgementFailed as exc:
            failed = exc
        time.sleep(0.5)
    assert failed is not None, "the gate never promoted out of shadow"
    restored = live_app.store.current()
    assert restored.phase == "shadow" and restored.version > shadow.version + 1
    state = rows(live_app, "SELECT state, phase_index FROM rollouts")[0]
    assert state == ("running", 0)
    assert rows(live_app, "SELECT count(*) FROM decisions WHERE verdict = 'RESTORED'")[0][0] == 1
    # The restored phase runs under a new version, judged from scratch: its clock restarts.
    (phase,) = rows(live_app, "SELECT config_version, started_at FROM phases WHERE phase_index = 0")
    assert phase[0] == restored.version and phase[1] >= ticked_at


def test_nightly_comparison_stores_rows_and_artifacts(live_app: LiveApp) -> None:
    from prefect.artifacts import Artifact

    from flows.rollout_flows import nightly_comparison, rollout_start

    rollout_start(small_plan(), str(live_app.paths.root))
    tick_until(live_app, {"running"}, limit_s=20)
    from flows.store.ingest import collect

    def served_rows() -> int:
        collect(live_app.paths)  # rows reach DuckDB only through collection
        return rows(live_app, "SELECT count(*) FROM requests WHERE NOT is_shadow")[0][0]

    wait_for(lambda: served_rows() > 0, 30, "served rows in DuckDB", interval_s=1)
    result = nightly_comparison(str(live_app.paths.root), hours=1)
    assert result["rows"] > 0 and result["legacy"] > 0
    assert result["retention"]["archived_rows"] == 0  # nothing is older than 30 days
    stored = rows(
        live_app,
        "SELECT count(*), count(DISTINCT backend) FROM nightly_comparisons WHERE run_id = ?",
        [result["run_id"]],
    )[0]
    assert stored[0] == result["rows"] and stored[1] >= 2
    assert Artifact.get("nightly-comparison") is not None
    # a UI run with an inverted window is refused, not "completed" with an empty table
    from prefect.exceptions import ParameterTypeError

    with pytest.raises(ParameterTypeError, match="hours"):
        nightly_comparison(str(live_app.paths.root), hours=-24)


def test_tick_writes_status_and_decision_artifacts(live_app: LiveApp) -> None:
    from prefect.artifacts import Artifact

    from flows.rollout_flows import rollout_start, rollout_tick

    started = rollout_start(small_plan(), str(live_app.paths.root))
    time.sleep(2)
    rollout_tick(str(live_app.paths.root))
    status = Artifact.get(f"rollout-{started['rollout_id']}-status")
    assert status is not None and "shadow" in str(status.data)
    record = Artifact.get(f"rollout-{started['rollout_id']}-decision-record")
    assert record is not None


HOLD_THE_LOCK = textwrap.dedent("""
    import sys, time, duckdb
    con = duckdb.connect(sys.argv[1], read_only=True)  # a reader blocks every writer
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
""")


def test_rollback_reaches_routers_while_the_database_is_locked(
    live_app: LiveApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows import lifecycle
    from flows.rollout_flows import rollout_start, rollout_tick

    rollout_start(small_plan(), str(live_app.paths.root))
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_THE_LOCK, str(live_app.paths.database), "8"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        monkeypatch.setattr(lifecycle, "RECORD_WAIT_S", 1.0)
        with pytest.raises(lifecycle.RecordingDeferred, match="legacy_only is published"):
            lifecycle.rollback(live_app.paths, reason="pager went off", actor="on-call")
        # the routers were told at once, the lock notwithstanding
        assert live_app.store.current().mode.value == "legacy_only"
        wait_for(
            lambda: any(
                a.effective_mode.value == "legacy_only" for a in live_app.store.read_acks()
            ),
            10,
            "router on legacy",
        )
    finally:
        holder.wait(30)
    # once the lock is gone, the next tick records what happened
    result = rollout_tick(str(live_app.paths.root))
    assert result["reconciled"] and "adopted rollback" in result["reconciled"]
    assert rows(live_app, "SELECT state FROM rollouts")[0][0] == "rolled_back"


def test_a_rollback_after_the_control_document_was_lost_still_reaches_routers(
    live_app: LiveApp,
) -> None:
    """The endpoint restarted empty (or a folder was restored from an old backup) while
    routers run v1: a rollback numbered from the store alone would be v1 again, which
    routers ignore. It is numbered above what their heartbeats say they run."""
    from flows import lifecycle
    from flows.rollout_flows import rollout_start

    rollout_start(small_plan(), str(live_app.paths.root))
    wait_for(
        lambda: any(a.applied_version == 1 for a in live_app.store.read_acks()),
        10,
        "router on v1",
    )
    live_app.store.config_path.unlink()
    ended = lifecycle.rollback(live_app.paths, reason="pager went off", actor="on-call")
    assert ended.config.version == 2
    wait_for(
        lambda: any(
            a.applied_version == 2 and a.effective_mode.value == "legacy_only"
            for a in live_app.store.read_acks()
        ),
        10,
        "router on legacy v2",
    )
    assert rows(live_app, "SELECT mode FROM config_versions WHERE version = 2") == [
        ("legacy_only",)
    ]


def test_a_promotion_never_undoes_a_rollback_published_meanwhile(live_app: LiveApp) -> None:
    """The rollback fast path tells the routers first and records later. A tick that
    decided to promote in the meantime must not publish over it: the promotion is
    refused, the routers stay on legacy, and the next tick records the rollback."""
    from flows import lifecycle
    from flows.control import legacy_only_config
    from flows.rollout_flows import rollout_start, rollout_tick
    from flows.store.database import connect

    started = rollout_start(small_plan(), str(live_app.paths.root))
    rollout_id = started["rollout_id"]
    current = live_app.store.current()
    live_app.store.publish(
        legacy_only_config(current.version + 1, rollout_id, current.salt, "rollback: pager")
    )
    with connect(live_app.paths.database) as con:
        rollout = lifecycle.get_state(con, rollout_id)
        with pytest.raises(lifecycle.RolledBackMeanwhile, match="sent back to legacy"):
            lifecycle.promote(con, live_app.paths, rollout, reason="checks pass", actor="tick")
    assert live_app.store.current().mode.value == "legacy_only"
    result = rollout_tick(str(live_app.paths.root))
    assert result["reconciled"] and "rollback" in result["reconciled"]
    assert rows(live_app, "SELECT state FROM rollouts WHERE rollout_id = ?", [rollout_id]) == [
        ("rolled_back",)
    ]


def test_a_restore_that_died_before_recording_is_adopted(live_app: LiveApp) -> None:
    from flows.control import phase_config
    from flows.lifecycle import reconcile
    from flows.rollout_flows import rollout_start

    plan = small_plan()
    rollout_start(plan, str(live_app.paths.root))
    tick_until(live_app, {"running"}, limit_s=5)
    # fake the state "promoted to phase 2, then a restore published phase 1 and died"
    (rollout_id,) = rows(live_app, "SELECT rollout_id FROM rollouts")[0]
    with connect(live_app.paths.database) as con:
        from flows.lifecycle import get_state, promote

        promote(con, live_app.paths, get_state(con, rollout_id), reason="test", actor="test")
    live = live_app.store.current()
    restored = phase_config(plan, 0, live.version + 1, rollout_id, "restore (crashed)")
    live_app.store.publish(restored)
    what = reconcile(live_app.paths)
    assert what and "adopted restore of phase 1" in what
    assert rows(live_app, "SELECT state, phase_index FROM rollouts")[0] == ("running", 0)
    assert (
        rows(live_app, "SELECT config_version FROM phases WHERE phase_index = 0")[0][0]
        == restored.version
    )


def test_a_scheduled_tick_evaluates_at_the_phase_interval(live_app: LiveApp) -> None:
    """The deployment ticks every minute with only_when_due: it collects each time but
    judges the phase only at the phase's own evaluation_interval."""
    from flows.rollout_flows import rollout_start, rollout_tick

    plan = small_plan()
    plan.phases[0].evaluation_interval = timedelta(seconds=4)
    started = rollout_start(plan, str(live_app.paths.root))
    data_dir = str(live_app.paths.root)
    count_sql = "SELECT count(DISTINCT evaluation_id) FROM gate_evaluations WHERE rollout_id = ?"
    first = rollout_tick(data_dir, ack_timeout_s=10, only_when_due=True)
    assert first["evaluation_id"], first  # never evaluated: due at once
    early = rollout_tick(data_dir, ack_timeout_s=10, only_when_due=True)
    assert early["action"] == "not due" and "evaluates every 0:00:04" in early["reason"]
    assert rows(live_app, count_sql, [started["rollout_id"]]) == [(1,)]
    forced = rollout_tick(data_dir, ack_timeout_s=10)  # a human's `rollout tick`
    assert forced["evaluation_id"] and forced["evaluation_id"] != first["evaluation_id"]
    time.sleep(4.2)
    due = rollout_tick(data_dir, ack_timeout_s=10, only_when_due=True)
    assert due["evaluation_id"], due
    assert rows(live_app, count_sql, [started["rollout_id"]]) == [(3,)]
