"""Lifecycle commands: a wrong rollout id is refused before any router moves, and a
process that dies mid-move leaves the database and the routers agreeing, with a record."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from flows import lifecycle
from flows.control import control_store, legacy_only_config
from flows.demo.runner import DEMO_PLAN
from flows.paths import DataPaths
from flows.plan import load_plan
from flows.state import RolloutState
from flows.store.database import connect, transaction
from flows.store.rollouts import get_rollout, transition
from router.control_store import FileControlStore
from router.router_config import RouterConfig
from tests.conftest import heartbeat


@pytest.fixture
def running(tmp_path: Path) -> tuple[DataPaths, str]:
    paths = DataPaths.at(tmp_path / "data").ensure()
    published = lifecycle.start(paths, load_plan(DEMO_PLAN), actor="test", rollout_id="ro-real")
    return paths, published.rollout.rollout_id


def state_of(paths: DataPaths, rollout_id: str) -> str:
    with connect(paths.database, read_only=True) as con:
        rollout = get_rollout(con, rollout_id)
    assert rollout is not None
    return rollout.state.value


def move_to(paths: DataPaths, rollout_id: str, state: RolloutState) -> None:
    """Put the rollout in `state` as the gate would have."""
    with connect(paths.database) as con:
        rollout = get_rollout(con, rollout_id)
        assert rollout is not None
        with transaction(con):
            transition(con, rollout, state, cause="gate", actor="gate")


def test_a_rollback_for_a_mistyped_id_publishes_nothing(running: tuple[DataPaths, str]) -> None:
    """It used to publish legacy_only first and fail after: every router went to legacy,
    the real rollout stayed running, and the next tick put the phase back."""
    paths, rid = running
    before = control_store(paths).current()
    with pytest.raises(
        lifecycle.RolloutError, match=r"no rollout 'ro-typo'.*nothing was published"
    ):
        lifecycle.rollback(paths, reason="oops", actor="alice", rollout_id="ro-typo")
    assert control_store(paths).current() == before
    assert state_of(paths, rid) == "running"
    done = lifecycle.rollback(paths, reason="for real", actor="alice", rollout_id=rid)
    assert done.rollout is not None and done.rollout.state.value == "rolled_back"
    assert control_store(paths).current().mode.value == "legacy_only"


def test_starting_an_existing_id_again_is_a_no_op_only_for_the_same_active_plan(
    running: tuple[DataPaths, str],
) -> None:
    paths, rid = running
    plan = load_plan(DEMO_PLAN)
    again = lifecycle.start(paths, plan, actor="test", rollout_id=rid)  # a retried task
    assert not again.new and again.rollout.rollout_id == rid
    other = plan.model_copy(update={"name": "another plan"})
    with pytest.raises(lifecycle.RolloutError, match="already exists with another plan"):
        lifecycle.start(paths, other, actor="test", rollout_id=rid)
    lifecycle.rollback(paths, reason="done", actor="alice", rollout_id=rid)
    published = control_store(paths).current()
    with pytest.raises(lifecycle.RolloutError, match=r"already exists \(rolled_back\)"):
        lifecycle.start(paths, plan, actor="test", rollout_id=rid)
    assert control_store(paths).current() == published  # nothing claimed, nothing moved


def gate_promotes(paths: DataPaths, rid: str, **kw: object) -> lifecycle.Published:
    """The next phase, as the gate (or, with `override=True` and an actor, a person)."""
    with connect(paths.database) as con:
        rollout = get_rollout(con, rid)
        assert rollout is not None
        moved = lifecycle.promote(con, paths, rollout, **{"reason": "gate", "actor": "gate", **kw})
    assert isinstance(moved, lifecycle.Published)
    return moved


def _rollback_published_not_recorded(paths: DataPaths, rid: str) -> RouterConfig:
    """What `rollback` leaves when the database is locked: legacy_only is live (it tells
    the routers first) and the record is deferred."""
    live = control_store(paths).current()
    document = legacy_only_config(live.version + 1, rid, live.salt, "rollback: on-call")
    control_store(paths).publish(document)
    return document


def test_a_restore_never_undoes_a_rollback_that_is_live_but_unrecorded(
    running: tuple[DataPaths, str],
) -> None:
    """An unacknowledged promotion's restore re-published the previous phase over an
    emergency rollback: users went back to the production balancer and the rollback
    left no trace. The rollback is recorded instead."""
    paths, rid = running
    moved = gate_promotes(paths, rid)
    rollback = _rollback_published_not_recorded(paths, rid)
    restored = lifecycle.restore_previous(
        paths,
        rollout_id=rid,
        failed_version=moved.config.version,
        reason="routers did not acknowledge it",
        actor="transaction",
    )
    assert restored is None
    assert control_store(paths).current() == rollback
    assert state_of(paths, rid) == "rolled_back"


def test_an_approval_whose_promotion_fails_leaves_no_approved_decision(
    running: tuple[DataPaths, str],
) -> None:
    paths, rid = running
    move_to(paths, rid, RolloutState.AWAITING_APPROVAL)
    _rollback_published_not_recorded(paths, rid)
    for _ in range(2):
        with pytest.raises(lifecycle.RolledBackMeanwhile):
            lifecycle.approve(paths, approved=True, actor="alice", rollout_id=rid)
    with connect(paths.database, read_only=True) as con:
        verdicts = con.execute("SELECT verdict FROM decisions WHERE rollout_id = ?", [rid])
        assert ("APPROVED",) not in verdicts.fetchall()


def test_versions_are_numbered_above_what_the_routers_run(tmp_path: Path) -> None:
    """A data dir reset under running routers (they run v7) started at v1: routers refuse
    a lower version, so every start and restore was refused."""
    paths = DataPaths.at(tmp_path / "data").ensure()
    control_store(paths).write_ack(heartbeat("app-1", 7, "legacy_only"))
    published = lifecycle.start(paths, load_plan(DEMO_PLAN), actor="test")
    assert published.config.version == 8


def test_a_phase_one_restore_that_died_before_recording_is_adopted_as_an_abort(
    running: tuple[DataPaths, str],
) -> None:
    """reconcile told an abort from a rollback by the reason's first word, and the
    phase-1 restore's reason starts "restore": it was adopted as ROLLED_BACK."""
    paths, rid = running
    live = control_store(paths).current()
    control_store(paths).publish(
        legacy_only_config(
            live.version + 1, rid, live.salt, f"{lifecycle.PHASE_ONE_RESTORE}: no ack"
        )
    )
    assert "adopted abort" in (lifecycle.reconcile(paths) or "")
    assert state_of(paths, rid) == "aborted"


def test_rolling_back_a_finished_rollout_leaves_a_decision(
    running: tuple[DataPaths, str],
) -> None:
    """Every user went back to legacy after a completed rollout with no transition, no
    decision and no event: `rollout report` showed nothing."""
    paths, rid = running
    move_to(paths, rid, RolloutState.COMPLETED)
    done = lifecycle.rollback(paths, reason="late errors", actor="alice", rollout_id=rid)
    assert done.published and not done.ended_now
    again = lifecycle.rollback(paths, reason="again", actor="alice", rollout_id=rid)
    assert not again.published  # a repeat publishes and records nothing new
    with connect(paths.database, read_only=True) as con:
        decisions = con.execute(
            "SELECT verdict, action, actor FROM decisions WHERE rollout_id = ?", [rid]
        ).fetchall()
    assert decisions == [("ROLLBACK", "published legacy_only after the rollout completed", "alice")]
    assert state_of(paths, rid) == "completed"


class Died(BaseException):
    """The process dying at this point (nothing after it runs, nothing uncommitted stays)."""


@contextlib.contextmanager
def dies_after_publishing(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every publish reaches the routers, then the process dies (before any commit)."""
    publish = FileControlStore.publish

    def publish_then_die(self: FileControlStore, config: RouterConfig) -> None:
        publish(self, config)
        raise Died

    with monkeypatch.context() as patched:
        patched.setattr(FileControlStore, "publish", publish_then_die)
        yield


def override_promotion_dies(paths: DataPaths, rid: str) -> None:
    with pytest.raises(Died):
        gate_promotes(paths, rid, reason="manual: ok", actor="bob", override=True)


def decisions_of(paths: DataPaths, rid: str) -> list[tuple[str, str, str]]:
    with connect(paths.database, read_only=True) as con:
        return con.execute(
            "SELECT verdict, actor, reason FROM decisions WHERE rollout_id = ? ORDER BY decided_at",
            [rid],
        ).fetchall()


def test_a_rejection_on_record_was_acted_on(
    running: tuple[DataPaths, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """REJECTED was written before the rollback: a crash in between left a recorded
    rejection, a rollout still awaiting approval and the phase still live."""
    paths, rid = running
    move_to(paths, rid, RolloutState.AWAITING_APPROVAL)

    def dies(*args: object, **kwargs: object) -> None:
        raise Died

    with monkeypatch.context() as patched:
        patched.setattr(lifecycle, "_back_to_legacy", dies)
        with pytest.raises(Died):
            lifecycle.approve(paths, approved=False, actor="alice", rollout_id=rid)
    assert decisions_of(paths, rid) == []
    assert state_of(paths, rid) == "awaiting_approval"

    lifecycle.approve(paths, approved=False, actor="alice", comment="p95", rollout_id=rid)
    assert [d[0] for d in decisions_of(paths, rid)] == ["ROLLBACK", "REJECTED"]
    assert state_of(paths, rid) == "rolled_back"


def test_a_decision_that_died_with_its_process_is_recorded_by_reconcile(
    running: tuple[DataPaths, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """reconcile adopted the move but the decision was gone: an override promotion or an
    on-call rollback left no trace of who decided, or that anybody did."""
    paths, rid = running
    with dies_after_publishing(monkeypatch):
        override_promotion_dies(paths, rid)
        with pytest.raises(Died):
            lifecycle.rollback(paths, reason="pager", actor="alice", rollout_id=rid)
    # the rollback's document replaced the promotion's: only the rollback can be adopted
    assert "adopted rollback" in (lifecycle.reconcile(paths) or "")
    assert state_of(paths, rid) == "rolled_back"
    ((verdict, actor, reason),) = decisions_of(paths, rid)
    assert (verdict, actor) == ("ROLLBACK", "reconcile") and "by alice: pager" in reason


def test_a_promotion_that_died_before_recording_keeps_who_decided(
    running: tuple[DataPaths, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    paths, rid = running
    with dies_after_publishing(monkeypatch):
        override_promotion_dies(paths, rid)
    assert decisions_of(paths, rid) == []  # the whole move was rolled back with the process
    assert "adopted promotion" in (lifecycle.reconcile(paths) or "")
    ((verdict, actor, reason),) = decisions_of(paths, rid)
    assert (verdict, actor) == ("PROMOTE", "reconcile") and "by bob: manual: ok" in reason
    assert lifecycle.reconcile(paths) is None  # once


def test_a_republished_phase_is_not_restored_to_an_older_copy_of_itself(
    running: tuple[DataPaths, str],
) -> None:
    """After a lost control document, reconcile republished the phase; the same tick found
    it "overdue" (timed from the phase's start) and restored the newest older version,
    an older copy of the same phase, while the database moved back a phase."""
    from datetime import timedelta

    from flows.tick import tick

    paths, rid = running
    moved = gate_promotes(paths, rid)
    with connect(paths.database) as con:
        con.execute(  # the phase has run for a day
            "UPDATE phases SET started_at = started_at - INTERVAL 1 DAY WHERE rollout_id = ?",
            [rid],
        )
    control_store(paths).write_ack(heartbeat("app-1", moved.config.version, "canary"))
    (paths.control / "router_config.json").unlink()  # the live document is lost
    report = tick(paths, runner=None, rollout_id=rid)  # type: ignore[arg-type]  # no gate run
    assert report.reconciled and "republished phase 2" in report.reconciled
    assert report.action == "none" and report.phase_index == 1
    live = control_store(paths).current()
    assert live.phase == moved.config.phase and live.version > moved.config.version

    # routers that never take it: the previous PHASE goes back out
    restored = lifecycle.restore_previous(
        paths, rollout_id=rid, failed_version=live.version, reason="no ack", actor="gate"
    )
    assert restored is not None and restored.phase == load_plan(DEMO_PLAN).phases[0].name
    assert timedelta(0) < restored.published_at - live.published_at


def test_a_reason_cannot_inject_markdown_into_the_status_artifact(
    running: tuple[DataPaths, str],
) -> None:
    """A comment `# Heading ![x](http://...)` rendered as a heading and a remote image in
    the status artifact people read in the Prefect UI."""
    from flows.status import markdown, snapshot

    paths, rid = running
    lifecycle.rollback(
        paths, reason="# Heading ![x](http://127.0.0.1:9/p.png) | cell", actor="eve", rollout_id=rid
    )
    with connect(paths.database, read_only=True) as con:
        snap = snapshot(con, rid)
    assert snap is not None
    page = markdown(snap)
    assert "\n# Heading" not in page and "![x](" not in page
    assert r"\# Heading \!\[x\]\(http://127.0.0.1:9/p.png\) \| cell" in page


def test_rolling_back_a_finished_rollout_while_another_runs_is_refused(
    running: tuple[DataPaths, str],
) -> None:
    """Its legacy_only named the finished rollout: the next tick's reconcile republished
    the running rollout's phase, after the operator was told routers were on legacy."""
    paths, first = running
    lifecycle.rollback(paths, reason="bad canary", actor="alice", rollout_id=first)
    second = lifecycle.start(paths, load_plan(DEMO_PLAN), actor="t", rollout_id="ro-two")
    with pytest.raises(lifecycle.RolloutError, match="rollout ro-two is running and owns"):
        lifecycle.rollback(paths, reason="users see errors", actor="bob", rollout_id=first)
    assert control_store(paths).current() == second.config  # nothing was published


def test_only_a_new_rollouts_first_document_re_arms_the_guard(
    running: tuple[DataPaths, str],
) -> None:
    """A phase-1 republish (after a lost document) or restore re-armed a guard that had
    tripped in that phase: routers went back to production, the failback never judged."""
    paths, rid = running
    assert control_store(paths).current().rearm_guard  # the start's document
    (paths.control / "router_config.json").unlink()
    assert "republished phase 1" in (lifecycle.reconcile(paths) or "")
    republished = control_store(paths).current()
    assert republished.phase == "shadow" and not republished.rearm_guard
    moved = gate_promotes(paths, rid)
    restored = lifecycle.restore_previous(
        paths, rollout_id=rid, failed_version=moved.config.version, reason="no ack", actor="g"
    )
    assert restored is not None and restored.phase == "shadow" and not restored.rearm_guard


def test_a_failback_after_the_rollout_completed_sends_routers_to_legacy(
    running: tuple[DataPaths, str],
) -> None:
    """Nobody confirmed it: the instance that tripped went back to production at its next
    restart, since the finished rollout's document still said production."""
    from datetime import UTC, datetime

    from flows.tick import tick

    paths, rid = running
    move_to(paths, rid, RolloutState.COMPLETED)
    live = control_store(paths).current()
    with connect(paths.database) as con:
        con.execute(
            "INSERT INTO router_events VALUES ('e1', ?, 'app-1', 'failback', ?, NULL, ?)",
            [datetime.now(UTC), live.version, "production error rate 40% over 20 requests"],
        )
    report = tick(paths, runner=None)  # type: ignore[arg-type]  # no gate runs when idle
    assert report.rollout_id == rid and report.action.startswith("rolled back")
    assert control_store(paths).current().mode.value == "legacy_only"
    ((verdict, actor, reason),) = decisions_of(paths, rid)
    assert (verdict, actor) == ("ROLLBACK", "gate")
    assert "failed back after the rollout ended" in reason
    assert tick(paths, runner=None).action == "none"  # type: ignore[arg-type]  # once


@pytest.mark.parametrize(
    ("evaluated_s_ago", "due"),
    [(900 - 4, True), (900 - 60, False), (900, True)],
    ids=["4 s early", "a minute early", "on time"],
)
def test_an_evaluation_stamped_seconds_after_its_tick_is_due_at_the_next(
    evaluated_s_ago: float, due: bool
) -> None:
    """`evaluated_at` lands seconds after the tick starts (collect runs first): compared
    exactly, the next 15-minute evaluation was "not due for 4 s" and ran a tick late."""
    from datetime import UTC, datetime, timedelta
    from types import SimpleNamespace

    from flows.tick import _not_due_for

    now = datetime(2026, 12, 7, 12, 15, 3, tzinfo=UTC)
    answers = iter([(now - timedelta(seconds=evaluated_s_ago),), (0,)])  # last, failbacks
    con = SimpleNamespace(execute=lambda *_: SimpleNamespace(fetchone=lambda: next(answers)))
    rollout = SimpleNamespace(
        rollout_id="r1",
        phase_index=0,
        phase=SimpleNamespace(evaluation_interval=timedelta(minutes=15)),
    )
    assert (_not_due_for(con, rollout, 3, now) is None) is due


def test_a_rollback_a_live_router_refused_is_reported_by_every_idle_tick(
    running: tuple[DataPaths, str],
) -> None:
    """The rollout reads `rolled_back`, but a router that refused legacy_only (an old
    release refusing a field it does not know) still serves the canary."""
    from flows.tick import tick

    paths, rid = running
    store = control_store(paths)
    store.write_ack(heartbeat("app-old", store.current().version, "canary"))
    done = lifecycle.rollback(paths, reason="5xx", actor="on-call", rollout_id=rid)
    assert tick(paths, runner=None).refused_rollback is None  # type: ignore[arg-type]
    refusal = "rearm_guard: Extra inputs are not permitted"
    store.write_ack(
        heartbeat(
            "app-old",
            store.current().version - 1,
            "canary",
            refused_version=done.config.version,
            refused_reason=refusal,
        )
    )
    report = tick(paths, runner=None)  # type: ignore[arg-type]  # no gate runs when idle
    assert report.state == "idle" and state_of(paths, rid) == "rolled_back"
    assert report.refused_rollback is not None
    assert "app-old" in report.refused_rollback and refusal in report.refused_rollback
