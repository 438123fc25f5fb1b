"""`rollout start|status|tick|approve|promote|rollback|abort|report|deploy`.

Commands that run a flow work without a Prefect server (an ephemeral API in this
process) and against one (`PREFECT_API_URL`), where the runs appear in the UI.
`rollback`, `promote` and `abort` act directly and at once (the `rollout-rollback`
deployment is the same fast path from the UI) and, against a server, emit the same
events as the flows.
"""

from __future__ import annotations

import getpass
import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from flows.cli.common import (
    DEFAULT_DATA_DIR,
    DataDir,
    console,
    err_console,
    existing,
    fail,
    fail_store,
    literal,
    paths,
)
from flows.paths import DataPaths
from flows.prefect_env import configure_prefect, prefect_session

if TYPE_CHECKING:
    from flows.control import AckStatus

RolloutId = Annotated[
    str | None, typer.Option("--rollout-id", help="Which rollout (default: the active one).")
]
#: status and report show the latest rollout, finished or not.
LatestRolloutId = Annotated[
    str | None,
    typer.Option("--rollout-id", help="Which rollout (default: the latest, even a finished one)."),
]
#: The id a new rollout gets.
NewRolloutId = Annotated[
    str | None,
    typer.Option(
        "--rollout-id",
        help="The new rollout's id: 1 to 64 letters, digits, '_', '.', '-' (default: a fresh "
        "ro-<hex>).",
    ),
]
AsJson = Annotated[bool, typer.Option("--json", help="One JSON object.")]


def _actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except Exception:  # no user name in some containers
        return "cli"


def _notify(event: str, rollout: Any, reason: str) -> None:
    """The flows' event for what this command just did (sent only to a configured server)."""
    from flows.prefect_outputs import emit_from_cli

    payload = {"reason": reason, "actor": _actor(), "source": "cli"}
    emit_from_cli(event, rollout.rollout_id, rollout.plan.router_group, payload)


def _print_json(value: Any) -> None:
    print(json.dumps(value, default=str))


def start(
    plan: Annotated[
        Path | None,
        typer.Option(
            "--plan",
            help="Rollout plan YAML (default: the five-week plan, "
            "deployments/plans/five_weeks.yaml).",
        ),
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Validate only.")] = False,
    rollout_id: NewRolloutId = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Validate a plan and start the rollout (publishes phase 1, waits for the routers)."""
    from flows.plan import DEFAULT_PLAN_FILE, PlanError, load_plan

    try:
        parsed = load_plan(plan or DEFAULT_PLAN_FILE)
    except PlanError as exc:
        fail(exc.lines)
    if rollout_id is not None:
        import re

        from flows.lifecycle import ROLLOUT_ID_PATTERN

        if not re.fullmatch(ROLLOUT_ID_PATTERN, rollout_id):
            fail(
                f"--rollout-id {rollout_id[:80]!r}: allowed are 1 to 64 letters, digits, "
                "'_', '.' and '-'"
            )
    if not dry_run:
        _check_can_start(paths(data_dir), rollout_id)
    table = Table("#", "phase", "mode", "%", "min", "max", "every", "min samples", "approval")
    for i, p in enumerate(parsed.phases, start=1):
        table.add_row(
            str(i),
            literal(p.name),
            p.mode.value,
            f"{p.traffic_percent:g}",
            str(p.min_duration),
            str(p.max_duration),
            str(p.evaluation_interval),
            str(p.min_samples),
            "yes" if p.requires_approval else "",
        )
    console.print(table)
    if dry_run:
        console.print(
            f"[green]plan {escape(repr(parsed.name))} is valid[/] ({len(parsed.phases)} phases, "
            f"algorithm {parsed.algorithm.value}); nothing started"
        )
        return
    from flows.lifecycle import RolloutError

    timeout_s = parsed.ack_timeout.total_seconds()
    err_console.print(
        f"publishing phase 1 ({parsed.phases[0].name}), then waiting up to {timeout_s:g}s "
        "for the routers to apply it...",
        markup=False,
        highlight=False,
    )
    target = paths(data_dir)  # before Prefect's start-up: a bad folder fails at once
    with prefect_session():
        from flows.rollout_flows import rollout_start

        try:
            result = rollout_start(parsed, str(target.ensure().root), rollout_id, actor=_actor())
        except RolloutError as exc:
            fail(str(exc))
    console.print(
        f"started rollout [bold]{escape(result['rollout_id'])}[/]: phase 1 is config "
        f"v{result['version']} ({escape(result['acks'])})",
        highlight=False,
    )


def _check_can_start(p: DataPaths, rollout_id: str | None) -> None:
    """Refuse a start the lifecycle would refuse, before any flow runs: one line, not a
    failed flow run and its tracebacks. (The lifecycle checks again, in its transaction.)"""
    from flows.store.database import StoreError, connect
    from flows.store.rollouts import active_rollouts, get_rollout

    if not p.database.exists():
        return
    try:
        with connect(p.database, read_only=True) as con:
            same_id = get_rollout(con, rollout_id) if rollout_id else None
            active = active_rollouts(con)
    except StoreError as exc:
        fail(str(exc), code=1)
    if same_id is not None and not same_id.active:
        fail(
            f"rollout {rollout_id} already exists ({same_id.state.value}): nothing was "
            "started; pick another id, or leave --rollout-id out for a fresh one"
        )
    others = [r for r in active if r.rollout_id != rollout_id]
    if others:
        fail(
            f"rollout {others[0].rollout_id} (router group {others[0].router_group!r}) is "
            f"already {others[0].state.value} in {p.root}: finish, roll back or abort it "
            "first (one control store, one rollout at a time)"
        )


def status(
    rollout_id: LatestRolloutId = None,
    as_json: AsJson = False,
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Where the rollout is, what the gate said last, and what each router instance runs."""
    from flows.control import control_store
    from flows.status import snapshot
    from flows.store.database import StoreError, connect

    p = paths(data_dir)
    try:
        with connect(p.database, read_only=True) as con:
            snap = snapshot(con, rollout_id, decisions=5)
    except StoreError as exc:
        fail_store(exc)
    acks = control_store(p).read_acks()
    if snap is None:
        fail(
            f"no rollout {rollout_id!r} in {p.root}"
            if rollout_id
            else "no rollout recorded yet: start one with `rollout start --plan FILE`",
            code=2 if rollout_id else 1,
        )
    r = snap.rollout
    if as_json:
        _print_json(
            {
                "rollout_id": r.rollout_id,
                "state": r.state.value,
                "phase_index": r.phase_index,
                "phase": r.phase.name,
                "timeline": snap.timeline,
                "decisions": snap.decisions,
                "routers": [
                    a.model_dump(mode="json") | {"age_s": round(a.age_s(), 1)} for a in acks
                ],
            }
        )
        return
    console.print(
        f"rollout [bold]{escape(r.rollout_id)}[/] ({escape(r.plan.name)}): "
        f"[bold]{r.state.value}[/], phase {r.phase_index + 1}/{len(r.plan.phases)} "
        f"{escape(r.phase.name)}",
        highlight=False,
    )
    timeline = Table(
        "#",
        "phase",
        "mode",
        "%",
        "config",
        "legacy n",
        "production n",
        "outcome",
        "last verdict",
        title="phases",
    )
    for t in snap.timeline:
        timeline.add_row(
            str(t["phase_index"] + 1),
            literal(t["name"]),
            t["mode"],
            f"{t['traffic_percent']:g}",
            str(t["config_version"] or "-"),
            str(t["legacy_requests"]),
            str(t["production_requests"]),
            literal(t["outcome"]),
            literal(t["last_verdict"]),
        )
    console.print(timeline)
    decisions = Table("when (UTC)", "verdict", "action", "reason", title="last decisions")
    for d in snap.decisions:
        decisions.add_row(
            f"{d['decided_at']:%m-%d %H:%M:%S}",  # phases last weeks: the day matters
            literal(d["verdict"]),
            literal(d["action"]),
            literal(d["reason"]),
        )
    console.print(decisions)
    routers = Table(
        "instance",
        "applied",
        "mode",
        "%",
        "heartbeat age s",
        "failback",
        "refused",
        title="router instances",
    )
    for a in acks:
        age = a.age_s()
        routers.add_row(
            literal(a.instance),
            f"v{a.applied_version}",
            a.effective_mode.value,
            f"{a.traffic_percent:g}",
            f"{age:.1f}" + (" (gone)" if a.is_stale() else ""),
            literal(a.failback_reason),
            literal(a.refused_reason),
        )
    console.print(routers)


def tick(
    rollout_id: RolloutId = None, as_json: AsJson = False, data_dir: DataDir = DEFAULT_DATA_DIR
) -> None:
    """Run one evaluation now (what the `rollout-tick` deployment does on its schedule)."""
    from flows.lifecycle import RecordingDeferred, RolloutError

    p = existing(data_dir)
    _check_tickable(p, rollout_id)
    with prefect_session():
        from flows.rollout_flows import rollout_tick

        state = rollout_tick(str(p.root), rollout_id, actor=_actor(), return_state=True)
        if state.is_failed():
            error = state.result(raise_on_failure=False)
            if isinstance(error, RolloutError) and not isinstance(error, RecordingDeferred):
                fail(str(error))  # refused meanwhile: bad input, not a failure to act
            fail(f"tick failed: {state.message}", code=1)
        result = state.result()
    if as_json:
        _print_json(result)
        return
    console.print(
        f"{result['rollout_id'] or 'no active rollout'}: {result['verdict'] or '-'} "
        f"-> {result['action']} ({result['reason']})",
        markup=False,
        highlight=False,
    )


def _check_tickable(p: DataPaths, rollout_id: str | None) -> None:
    """Refuse a tick the lifecycle would refuse (an unknown or finished rollout, several
    active ones) before the flow runs: one line and exit 2, not a failed flow run."""
    from flows.lifecycle import RolloutError, resolve_active
    from flows.store.database import StoreError, connect

    if not p.database.exists():
        if rollout_id is not None:
            fail(f"no rollout {rollout_id!r}")
        return  # nothing recorded yet: the tick says "no active rollout"
    try:
        with connect(p.database, read_only=True) as con:
            resolve_active(con, rollout_id)
    except RolloutError as exc:
        fail(str(exc))
    except StoreError as exc:
        fail(str(exc), code=1)


def approve(
    reject: Annotated[bool, typer.Option("--reject", help="Reject: roll back.")] = False,
    comment: Annotated[str, typer.Option(help="Why, for the record.")] = "",
    rollout_id: RolloutId = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Answer a rollout awaiting approval: promote (default) or --reject (roll back).

    If a `rollout-approve` run is paused waiting for the UI form, this resumes it with
    your answer; otherwise it runs the approval flow directly."""
    from flows.lifecycle import RolloutError, awaiting_approval

    try:  # a mistake gets one line, not a failed flow run and its traceback
        awaiting_approval(
            _with_rollouts(data_dir, "nothing awaits approval (state: no active rollout)"),
            rollout_id,
        )
    except RolloutError as exc:
        fail(str(exc))
    answer = {"approve": not reject, "comment": comment, "approver": _actor()}
    with prefect_session():
        resumed = _resume_paused_approval(answer, existing(data_dir).root, rollout_id)
        if resumed:
            state = _wait_for_run(resumed, timeout_s=120)
            console.print(
                f"resumed approval run {resumed} with your answer: it ended {state}",
                markup=False,
                highlight=False,
            )
            if state != "COMPLETED":
                fail(f"the approval run ended {state}; see it in the Prefect UI", code=1)
            return
        from flows.rollout_flows import rollout_approve

        try:
            result = rollout_approve(
                str(existing(data_dir).root),
                rollout_id,
                approve=not reject,
                comment=comment,
                approver=_actor(),
            )
        except RolloutError as exc:
            fail(str(exc))
    console.print(
        f"rollout {result['rollout_id']} is now {result['state']}", markup=False, highlight=False
    )


def _resume_paused_approval(
    answer: dict[str, Any], data_dir: Path, rollout_id: str | None = None
) -> str | None:
    """Resume the paused `rollout-approve` run of this data directory (and rollout, if
    given) with `answer`; None if there is none."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.flow_runs import resume_flow_run

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["rollout-approve"])),
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED]))
            ),
        )
    target = Path(data_dir).resolve()

    def ours(run: Any) -> bool:
        params = run.parameters or {}
        same_dir = Path(str(params.get("data_dir", "data"))).resolve() == target
        same_rollout = rollout_id is None or params.get("rollout_id") in (None, rollout_id)
        return same_dir and same_rollout

    waiting = [r for r in runs if r.state and r.state.state_details.run_input_keyset and ours(r)]
    if not waiting:
        return None
    run = max(waiting, key=lambda r: r.created or 0)
    resume_flow_run(run.id, run_input=answer)
    return str(run.id)


def _wait_for_run(run_id: str, timeout_s: float) -> str:
    import time

    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(run_id)
            if run.state is not None and run.state.is_final():
                return run.state.type.value
            if time.monotonic() >= deadline:
                return "still running"
            time.sleep(1)


def _wait_for_routers(p: DataPaths, version: int, timeout_s: float) -> AckStatus:
    """`wait_for_ack`, saying first what it waits for: it can take the whole timeout."""
    from flows.control import control_store, wait_for_ack

    err_console.print(
        f"published v{version}; waiting up to {timeout_s:g}s for the routers to apply it...",
        markup=False,
        highlight=False,
    )
    return wait_for_ack(control_store(p), version, timeout_s)


def _with_rollouts(data_dir: Path, refusal: str) -> DataPaths:
    """A data dir with a metrics database: acting on a rollout elsewhere would create an
    empty one first, only to say there is no rollout."""
    found = existing(data_dir)
    if not found.database.exists():
        fail(f"{refusal}: {found.root} has no metrics database (pass --data-dir)")
    return found


def promote(
    reason: Annotated[str, typer.Option(help="Why you override the gate.")],
    rollout_id: RolloutId = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Promote to the next phase now, overriding the gate (recorded with your name)."""
    from flows import lifecycle
    from flows.prefect_outputs import EVENT_COMPLETED, EVENT_PROMOTED
    from flows.store.database import connect

    p = _with_rollouts(data_dir, "no active rollout to promote")
    try:
        with connect(p.database) as con:
            rollout = lifecycle.resolve_active(con, rollout_id)
            if rollout is None:
                fail("no active rollout to promote")
            moved = lifecycle.promote(
                con, p, rollout, reason=f"manual: {reason}", actor=_actor(), override=True
            )
    except lifecycle.RolloutError as exc:
        fail(str(exc))
    finished = not isinstance(moved, lifecycle.Published)
    _notify(EVENT_COMPLETED if finished else EVENT_PROMOTED, rollout, f"manual: {reason}")
    if isinstance(moved, lifecycle.Published):
        status_ = _wait_for_routers(
            p, moved.config.version, rollout.plan.ack_timeout.total_seconds()
        )
        console.print(
            f"promoted to phase {moved.rollout.phase_index + 1} "
            f"({moved.rollout.phase.name}) as v{moved.config.version}: "
            f"{status_.describe()}",
            markup=False,
            highlight=False,
        )
        if status_.live and not status_.complete:
            # As a tick or an approval does: the routers did not take it, so the previous
            # phase goes back out (the database claimed a phase no router served).
            restored = lifecycle.restore_previous(
                p,
                rollout_id=rollout.rollout_id,
                failed_version=moved.config.version,
                reason=f"not applied by every router: {status_.describe()}",
                actor=_actor(),
            )
            undo = (
                f"restored the previous config as v{restored.version}"
                if restored
                else ("nothing restored (see rollout status)")
            )
            fail(f"v{moved.config.version} was not applied by every router: {undo}", code=1)
    else:
        console.print(f"rollout {moved.rollout_id} completed", markup=False, highlight=False)


def rollback(
    reason: Annotated[str, typer.Option(help="Why, for the record.")] = "manual rollback",
    rollout_id: RolloutId = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Send every router back to legacy now (publishes legacy_only first). Safe to repeat."""
    from flows import lifecycle
    from flows.prefect_outputs import EVENT_ROLLED_BACK

    p = existing(data_dir)
    try:
        done = lifecycle.rollback(p, reason=reason, actor=_actor(), rollout_id=rollout_id)
    except lifecycle.RecordingDeferred as exc:  # the routers were told: say so, exit 1
        fail(str(exc), code=1)
    except lifecycle.RolloutError as exc:
        fail(str(exc))
    config, rollout = done.config, done.rollout
    acks = _wait_for_routers(p, config.version, 10)
    if rollout is not None and (done.ended_now or done.published):  # a repeat: nothing new
        _notify(EVENT_ROLLED_BACK, rollout, reason)
    state = rollout.state.value if rollout else "no rollout recorded"
    if rollout is not None and not done.ended_now:
        state += (
            " (it had ended; routers sent back to legacy, recorded as a decision)"
            if done.published
            else " (already)"
        )
    console.print(
        f"legacy_only published as v{config.version} ({acks.describe()}); rollout: {state}",
        markup=False,
        highlight=False,
    )
    if acks.live and not acks.complete:
        fail(f"not every router applied v{config.version} within 10 s: {acks.describe()}", code=1)


def abort(
    reason: Annotated[str, typer.Option(help="Why, for the record.")],
    rollout_id: RolloutId = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Stop the rollout on purpose: routers go back to legacy, the rollout ends aborted."""
    from flows import lifecycle
    from flows.prefect_outputs import EVENT_ABORTED

    try:
        rollout = lifecycle.abort(
            _with_rollouts(data_dir, "no active rollout to abort"),
            reason=reason,
            actor=_actor(),
            rollout_id=rollout_id,
        )
    except lifecycle.RolloutError as exc:
        fail(str(exc))
    _notify(EVENT_ABORTED, rollout, reason)
    console.print(
        f"rollout {rollout.rollout_id} aborted; routers told to use legacy",
        markup=False,
        highlight=False,
    )


def _decisions_table(decisions: list[dict[str, Any]]) -> Table:
    """Every decision, oldest first; a run of the same verdict and action in one phase
    is one row with its count, its first time and its latest reason (a week-long phase
    evaluated every 15 minutes holds hundreds of HOLDs)."""

    def same(d: dict[str, Any]) -> tuple[Any, ...]:
        return d["phase_index"], d["verdict"], d["action"], d["actor"]

    runs: list[tuple[dict[str, Any], int, str]] = []
    for d in reversed(decisions):  # the snapshot lists the newest first
        if runs and same(runs[-1][0]) == same(d):
            first_row, count, _ = runs[-1]
            runs[-1] = (first_row, count + 1, d["reason"])
        else:
            runs.append((d, 1, d["reason"]))
    table = Table(
        "when (UTC)", "phase", "verdict", "×", "action", "by", "reason", title="decisions"
    )
    for d, count, reason in runs:
        table.add_row(
            f"{d['decided_at']:%Y-%m-%d %H:%M:%S}",
            "-" if d["phase_index"] is None else str(d["phase_index"] + 1),
            literal(d["verdict"]),
            str(count),
            literal(d["action"]),
            literal(d["actor"]),
            literal(reason),
        )
    return table


def report(
    rollout_id: LatestRolloutId = None,
    as_json: AsJson = False,
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """The whole story of a rollout: timeline, every transition and decision, and the
    legacy-vs-production table."""
    from flows.demo.runner import FINAL_TABLE_SQL
    from flows.status import markdown, snapshot
    from flows.store.database import StoreError, check_current_schema, connect

    try:
        with connect(paths(data_dir).database, read_only=True) as con:
            check_current_schema(con)
            snap = snapshot(con, rollout_id, decisions=1000)
            if snap is None:
                fail(
                    f"no rollout {rollout_id!r}" if rollout_id else "no rollout recorded yet",
                    code=2 if rollout_id else 1,
                )
            cursor = con.execute(FINAL_TABLE_SQL, [snap.rollout.rollout_id])
            names = [d[0] for d in cursor.description]
            arms = [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
    except StoreError as exc:
        fail_store(exc)
    if as_json:
        _print_json(
            {
                "rollout_id": snap.rollout.rollout_id,
                "state": snap.rollout.state.value,
                "timeline": snap.timeline,
                "transitions": snap.transitions,
                "decisions": snap.decisions,
                "arms": arms,
            }
        )
        return
    from rich.markdown import Markdown

    console.print(Markdown(markdown(snap)))
    transitions = Table(
        "#", "when (UTC)", "from", "to", "phase", "by", "cause", title="transitions"
    )
    for t in snap.transitions:
        transitions.add_row(
            str(t["seq"]),
            f"{t['occurred_at']:%Y-%m-%d %H:%M:%S}",
            literal(t["from_state"]),
            literal(t["to_state"]),
            str(t["phase_index"] + 1),
            literal(t["actor"]),
            literal(t["cause"]),
        )
    console.print(transitions)
    console.print(_decisions_table(snap.decisions))
    arms_table = Table(
        "arm",
        "requests",
        "success",
        "p50 ms",
        "p95 ms",
        "cost/request",
        "quality",
        title="legacy vs production",
    )
    for a in arms:
        arms_table.add_row(
            literal(a["arm"]),
            str(a["requests"]),
            f"{a['success_rate']:.2%}",
            f"{a['p50_ms']:.0f}",
            f"{a['p95_ms']:.0f}",
            f"{a['cost_per_request_usd']:.5f}",
            "-" if a["mean_quality"] is None else f"{a['mean_quality']:.3f}",
        )
    console.print(arms_table)


#: Ten years: a longer window reaches before year 1 and crashes the date arithmetic.
def nightly(
    hours: Annotated[float, typer.Option(help="Window length in hours (above 0).")] = 24.0,
    compact: Annotated[
        bool,
        typer.Option(
            help="Also run the retention step, as the scheduled deployment does: rows older "
            "than ROLLOUT_RETENTION_DAYS move to the archive, old segment files are deleted."
        ),
    ] = False,
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Run the nightly legacy-vs-production comparison now (the window starts where the
    previous stored comparison ended, when that is less than 2 x --hours back)."""
    from flows.nightly import MAX_HOURS

    if not 0 < hours <= MAX_HOURS:  # also refuses nan
        fail(f"--hours {hours:g}: allowed is above 0 and at most {MAX_HOURS}")
    p = existing(data_dir)  # before the (slow) Prefect session starts
    if not p.database.exists() and not any(p.segments.glob("*/*.parquet")):
        fail(f"no metrics database and no segments in {p.root}: is this the data dir?")
    with prefect_session():
        from flows.rollout_flows import nightly_comparison

        result = nightly_comparison(str(p.root), hours, compact=compact)
    console.print(
        f"nightly comparison {result['run_id']}: {result['rows']} rows "
        f"(legacy {result['legacy']}, production {result['production']})",
        markup=False,
        highlight=False,
    )
    if result["retention"] is not None:
        console.print(f"retention: {result['retention']}", markup=False, highlight=False)


def deploy(
    prefect_file: Annotated[Path, typer.Option(help="Deployment declarations.")] = Path(
        "deployments/prefect.yaml"
    ),
    pool: Annotated[str, typer.Option(help="Process work pool to create if missing.")] = (
        "rollout-pool"
    ),
    timezone: Annotated[
        str,
        typer.Option(envvar="ROLLOUT_TIMEZONE", help="Time zone of the 02:00 nightly schedule."),
    ] = "UTC",
    data_dir: DataDir = DEFAULT_DATA_DIR,
    worker_data_dir: Annotated[
        str | None,
        typer.Option(
            help="The data directory as the flow runs see it (an absolute path, e.g. a "
            "volume mounted in Kubernetes jobs); default: --data-dir, resolved here."
        ),
    ] = None,
) -> None:
    """Register the deployments of prefect.yaml with the running Prefect server."""
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        fail(f"--timezone {timezone!r} is not an IANA time zone (e.g. UTC, Europe/Berlin)")
    if worker_data_dir is not None and not worker_data_dir.startswith("/"):
        fail(
            f"--worker-data-dir {worker_data_dir!r} is not an absolute path: flow runs start "
            "in the project directory, so give the full path they see (e.g. /data)"
        )
    import os
    import subprocess
    import sys

    configure_prefect()
    if not os.environ.get("PREFECT_API_URL"):
        fail(
            "PREFECT_API_URL is not set: start `prefect server start` and export "
            "PREFECT_API_URL=http://127.0.0.1:4200/api first"
        )
    _check_server(os.environ["PREFECT_API_URL"])
    from flows.resources import code_root, resource

    root = code_root()
    target = (prefect_file if prefect_file.is_absolute() else resource(str(prefect_file))).resolve()
    if not target.is_file():
        fail(f"no deployment file at {target}")
    prefect = [sys.executable, "-m", "prefect"]
    env = {
        **os.environ,
        "ROLLOUT_PROJECT_DIR": str(root),
        "ROLLOUT_WORK_POOL": pool,
        "ROLLOUT_TIMEZONE": timezone,
        "ROLLOUT_DATA_DIR": worker_data_dir or str(paths(data_dir).ensure().root.resolve()),
    }
    subprocess.run(
        [*prefect, "work-pool", "create", pool, "--type", "process"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )  # exists: fine
    # Entrypoints resolve against the working directory, not the yaml's folder.
    result = subprocess.run(
        [*prefect, "--no-prompt", "deploy", "--all", "--prefect-file", str(target)],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    output = result.stdout + result.stderr
    if result.returncode != 0 or "Traceback" in output or "Error" in output:
        lines = [line.strip() for line in output.splitlines() if line.strip()]
        fail(
            [
                f"prefect deploy failed: {lines[-1] if lines else f'exit {result.returncode}'}",
                f"see the whole output: cd {root} && prefect --no-prompt deploy --all "
                f"--prefect-file {target}",
            ],
            code=1,
        )
    console.print(output[-2000:], markup=False, highlight=False)


def _check_server(api_url: str) -> None:
    """A dead server made `prefect deploy` end in a raw traceback: say so in one line."""
    import httpx

    from router.settings_errors import mask_url

    try:  # any answer will do (Prefect Cloud wants a key even here): only silence fails
        httpx.get(f"{api_url.rstrip('/')}/health", timeout=5.0)
    except httpx.TransportError as exc:
        fail(
            f"no Prefect server answers at {mask_url(api_url)} ({type(exc).__name__}): "
            "start `prefect server start` or fix PREFECT_API_URL",
            code=1,
        )
