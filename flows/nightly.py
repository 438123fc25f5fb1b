"""The nightly legacy-against-production comparison: per backend and query category.

Plain SQL over the last `hours` of requests, archived ones included (`all_requests`: a
window longer than the retention period must not be undercounted); rows are stored in
`nightly_comparisons` so trends can be queried later, and rendered as Prefect artifacts by
the flow.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import duckdb

from flows.status import md
from flows.store.database import transaction

#: The longest window a comparison covers (ten years): the CLI and the flow refuse more.
MAX_HOURS = 24 * 3653
#: How far back a run looks for earlier windows that gained rows since they were compared.
LATE_ROWS_DAYS = 7

COMPARISON_SQL = """
WITH per_arm AS (
    SELECT coalesce(backend, '(none)') AS backend, query_category, arm,
           count(*) AS requests,
           avg(CASE WHEN is_failure(outcome) THEN 1.0 ELSE 0.0 END) AS error_rate,
           quantile_cont(latency_ms, 0.5) AS p50_ms,
           quantile_cont(latency_ms, 0.95) AS p95_ms,
           avg(cost_usd) AS cost_per_request_usd,
           avg(quality_score) AS mean_quality
    FROM all_requests
    WHERE ts >= ? AND ts < ? AND NOT is_shadow
    GROUP BY ALL
)
SELECT coalesce(l.backend, p.backend) AS backend,
       coalesce(l.query_category, p.query_category) AS query_category,
       coalesce(l.requests, 0) AS legacy_requests, coalesce(p.requests, 0) AS production_requests,
       l.error_rate AS legacy_error_rate, p.error_rate AS production_error_rate,
       l.p95_ms AS legacy_p95_ms, p.p95_ms AS production_p95_ms,
       rel_diff(p.p95_ms, l.p95_ms) AS p95_rel_diff,
       l.cost_per_request_usd AS legacy_cost_usd, p.cost_per_request_usd AS production_cost_usd,
       rel_diff(p.cost_per_request_usd, l.cost_per_request_usd) AS cost_rel_diff,
       l.mean_quality AS legacy_quality, p.mean_quality AS production_quality
FROM (SELECT * FROM per_arm WHERE arm = 'legacy') l
FULL OUTER JOIN (SELECT * FROM per_arm WHERE arm = 'production') p
  ON l.backend = p.backend AND l.query_category = p.query_category
ORDER BY backend, query_category
"""

COLUMNS = [
    "backend",
    "query_category",
    "legacy_requests",
    "production_requests",
    "legacy_error_rate",
    "production_error_rate",
    "legacy_p95_ms",
    "production_p95_ms",
    "p95_rel_diff",
    "legacy_cost_usd",
    "production_cost_usd",
    "cost_rel_diff",
    "legacy_quality",
    "production_quality",
]


@dataclass
class Comparison:
    run_id: str
    window_start: datetime
    window_end: datetime
    rows: list[dict[str, Any]]

    @property
    def totals(self) -> dict[str, int]:
        return {
            "legacy": sum(r["legacy_requests"] for r in self.rows),
            "production": sum(r["production_requests"] for r in self.rows),
        }


def window(
    con: duckdb.DuckDBPyConnection, hours: float, end: datetime
) -> tuple[datetime, datetime]:
    """[start, end): `hours` back from `end`, except that it starts where the previous
    stored comparison ended when that is less than twice `hours` back. A schedule at
    02:00 local time runs 23 or 25 hours apart when clocks change, and a late run must
    not skip or double-count the hours in between."""
    start = end - timedelta(hours=hours)
    row = con.execute(
        "SELECT max(window_end) FROM nightly_comparisons WHERE window_end < ?", [end]
    ).fetchall()
    previous = row[0][0] if row else None
    if previous is not None and end - timedelta(hours=2 * hours) < previous:
        start = previous
    return start, end


def compare(
    con: duckdb.DuckDBPyConnection, hours: float, now: datetime | None = None
) -> Comparison:
    return compare_window(con, *window(con, hours, now or datetime.now(UTC)))


def compare_window(con: duckdb.DuckDBPyConnection, start: datetime, end: datetime) -> Comparison:
    rows = [
        dict(zip(COLUMNS, r, strict=True))
        for r in con.execute(COMPARISON_SQL, [start, end]).fetchall()
    ]
    return Comparison(uuid.uuid4().hex, start, end, rows)


_LATE_WINDOWS_SQL = """
WITH stored AS (
    SELECT window_start, window_end, sum(legacy_requests + production_requests) AS counted
    FROM nightly_comparisons WHERE window_end > ? AND window_end <= ?
    GROUP BY ALL
)
SELECT s.window_start, s.window_end, s.counted FROM stored s
WHERE s.counted <> (SELECT count(*) FROM all_requests r
                    WHERE r.ts >= s.window_start AND r.ts < s.window_end AND NOT r.is_shadow)
ORDER BY s.window_start
"""


def late_windows(con: duckdb.DuckDBPyConnection, now: datetime) -> list[tuple[Comparison, int]]:
    """The stored windows of the last `LATE_ROWS_DAYS` whose rows changed since they were
    compared, compared again (with the number of requests they counted before). Rows are stamped when routed but land when their segment is
    collected: a router offline overnight, or rows not yet flushed at 02:00, arrive after
    their window ran, and the next window starts where that one ended. They were never
    counted by any comparison."""
    found = con.execute(_LATE_WINDOWS_SQL, [now - timedelta(days=LATE_ROWS_DAYS), now])
    return [(compare_window(con, start, end), int(n)) for start, end, n in found.fetchall()]


#: The row an empty window is stored as: with zero counts, so that the next window
#: starts after it and rows arriving late for it are compared again (`late_windows`).
EMPTY_WINDOW_ROW: dict[str, Any] = {
    **dict.fromkeys(COLUMNS),
    "backend": "(none)",
    "query_category": "(no requests)",
    "legacy_requests": 0,
    "production_requests": 0,
}


def store(con: duckdb.DuckDBPyConnection, comparison: Comparison) -> None:
    """All rows or none (`executemany` commits row by row: a crash left a partial window
    that the next night's window starts after); a re-run of the same window replaces the
    earlier run instead of counting it twice. An empty window is stored as one
    `EMPTY_WINDOW_ROW`: unstored, the rows of a router that was offline that night were
    never compared (the next window started after the last stored one)."""
    rows = comparison.rows or [EMPTY_WINDOW_ROW]
    with transaction(con):
        con.execute(
            "DELETE FROM nightly_comparisons WHERE window_start = ? AND window_end = ?",
            [comparison.window_start, comparison.window_end],
        )
        con.executemany(
            f"INSERT INTO nightly_comparisons (run_id, window_start, window_end, "
            f"{', '.join(COLUMNS)}) VALUES ({', '.join('?' for _ in range(3 + len(COLUMNS)))})",
            [
                [
                    comparison.run_id,
                    comparison.window_start,
                    comparison.window_end,
                    *[row[c] for c in COLUMNS],
                ]
                for row in rows
            ],
        )


def markdown(comparison: Comparison) -> str:
    totals = comparison.totals
    lines = [
        f"# Legacy vs production, {comparison.window_start:%Y-%m-%d %H:%M} to "
        f"{comparison.window_end:%Y-%m-%d %H:%M} UTC",
        "",
        f"{totals['legacy']} legacy and {totals['production']} production requests "
        "(shadow executions excluded).",
        "",
        "| backend | category | legacy n | prod n | legacy err | prod err | p95 legacy | "
        "p95 prod | p95 diff | cost diff |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{v:+.1%}" if abs(v) < 10 else f"{v:+.0%}"

    def num(v: float | None, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    for r in comparison.rows:
        lines.append(
            f"| {md(r['backend'])} | {md(r['query_category'])} | {r['legacy_requests']} | "
            f"{r['production_requests']} | {num(r['legacy_error_rate'], '.2%')} | "
            f"{num(r['production_error_rate'], '.2%')} | {num(r['legacy_p95_ms'], '.0f')} | "
            f"{num(r['production_p95_ms'], '.0f')} | {pct(r['p95_rel_diff'])} | "
            f"{pct(r['cost_rel_diff'])} |"
        )
    if not comparison.rows:
        lines.append("| (no requests in the window) | | | | | | | | | |")
    return "\n".join(lines)
