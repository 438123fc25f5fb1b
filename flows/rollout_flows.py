"""The Prefect flows. Each is a thin shell over `lifecycle` and `tick`, so the same logic
runs from the UI (deployments), the CLI (`rollout ...`) and the tests.

| flow               | what it does                                                      |
|--------------------|-------------------------------------------------------------------|
| rollout-start      | validate the plan, record the rollout, publish phase 1, wait acks |
| rollout-tick       | one evaluation: collect, check, decide, act (interval schedule)   |
| rollout-approve    | a human's decision (UI form via wait_for_input, or parameters)    |
| rollout-rollback   | publish legacy_only first, then record; safe to repeat            |
| nightly-comparison | last 24 h of legacy against production per backend and category  |
| rollout-run        | start, then tick at each phase's interval until done (the demo)   |

Publishing a new phase runs in a Prefect transaction with the acknowledgement wait:
if the routers refuse the config or do not acknowledge it in time, the `on_rollback`
hook re-publishes the previous config and moves the rollout back to that phase.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Annotated, Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE
from prefect.input import RunInput
from prefect.transactions import Transaction, get_transaction, transaction
from pydantic import Field, StringConstraints

from checks.gx_suites import GxRunner
from flows import lifecycle, nightly, progress
from flows.control import ack_status, control_store, wait_for_ack
from flows.paths import DataPaths
from flows.plan import RolloutPlan, default_plan
from flows.prefect_outputs import (
    EVENT_APPROVAL_DECIDED,
    EVENT_APPROVAL_REQUESTED,
    EVENT_COMPLETED,
    EVENT_PROMOTED,
    EVENT_ROLLED_BACK,
    GROUP_RESOURCE_PREFIX,
    artifact_key,
    emit,
    publish_decision,
    publish_status,
)
from flows.status import md
from flows.store.database import StoreError, connect
from flows.store.rollouts import Rollout
from flows.tick import TickReport, tick

_RUNNERS: dict[str, GxRunner] = {}
TERMINAL = ("completed", "rolled_back", "aborted")


def gx_runner(paths: DataPaths) -> GxRunner:
    """One GX context per process and data dir: GX costs seconds to set up, ms to run."""
    key = str(paths.gx.resolve())
    if key not in _RUNNERS:
        _RUNNERS[key] = GxRunner(docs_dir=paths.gx / "docs")
    return _RUNNERS[key]


class AcknowledgementFailed(RuntimeError):
    pass


# -- tasks ---------------------------------------------------------------------------------
@task(name="publish-first-phase", cache_policy=NONE)
def start_task(data_dir: str, plan: RolloutPlan, rollout_id: str | None, actor: str) -> dict:
    published = lifecycle.start(DataPaths.at(data_dir), plan, actor=actor, rollout_id=rollout_id)
    txn = get_transaction()
    if txn is not None and published.new:  # a re-run published nothing: nothing to undo
        txn.set("published", (data_dir, published.rollout.rollout_id, published.config.version))
    return {"rollout_id": published.rollout.rollout_id, "version": published.config.version}


@task(name="wait-for-acknowledgement", cache_policy=NONE)
def ack_task(data_dir: str, version: int, timeout_s: float) -> str:
    status = wait_for_ack(control_store(DataPaths.at(data_dir)), version, timeout_s)
    if status.refused or not status.complete:
        raise AcknowledgementFailed(f"config v{version} not applied: {status.describe()}")
    return status.describe()


@task(name="evaluate-and-act", cache_policy=NONE)
def tick_task(
    data_dir: str, rollout_id: str | None, actor: str, only_when_due: bool = False
) -> TickReport:
    paths = DataPaths.at(data_dir)
    report = tick(
        paths, gx_runner(paths), rollout_id=rollout_id, actor=actor, only_when_due=only_when_due
    )
    txn = get_transaction()
    if txn is not None and report.published_version is not None:
        txn.set("published", (data_dir, report.rollout_id, report.published_version))
    return report


def _restore(txn: Transaction) -> None:
    """on_rollback: the routers did not take the new phase; put the previous one back."""
    published = txn.get("published", None)
    if not published:
        return
    data_dir, rollout_id, version = published
    lifecycle.restore_previous(
        DataPaths.at(data_dir),
        rollout_id=rollout_id,
        failed_version=version,
        reason="routers did not acknowledge it",
        actor="transaction",
    )


start_task.on_rollback(_restore)
tick_task.on_rollback(_restore)


@task(name="rollback", cache_policy=NONE)
def rollback_task(data_dir: str, reason: str, rollout_id: str | None, actor: str) -> dict:
    done = lifecycle.rollback(
        DataPaths.at(data_dir), reason=reason, actor=actor, rollout_id=rollout_id
    )
    rollout = done.rollout
    return {
        "version": done.config.version,
        "ended_now": done.ended_now,
        "rollout_id": rollout.rollout_id if rollout else None,
        "state": rollout.state.value if rollout else None,
        "router_group": rollout.router_group if rollout else None,
    }


@task(name="nightly-comparison-query", cache_policy=NONE)
def nightly_task(data_dir: str, hours: float) -> nightly.Comparison:
    paths = DataPaths.at(data_dir)
    from flows.store.ingest import collect

    collect(paths)
    # A scheduled run compares up to its scheduled time, not to when a worker got to it.
    from prefect.runtime import flow_run

    scheduled = flow_run.scheduled_start_time
    end = min(scheduled, datetime.now(UTC)) if isinstance(scheduled, datetime) else None
    with connect(paths.database) as con:
        for late, counted in nightly.late_windows(con, end or datetime.now(UTC)):
            nightly.store(con, late)
            get_run_logger().info(
                "compared %s to %s UTC again: it counted %d request(s), now %d (rows that "
                "arrived after it ran)",
                f"{late.window_start:%Y-%m-%d %H:%M}",
                f"{late.window_end:%Y-%m-%d %H:%M}",
                counted,
                sum(late.totals.values()),
            )
        comparison = nightly.compare(con, hours, end)
        nightly.store(con, comparison)
    return comparison


# -- flows ---------------------------------------------------------------------------------
@flow(name="rollout-start")
def rollout_start(
    plan: RolloutPlan | None = None,
    data_dir: str = "data",
    rollout_id: Annotated[str | None, Field(pattern=f"^{lifecycle.ROLLOUT_ID_PATTERN}$")] = None,
    actor: str = "prefect",
) -> dict[str, Any]:
    """Validate the plan, record the rollout and publish phase 1; wait for the routers.

    Args:
        plan: The phases, thresholds and timeouts. Empty: the five-week plan of
            deployments/plans/five_weeks.yaml.
        data_dir: The data folder the routers and the flows share (metrics.duckdb,
            control/, segments/).
        rollout_id: An id for the new rollout; empty: one is generated.
        actor: Who started it, for the record.
    """
    logger = get_run_logger()
    plan = plan or default_plan()
    with transaction():
        started = start_task(data_dir, plan, rollout_id, actor)
        acks = ack_task(data_dir, started["version"], plan.ack_timeout.total_seconds())
    logger.info(
        "rollout %s started: phase 1 (%s) is v%s; %s",
        started["rollout_id"],
        plan.phases[0].name,
        started["version"],
        acks,
    )
    publish_status(DataPaths.at(data_dir), started["rollout_id"])
    return {**started, "acks": acks}


#: Seconds; None: the rollout plan's `ack_timeout` (30 s was used whatever the plan said).
AckTimeout = Annotated[float | None, Field(gt=0)]


@flow(name="rollout-tick")
def rollout_tick(
    data_dir: str = "data",
    rollout_id: str | None = None,
    actor: str = "gate",
    ack_timeout_s: AckTimeout = None,
    only_when_due: bool = False,
) -> dict[str, Any]:
    """One evaluation: collect new segments, run the checks, decide, act.

    Args:
        data_dir: The data folder the routers and the flows share.
        rollout_id: The rollout to evaluate; empty: the active one.
        actor: Who decides, for the record.
        ack_timeout_s: Seconds the routers get to apply a promotion; empty: the plan's
            ack_timeout.
        only_when_due: What the schedule sets: collect every time, but evaluate only at
            the phase's evaluation_interval (or at once after a router failback).
    """
    logger = get_run_logger()
    with transaction():
        report = tick_task(data_dir, rollout_id, actor, only_when_due)
        if report.published_version is not None:
            # (not read from the database here: a busy writer would fail the transaction
            # and undo a good promotion)
            ack_task(data_dir, report.published_version, ack_timeout_s or report.ack_timeout_s)
    if report.rollout_id is None:
        logger.info("no active rollout: %s", report.reason or "nothing to evaluate")
    else:
        logger.info(
            "%s phase %s: %s (%s) -> %s [legacy %d, production %d]",
            report.rollout_id,
            report.phase_name,
            report.verdict,
            report.reason,
            report.action,
            report.n_legacy,
            report.n_production,
        )
    if report.reconciled:
        logger.warning("reconciled after an earlier crash: %s", report.reconciled)
    if report.refused_rollback:
        logger.error("routers refused the rollback to legacy: %s", report.refused_rollback)
    if report.rollout_id:
        if report.evaluation_id:  # a decision record only where there was a decision
            publish_decision(report.rollout_id, report)
        publish_status(DataPaths.at(data_dir), report.rollout_id, report.data_docs_url)
        _emit_for(report)
    progress.publish(report)
    if report.refused_rollback:  # a failed run is what alerts watch; users are not safe
        raise RollbackRefused(f"routers refused the rollback: {report.refused_rollback}")
    return {k: v for k, v in report.__dict__.items() if k != "records"} | {
        "records": len(report.records)
    }


def _emit_for(report: TickReport) -> None:
    assert report.rollout_id is not None
    group = report.router_group or "default"
    payload = {
        "phase": report.phase_name,
        "verdict": report.verdict,
        "reason": report.reason,
        "n_legacy": report.n_legacy,
        "n_production": report.n_production,
    }
    if report.action.startswith("promoted"):
        emit(EVENT_PROMOTED, report.rollout_id, group, payload)
    elif report.action.startswith("completed"):
        emit(EVENT_COMPLETED, report.rollout_id, group, payload)
    elif report.action.startswith("rolled back"):
        emit(EVENT_ROLLED_BACK, report.rollout_id, group, payload)
    elif report.action == "awaiting approval":
        emit(EVENT_APPROVAL_REQUESTED, report.rollout_id, group, payload)


#: Who decided, as recorded with the decision: never blank.
Approver = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=100)]


class ApprovalInput(RunInput):
    """The form a human fills in the Prefect UI."""

    approve: bool = Field(description="Promote to the next phase (true) or roll back (false)")
    comment: str = Field(default="", max_length=500, description="Why; kept with the decision")
    approver: Approver = Field(default="prefect-ui", description="Your name, for the record")


def _approval_question(paths: DataPaths, asked: Rollout) -> str:
    """What the form asks: which rollout, which move, and why the gate asked."""
    i, phases = asked.phase_index, asked.plan.phases
    move = (
        f"promote phase {i + 1} ({md(phases[i].name)}) to phase {i + 2} ({md(phases[i + 1].name)})"
        if i + 1 < len(phases)
        else f"complete the rollout after its last phase ({md(phases[i].name)})"
    )
    with connect(paths.database, read_only=True) as con:
        row = con.execute(
            "SELECT reason, n_legacy, n_production FROM decisions WHERE rollout_id = ? "
            "AND phase_index = ? AND verdict = 'NEEDS_APPROVAL' ORDER BY decided_at DESC LIMIT 1",
            [asked.rollout_id, i],
        ).fetchall()
    why = (
        f" The gate asked because: {md(row[0][0])} (legacy {row[0][1]}, production {row[0][2]}"
        " requests)."
        if row
        else ""
    )
    return (
        f"Rollout {md(asked.rollout_id)}: {move}?{why} Approve to go ahead; reject to send every "
        "user back to the legacy balancer."
    )


@flow(name="rollout-approve")
def rollout_approve(
    data_dir: str = "data",
    rollout_id: str | None = None,
    approve: bool | None = None,
    comment: Annotated[str, Field(max_length=500)] = "",
    approver: Approver = "prefect-ui",
    timeout_s: Annotated[int, Field(ge=1)] = 86_400,
    ack_timeout_s: AckTimeout = None,
) -> dict[str, Any]:
    """A human's decision on a rollout awaiting approval.

    Args:
        data_dir: The data folder the routers and the flows share.
        rollout_id: The rollout awaiting approval; empty: the active one.
        approve: True promotes, false rolls back. Empty: the run pauses with a form in
            the Prefect UI (or answer with `rollout approve`).
        comment: Why; kept with the decision.
        approver: Who decides, for the record.
        timeout_s: Seconds the paused form waits for an answer.
        ack_timeout_s: Seconds the routers get to apply an approved promotion; empty:
            the plan's ack_timeout.
    """
    from prefect.flow_runs import pause_flow_run

    logger = get_run_logger()
    paths = DataPaths.at(data_dir)
    # Fails at once when nothing awaits approval, rather than pausing for a day; and
    # ties the answer to the phase asked about.
    asked = lifecycle.awaiting_approval(paths, rollout_id)
    if approve is None:
        logger.info(
            "waiting for a human decision on phase %d (%s): Prefect UI form, or `rollout approve`",
            asked.phase_index + 1,
            asked.phase.name,
        )
        answer = pause_flow_run(
            # No default answer: a click on Resume must not promote by accident.
            wait_for_input=ApprovalInput.with_initial_data(
                description=_approval_question(paths, asked),
            ),
            timeout=timeout_s,
            poll_interval=2,
        )
        approve, comment, approver = answer.approve, answer.comment, answer.approver
    rollout = lifecycle.approve(
        paths,
        approved=approve,
        actor=approver,
        comment=comment,
        rollout_id=asked.rollout_id,
        phase_index=asked.phase_index,
    )
    with connect(paths.database, read_only=True) as con:
        version_row = con.execute(
            "SELECT config_version FROM phases WHERE rollout_id = ? AND phase_index = ?",
            [rollout.rollout_id, rollout.phase_index],
        ).fetchall()
    if approve and rollout.state.value == "running" and version_row and version_row[0][0]:
        version = int(version_row[0][0])
        try:
            ack_task(data_dir, version, ack_timeout_s or asked.plan.ack_timeout.total_seconds())
        except AcknowledgementFailed as exc:
            # The same undo as a tick's promotion: the previous phase goes back out.
            lifecycle.restore_previous(
                paths,
                rollout_id=rollout.rollout_id,
                failed_version=version,
                reason=str(exc),
                actor="approval",
            )
            raise
    emit(
        EVENT_APPROVAL_DECIDED,
        rollout.rollout_id,
        rollout.router_group,
        {
            "approved": approve,
            "approver": approver,
            "comment": comment,
            "state": rollout.state.value,
        },
    )
    publish_status(paths, rollout.rollout_id)
    logger.info(
        "%s by %s: rollout %s is now %s",
        "approved" if approve else "rejected",
        approver,
        rollout.rollout_id,
        rollout.state.value,
    )
    return {
        "rollout_id": rollout.rollout_id,
        "state": rollout.state.value,
        "phase_index": rollout.phase_index,
        "approved": approve,
    }


#: How long a rollback run waits for the routers' answers (as `rollout rollback` does).
ROLLBACK_ACK_WAIT_S = 10.0


class RollbackRefused(RuntimeError):
    """Live routers refused legacy_only: they serve their previous config still."""


@flow(name="rollout-rollback")
def rollout_rollback(
    reason: str = "manual rollback",
    data_dir: str = "data",
    rollout_id: str | None = None,
    actor: str = "prefect",
    router_group: str | None = None,
) -> dict[str, Any]:
    """Fast path back to legacy: publish legacy_only first, then record. Safe to repeat.

    Args:
        reason: Why, for the record (the routers' events and the decision).
        data_dir: The data folder the routers and the flows share.
        rollout_id: The rollout to roll back; empty: the one the live config belongs to.
        actor: Who rolls back, for the record.
        router_group: Act only if that rollout belongs to this router group (a name, or
            an event's `rollout.group.<name>` resource); empty: whichever it belongs to.
    """
    if router_group is not None:
        wanted = router_group.removeprefix(GROUP_RESOURCE_PREFIX)
        try:
            actual: str | None = lifecycle.rollback_target_group(DataPaths.at(data_dir), rollout_id)
        except StoreError as exc:  # users first: a busy database must not block a rollback
            get_run_logger().warning(
                "could not check that the live rollout belongs to router group %r (%s): "
                "rolling back anyway",
                wanted,
                exc,
            )
            actual = wanted
        if actual != wanted:
            skipped = f"nothing rolled back: the request names router group {wanted!r}, but " + (
                f"the rollout here belongs to {actual!r}"
                if actual is not None
                else f"no rollout recorded in {data_dir} owns the live config"
            )
            get_run_logger().warning(skipped)
            return {"skipped": skipped, "version": None, "ended_now": False, "rollout_id": None}
    result = rollback_task(data_dir, reason, rollout_id, actor)
    if result["ended_now"]:  # a repeat changes nothing: no second event
        emit(
            EVENT_ROLLED_BACK,
            result["rollout_id"],
            result["router_group"] or "default",
            {"reason": reason, "actor": actor},
        )
    if result["rollout_id"]:
        publish_status(DataPaths.at(data_dir), result["rollout_id"])
    get_run_logger().warning("rolled back (%s): legacy_only is v%s", reason, result["version"])
    store = control_store(DataPaths.at(data_dir))
    acks = ack_status(store, result["version"])
    if acks.live:  # no router running: nobody to wait for
        acks = wait_for_ack(store, result["version"], ROLLBACK_ACK_WAIT_S)
    if acks.refused:  # recorded all the same; a failed run is what alerts watch
        raise RollbackRefused(f"legacy_only v{result['version']}: {acks.describe()}")
    return {**result, "skipped": None, "routers": acks.describe()}


@task(name="compact-old-rows", cache_policy=NONE)
def compact_task(data_dir: str, retention_days: int | None) -> dict[str, Any]:
    from flows.store.retention import compact

    report = compact(DataPaths.at(data_dir), retention=retention_days)
    return {
        "archived_rows": report.rows,
        "cutoff": str(report.cutoff),
        "segments_deleted": report.segments_deleted,
        "held_back": report.held_back,
    }


@flow(name="nightly-comparison")
def nightly_comparison(
    data_dir: str = "data",
    hours: Annotated[float, Field(gt=0, le=nightly.MAX_HOURS)] = 24.0,
    compact: bool = True,
    retention_days: Annotated[int | None, Field(ge=0)] = None,
) -> dict[str, Any]:
    """Legacy against production over the last `hours`, per backend and query category;
    then the retention step (`rollout compact`), so old rows move to daily Parquet.

    Args:
        data_dir: The data folder the routers and the flows share.
        hours: The window; it starts where the previous stored comparison ended when
            that is less than twice this far back. Earlier windows of the last 7 days
            that gained rows since they ran (late segments) are compared again.
        compact: Also run the retention step.
        retention_days: Days of rows kept in the table; empty: ROLLOUT_RETENTION_DAYS,
            else 30.
    """
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    comparison = nightly_task(data_dir, hours)
    create_table_artifact(
        [
            {k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()}
            for r in comparison.rows
        ],
        key=artifact_key("nightly-comparison-table"),
        description="legacy vs production per backend and query category",
    )
    create_markdown_artifact(nightly.markdown(comparison), key=artifact_key("nightly-comparison"))
    retention = compact_task(data_dir, retention_days) if compact else None
    return {
        "run_id": comparison.run_id,
        "rows": len(comparison.rows),
        **comparison.totals,
        "retention": retention,
    }


@flow(name="rollout-run")
def rollout_run(
    plan: RolloutPlan,
    data_dir: str = "data",
    rollout_id: str | None = None,
    max_ticks: int = 10_000,
    max_failed_ticks: int = 3,
) -> dict[str, Any]:
    """Walk the whole plan in one run: start, then evaluate at each phase's interval
    until the rollout completes, rolls back, is aborted or waits for a human. Stops
    (and fails) after `max_failed_ticks` failed evaluations in a row."""
    logger = get_run_logger()
    started = rollout_start(plan, data_dir, rollout_id)
    rid = started["rollout_id"]
    last: dict[str, Any] = {"rollout_id": rid, "state": "running"}
    paths = DataPaths.at(data_dir)
    failed = 0
    for _ in range(max_ticks):
        with connect(paths.database, read_only=True) as con:
            current = lifecycle.get_state(con, rid)
        time.sleep(current.phase.evaluation_interval.total_seconds())
        state = rollout_tick(
            data_dir, rid, ack_timeout_s=plan.ack_timeout.total_seconds(), return_state=True
        )
        if state.is_failed():
            failed += 1
            logger.error("tick %d/%d failed: %s", failed, max_failed_ticks, state.message)
            if failed >= max_failed_ticks:
                raise RuntimeError(f"{failed} evaluations in a row failed; last: {state.message}")
            continue
        failed = 0
        last = state.result()
        if last["state"] in (*TERMINAL, "awaiting_approval"):
            break
    return last
