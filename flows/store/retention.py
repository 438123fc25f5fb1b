"""Retention: move old rows out of the DuckDB file into daily Parquet, delete old segments.

The DuckDB file keeps a bounded window (default 30 days, `ROLLOUT_RETENTION_DAYS`), so
it stays small and the gate stays fast; older rows live in
`<archive>/requests/day=YYYY-MM-DD/part-<batch>-<uuid>.parquet`, which the
`all_requests` view (and every analysis view built on it) reads back transparently.

Exactly once, although COPY is not transactional:

1. COPY the rows older than the cutoff to new files named after a fresh batch id. A
   local archive is written into `<archive>/.staging-<batch>/` and the finished files
   are renamed into place: the views read every file's schema, so a file DuckDB is
   still writing (or a crash left at 0 bytes) must never sit where they look. Object
   stores only show a file once its upload completes, so remote archives are written
   in place (APPEND mode: files of earlier batches are never touched or overwritten).
2. In ONE transaction: DELETE those rows from `requests` and record the batch, day by
   day, in `archive_batches`. The row counts of COPY and DELETE must agree.

The views only read archive files whose batch is recorded, so a crash between 1 and 2
leaves rows in the table and invisible files in the archive: nothing is counted twice,
nothing is lost, and the next run deletes those files and the staging folder (the
batch id was noted as pending before the COPY) and archives the rows again.

Rows of a phase that is still open are never archived (the gate reads the table only),
whatever the retention window says.
"""

from __future__ import annotations

import contextlib
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from datetime import time as clock
from pathlib import Path

import duckdb

from flows.paths import DataPaths
from flows.state import ACTIVE
from flows.store.database import (
    StoreError,
    archive_location,
    connect,
    first,
    recorded_archive,
    transaction,
)
from flows.store.ingest import INGESTED_DIR
from flows.store.locations import is_remote, join, retention_days, segments_location
from flows.store.schema import ARCHIVE_TABLE_DIR, REQUEST_COLUMN_NAMES, sql_literal

#: `store_settings` key of the batch being copied (cleared by the commit that records it).
PENDING_SETTING = "archive_pending_batch"
#: Where a local archive's COPY writes, beside (never inside) the folder the views read.
STAGING_PREFIX = ".staging-"

#: The earliest moment that must stay in the table: the start of any open phase.
_OPEN_PHASES_SQL = """
SELECT min(least(cv.published_at, coalesce(p.started_at, cv.published_at)))
FROM phases p
JOIN rollouts r ON r.rollout_id = p.rollout_id
JOIN config_versions cv ON cv.version = p.config_version
WHERE p.ended_at IS NULL AND list_contains(?, r.state)
"""


@dataclass
class CompactReport:
    retention_days: int
    cutoff: date  # rows before this UTC midnight were archived
    archive: str
    batch_id: str | None = None
    days: list[tuple[date, int]] = field(default_factory=list)
    rows: int = 0
    held_back: str | None = None  # why the cutoff is earlier than the window says
    orphans_removed: int = 0  # archive files of this database's interrupted run, deleted
    orphans_left: int = 0  # other unrecorded files (remote, or another database's): ignored
    segments_deleted: int = 0
    segments_left: int = 0  # old remote segments (delete them with the store's lifecycle rules)
    seconds: float = 0.0


def batch_of(file_name: str) -> str | None:
    """The batch id in `part-<batch>-<uuid>.parquet`, or None for other files."""
    if not file_name.startswith("part-"):
        return None
    parts = file_name.split("-")
    return parts[1] if len(parts) > 2 else None


def archive_files(con: duckdb.DuckDBPyConnection, location: str) -> list[str]:
    pattern = join(location, ARCHIVE_TABLE_DIR, "*", "part-*.parquet")
    if is_remote(location):
        return [r[0] for r in con.execute("SELECT file FROM glob(?)", [pattern]).fetchall()]
    root = Path(location) / ARCHIVE_TABLE_DIR
    return sorted(str(p) for p in root.glob("day=*/part-*.parquet"))


def _sweep_orphans(con: duckdb.DuckDBPyConnection, location: str, report: CompactReport) -> None:
    """Delete the files of this database's interrupted batch (COPY done, DELETE never
    committed). Other unrecorded files may belong to another database sharing the
    location: they are left alone (the views ignore them) and only counted."""
    committed = {
        r[0] for r in con.execute("SELECT DISTINCT batch_id FROM archive_batches").fetchall()
    }
    row = first(con.execute("SELECT value FROM store_settings WHERE key = ?", [PENDING_SETTING]))
    pending = row[0] if row and row[0] not in committed else None
    for path in archive_files(con, location):
        batch = batch_of(path.rsplit("/", 1)[-1])
        if batch in committed:
            continue
        if batch == pending and not is_remote(location):
            Path(path).unlink(missing_ok=True)
            report.orphans_removed += 1
        else:
            report.orphans_left += 1
    if not is_remote(location):
        for staging in Path(location).glob(f"{STAGING_PREFIX}*"):
            files = sum(1 for f in staging.rglob("*") if f.is_file())
            if staging.name == f"{STAGING_PREFIX}{pending}":
                shutil.rmtree(staging, ignore_errors=True)
                report.orphans_removed += files
            else:
                report.orphans_left += files
    con.execute("DELETE FROM store_settings WHERE key = ?", [PENDING_SETTING])


def _cutoff(con: duckdb.DuckDBPyConnection, today: date, days: int, report: CompactReport) -> date:
    cutoff = today - timedelta(days=days)
    row = first(con.execute(_OPEN_PHASES_SQL, [[s.value for s in ACTIVE]]))
    opened: datetime | None = row[0] if row else None
    if opened is not None and opened.astimezone(UTC).date() < cutoff:
        cutoff = opened.astimezone(UTC).date()
        report.held_back = (
            f"an open phase started {opened.astimezone(UTC):%Y-%m-%d %H:%M} UTC: "
            "its rows stay in the table for the gate"
        )
    return cutoff


def _archive(
    con: duckdb.DuckDBPyConnection,
    location: str,
    recorded: str,
    cutoff_ts: datetime,
    report: CompactReport,
    after_copy: Callable[[], None] | None,
) -> None:
    days = con.execute(
        "SELECT ts::DATE AS day, count(*), min(ts), max(ts) FROM requests WHERE ts < ? "
        "GROUP BY day ORDER BY day",
        [cutoff_ts],
    ).fetchall()
    if not days:
        return
    batch = uuid.uuid4().hex
    expected = sum(int(d[1]) for d in days)
    # Committed before the COPY, so that a crash leaves a record of whose files to delete.
    con.execute(
        "INSERT OR REPLACE INTO store_settings VALUES (?, ?, ?)",
        [PENDING_SETTING, batch, datetime.now(UTC)],
    )
    columns = ", ".join(REQUEST_COLUMN_NAMES)
    since = sql_literal(cutoff_ts.isoformat())
    staging = None if is_remote(location) else Path(location) / f"{STAGING_PREFIX}{batch}"
    target = sql_literal(str(staging) if staging else join(location, ARCHIVE_TABLE_DIR))
    # APPEND, never OVERWRITE_OR_IGNORE: mixing the two leaves stale duplicates behind.
    copied = con.execute(
        f"COPY (SELECT {columns}, {sql_literal(batch)} AS archive_batch, ts::DATE AS day "
        f"FROM requests WHERE ts < {since}::TIMESTAMPTZ) TO {target} "
        f"(FORMAT parquet, COMPRESSION zstd, PARTITION_BY (day), APPEND, "
        f"FILENAME_PATTERN 'part-{batch}-{{uuid}}')"
    ).fetchall()[0][0]
    if copied != expected:
        raise StoreError(f"archive copy wrote {copied} rows, expected {expected}; nothing deleted")
    if after_copy is not None:
        after_copy()
    if staging is not None:
        _move_into_place(staging, Path(location) / ARCHIVE_TABLE_DIR)
    now = datetime.now(UTC)
    with transaction(con):
        deleted = con.execute("DELETE FROM requests WHERE ts < ?", [cutoff_ts]).fetchall()[0][0]
        if deleted != copied:
            raise StoreError(
                f"deleted {deleted} rows but archived {copied}; rolled back, nothing changed"
            )
        con.execute(
            "INSERT INTO archive_batches SELECT $batch, unnest($days), unnest($rows), "
            "unnest($min_ts), unnest($max_ts), $location, $now",
            {
                "batch": batch,
                "days": [d[0] for d in days],
                "rows": [int(d[1]) for d in days],
                "min_ts": [d[2] for d in days],
                "max_ts": [d[3] for d in days],
                "location": recorded,  # as store_settings records it (may be relative)
                "now": now,
            },
        )
        con.execute("DELETE FROM store_settings WHERE key = ?", [PENDING_SETTING])
    report.batch_id = batch
    report.days = [(d[0], int(d[1])) for d in days]
    report.rows = int(copied)


def _move_into_place(staging: Path, table_dir: Path) -> None:
    """Rename each finished `day=*/part-*.parquet` from the staging folder into the
    archive (the same file system: each rename is atomic), then drop the folder."""
    for part in sorted(staging.glob("day=*/part-*.parquet")):
        day = table_dir / part.parent.name
        day.mkdir(parents=True, exist_ok=True)
        part.rename(day / part.name)
    shutil.rmtree(staging)


#: Ingested local segment files are kept this long for inspection, then deleted: their
#: rows are in the table (and later the archive). A file a second per instance, 7-13 KB
#: each: 0.6-1 GiB a day per instance, 17-31 GiB if kept for the 30-day row retention.
SEGMENT_KEEP_DAYS = 2
#: Ledger rows of deleted local segments are dropped this long after the deletion (the
#: file cannot come back; the ledger grew by 78 B per segment for ever).
LEDGER_KEEP_DAYS = 7


def _delete_segments(
    con: duckdb.DuckDBPyConnection, location: str, older_than: datetime, report: CompactReport
) -> None:
    """Delete segment files ingested before `older_than`: their rows are committed. Then
    forget the ledger rows of files deleted over `LEDGER_KEEP_DAYS` ago (local only: a
    remote file stays until the bucket's lifecycle rules expire it, and its ledger row
    keeps it from being ingested again)."""
    keys = [
        r[0]
        for r in con.execute(
            "SELECT path FROM ingested_segments WHERE status = 'ingested' "
            "AND deleted_at IS NULL AND ingested_at < ? ORDER BY path",
            [older_than],
        ).fetchall()
    ]
    if is_remote(location):
        report.segments_left = len(keys)
        return
    folders = set()
    for key in keys:
        listed = Path(location) / key  # where collect found it; set aside once ingested
        listed.unlink(missing_ok=True)
        (listed.parent / INGESTED_DIR / listed.name).unlink(missing_ok=True)
        folders.add(listed.parent)
    for folder in folders:  # a recycled worker's folder, once empty, goes too
        for empty in (folder / INGESTED_DIR, folder):
            with contextlib.suppress(OSError):
                empty.rmdir()
    now = datetime.now(UTC)
    if keys:
        con.execute(
            "UPDATE ingested_segments SET deleted_at = ? WHERE list_contains(?, path)",
            [now, keys],
        )
    report.segments_deleted = len(keys)
    con.execute(
        "DELETE FROM ingested_segments WHERE deleted_at < ?",
        [now - timedelta(days=LEDGER_KEEP_DAYS)],
    )


def compact(
    paths: DataPaths,
    *,
    retention: int | None = None,
    archive: str | Path | None = None,
    segments: str | Path | None = None,
    relocate_archive: bool = False,
    now: datetime | None = None,
    after_copy: Callable[[], None] | None = None,
    wait_s: float = 15.0,
) -> CompactReport:
    """Archive rows older than the retention window and delete old ingested segments.

    Idempotent: a second run with nothing older than the cutoff changes nothing.
    `retention`: days to keep in the table (default `$ROLLOUT_RETENTION_DAYS`, else 30).
    `now`: the clock (tests). `after_copy`: runs between COPY and DELETE (crash tests).
    """
    started = time.perf_counter()
    days = retention_days(retention)
    moment = (now or datetime.now(UTC)).astimezone(UTC)
    with connect(
        paths.database, archive=archive, relocate_archive=relocate_archive, wait_s=wait_s
    ) as con:
        location = archive_location(con, paths.database)
        recorded = recorded_archive(con)
        assert location is not None and recorded is not None  # migrate() records it
        report = CompactReport(retention_days=days, cutoff=moment.date(), archive=location)
        _sweep_orphans(con, location, report)
        report.cutoff = _cutoff(con, moment.date(), days, report)
        cutoff_ts = datetime.combine(report.cutoff, clock(0), UTC)
        _archive(con, location, recorded, cutoff_ts, report, after_copy)
        found_at = segments_location(paths, segments)
        # Local files go two days after ingest; remote ones are only counted (the
        # bucket's lifecycle rules expire them), against the row retention as before.
        keep = days if is_remote(found_at) else min(days, SEGMENT_KEEP_DAYS)
        _delete_segments(con, found_at, moment - timedelta(days=keep), report)
    report.seconds = time.perf_counter() - started
    return report


def archived_days(con: duckdb.DuckDBPyConnection) -> list[tuple[date, int, int]]:
    """(day, rows, batches) of every archived day, oldest first."""
    return [
        (r[0], int(r[1]), int(r[2]))
        for r in con.execute(
            "SELECT day, sum(rows), count(*) FROM archive_batches GROUP BY day ORDER BY day"
        ).fetchall()
    ]
