"""Reading and writing rollouts, phases, configs, evaluations and decisions.

Each function takes an open write connection; callers group them into one
transaction where a step must be all-or-nothing.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import duckdb

from flows.plan import RolloutPlan
from flows.state import ACTIVE, RolloutState, check_transition
from flows.store.database import first
from router.router_config import RouterConfig


@dataclass(frozen=True)
class Rollout:
    rollout_id: str
    router_group: str
    plan: RolloutPlan
    state: RolloutState
    phase_index: int
    started_at: datetime
    updated_at: datetime
    ended_at: datetime | None
    reason: str | None

    @property
    def phase(self):
        return self.plan.phases[min(self.phase_index, len(self.plan.phases) - 1)]

    @property
    def active(self) -> bool:
        return self.state in ACTIVE


_ROLLOUT_COLUMNS = (
    "rollout_id, router_group, plan, state, phase_index, started_at, updated_at, ended_at, reason"
)


def _rollout(row: Sequence[Any]) -> Rollout:
    return Rollout(
        rollout_id=row[0],
        router_group=row[1],
        plan=RolloutPlan.model_validate_json(row[2]),
        state=RolloutState(row[3]),
        phase_index=int(row[4]),
        started_at=row[5],
        updated_at=row[6],
        ended_at=row[7],
        reason=row[8],
    )


def get_rollout(con: duckdb.DuckDBPyConnection, rollout_id: str) -> Rollout | None:
    row = first(
        con.execute(f"SELECT {_ROLLOUT_COLUMNS} FROM rollouts WHERE rollout_id = ?", [rollout_id])
    )
    return _rollout(row) if row else None


def active_rollouts(
    con: duckdb.DuckDBPyConnection, router_group: str | None = None
) -> list[Rollout]:
    states = [s.value for s in ACTIVE]
    sql = f"SELECT {_ROLLOUT_COLUMNS} FROM rollouts WHERE list_contains(?, state)"
    params: list[Any] = [states]
    if router_group is not None:
        sql += " AND router_group = ?"
        params.append(router_group)
    return [_rollout(r) for r in con.execute(sql + " ORDER BY started_at", params).fetchall()]


def latest_rollout(con: duckdb.DuckDBPyConnection) -> Rollout | None:
    row = first(
        con.execute(f"SELECT {_ROLLOUT_COLUMNS} FROM rollouts ORDER BY started_at DESC LIMIT 1")
    )
    return _rollout(row) if row else None


def create_rollout(
    con: duckdb.DuckDBPyConnection, rollout_id: str, plan: RolloutPlan, actor: str
) -> Rollout:
    now = datetime.now(UTC)
    con.execute(
        "INSERT INTO rollouts VALUES (?, ?, ?, ?, ?, 0, ?, ?, NULL, NULL)",
        [
            rollout_id,
            plan.router_group,
            plan.name,
            plan.model_dump_json(),
            RolloutState.STARTED.value,
            now,
            now,
        ],
    )
    for index, phase in enumerate(plan.phases):
        con.execute(
            "INSERT INTO phases VALUES (?, ?, ?, ?, ?, NULL, NULL, NULL, NULL)",
            [rollout_id, index, phase.name, phase.mode.value, phase.traffic_percent],
        )
    _append_transition(con, rollout_id, None, RolloutState.STARTED, 0, "rollout started", actor)
    rollout = get_rollout(con, rollout_id)
    assert rollout is not None
    return rollout


def _append_transition(
    con: duckdb.DuckDBPyConnection,
    rollout_id: str,
    before: RolloutState | None,
    after: RolloutState,
    phase_index: int,
    cause: str,
    actor: str,
) -> None:
    row = first(
        con.execute(
            "SELECT coalesce(max(seq), 0) + 1 FROM rollout_transitions WHERE rollout_id = ?",
            [rollout_id],
        )
    )
    con.execute(
        "INSERT INTO rollout_transitions VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        [
            rollout_id,
            row[0] if row else 1,
            datetime.now(UTC),
            before.value if before else None,
            after.value,
            phase_index,
            cause,
            actor,
        ],
    )


def transition(
    con: duckdb.DuckDBPyConnection,
    rollout: Rollout,
    target: RolloutState,
    *,
    phase_index: int | None = None,
    cause: str,
    actor: str,
) -> Rollout:
    """Move the state machine one step and record why; refuses a transition that does not exist."""
    check_transition(rollout.state, target)
    index = rollout.phase_index if phase_index is None else phase_index
    now = datetime.now(UTC)
    ended = now if target not in ACTIVE else None
    con.execute(
        "UPDATE rollouts SET state = ?, phase_index = ?, updated_at = ?, ended_at = ?, reason = ? "
        "WHERE rollout_id = ?",
        [target.value, index, now, ended, cause, rollout.rollout_id],
    )
    _append_transition(con, rollout.rollout_id, rollout.state, target, index, cause, actor)
    updated = get_rollout(con, rollout.rollout_id)
    assert updated is not None
    return updated


def next_config_version(con: duckdb.DuckDBPyConnection, floor: int = 0) -> int:
    row = first(con.execute("SELECT coalesce(max(version), 0) FROM config_versions"))
    return max(int(row[0]) if row else 0, floor) + 1


def record_config(
    con: duckdb.DuckDBPyConnection,
    config: RouterConfig,
    phase_index: int | None,
) -> None:
    con.execute(
        "INSERT INTO config_versions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
        [
            config.version,
            config.rollout_id,
            phase_index,
            config.phase,
            config.mode.value,
            config.traffic_percent,
            config.algorithm.value,
            config.reason,
            config.published_at,
            config.to_json(),
        ],
    )


def phase_config_version(
    con: duckdb.DuckDBPyConnection, rollout_id: str, phase_index: int
) -> int | None:
    row = first(
        con.execute(
            "SELECT config_version FROM phases WHERE rollout_id = ? AND phase_index = ?",
            [rollout_id, phase_index],
        )
    )
    return int(row[0]) if row and row[0] is not None else None


def phase_started_at(
    con: duckdb.DuckDBPyConnection, rollout_id: str, phase_index: int
) -> datetime | None:
    row = first(
        con.execute(
            "SELECT started_at FROM phases WHERE rollout_id = ? AND phase_index = ?",
            [rollout_id, phase_index],
        )
    )
    return row[0] if row else None


def config_published_at(con: duckdb.DuckDBPyConnection, version: int) -> datetime | None:
    row = first(
        con.execute("SELECT published_at FROM config_versions WHERE version = ?", [version])
    )
    return row[0] if row else None


def start_phase(
    con: duckdb.DuckDBPyConnection, rollout_id: str, phase_index: int, version: int
) -> None:
    con.execute(
        "UPDATE phases SET config_version = ?, started_at = ?, ended_at = NULL, outcome = NULL "
        "WHERE rollout_id = ? AND phase_index = ?",
        [version, datetime.now(UTC), rollout_id, phase_index],
    )


def end_phase(
    con: duckdb.DuckDBPyConnection, rollout_id: str, phase_index: int, outcome: str
) -> None:
    con.execute(
        "UPDATE phases SET ended_at = ?, outcome = ? "
        "WHERE rollout_id = ? AND phase_index = ? AND ended_at IS NULL",
        [datetime.now(UTC), outcome, rollout_id, phase_index],
    )


def record_decision(
    con: duckdb.DuckDBPyConnection,
    *,
    decision_id: str,
    rollout: Rollout | None,
    config_version: int | None,
    verdict: str,
    action: str,
    actor: str,
    reason: str,
    evaluation_id: str | None = None,
    n_legacy: int | None = None,
    n_production: int | None = None,
) -> None:
    con.execute(
        "INSERT INTO decisions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
        [
            decision_id,
            rollout.rollout_id if rollout else None,
            rollout.phase_index if rollout else None,
            config_version,
            datetime.now(UTC),
            verdict,
            action,
            actor,
            reason,
            evaluation_id,
            n_legacy,
            n_production,
        ],
    )


def record_evaluations(con: duckdb.DuckDBPyConnection, rows: Sequence[dict[str, Any]]) -> None:
    """Insert decision-record rows (one per metric) into `gate_evaluations`."""
    if not rows:
        return
    columns = [
        "evaluation_id",
        "rollout_id",
        "phase_index",
        "config_version",
        "evaluated_at",
        "check_kind",
        "metric",
        "estimate",
        "lower_bound",
        "upper_bound",
        "e_value",
        "n_legacy",
        "n_production",
        "threshold",
        "decision",
        "metric_mode",
        "reason",
    ]
    con.executemany(
        f"INSERT INTO gate_evaluations ({', '.join(columns)}) VALUES "
        f"({', '.join('?' for _ in columns)})",
        [[row.get(c) for c in columns] for row in rows],
    )


def dumps(value: Any) -> str:
    return json.dumps(value, default=str, sort_keys=True)
