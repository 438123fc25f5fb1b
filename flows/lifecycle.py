"""Rollout state changes that touch the router: start, promote, roll back, abort, approve.

Ordering rule: the database change and the control-store publish happen inside one
DuckDB transaction, with the publish last before COMMIT. If the publish fails, the
transaction rolls back and nothing is recorded; if the process dies after publishing
but before COMMIT, the next tick finds a published document the database does not know
and adopts it (`reconcile`). Either way the recorded state never claims a config the
routers were not sent.

Rollback and abort are the exception: they publish `legacy_only` FIRST, without waiting
for the database (a reader or writer holding the DuckDB lock must not keep users on a
bad balancer), and record afterwards. If recording fails, the published document is
adopted by the next tick's `reconcile`, and publishing legacy twice is harmless.

`reconcile` is the crash recovery for every step: whatever document is live, the
database ends up describing it, or the live document is replaced by the one the
database describes.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import duckdb

from flows.control import Store, brief, control_store, legacy_only_config, phase_config
from flows.paths import DataPaths
from flows.plan import PlanError, RolloutPlan, apply_profiles
from flows.state import RolloutState
from flows.store.database import StoreError, connect, first, transaction
from flows.store.rollouts import (
    Rollout,
    active_rollouts,
    create_rollout,
    end_phase,
    get_rollout,
    latest_rollout,
    next_config_version,
    record_config,
    record_decision,
    start_phase,
    transition,
)
from router.router_config import RouterConfig

#: What a new rollout's id may be: it names GX Data Docs pages (HTML), store keys and files.
ROLLOUT_ID_PATTERN = r"[A-Za-z0-9_.-]{1,64}"


class RolloutError(RuntimeError):
    """A request that cannot be carried out in the rollout's current state."""


class RecordingDeferred(RolloutError):
    """The routers were told, the database could not be written yet (locked)."""


class RolledBackMeanwhile(RolloutError):
    """A rollback reached the routers while this change was being decided."""


log = logging.getLogger(__name__)

#: The reason a restore of phase 1 (legacy_only, the rollout ends ABORTED) starts with:
#: `reconcile` tells it from a rollback by it.
PHASE_ONE_RESTORE = "restore after failed publish"

#: How long a rollback waits for the database *after* it has told the routers.
RECORD_WAIT_S = 15.0


@dataclass(frozen=True)
class BackToLegacy:
    config: RouterConfig
    rollout: Rollout | None
    #: True only for the call that ended the rollout: repeats and rollbacks of a finished
    #: rollout publish nothing new and must not announce it again.
    ended_now: bool = False
    #: True when this call published a new legacy_only document (not a repeat).
    published: bool = False


@dataclass(frozen=True)
class Published:
    rollout: Rollout
    config: RouterConfig
    #: False when nothing was published (re-running a start that already happened).
    new: bool = True


def _store_floor(paths: DataPaths) -> int:
    """The highest version the routers may have seen: the live document's, or one in
    their heartbeats (applied or refused). Every publisher numbers above it: routers
    refuse a version below the one they run (a reset data dir started at v1 under
    routers on v7, and every start and restore was refused)."""
    store = control_store(paths)
    return _fresh_version(store, store.current_or_none()) - 1


def _publish_in_txn(
    con: duckdb.DuckDBPyConnection,
    paths: DataPaths,
    config: RouterConfig,
    phase_index: int | None,
) -> None:
    store = control_store(paths)
    live = store.current_or_none()
    if (
        live is not None
        and live.mode.value == "legacy_only"
        and live.rollout_id is not None
        and live.rollout_id == config.rollout_id
    ):
        # A rollback (the fast path publishes before it records) went out while this
        # was decided: never undo it. The next tick's reconcile records the rollback.
        raise RolledBackMeanwhile(
            f"routers were sent back to legacy as v{live.version} ({live.reason}) while "
            f"this was decided: {config.phase or 'the change'} is not published"
        )
    record_config(con, config, phase_index)
    store.publish(config)


def start(
    paths: DataPaths, plan: RolloutPlan, *, actor: str, rollout_id: str | None = None
) -> Published:
    """Record a new rollout and publish its first phase.

    One active rollout per data directory: its control store is the one document every
    router instance of the group reads, so two rollouts would overwrite each other."""
    rollout_id = rollout_id or f"ro-{uuid.uuid4().hex[:10]}"
    if not re.fullmatch(ROLLOUT_ID_PATTERN, rollout_id):
        raise RolloutError(
            f"rollout id {rollout_id[:80]!r}: allowed are 1 to 64 letters, digits, '_', '.' "
            "and '-' (it names Data Docs pages and files; a '/' stopped every evaluation)"
        )
    try:  # a plan from the UI form or the API has not been through load_plan
        plan = apply_profiles(plan)
    except PlanError as exc:
        raise RolloutError("invalid plan: " + "; ".join(exc.lines)) from None
    with connect(paths.database) as con:
        existing = get_rollout(con, rollout_id)
        if existing is not None:
            # Re-running the same start (a retried task) is a no-op; anything else that
            # reuses an id would report a start that never happened.
            same_plan = existing.plan.model_dump(mode="json") == plan.model_dump(mode="json")
            if not existing.active or not same_plan:
                why = "with another plan" if existing.active else f"({existing.state.value})"
                raise RolloutError(
                    f"rollout {rollout_id} already exists {why}: nothing was started; "
                    "pick another id, or leave --rollout-id out for a fresh one"
                )
            version = _phase_version(con, existing)
            return Published(existing, _config_of(con, version), new=False)
        active = active_rollouts(con)
        if active:
            raise RolloutError(
                f"rollout {active[0].rollout_id} (router group {active[0].router_group!r}) is "
                f"already {active[0].state.value} in {paths.root}: finish, roll back or abort "
                "it first (one control store, one rollout at a time)"
            )
        with transaction(con):
            rollout = create_rollout(con, rollout_id, plan, actor)
            version = next_config_version(con, _store_floor(paths))
            config = phase_config(
                plan, 0, version, rollout_id, "rollout started: phase 1", rearm=True
            )
            start_phase(con, rollout_id, 0, version)
            rollout = transition(
                con,
                rollout,
                RolloutState.RUNNING,
                phase_index=0,
                cause=f"published phase 1 ({plan.phases[0].name}) as v{version}",
                actor=actor,
            )
            _publish_in_txn(con, paths, config, 0)
    return Published(rollout, config)


def _phase_version(con: duckdb.DuckDBPyConnection, rollout: Rollout) -> int:
    row = first(
        con.execute(
            "SELECT config_version FROM phases WHERE rollout_id = ? AND phase_index = ?",
            [rollout.rollout_id, rollout.phase_index],
        )
    )
    if not row or row[0] is None:
        raise RolloutError(
            f"rollout {rollout.rollout_id} phase {rollout.phase_index} has no config"
        )
    return int(row[0])


def _phase_version_or_none(con: duckdb.DuckDBPyConnection, rollout: Rollout) -> int | None:
    row = first(
        con.execute(
            "SELECT config_version FROM phases WHERE rollout_id = ? AND phase_index = ?",
            [rollout.rollout_id, rollout.phase_index],
        )
    )
    return int(row[0]) if row and row[0] is not None else None


def _config_of(con: duckdb.DuckDBPyConnection, version: int) -> RouterConfig:
    row = first(con.execute("SELECT document FROM config_versions WHERE version = ?", [version]))
    if not row:
        raise RolloutError(f"config v{version} is not recorded")
    return RouterConfig.model_validate_json(row[0])


def promote(
    con: duckdb.DuckDBPyConnection,
    paths: DataPaths,
    rollout: Rollout,
    *,
    reason: str,
    actor: str,
    override: bool = False,
    decision: tuple[str, str] | None = None,
) -> Published | Rollout:
    """Next phase (publishes its config) or, after the last phase, completion.

    A person's decision is recorded with the move, in the same transaction, so a move
    that fails leaves no decision claiming it happened: `override` (promoting without
    the gate's verdict) or `decision` = (verdict, action), e.g. an approval. The gate
    records its own."""
    index = rollout.phase_index
    plan = rollout.plan
    if override:
        decision = ("PROMOTE", "manual override of the gate")
    with transaction(con):
        if decision is not None:
            record_decision(
                con,
                decision_id=uuid.uuid4().hex,
                rollout=rollout,
                config_version=_phase_version_or_none(con, rollout),
                verdict=decision[0],
                action=decision[1],
                actor=actor,
                reason=reason,
            )
        end_phase(con, rollout.rollout_id, index, "promoted")
        if index + 1 >= len(plan.phases):
            return transition(con, rollout, RolloutState.COMPLETED, cause=reason, actor=actor)
        version = next_config_version(con, _store_floor(paths))
        nxt = plan.phases[index + 1]
        config = phase_config(
            plan,
            index + 1,
            version,
            rollout.rollout_id,
            # names the actor: `reconcile` records the decision from it after a crash
            f"promoted to phase {index + 2} ({nxt.name}) by {actor}: {reason}",
        )
        start_phase(con, rollout.rollout_id, index + 1, version)
        moved = transition(
            con,
            rollout,
            RolloutState.RUNNING,
            phase_index=index + 1,
            cause=f"promoted to phase {index + 2} ({nxt.name}) as v{version}: {reason}",
            actor=actor,
        )
        _publish_in_txn(con, paths, config, index + 1)
        return Published(moved, config)


#: Records the caller's own rows (a gate's evaluation, a person's rejection) in the
#: transaction that records a rollback, so that no row claims a rollback that a crash
#: kept from being recorded, and none is lost once it is.
AlsoRecord = Callable[[duckdb.DuckDBPyConnection, Rollout | None, RouterConfig], None]


def rollback(
    paths: DataPaths,
    *,
    reason: str,
    actor: str,
    rollout_id: str | None = None,
    decided: bool = False,
    also: AlsoRecord | None = None,
) -> BackToLegacy:
    """Fast path: publish legacy_only first, then record. Safe to repeat.

    `decided`: the caller records the ROLLBACK decision itself, in `also`.
    """
    return _back_to_legacy(
        paths,
        rollout_id,
        RolloutState.ROLLED_BACK,
        reason=reason,
        actor=actor,
        record=not decided,
        also=also,
    )


#: How long an event-triggered rollback waits for the database to check the group: the
#: rollback itself needs no database, and a busy writer must not hold it back long.
GROUP_CHECK_WAIT_S = 2.0


def rollback_target_group(paths: DataPaths, rollout_id: str | None) -> str | None:
    """The router group of the rollout a rollback would move back: the named one, else
    the live document's. None when no rollout is recorded for it. An event-triggered
    rollback checks it, so an alert about one group never moves another group's routers.
    Raises StoreError when the database stays busy for `GROUP_CHECK_WAIT_S`."""
    current = control_store(paths).current_or_none()
    owner = rollout_id or (current.rollout_id if current is not None else None)
    if owner is None or not paths.database.exists():
        return None
    with connect(paths.database, read_only=True, wait_s=GROUP_CHECK_WAIT_S) as con:
        rollout = get_rollout(con, owner)
    return rollout.router_group if rollout is not None else None


def abort(paths: DataPaths, *, reason: str, actor: str, rollout_id: str | None = None) -> Rollout:
    """Stop a rollout on purpose: routers go back to legacy, the rollout ends as aborted.

    Unlike a rollback (the emergency path, which tells the routers first, whatever the
    database says), an abort with no active rollout is refused before anything is
    published: it must not move routers off a completed rollout's config."""
    if not paths.database.exists():
        raise RolloutError("no active rollout to abort")
    with connect(paths.database, read_only=True) as con:
        if _resolve(con, rollout_id, allow_terminal=False) is None:
            raise RolloutError("no active rollout to abort")
    rollout = _back_to_legacy(
        paths, rollout_id, RolloutState.ABORTED, reason=reason, actor=actor, record=True
    ).rollout
    if rollout is None:
        raise RolloutError("no active rollout to abort")
    return rollout


_ENDINGS = {
    RolloutState.ROLLED_BACK: ("rolled_back", "ROLLBACK", "rolled back", "rollback"),
    RolloutState.ABORTED: ("aborted", "ABORT", "aborted", "abort"),
}


def _check_known(paths: DataPaths, rollout_id: str, current: RouterConfig | None) -> None:
    """Before publishing for an id the live document does not name: a mistyped id must
    not move every router to legacy (and leave the real rollout running, so that the
    next tick puts the phase back)."""
    live = (
        f"the live config v{current.version} belongs to {current.rollout_id or 'no rollout'}"
        if current is not None
        else "no config is published"
    )
    try:
        with connect(paths.database, read_only=True, wait_s=RECORD_WAIT_S) as con:
            named = get_rollout(con, rollout_id)
            active = active_rollouts(con)
    except StoreError as exc:
        raise RolloutError(
            f"cannot check rollout {rollout_id!r}: {exc}; {live}; nothing was published"
        ) from None
    if named is None:
        raise RolloutError(f"no rollout {rollout_id!r}; {live}; nothing was published")
    if not named.active and active:
        # Its legacy_only would name a finished rollout: the next tick's reconcile
        # republished the active rollout's phase, undoing it, after telling the
        # operator the routers were on legacy.
        raise RolloutError(
            f"rollout {rollout_id} has ended ({named.state.value}); rollout "
            f"{active[0].rollout_id} is {active[0].state.value} and owns the routers: roll "
            "that one back (leave --rollout-id out); nothing was published"
        )


def _back_to_legacy(
    paths: DataPaths,
    rollout_id: str | None,
    target: RolloutState,
    *,
    reason: str,
    actor: str,
    record: bool,
    also: AlsoRecord | None = None,
) -> BackToLegacy:
    """Publish legacy_only first, from the control store alone, then end the rollout in
    `target`. A rollback may target no or a finished rollout (the routers go back to
    legacy all the same); an abort needs an active one. The document's reason names
    the actor: if the process dies before recording, `reconcile` records the decision
    from it."""
    outcome, verdict, past, noun = _ENDINGS[target]
    store = control_store(paths)
    current = store.current_or_none()
    if record and rollout_id is not None and (current is None or current.rollout_id != rollout_id):
        # A person's id (a gate's comes from the database it holds open, so not checked).
        _check_known(paths, rollout_id, current)
    owner = rollout_id or (current.rollout_id if current is not None else None)
    if (
        current is not None
        and current.mode.value == "legacy_only"
        and current.rollout_id == owner
        and owner is not None
    ):
        config = current  # already out: repeating is a no-op for the routers
        published = False
    else:
        published = True
        config = legacy_only_config(
            _fresh_version(store, current),
            owner,
            current.salt if current else "rollout-v1",
            f"{noun} by {actor}: {reason}",
        )
        store.publish(config)  # users first; the database may be busy
    ended_now = False
    try:
        with connect(paths.database, wait_s=RECORD_WAIT_S) as con:
            rollout = _resolve(con, rollout_id, allow_terminal=target is RolloutState.ROLLED_BACK)
            if rollout is None and target is RolloutState.ABORTED:
                raise RolloutError("no active rollout to abort")
            with transaction(con):
                recorded = first(
                    con.execute(
                        "SELECT document FROM config_versions WHERE version = ?", [config.version]
                    )
                )
                if recorded is None or RouterConfig.model_validate_json(recorded[0]) != config:
                    config = _renumber_if_taken(con, store, config)
                    record_config(con, config, rollout.phase_index if rollout else None)
                if rollout is not None and rollout.active:
                    end_phase(con, rollout.rollout_id, rollout.phase_index, outcome)
                    rollout = transition(
                        con, rollout, target, cause=f"{past}: {reason}", actor=actor
                    )
                    ended_now = True
                if record and (ended_now or (rollout is not None and published)):
                    # after the rollout ended too: moving every user back to legacy
                    # must leave a trace where people look (report, status)
                    record_decision(
                        con,
                        decision_id=uuid.uuid4().hex,
                        rollout=rollout,
                        config_version=config.version,
                        verdict=verdict,
                        action="published legacy_only"
                        + ("" if ended_now else f" after the rollout {rollout.state.value}"),
                        actor=actor,
                        reason=reason,
                    )
                if also is not None:
                    also(con, rollout, config)
    except StoreError as exc:
        raise RecordingDeferred(
            f"legacy_only is published as v{config.version} (routers are switching now); "
            f"recording it is deferred to the next tick: {exc}"
        ) from exc
    return BackToLegacy(config, rollout, ended_now, published)


def _fresh_version(store: Store, current: RouterConfig | None) -> int:
    """A version above anything the routers have seen: the store's document may be gone
    or older (an endpoint restarted empty, a folder restored), and routers refuse a
    version below the one they run, so their heartbeats count too."""
    seen = current.version if current else 0
    try:
        acks = store.read_acks()
    except (OSError, ValueError):
        acks = []  # unreadable heartbeats: the database step renumbers if needed
    for ack in acks:
        seen = max(seen, ack.applied_version, ack.refused_version or 0)
    return seen + 1


def _renumber_if_taken(
    con: duckdb.DuckDBPyConnection, store: Store, config: RouterConfig
) -> RouterConfig:
    """The control document was older than the database (restored from a backup, say),
    so the version may belong to another document: versions must still only grow, so
    publish the same legacy document again, higher."""
    floor = next_config_version(con, config.version - 1)
    if floor == config.version:
        return config
    renumbered = config.model_copy(update={"version": floor})
    store.publish(renumbered)
    return renumbered


def _resolve(
    con: duckdb.DuckDBPyConnection, rollout_id: str | None, allow_terminal: bool = False
) -> Rollout | None:
    if rollout_id is not None:
        rollout = get_rollout(con, rollout_id)
        if rollout is None:
            raise RolloutError(f"no rollout {rollout_id!r}")
        if not rollout.active and not allow_terminal:
            raise RolloutError(f"rollout {rollout_id} is already {rollout.state.value}")
        return rollout
    active = active_rollouts(con)
    if len(active) > 1:
        ids = ", ".join(r.rollout_id for r in active)
        raise RolloutError(f"several rollouts are active ({ids}): pass --rollout-id")
    if active:
        return active[0]
    return latest_rollout(con) if allow_terminal else None


def resolve_active(con: duckdb.DuckDBPyConnection, rollout_id: str | None) -> Rollout | None:
    return _resolve(con, rollout_id)


def get_state(con: duckdb.DuckDBPyConnection, rollout_id: str) -> Rollout:
    rollout = get_rollout(con, rollout_id)
    if rollout is None:
        raise RolloutError(f"no rollout {rollout_id!r}")
    return rollout


def check_awaiting_approval(rollout: Rollout | None) -> None:
    if rollout is None or rollout.state is not RolloutState.AWAITING_APPROVAL:
        state = rollout.state.value if rollout else "no active rollout"
        raise RolloutError(f"nothing awaits approval (state: {state})")


def awaiting_approval(paths: DataPaths, rollout_id: str | None) -> Rollout:
    """The rollout an answer is for, checked before any flow runs (a read)."""
    if not paths.database.exists():
        raise RolloutError("nothing awaits approval (state: no rollout recorded)")
    with connect(paths.database, read_only=True) as con:
        rollout = _resolve(con, rollout_id)
    check_awaiting_approval(rollout)
    assert rollout is not None
    return rollout


def approve(
    paths: DataPaths,
    *,
    approved: bool,
    actor: str,
    comment: str = "",
    rollout_id: str | None = None,
    phase_index: int | None = None,
) -> Rollout:
    """A human's answer to NEEDS_APPROVAL: approval promotes, rejection rolls back.

    `phase_index`: the phase the question was asked for. An answer that waited (a paused
    Prefect form) must not promote a later phase that asks again."""
    with connect(paths.database) as con:
        rollout = _resolve(con, rollout_id)
        check_awaiting_approval(rollout)
        assert rollout is not None
        if phase_index is not None and rollout.phase_index != phase_index:
            asked = rollout.plan.phases[phase_index].name
            raise RolloutError(
                f"this answer was for phase {phase_index + 1} ({asked}); the rollout now "
                f"awaits approval of phase {rollout.phase_index + 1} ({rollout.phase.name}): "
                "answer again"
            )
        reason = f"{'approved' if approved else 'rejected'} by {actor}" + (
            f": {comment}" if comment else ""
        )
        if approved:
            moved = promote(
                con, paths, rollout, reason=reason, actor=actor, decision=("APPROVED", "promote")
            )
            return moved.rollout if isinstance(moved, Published) else moved
        version = _phase_version(con, rollout)

    def rejected(c: duckdb.DuckDBPyConnection, _: Rollout | None, __: RouterConfig) -> None:
        # with the rollback, never before it: a rejection on record must have been acted on
        record_decision(
            c,
            decision_id=uuid.uuid4().hex,
            rollout=rollout,
            config_version=version,
            verdict="REJECTED",
            action="rollback",
            actor=actor,
            reason=reason,
        )

    rolled = rollback(
        paths, reason=reason, actor=actor, rollout_id=rollout.rollout_id, also=rejected
    ).rollout
    assert rolled is not None
    return rolled


def restore_previous(
    paths: DataPaths, *, rollout_id: str, failed_version: int, reason: str, actor: str
) -> RouterConfig | None:
    """Undo a publish the routers did not take: re-publish the config that was in force
    before `failed_version` under a new version (versions only grow) and move the
    rollout back to that phase. A rollback (legacy_only) is never undone."""
    store = control_store(paths)
    with connect(paths.database) as con:
        rollout = get_rollout(con, rollout_id)
        failed = first(
            con.execute(
                "SELECT mode, phase_index FROM config_versions WHERE version = ?", [failed_version]
            )
        )
        if rollout is None or failed is None or failed[0] == "legacy_only":
            return None
        # The previous PHASE's latest document, not the previous version: that may be an
        # older document of the failed phase itself (a republish after a lost document).
        row = first(
            con.execute(
                "SELECT document FROM config_versions WHERE version < ? AND rollout_id = ? "
                "AND phase_index = ? AND mode <> 'legacy_only' ORDER BY version DESC LIMIT 1",
                [failed_version, rollout_id, int(failed[1]) - 1],
            )
        )
        if not rollout.active or _phase_version_or_none(con, rollout) != failed_version:
            return None  # not the live, unacknowledged phase: nothing to undo
        version = next_config_version(con, _store_floor(paths))
        if row is None:  # the failed publish was phase 1: before it, legacy served everyone
            config = legacy_only_config(
                version, rollout_id, rollout.plan.salt, f"{PHASE_ONE_RESTORE}: {reason}"
            )
            target_state, phase_index = RolloutState.ABORTED, 0
        else:
            previous = RouterConfig.model_validate_json(row[0])
            config = previous.model_copy(
                update={
                    "version": version,
                    "reason": brief(
                        f"restored after failed publish of v{failed_version}: {reason}"
                    ),
                    "published_at": datetime.now(UTC),  # not the copied document's
                    "rearm_guard": False,  # only a new rollout's start re-arms the guard
                }
            )
            target_state, phase_index = RolloutState.RUNNING, max(0, int(failed[1]) - 1)
        try:
            with transaction(con):
                con.execute(
                    "UPDATE phases SET started_at = NULL, config_version = NULL, "
                    "ended_at = NULL, outcome = NULL "
                    "WHERE rollout_id = ? AND phase_index = ? AND phase_index <> ?",
                    [rollout_id, int(failed[1]), phase_index],
                )
                if target_state is RolloutState.RUNNING:
                    # a new version judged from scratch: its clock restarts too
                    start_phase(con, rollout_id, phase_index, version)
                if target_state is RolloutState.ABORTED:
                    end_phase(con, rollout_id, 0, "aborted")
                moved = rollout
                if rollout.state is not target_state or rollout.phase_index != phase_index:
                    moved = transition(
                        con,
                        rollout,
                        target_state,
                        phase_index=phase_index,
                        cause=f"publish of v{failed_version} failed ({reason}); restored as "
                        f"v{version}",
                        actor=actor,
                    )
                record_decision(
                    con,
                    decision_id=uuid.uuid4().hex,
                    rollout=moved,
                    config_version=version,
                    verdict="RESTORED",
                    action=f"re-published the previous config as v{version}",
                    actor=actor,
                    reason=reason,
                )
                _publish_in_txn(con, paths, config, phase_index)
        except RolledBackMeanwhile:
            # An emergency rollback went out and could not be recorded yet: restoring the
            # previous phase would undo it (users back on production, no trace of the
            # rollback). Record the rollback instead.
            live = store.current_or_none()
            if live is not None:
                log.warning(
                    "restore of v%s skipped, a rollback is live: %s",
                    failed_version,
                    _adopt(con, rollout, live, failed_version),
                )
            return None
    return config


def reconcile(paths: DataPaths) -> str | None:
    """Make the database and the live control document agree again after a crash.

    With one active rollout and its current phase recorded as version E:
    - a live document for another, unrecorded rollout (a start that died before
      recording): revert the routers to legacy;
    - a live `legacy_only` of this rollout: it was rolled back or aborted and the record
      is missing: record it;
    - the live document is E: nothing to do;
    - an unrecorded document for the next phase: a promotion that died before recording:
      adopt it;
    - a document for the previous phase published after E: a restore that died before
      recording: adopt it (the rollout moves back);
    - anything else (no document, a stale or foreign one): republish phase E's config.
    Returns what was done, or None when both already agree.
    """
    store = control_store(paths)
    document = store.current_or_none()
    with connect(paths.database) as con:
        if (
            document is not None
            and document.mode.value != "legacy_only"
            and document.rollout_id
            and get_rollout(con, document.rollout_id) is None
        ):
            version = next_config_version(con, _store_floor(paths))
            config = legacy_only_config(
                version,
                None,
                document.salt,
                f"reverted unrecorded rollout {document.rollout_id}",
            )
            with transaction(con):
                record_config(con, config, None)
                store.publish(config)
            return f"reverted unrecorded rollout {document.rollout_id} to legacy as v{version}"
        active = active_rollouts(con)
        if len(active) != 1:
            return None
        rollout = active[0]
        expected = _phase_version_or_none(con, rollout)
        if expected is None:
            return None
        if document is not None and document.rollout_id == rollout.rollout_id:
            adopted = _adopt(con, rollout, document, expected)
            if adopted is not None or document.version == expected:
                return adopted
        version = next_config_version(con, _store_floor(paths))
        config = phase_config(
            rollout.plan,
            rollout.phase_index,
            version,
            rollout.rollout_id,
            "republished: the live control document was missing, stale or foreign",
        )
        with transaction(con):
            record_config(con, config, rollout.phase_index)
            con.execute(
                "UPDATE phases SET config_version = ? WHERE rollout_id = ? AND phase_index = ?",
                [version, rollout.rollout_id, rollout.phase_index],
            )
            store.publish(config)
        return f"republished phase {rollout.phase_index + 1} as v{version}"


def _adopt(
    con: duckdb.DuckDBPyConnection, rollout: Rollout, document: RouterConfig, expected: int
) -> str | None:
    """Record what the live document of this rollout says happened; None if it says
    nothing the database could adopt."""
    names = [p.name for p in rollout.plan.phases]
    index = names.index(document.phase) if document.phase in names else None
    known = (
        first(con.execute("SELECT 1 FROM config_versions WHERE version = ?", [document.version]))
        is not None
    )
    cause = f"recovered after a crash: v{document.version} was published but not recorded"

    def recovered(verdict: str, action: str, version: int) -> None:
        # The decision died with the process that made it; its document's reason says
        # who decided and why, so the audit trail keeps the move.
        record_decision(
            con,
            decision_id=uuid.uuid4().hex,
            rollout=rollout,
            config_version=version,
            verdict=verdict,
            action=f"{action} (recorded after a crash)",
            actor="reconcile",
            reason=document.reason,
        )

    with transaction(con):
        if document.mode.value == "legacy_only":
            # a restore of phase 1 ends the rollout aborted too (see restore_previous)
            aborted = document.reason.startswith(("abort", PHASE_ONE_RESTORE))
            target = RolloutState.ABORTED if aborted else RolloutState.ROLLED_BACK
            if not known:
                record_config(con, document, rollout.phase_index)
            recovered("ABORT" if aborted else "ROLLBACK", "published legacy_only", document.version)
            end_phase(
                con,
                rollout.rollout_id,
                rollout.phase_index,
                "aborted" if aborted else "rolled_back",
            )
            transition(
                con,
                rollout,
                target,
                actor="reconcile",
                cause=f"{cause} ({'abort' if aborted else 'rollback'})",
            )
            return f"adopted {'abort' if aborted else 'rollback'} v{document.version}"
        if document.version <= expected or index is None:
            return None
        if index == rollout.phase_index + 1 and not known:
            decided = first(
                con.execute(
                    "SELECT 1 FROM decisions WHERE rollout_id = ? AND config_version = ? "
                    "AND verdict IN ('PROMOTE', 'APPROVED')",
                    [rollout.rollout_id, expected],
                )
            )
            if decided is None:  # a person's (a gate's PROMOTE is on record before it acts)
                recovered("PROMOTE", f"promoted to phase {index + 1}", expected)
            end_phase(con, rollout.rollout_id, rollout.phase_index, "promoted")
            record_config(con, document, index)
            start_phase(con, rollout.rollout_id, index, document.version)
            transition(
                con,
                rollout,
                RolloutState.RUNNING,
                phase_index=index,
                actor="reconcile",
                cause=f"{cause} (promotion to phase {index + 1})",
            )
            return f"adopted promotion to phase {index + 1} (v{document.version})"
        if index == rollout.phase_index - 1:
            if not known:
                record_config(con, document, index)
            con.execute(
                "UPDATE phases SET started_at = NULL, config_version = NULL, ended_at = NULL, "
                "outcome = NULL WHERE rollout_id = ? AND phase_index = ?",
                [rollout.rollout_id, rollout.phase_index],
            )
            start_phase(con, rollout.rollout_id, index, document.version)  # clock restarts
            transition(
                con,
                rollout,
                RolloutState.RUNNING,
                phase_index=index,
                actor="reconcile",
                cause=f"{cause} (restore of phase {index + 1})",
            )
            return f"adopted restore of phase {index + 1} (v{document.version})"
    return None
