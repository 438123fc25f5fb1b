"""The SQL the gate runs, and the frames it hands to the suites.

All aggregation happens in DuckDB (quantiles included, see DESIGN.md on the GX
quantile bug); Python sees one row per arm plus a bounded sample of raw rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

import pandas as pd

from router.modes import Arm, DeploymentMode
from router.record import Outcome

#: Outcomes that count as failures (a 4xx "rejected" is the caller's fault).
FAILURE_SQL = "outcome IN ('error', 'timeout', 'rate_limited')"

#: A row whose numbers no metric can use: NaN or infinite latency, cost or quality, a
#: negative latency or cost, a quality outside 0..1. NaN slips past GX's range checks
#: (it counts as missing) and silently freezes the sums the sequential tests run on.
INVALID_NUMBERS_SQL = (
    "NOT isfinite(latency_ms) OR NOT isfinite(cost_usd) OR NOT isfinite(quality_score) "
    "OR latency_ms < 0 OR cost_usd < 0 OR quality_score < 0 OR quality_score > 1"
)

ARM_AGGREGATES_SQL = f"""
SELECT arm,
       count(*)                                   AS n,
       count(*) FILTER (WHERE {FAILURE_SQL})      AS failures,
       quantile_cont(latency_ms, 0.50)            AS p50_ms,
       quantile_cont(latency_ms, 0.95)            AS p95_ms,
       quantile_cont(latency_ms, 0.99)            AS p99_ms,
       avg(cost_usd)                              AS cost_mean,
       avg(quality_score)                         AS quality_mean,
       count(quality_score)                       AS quality_n,
       max(ts)                                    AS last_ts,
       count(*) FILTER (WHERE {INVALID_NUMBERS_SQL}) AS invalid_numbers
FROM requests
WHERE config_version = ?
GROUP BY arm
"""

#: The row checks that must see EVERY row of the phase, counted in SQL: the raw-row frame
#: GX validates holds the newest `window_rows` only, and a long phase has more (50
#: duplicated rows in a phase's first hour passed under 200,000 later rows). A row
#: stored twice (same instance, id, time and kind) breaks exactly-once collection; a
#: request id a caller reused for a retry is another request, and is the row check's
#: business (`unique_request_id`) while it is recent.
PHASE_INTEGRITY_SQL = """
SELECT count(*) - count(DISTINCT (router_instance, request_id, ts, is_shadow))
           AS duplicate_rows,
       count(*) FILTER (WHERE arm NOT IN $arms OR outcome NOT IN $outcomes
                        OR mode NOT IN $modes) AS invalid_labels
FROM requests
WHERE config_version = $version
"""


def html_text(column: str) -> str:
    """`column` HTML-escaped, as `html.escape` would (distinct values stay distinct, valid
    labels are unchanged): GX Data Docs render unexpected sample values as raw HTML, and
    these values come from segment files anyone who can write there controls."""
    expression = column
    for char, entity in (
        ("&", "&amp;"),
        ("<", "&lt;"),
        (">", "&gt;"),
        ('"', "&quot;"),
        ("'", "&#x27;"),
    ):
        quoted = char.replace("'", "''")  # SQL string literal
        expression = f"replace({expression}, '{quoted}', '{entity}')"
    return f"{expression} AS {column}"


WINDOW_ROWS_SQL = f"""
SELECT {html_text("request_id")}, ts, {html_text("router_instance")}, config_version,
       {html_text("mode")}, {html_text("arm")}, is_shadow, {html_text("outcome")},
       latency_ms, cost_usd, quality_score, tokens_in, tokens_out, attempts
FROM requests
WHERE config_version = ? OR ts >= ?
ORDER BY ts DESC
LIMIT ?
"""


class Connection(Protocol):
    def execute(self, query: str, parameters: Any = ...) -> Any: ...


@dataclass(frozen=True)
class ArmStats:
    arm: str
    n: int = 0
    failures: int = 0
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    cost_mean: float | None = None
    quality_mean: float | None = None
    quality_n: int = 0
    last_ts: datetime | None = None
    invalid_numbers: int = 0

    @property
    def error_rate(self) -> float | None:
        return self.failures / self.n if self.n else None


def arm_stats(con: Connection, version: int) -> dict[str, ArmStats]:
    cursor = con.execute(ARM_AGGREGATES_SQL, [version])
    names = [d[0] for d in cursor.description]
    stats = {}
    for row in cursor.fetchall():
        values = dict(zip(names, row, strict=True))
        stats[values["arm"]] = ArmStats(**values)
    for arm in ("legacy", "production"):
        stats.setdefault(arm, ArmStats(arm))
    return stats


#: Requests started before a new config was applied finish under the old version after
#: the switch; rows within this many seconds of the phase start may carry either.
SWITCH_GRACE_S = 10.0


def window_rows(
    con: Connection, version: int, since: datetime, limit: int = 200_000
) -> pd.DataFrame:
    """The phase's rows plus anything else seen since the phase began (newest first)."""
    return con.execute(
        WINDOW_ROWS_SQL, [version, since + timedelta(seconds=SWITCH_GRACE_S), limit]
    ).df()


def phase_integrity(con: Connection, version: int) -> dict[str, int]:
    """`PHASE_INTEGRITY_SQL` for one config version: {duplicate_rows, invalid_labels}."""
    cursor = con.execute(
        PHASE_INTEGRITY_SQL,
        {
            "version": version,
            "arms": [a.value for a in Arm],
            "outcomes": [o.value for o in Outcome],
            "modes": [m.value for m in DeploymentMode],
        },
    )
    names = [d[0] for d in cursor.description]
    return {k: int(v or 0) for k, v in zip(names, cursor.fetchone(), strict=True)}


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def difference(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b
