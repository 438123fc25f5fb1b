"""`rollout sql`: read-only SQL on the metrics database, as a table, CSV or JSON."""

from __future__ import annotations

import csv
import json
import math
import re
import sys
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from enum import StrEnum
from typing import Annotated, Any
from uuid import UUID

import typer
from rich.markup import escape
from rich.table import Table

from flows.cli.common import (
    DEFAULT_DATA_DIR,
    DataDir,
    console,
    fail,
    fail_store,
    literal,
    paths,
)
from flows.store.phase_names import NOT_A_PHASE_SQL

EXAMPLES: dict[str, str] = {
    "Legacy against production, per phase of the latest rollout": "SELECT phase_index + 1 AS phase, phase_name, arm, requests, success_rate, p95_ms, "
    "cost_per_request_usd, mean_quality FROM arm_summary WHERE rollout_id = (SELECT rollout_id "
    f"FROM rollouts ORDER BY started_at DESC LIMIT 1) AND phase_name NOT IN {NOT_A_PHASE_SQL} "
    "ORDER BY phase, arm",
    "Every decision of the latest rollout, with its reason": "SELECT decided_at, phase_index + 1 AS phase, verdict, action, actor, reason "
    "FROM decisions WHERE rollout_id = (SELECT rollout_id FROM rollouts "
    "ORDER BY started_at DESC LIMIT 1) ORDER BY decided_at",
    "The decision record of the latest evaluation": "SELECT check_kind, metric, decision, estimate, threshold, n_legacy, n_production, "
    "reason FROM gate_evaluations WHERE evaluation_id = (SELECT evaluation_id FROM "
    "gate_evaluations ORDER BY evaluated_at DESC LIMIT 1)",
    "Backend error rates per minute": "SELECT window_start, backend, arm, requests, error_rate, p95_ms FROM backend_health "
    "ORDER BY window_start DESC, backend LIMIT 30",
    "Shadow mode: did production pick a faster backend?": "SELECT same_backend, count(*) AS pairs, avg(latency_delta_ms) AS mean_latency_delta_ms, "
    "avg(quality_delta) AS mean_quality_delta FROM shadow_pairs GROUP BY ALL",
    "Router events: failbacks, refused configs, quarantined segments": "SELECT ts, router_instance, kind, config_version, detail FROM router_events "
    "ORDER BY ts DESC LIMIT 20",
    "The rollout state machine, step by step": "SELECT rollout_id, seq, occurred_at, from_state, to_state, phase_index + 1 AS phase, "
    "cause FROM rollout_transitions ORDER BY rollout_id, seq",
}


#: Leading comments before a statement's first keyword.
_COMMENTS = r"^\s*(?:(?:--[^\n]*(?:\n|$)|/\*.*?\*/)\s*)*"

#: An EXPLAIN's own prefix: what follows is the statement it explains, which
#: `EXPLAIN ANALYZE` also RUNS, so it must be a SELECT as well.
_EXPLAIN_PREFIX = re.compile(
    _COMMENTS + r"EXPLAIN\s+(?:ANALY[SZ]E\s+)?(?:\([^)]*\)\s*)?", re.IGNORECASE | re.DOTALL
)

#: DuckDB turns a PIVOT into several statements (it builds the column list first), so
#: its type is MULTI; it only reads.
_PIVOT = re.compile(_COMMENTS + r"PIVOT(?:_WIDER)?\b", re.IGNORECASE | re.DOTALL)

#: `PRAGMA name` / `CALL name(...)`: allowed for the catalogue readers only; other
#: pragmas change settings, other calls may write files.
_PRAGMA_OR_CALL = re.compile(_COMMENTS + r"(?:PRAGMA|CALL)\s+(\w+)", re.IGNORECASE | re.DOTALL)
READ_PRAGMAS = frozenset(
    {"table_info", "show", "show_tables", "show_tables_expanded", "database_size", "version"}
)


def _reads_catalogue(query: str) -> bool:
    match = _PRAGMA_OR_CALL.match(query)
    if match is None:
        return False
    name = match.group(1).lower()
    return name.removeprefix("pragma_") in READ_PRAGMAS or (
        name.startswith("duckdb_") and name != "duckdb_secrets"
    )


def _read_only(con: Any, statement: Any) -> bool:
    """SELECT-like statements (PIVOT included), the catalogue's pragmas, and EXPLAIN
    [ANALYZE] of a SELECT (never of a COPY: analysing a COPY writes its file)."""
    import duckdb

    kind = statement.type
    if kind is duckdb.StatementType.SELECT:
        return True
    if kind is duckdb.StatementType.MULTI:
        return _PIVOT.match(statement.query) is not None
    if kind in (duckdb.StatementType.PRAGMA, duckdb.StatementType.CALL):
        return _reads_catalogue(statement.query)
    if kind is not duckdb.StatementType.EXPLAIN:
        return False
    prefix = _EXPLAIN_PREFIX.match(statement.query)
    if prefix is None:
        return False
    try:
        inner = con.extract_statements(statement.query[prefix.end() :])
    except duckdb.Error:
        return False
    return len(inner) == 1 and inner[0].type is duckdb.StatementType.SELECT


class Format(StrEnum):
    table = "table"
    csv = "csv"
    json = "json"


def _duration(value: timedelta) -> str:
    """ISO 8601 (`P1DT2H3M4.5S`), as DuckDB's INTERVAL reads back; str() gave `1 day, 2:03`."""
    sign = "-" if value < timedelta(0) else ""
    value = abs(value)
    hours, rest = divmod(value.seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    fraction = f"{seconds + value.microseconds / 1e6:.6f}".rstrip("0").rstrip(".")
    return f"{sign}P{value.days}DT{hours}H{minutes}M{fraction}S"


def _plain(value: Any) -> Any:
    """JSON-ready, nested values included (lists, structs and maps came out as Python
    reprs): ISO 8601 times and durations, hex for blobs, null for NaN and infinities
    (which JSON cannot hold), strings for decimals and UUIDs."""
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, timedelta):
        return _duration(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Decimal | UUID):
        return str(value)
    return value


def _float_cell(value: float) -> str:
    """4 significant digits, but never scientific notation for everyday sizes: a
    week-long phase's duration_s read `6.048e+05`."""
    if not math.isfinite(value) or value == 0 or not 1e-4 <= abs(value) < 1e15:
        return f"{value:.4g}"
    if abs(value) >= 1000:
        return f"{value:.0f}"
    if abs(value) >= 1:
        return f"{value:.4g}"
    decimals = 3 - math.floor(math.log10(abs(value)))  # 4 significant digits
    return f"{value:.{decimals}f}".rstrip("0").rstrip(".")


def _table_cell(value: Any) -> Any:
    """A table cell: floats short and readable, nested values as JSON."""
    if isinstance(value, float):
        return _float_cell(value)
    plain = _plain(value)
    return json.dumps(plain) if isinstance(plain, dict | list) else value


def _csv_cell(value: Any) -> Any:
    """A CSV cell: nested values as JSON text, NaN and infinities spelled out."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # nan, inf, -inf: an empty cell would read as NULL
    plain = _plain(value)
    return json.dumps(plain) if isinstance(plain, dict | list) else plain


def unique_names(columns: list[str]) -> list[str]:
    """JSON objects cannot repeat a key: a join's second `reason` becomes `reason_2`
    (it silently replaced the first)."""
    used: set[str] = set()
    out = []
    for name in columns:
        candidate, k = name, 1
        while candidate in used:
            k += 1
            candidate = f"{name}_{k}"
        used.add(candidate)
        out.append(candidate)
    return out


def sql(
    query: Annotated[str | None, typer.Argument(help="One or more SELECT statements.")] = None,
    output: Annotated[Format, typer.Option("--format", help="Output format.")] = Format.table,
    examples: Annotated[bool, typer.Option("--examples", help="List ready-made queries.")] = False,
    wait: Annotated[
        float, typer.Option(help="Seconds to wait while a writer holds the lock.")
    ] = 15.0,
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Run read-only SQL on the metrics database. Writes are refused (exit code 2)."""
    import duckdb

    from flows.store.database import StoreError, connect

    if examples:
        for title, text in EXAMPLES.items():
            console.print(
                f"[bold]-- {escape(title)}[/]\n{escape(text)};\n", highlight=False, soft_wrap=True
            )
        return
    if not query or not query.strip():
        fail('give a query, e.g. rollout sql "SELECT * FROM arm_summary", or --examples')
    if re.fullmatch(r"--?[\w-]+(=\S*)?", query):
        # Unknown options reach here as the query (a query may start with "-- comment").
        fail(f"no such option: {query}; see rollout sql --help")
    p = paths(data_dir)
    try:
        with connect(p.database, read_only=True, wait_s=wait, sandbox=[p.root, p.archive]) as con:
            try:
                statements = con.extract_statements(query)
            except duckdb.Error as exc:
                fail(f"cannot parse the query: {exc}")
            if not statements:  # ";" or only comments: say so rather than print nothing
                fail('no statement in the query: give one, e.g. "SELECT * FROM arm_summary"')
            refused = [s for s in statements if not _read_only(con, s)]
            if refused:
                kind = refused[0].type.name
                if kind == "EXPLAIN":
                    kind = "EXPLAIN of anything but a SELECT"
                fail(
                    f"refused: {kind} statements are not allowed; `rollout sql` is read-only "
                    "(SELECT, WITH, PIVOT, DESCRIBE, SHOW, SUMMARIZE, EXPLAIN of a SELECT, "
                    "PRAGMA table_info and the other catalogue pragmas)"
                )
            for statement in statements:
                try:
                    cursor = con.execute(statement)
                    columns = [d[0] for d in cursor.description or []]
                    rows = cursor.fetchall()
                except duckdb.Error as exc:
                    fail(f"query failed: {str(exc).splitlines()[0]}")
                _print(columns, rows, output)
    except StoreError as exc:
        fail_store(exc)


def _print(columns: list[str], rows: list[tuple[Any, ...]], output: Format) -> None:
    if output is Format.csv:
        writer = csv.writer(sys.stdout, lineterminator="\n")  # "\r\n" left "200\r" in shells
        writer.writerow(columns)
        writer.writerows([[_csv_cell(v) for v in row] for row in rows])
        return
    if output is Format.json:
        names = unique_names(columns)
        print(
            json.dumps(
                [{c: _plain(v) for c, v in zip(names, row, strict=True)} for row in rows],
                default=str,
                allow_nan=False,
            )
        )
        return
    table = Table(show_lines=False)
    for column in columns:  # names come from the query (`AS "[x]"`): data, not markup
        table.add_column(literal(column))
    for row in rows:
        table.add_row(*(literal(_table_cell(v)) for v in row))
    console.print(table)
    console.print(f"{len(rows)} row(s)", style="dim")
