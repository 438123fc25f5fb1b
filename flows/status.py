"""A rollout's status as people read it: phase timeline, last verdict, counts per arm.

One snapshot feeds the Prefect status artifact, `rollout status` and `rollout report`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import duckdb

from flows.store.rollouts import Rollout, get_rollout, latest_rollout

TIMELINE_SQL = """
SELECT phase_index, name, mode, traffic_percent, config_version, started_at, ended_at,
       duration_s, outcome, legacy_requests, production_requests, last_verdict
FROM phase_timeline WHERE rollout_id = ? ORDER BY phase_index
"""

DECISIONS_SQL = """
SELECT decided_at, phase_index, verdict, action, actor, reason
FROM decisions WHERE rollout_id = ? ORDER BY decided_at DESC LIMIT ?
"""

RECORDS_SQL = """
SELECT check_kind, metric, decision, estimate, lower_bound, upper_bound, e_value,
       n_legacy, n_production, threshold, metric_mode, reason
FROM gate_evaluations WHERE evaluation_id = ? ORDER BY check_kind, metric
"""

TRANSITIONS_SQL = """
SELECT seq, occurred_at, from_state, to_state, phase_index, cause, actor
FROM rollout_transitions WHERE rollout_id = ? ORDER BY seq
"""


def _rows(con: duckdb.DuckDBPyConnection, sql: str, params: list[Any]) -> list[dict[str, Any]]:
    cursor = con.execute(sql, params)
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


@dataclass
class StatusSnapshot:
    rollout: Rollout
    timeline: list[dict[str, Any]] = field(default_factory=list)
    decisions: list[dict[str, Any]] = field(default_factory=list)
    transitions: list[dict[str, Any]] = field(default_factory=list)


def snapshot(
    con: duckdb.DuckDBPyConnection, rollout_id: str | None = None, decisions: int = 10
) -> StatusSnapshot | None:
    rollout = get_rollout(con, rollout_id) if rollout_id else latest_rollout(con)
    if rollout is None:
        return None
    return StatusSnapshot(
        rollout,
        _rows(con, TIMELINE_SQL, [rollout.rollout_id]),
        _rows(con, DECISIONS_SQL, [rollout.rollout_id, decisions]),
        _rows(con, TRANSITIONS_SQL, [rollout.rollout_id]),
    )


def evaluation_records(con: duckdb.DuckDBPyConnection, evaluation_id: str) -> list[dict[str, Any]]:
    return _rows(con, RECORDS_SQL, [evaluation_id])


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else "-"


_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-=!|<>~])")


def md(text: object) -> str:
    """Free text (a person's comment, a plan or phase name) as literal Markdown: a
    comment `# x ![](http://...)` became a heading and a remote image in the artifact."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", " ".join(str(text).split()))


def markdown(snap: StatusSnapshot, docs_url: str | None = None) -> str:
    r = snap.rollout
    phase = r.plan.phases[min(r.phase_index, len(r.plan.phases) - 1)]
    lines = [
        f"# Rollout {md(r.rollout_id)} ({md(r.plan.name)}, router group {md(r.router_group)})",
        "",
        f"**State:** {r.state.value} · **phase {r.phase_index + 1}/{len(r.plan.phases)}:** "
        f"{md(phase.name)} ({phase.mode.value}, {phase.traffic_percent:g} %)",
    ]
    if snap.decisions:
        last = snap.decisions[0]
        lines += [
            "",
            f"**Last verdict:** {last['verdict']} → {md(last['action'])}  ",
            md(last["reason"]),
        ]
    lines += [
        "",
        "| # | phase | mode | % | config | started | ended | legacy n | production n | outcome | last verdict |",
        "|---:|---|---|---:|---:|---|---|---:|---:|---|---|",
    ]
    for p in snap.timeline:
        lines.append(
            f"| {p['phase_index'] + 1} | {md(p['name'])} | {p['mode']} | {p['traffic_percent']:g} | "
            f"{p['config_version'] or '-'} | {_when(p['started_at'])} | {_when(p['ended_at'])} | "
            f"{p['legacy_requests']} | {p['production_requests']} | {p['outcome'] or '-'} | "
            f"{p['last_verdict'] or '-'} |"
        )
    if docs_url:
        lines += ["", f"Great Expectations Data Docs of the last evaluation: {docs_url}"]
    return "\n".join(lines)
