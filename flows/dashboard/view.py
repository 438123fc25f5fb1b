"""One read of everything the dashboard shows, from one short-lived read-only connection.

The dashboard must never hold up the flows that write: it opens the database read-only
for a few milliseconds per snapshot, waits only briefly on a writer's lock, and
reports "busy" instead of blocking (the page keeps the previous snapshot meanwhile).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import duckdb

from flows.control import control_store
from flows.paths import DataPaths
from flows.status import evaluation_records, snapshot
from flows.store.database import StoreError, check_current_schema, connect

#: Roughly this many points per chart, whatever the phase's length.
CHART_POINTS = 40
_NICE_BUCKETS_S = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21600, 86400)

#: The phase's own rows (view `phase_requests`): not those under the legacy_only document
#: of the rollback that ended it, nor those after the rollout completed.
PHASE_ROWS = "FROM phase_requests WHERE rollout_id = $rollout AND phase_index = $phase"

ARMS_SQL = f"""
SELECT arm, count(*) AS requests,
       count(*) FILTER (WHERE is_shadow) AS shadow_requests,
       avg(CASE WHEN outcome = 'ok' THEN 1.0 ELSE 0.0 END) AS success_rate,
       avg(CASE WHEN is_failure(outcome) THEN 1.0 ELSE 0.0 END) AS error_rate,
       quantile_cont(latency_ms, 0.5) AS p50_ms,
       quantile_cont(latency_ms, 0.95) AS p95_ms,
       quantile_cont(latency_ms, 0.99) AS p99_ms,
       avg(cost_usd) AS cost_per_request_usd,
       avg(quality_score) AS mean_quality,
       max(ts) AS last_ts
{PHASE_ROWS}
GROUP BY arm ORDER BY arm
"""

SERIES_SQL = f"""
SELECT time_bucket(to_seconds($bucket), ts) AS t, arm, count(*) AS requests,
       avg(CASE WHEN is_failure(outcome) THEN 1.0 ELSE 0.0 END) AS error_rate,
       quantile_cont(latency_ms, 0.95) AS p95_ms
{PHASE_ROWS}
GROUP BY ALL ORDER BY t, arm
"""

SPAN_SQL = f"""
SELECT min(ts), max(ts) {PHASE_ROWS}
"""

LAST_EVALUATION_SQL = """
SELECT evaluation_id, evaluated_at, phase_index FROM gate_evaluations WHERE rollout_id = ?
ORDER BY evaluated_at DESC LIMIT 1
"""

EVENTS_SQL = """
SELECT ts, router_instance, kind, backend, detail FROM router_events
ORDER BY ts DESC LIMIT ?
"""

#: Each backend over the last `window` seconds of collected rows (both arms, shadow
#: included): where failures and failovers come from right now. From the table only:
#: archived rows are older than the retention window, and reading the archive on every
#: refresh took 0.9 s at 27 archived days.
BACKENDS_SQL = """
WITH recent AS (
    SELECT * FROM requests
    WHERE backend IS NOT NULL
      AND ts >= (SELECT max(ts) FROM requests) - to_seconds($window)
)
SELECT backend, arm, count(*) AS requests,
       avg(CASE WHEN is_failure(outcome) THEN 1.0 ELSE 0.0 END) AS error_rate,
       count(*) FILTER (WHERE outcome = 'timeout') AS timeouts,
       count(*) FILTER (WHERE outcome = 'rate_limited') AS rate_limited,
       count(*) FILTER (WHERE fallback_used) AS failovers,
       quantile_cont(latency_ms, 0.95) AS p95_ms
FROM recent GROUP BY ALL ORDER BY backend, arm
"""
BACKEND_WINDOW_S = 300

INGEST_SQL = """
SELECT max(ingested_at) AS last_ingest, count(*) AS segments,
       count(*) FILTER (WHERE status = 'quarantined') AS quarantined,
       -- request rows only: the footer says "collected N rows" next to request counts
       coalesce(sum(rows) FILTER (WHERE status <> 'quarantined' AND kind = 'requests'), 0)
           AS rows
FROM ingested_segments
"""


@dataclass
class DashboardView:
    """What one refresh shows. `problem` is set when the database could not be read."""

    read_at: datetime
    data_dir: str
    rollout: dict[str, Any] | None = None
    timeline: list[dict[str, Any]] = field(default_factory=list)
    decisions: list[dict[str, Any]] = field(default_factory=list)
    arms: list[dict[str, Any]] = field(default_factory=list)
    series: list[dict[str, Any]] = field(default_factory=list)
    bucket_s: int = 60
    evaluation: list[dict[str, Any]] = field(default_factory=list)
    evaluated_at: datetime | None = None
    evaluated_phase: int | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    backends: list[dict[str, Any]] = field(default_factory=list)
    routers: list[dict[str, Any]] = field(default_factory=list)
    ingest: dict[str, Any] = field(default_factory=dict)
    problem: str | None = None

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def bucket_seconds(span_s: float, points: int = CHART_POINTS) -> int:
    """The smallest round bucket that gives at most `points` buckets over `span_s`."""
    wanted = max(span_s, 1.0) / points
    return next((b for b in _NICE_BUCKETS_S if b >= wanted), math.ceil(wanted))


def _dicts(cursor: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def _routers(paths: DataPaths) -> list[dict[str, Any]]:
    try:
        acks = control_store(paths).read_acks()
    except OSError:
        return []
    return [
        {
            "instance": a.instance,
            "applied_version": a.applied_version,
            "mode": a.effective_mode.value,
            "traffic_percent": a.traffic_percent,
            "age_s": round(a.age_s(), 1),
            "gone": a.is_stale(),
            "failback_reason": a.failback_reason,
            "refused_reason": a.refused_reason,
        }
        for a in acks
    ]


def read_view(
    paths: DataPaths, rollout_id: str | None = None, *, wait_s: float = 2.0, events: int = 8
) -> DashboardView:
    view = DashboardView(datetime.now(UTC), str(paths.root), routers=_routers(paths))
    try:
        with connect(paths.database, read_only=True, wait_s=wait_s) as con:
            _read(con, view, rollout_id, events)
    except StoreError as exc:
        view.problem = str(exc)
    return view


def _read(
    con: duckdb.DuckDBPyConnection, view: DashboardView, rollout_id: str | None, events: int
) -> None:
    check_current_schema(con)
    view.ingest = _dicts(con.execute(INGEST_SQL))[0]
    view.events = _dicts(con.execute(EVENTS_SQL, [events]))
    view.backends = _dicts(con.execute(BACKENDS_SQL, {"window": BACKEND_WINDOW_S}))
    snap = snapshot(con, rollout_id, decisions=8)
    if snap is None:
        if rollout_id:
            view.problem = f"no rollout {rollout_id!r} in {view.data_dir}"
        return
    r = snap.rollout
    phase = r.phase
    view.rollout = {
        "rollout_id": r.rollout_id,
        "plan": r.plan.name,
        "router_group": r.plan.router_group,
        "algorithm": r.plan.algorithm.value,
        "state": r.state.value,
        "phase_index": r.phase_index,
        "phases": len(r.plan.phases),
        "phase": phase.name,
        "mode": phase.mode.value,
        "traffic_percent": phase.traffic_percent,
    }
    view.timeline, view.decisions = snap.timeline, snap.decisions
    params = {"rollout": r.rollout_id, "phase": r.phase_index}
    view.arms = _dicts(con.execute(ARMS_SQL, params))
    first, last = con.execute(SPAN_SQL, params).fetchone() or (None, None)
    if first is not None and last is not None:
        view.bucket_s = bucket_seconds((last - first).total_seconds())
        view.series = _dicts(con.execute(SERIES_SQL, params | {"bucket": view.bucket_s}))
    latest = con.execute(LAST_EVALUATION_SQL, [r.rollout_id]).fetchone()
    if latest is not None:
        records = evaluation_records(con, latest[0])
        # what needs attention first: anything that did not pass
        view.evaluation = sorted(records, key=lambda e: e["decision"] == "pass")
        view.evaluated_at, view.evaluated_phase = latest[1], latest[2]
