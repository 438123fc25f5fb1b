"""One evaluation of the active rollout: collect, check, decide, act.

Safe to run at any time and any number of times: collection is exactly-once, the
evaluation only reads, and each action is a state-machine transition that refuses to
happen twice.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from checks.gate import evaluate
from checks.gx_suites import GxRunner
from checks.thresholds import GateSpec
from checks.verdict import GateResult, Verdict
from flows import lifecycle
from flows.control import ack_status, control_store
from flows.paths import DataPaths
from flows.state import RolloutState
from flows.store.database import connect, transaction
from flows.store.ingest import IngestReport, collect
from flows.store.rollouts import (
    Rollout,
    config_published_at,
    phase_config_version,
    phase_started_at,
    record_decision,
    record_evaluations,
    transition,
)


@dataclass
class TickReport:
    rollout_id: str | None
    state: str
    phase_index: int | None = None
    phase_name: str | None = None
    config_version: int | None = None
    verdict: str | None = None
    reason: str = ""
    action: str = "none"
    #: how long routers get to apply a promotion: the plan's `ack_timeout`
    ack_timeout_s: float = 30.0
    n_legacy: int = 0
    n_production: int = 0
    ingested_rows: int = 0
    quarantined: list[tuple[str, str]] = field(default_factory=list)
    evaluation_id: str | None = None
    records: list[dict] = field(default_factory=list)
    data_docs_url: str | None = None
    #: Version this tick published for a promotion (the caller waits for its acks).
    published_version: int | None = None
    reconciled: str | None = None
    router_group: str | None = None
    #: Live routers that refused the live legacy_only document (a rollback): they still
    #: serve their previous config, whatever the rollout's state says.
    refused_rollback: str | None = None

    @property
    def finished(self) -> bool:
        return self.state in (
            RolloutState.COMPLETED.value,
            RolloutState.ROLLED_BACK.value,
            RolloutState.ABORTED.value,
        )


def gate_spec(con, rollout: Rollout, version: int, now: datetime) -> GateSpec:
    phase = rollout.phase
    started = phase_started_at(con, rollout.rollout_id, rollout.phase_index) or rollout.started_at
    return GateSpec(
        config_version=version,
        mode=phase.mode.value,
        traffic_percent=phase.traffic_percent,
        shadow_sample_rate=phase.shadow_sample_rate,
        thresholds=phase.thresholds,
        min_samples=phase.min_samples,
        min_duration_s=phase.min_duration.total_seconds(),
        max_duration_s=phase.max_duration.total_seconds(),
        phase_started_at=started,
        now=now,
        requires_approval=phase.requires_approval,
        on_max_duration=phase.on_max_duration,
    )


#: How early an evaluation counts as due (at most a tenth of the phase's interval).
DUE_SLACK_S = 30.0


def _not_due_for(con: Any, rollout: Rollout, version: int, now: datetime) -> float | None:
    """Seconds until this phase's next evaluation is due; None when it is due now (never
    evaluated, interval passed, or the router failed back and that must be confirmed)."""
    last = con.execute(
        "SELECT max(evaluated_at) FROM gate_evaluations WHERE rollout_id = ? AND phase_index = ?",
        [rollout.rollout_id, rollout.phase_index],
    ).fetchone()[0]
    if last is None:
        return None
    failbacks = con.execute(
        "SELECT count(*) FROM router_events WHERE kind = 'failback' AND config_version = ?",
        [version],
    ).fetchone()[0]
    interval = rollout.phase.evaluation_interval.total_seconds()
    remaining = (last + rollout.phase.evaluation_interval - now).total_seconds()
    # Due a little early: `evaluated_at` is stamped after the tick's collect, so it lands
    # seconds past the tick's start, and an exact comparison put every other evaluation
    # one tick late (every 16 minutes instead of 15).
    slack = min(DUE_SLACK_S, interval / 10)
    return remaining if remaining > slack and not failbacks else None


def _confirm_failback_after_the_end(
    con: Any, paths: DataPaths, store: Any, actor: str, report: TickReport
) -> None:
    """A router failed back under the last document of a finished rollout: send every
    router to legacy, as a tick confirms a failback during a rollout. Nobody did: the
    instance that tripped went back to production at its next restart."""
    live = store.current_or_none()
    if live is None or live.mode.value == "legacy_only" or live.rollout_id is None:
        return
    row = con.execute(
        "SELECT detail FROM router_events WHERE kind = 'failback' AND config_version = ? "
        "ORDER BY ts DESC LIMIT 1",
        [live.version],
    ).fetchall()
    if not row:
        return
    reason = f"a router failed back after the rollout ended: {row[0][0]}"
    done = lifecycle.rollback(paths, reason=reason, actor=actor, rollout_id=live.rollout_id)
    report.rollout_id = live.rollout_id
    report.state = done.rollout.state.value if done.rollout else "idle"
    report.verdict, report.reason = Verdict.ROLLBACK.value, reason
    report.action = f"rolled back: published legacy_only as v{done.config.version}"


def refused_rollback(store: Any) -> str | None:
    """Whether live routers refused the live legacy_only document, and who and why (an
    old router release refusing a field it does not know, say)."""
    live = store.current_or_none()
    if live is None or live.mode.value != "legacy_only":
        return None
    acks = ack_status(store, live.version)
    return acks.describe() if acks.refused else None


def tick(
    paths: DataPaths,
    runner: GxRunner,
    *,
    rollout_id: str | None = None,
    actor: str = "gate",
    only_when_due: bool = False,
) -> TickReport:
    """Collect, then (unless `only_when_due` and the phase's evaluation interval has not
    passed since its last evaluation, with no failback to act on) evaluate and act."""
    ingest: IngestReport = collect(paths)
    reconciled = lifecycle.reconcile(paths)
    store = control_store(paths)
    with connect(paths.database) as con:
        rollout = lifecycle.resolve_active(con, rollout_id)
        if rollout is None:
            idle = TickReport(
                None,
                "idle",
                reason="no active rollout",
                ingested_rows=ingest.rows,
                quarantined=ingest.quarantined,
                reconciled=reconciled,
            )
            if rollout_id is None:
                _confirm_failback_after_the_end(con, paths, store, actor, idle)
            idle.refused_rollback = refused_rollback(store)
            return idle
        report = TickReport(
            rollout.rollout_id,
            rollout.state.value,
            rollout.phase_index,
            rollout.phase.name,
            ingested_rows=ingest.rows,
            quarantined=ingest.quarantined,
            reconciled=reconciled,
        )
        report.router_group = rollout.router_group
        report.ack_timeout_s = rollout.plan.ack_timeout.total_seconds()
        version = phase_config_version(con, rollout.rollout_id, rollout.phase_index)
        report.config_version = version
        # While a human decides, the gate keeps judging: harm found meanwhile still rolls
        # back at once; anything else waits for the answer (see `_act`).
        awaiting = rollout.state is RolloutState.AWAITING_APPROVAL
        if version is None:
            report.reason = "phase has no published config"
            return report
        acks = ack_status(store, version)
        if not acks.complete:
            report.verdict = Verdict.INSUFFICIENT_DATA.value
            report.reason = f"waiting for routers: {acks.describe()}"
            # Timed from this version's publish: a republish (after a lost or stale
            # document) gets the routers' whole ack timeout, although its phase is older.
            started = max(
                (
                    t
                    for t in (
                        phase_started_at(con, rollout.rollout_id, rollout.phase_index),
                        config_published_at(con, version),
                    )
                    if t is not None
                ),
                default=None,
            )
            overdue = (
                acks.live
                and started is not None
                and datetime.now(UTC) - started > rollout.plan.ack_timeout
            )
            if acks.refused or overdue:
                # Routers refused this phase or never took it: put the previous one back
                # (or end the rollout if this was phase 1) instead of waiting forever.
                restored = lifecycle.restore_previous(
                    paths,
                    rollout_id=rollout.rollout_id,
                    failed_version=version,
                    reason=report.reason,
                    actor=actor,
                )
                report.action = (
                    f"restored the previous config as v{restored.version}"
                    if restored
                    else "nothing to restore"
                )
            return report
        now = datetime.now(UTC)
        if only_when_due:
            wait = _not_due_for(con, rollout, version, now)
            if wait is not None:
                report.reason = (
                    f"next evaluation in {wait:.0f}s (phase {rollout.phase.name} evaluates "
                    f"every {rollout.phase.evaluation_interval})"
                )
                report.action = "not due"
                return report
        evaluation_id = uuid.uuid4().hex
        result: GateResult = evaluate(
            con,
            gate_spec(con, rollout, version, now),
            runner,
            run_name=f"{rollout.rollout_id}-p{rollout.phase_index + 1}-{evaluation_id[:8]}",
        )
        rows = [
            {
                **record.as_row(),
                "evaluation_id": evaluation_id,
                "rollout_id": rollout.rollout_id,
                "phase_index": rollout.phase_index,
                "config_version": version,
                "evaluated_at": now,
            }
            for record in result.records
        ]
        report.evaluation_id = evaluation_id
        report.records = rows
        report.verdict = result.verdict.value
        report.reason = result.reason
        report.n_legacy, report.n_production = result.n_legacy, result.n_production
        report.data_docs_url = result.data_docs_url
        rolled_back = result.verdict is Verdict.ROLLBACK

        def record(c: Any, *_: Any) -> None:
            record_evaluations(c, rows)
            record_decision(
                c,
                decision_id=evaluation_id,
                rollout=rollout,
                config_version=version,
                verdict=result.verdict.value,
                action=AWAITING_INTENT if awaiting and not rolled_back else INTENT[result.verdict],
                actor=actor,
                reason=result.reason,
                evaluation_id=evaluation_id,
                n_legacy=result.n_legacy,
                n_production=result.n_production,
            )

        if rolled_back:
            # Users first: legacy_only goes out before anything is written here; the
            # evaluation is recorded with the rollback (a crash in between leaves the
            # rollback to `reconcile`, which records it from the document's reason).
            lifecycle.rollback(
                paths,
                reason=result.reason,
                actor=actor,
                rollout_id=rollout.rollout_id,
                decided=True,
                also=record,
            )
        else:
            # The decision is on record before any other action; if the process dies in
            # the action, the next tick re-evaluates and `reconcile` repairs a half-done
            # publish.
            with transaction(con):
                record(con)
        if awaiting and not rolled_back:
            report.action = AWAITING_INTENT
            report.reason = f"{WAITING_FOR_HUMAN}; the gate now says: {result.reason}"
        else:
            report.action, report.published_version = _act(con, paths, rollout, result, actor)
        current = lifecycle.get_state(con, rollout.rollout_id)
        report.state = current.state.value
        report.phase_index = current.phase_index
        report.phase_name = current.phase.name
    return report


WAITING_FOR_HUMAN = "waiting for a human decision (rollout approve)"
#: What a tick does with a verdict other than ROLLBACK while a human decides: the
#: question stays open; a PROMOTE or HOLD must not answer it on the human's behalf.
AWAITING_INTENT = "still awaiting approval"

INTENT = {
    Verdict.PROMOTE: "promote",
    Verdict.ROLLBACK: "roll back",
    Verdict.NEEDS_APPROVAL: "ask a human",
    Verdict.HOLD: "hold",
    Verdict.INSUFFICIENT_DATA: "wait for data",
}


def _act(
    con: Any, paths: DataPaths, rollout: Rollout, result: GateResult, actor: str
) -> tuple[str, int | None]:
    """Carry out the verdict: (what was done, version published for a promotion)."""
    verdict = result.verdict
    if verdict is Verdict.PROMOTE:
        try:
            moved = lifecycle.promote(con, paths, rollout, reason=result.reason, actor=actor)
        except lifecycle.RolledBackMeanwhile as exc:
            return f"not promoted: {exc}", None
        if isinstance(moved, lifecycle.Published):
            return (
                f"promoted: published v{moved.config.version} ({moved.rollout.phase.name})",
                moved.config.version,
            )
        return "completed: last phase promoted", None
    if verdict is Verdict.NEEDS_APPROVAL:
        with transaction(con):
            transition(
                con, rollout, RolloutState.AWAITING_APPROVAL, cause=result.reason, actor=actor
            )
        return "awaiting approval", None
    if verdict is Verdict.ROLLBACK:
        return "rolled back: published legacy_only", None
    if (
        verdict is Verdict.HOLD
        and rollout.state is not RolloutState.HOLDING
        and result.reason.startswith("maximum duration")
    ):
        with transaction(con):
            transition(con, rollout, RolloutState.HOLDING, cause=result.reason, actor=actor)
        return "holding at maximum duration", None
    return "none", None
