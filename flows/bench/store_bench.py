"""`rollout bench store`: the metrics path end to end, with honest numbers.

Three measurements, each on the code the product runs:

- segment_rows_per_s: RequestRecord tuples (built beforehand, as the request path
  does) through `router.recorder.rows_to_table` + `write_segment` (zstd, fsync, rename),
  in recorder-sized segments spread over several instance folders.
- ingest_rows_per_s: `flows.store.ingest.collect` over those kinds of segment files
  into a fresh database: discovery, footer checks, the INSERT, the ledger and COMMIT,
  all inside the timed call. Best of `repeats` runs on the same files.
- gate_query_s_10m: `checks.frames.ARM_AGGREGATES_SQL` (the gate's per-arm aggregate,
  exact quantiles) for one config version over a `requests` table of `rows` synthetic
  rows generated inside DuckDB. Best of 5 (median also reported).

Targets on 2 cores: ingest >= 2M rows/s, gate query <= 1 s.
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb

from checks.frames import ARM_AGGREGATES_SQL
from flows.bench.synthetic import make_records, make_table
from flows.paths import DataPaths
from flows.store.database import connect
from flows.store.ingest import collect
from router.record import REQUEST_SCHEMA
from router.recorder import rows_to_table, write_segment

INGEST_TARGET_ROWS_PER_S = 2_000_000
GATE_TARGET_S = 1.0

#: 10 M rows shaped like the router's: three config versions in time order (so the
#: gate's filter selects one third), log-normal latency, 5 % failures, 30 % null quality.
GENERATE_SQL = """
INSERT INTO requests
SELECT md5(i::VARCHAR) AS request_id,
       TIMESTAMPTZ '2025-06-01 00:00:00+00' + to_microseconds(i * 10000) AS ts,
       'app-' || (i % 4) AS router_instance,
       1 + (i * 3) // $rows AS config_version,
       'ab_test' AS mode,
       CASE WHEN random() < 0.5 THEN 'legacy' ELSE 'production' END AS arm,
       false AS is_shadow,
       NULL AS primary_request_id,
       (hash(i) % 10000)::INTEGER AS subject_bucket,
       ['general', 'pathway_mechanism', 'recent_events'][1 + i % 3] AS query_category,
       'health_aware' AS algorithm,
       ['lightrag-1', 'lightrag-2', 'perplexity-1'][1 + (i // 7) % 3] AS backend,
       1 AS attempts,
       false AS fallback_used,
       CASE WHEN random() < 0.95 THEN 'ok' ELSE 'error' END AS outcome,
       200 AS http_status,
       NULL AS error_kind,
       exp(6 + 0.5 * sqrt(-2 * ln(random())) * cos(2 * pi() * random())) AS latency_ms,
       (20 + i % 380)::INTEGER AS tokens_in,
       (50 + i % 850)::INTEGER AS tokens_out,
       random() / 500 AS cost_usd,
       CASE WHEN random() < 0.3 THEN NULL ELSE random() END AS quality_score,
       substr(md5((i % 273)::VARCHAR), 1, 16) AS query_hash,
       (20 + i % 280)::INTEGER AS query_length,
       NULL AS segment
FROM range($rows) t(i)
"""


def _say(quiet: bool, message: str) -> None:
    if not quiet:
        print(message, file=sys.stderr, flush=True)


def _timed(function: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    result = function()
    return time.perf_counter() - started, result


def bench_segments(work: Path, rows: int, segment_size: int, instances: int) -> dict[str, Any]:
    records = make_records(rows, seed=1)
    folder = work / "segment-bench"

    def write() -> int:
        count = 0
        for index, offset in enumerate(range(0, rows, segment_size)):
            table = rows_to_table(records[offset : offset + segment_size], REQUEST_SCHEMA)
            write_segment(table, folder / f"app-{index % instances}", "requests", index)
            count += 1
        return count

    seconds, files = _timed(write)
    shutil.rmtree(folder, ignore_errors=True)
    return {
        "segment_rows_per_s": rows / seconds,
        "segment_rows": rows,
        "segment_files": files,
        "segment_seconds": seconds,
    }


def bench_ingest(
    work: Path, rows: int, segment_size: int, instances: int, repeats: int
) -> dict[str, Any]:
    data = DataPaths.at(work / "ingest-bench")
    table = make_table(rows, seed=2)
    for index, offset in enumerate(range(0, rows, segment_size)):
        chunk = table.slice(offset, segment_size)
        write_segment(chunk, data.segments / f"app-{index % instances}", "requests", index)
    del table
    runs: list[float] = []
    files = 0
    for _ in range(repeats):
        for name in (data.database.name, data.database.name + ".wal"):
            (data.root / name).unlink(missing_ok=True)
        report = collect(data)
        if report.rows != rows or report.quarantined:
            raise RuntimeError(f"ingest bench: expected {rows} rows, got {report}")
        runs.append(report.rows_per_s)
        files = report.segments
    size = data.database.stat().st_size
    shutil.rmtree(data.root, ignore_errors=True)
    return {
        "ingest_rows_per_s": max(runs),
        "ingest_rows_per_s_runs": runs,
        "ingest_rows": rows,
        "ingest_files": files,
        "ingest_db_mib": size / 2**20,
    }


def bench_gate(work: Path, rows: int) -> dict[str, Any]:
    data = DataPaths.at(work / "gate-bench")
    with connect(data.database) as con:
        con.execute("SELECT setseed(0.42)")
        generate_s, _ = _timed(lambda: con.execute(GENERATE_SQL, {"rows": rows}).fetchall())
        con.execute("CHECKPOINT")
        versions = con.execute(
            "SELECT DISTINCT config_version FROM requests ORDER BY config_version"
        ).fetchall()
        version = versions[len(versions) // 2][0]  # the middle phase
    with connect(data.database, read_only=True) as con:
        selected = con.execute(
            "SELECT count(*) FROM requests WHERE config_version = ?", [version]
        ).fetchall()[0][0]
        times = []
        for _ in range(5):
            seconds, result = _timed(lambda: con.execute(ARM_AGGREGATES_SQL, [version]).fetchall())
            times.append(seconds)
        assert len(result) == 2
    shutil.rmtree(data.root, ignore_errors=True)
    return {
        "gate_query_s_10m": min(times),
        "gate_query_s_median": statistics.median(times),
        "gate_rows": rows,
        "gate_rows_selected": selected,
        "gate_generate_s": generate_s,
    }


def run(
    json_output: bool,
    rows: int = 10_000_000,
    *,
    ingest_rows: int = 2_000_000,
    segment_rows: int = 200_000,
    segment_size: int = 5_000,
    instances: int = 4,
    repeats: int = 2,
    workdir: Path | None = None,
) -> dict[str, Any]:
    """Run the three measurements; print a table (or nothing: the caller prints JSON)."""
    work = Path(tempfile.mkdtemp(prefix="rollout-bench-", dir=workdir))
    quiet = json_output
    try:
        started = time.perf_counter()
        _say(quiet, f"segments: {segment_rows:,} rows through the recorder ...")
        result: dict[str, Any] = bench_segments(work, segment_rows, segment_size, instances)
        _say(quiet, f"ingest: {ingest_rows:,} rows in {segment_size:,}-row segments ...")
        result |= bench_ingest(work, ingest_rows, segment_size, instances, repeats)
        _say(quiet, f"gate: generating {rows:,} rows in DuckDB, then the gate query ...")
        result |= bench_gate(work, rows)
        result |= {
            "ingest_target_rows_per_s": INGEST_TARGET_ROWS_PER_S,
            "ingest_target_met": result["ingest_rows_per_s"] >= INGEST_TARGET_ROWS_PER_S,
            "gate_target_s": GATE_TARGET_S,
            "gate_target_met": result["gate_query_s_10m"] <= GATE_TARGET_S,
            "cpus": os.cpu_count(),
            "duckdb": duckdb.__version__,
            "wall_s": time.perf_counter() - started,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not json_output:
        _print(result)
    return result


def _print(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("measurement", "value", "target", title="rollout bench store")
    table.add_row(
        "segment rows/s (recorder: tuples -> Parquet)",
        f"{result['segment_rows_per_s']:,.0f}",
        "",
    )
    table.add_row(
        f"ingest rows/s (collect, {result['ingest_files']} segments)",
        f"{result['ingest_rows_per_s']:,.0f}",
        f">= {INGEST_TARGET_ROWS_PER_S:,}" + ("" if result["ingest_target_met"] else "  MISSED"),
    )
    table.add_row(
        f"gate query s ({result['gate_rows_selected']:,} of {result['gate_rows']:,} rows)",
        f"{result['gate_query_s_10m']:.3f} (median {result['gate_query_s_median']:.3f})",
        f"<= {GATE_TARGET_S:g}" + ("" if result["gate_target_met"] else "  MISSED"),
    )
    Console().print(table)
