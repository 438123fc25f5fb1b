"""Exactly-once collection of segment files into the metrics database.

New files are checked (readable footer, expected columns), then ingested in ONE
transaction together with their ledger rows in `ingested_segments`. A crash before the
commit leaves neither rows nor ledger entries; a crash after it leaves both, and the
ledger makes the next run skip those files. Every row keeps its segment's ledger key in
`requests.segment`, so "rows per segment = ledger rows" can be audited with one query.

Only a file whose CONTENT is bad is quarantined: not Parquet, truncated, corrupt pages,
wrong columns or types, values that do not convert or break a NOT NULL (see
`is_bad_file`). It goes to `quarantine/` with its reason in `router_events` (recorded in
the same transaction), while the others land. Any other DuckDB error (out of memory,
disk full, network, interrupt, internal error) says nothing about the file: the batch
rolls back, nothing is recorded or moved, and `TransientIngestError` is raised, so the
next run retries the same files. `collect(retry_quarantined=True)` gives quarantined
files another chance: it moves them back, forgets their ledger rows and ingests them;
one still bad is quarantined again.

Segments live in `<location>/<instance>/<kind>-<stamp>-<seq>.parquet`, one folder per
router instance (many processes and machines never write the same name). The location
is a local folder by default, or any URL DuckDB reads (`s3://...`): then files are
listed and checked through DuckDB, and a bad file is only marked quarantined in the
ledger (object stores have no cheap move).

Rows carry their `config_version`, and views attribute rows to phases through it, so a
segment that arrives late (a router that was offline) still counts for the phase it
was routed under.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pyarrow as pa

from flows.paths import DataPaths
from flows.store.database import StoreError, connect, transaction
from flows.store.locations import is_remote, join, segments_location
from router.record import EVENT_SCHEMA, REQUEST_SCHEMA, EventKind
from router.recorder import SEGMENT_SUFFIX

log = logging.getLogger(__name__)

KINDS = {"requests": ("requests", REQUEST_SCHEMA), "events": ("router_events", EVENT_SCHEMA)}

#: DuckDB's name for each Arrow type a segment may use (footers are checked by DuckDB).
_DUCKDB_TYPES = {
    pa.string(): "VARCHAR",
    pa.timestamp("us", tz="UTC"): "TIMESTAMP WITH TIME ZONE",
    pa.int64(): "BIGINT",
    pa.int32(): "INTEGER",
    pa.bool_(): "BOOLEAN",
    pa.float64(): "DOUBLE",
}
_INTEGER_NAMES = {"TINYINT", "SMALLINT", "INTEGER", "BIGINT"}

#: The ledger key "<instance>/<file name>", computed per row from DuckDB's `filename`
#: column (a constant per file, so it costs little).
_SEGMENT_KEY_SQL = "regexp_extract(filename, '[^/]+/[^/]+$')"

#: Where a local segment goes once its rows are committed: `<instance>/ingested/`. Every
#: collect lists the instance folders, and they grew by a file a second per instance for
#: the whole retention window: after 12 instance-days, a minute per tick spent listing,
#: holding the write lock. Compaction deletes the set-aside files (`_delete_segments`).
INGESTED_DIR = "ingested"


def set_aside(segment: Segment) -> None:
    """Move an ingested local segment out of the listed folder (a remote one stays).

    Best effort: the ledger already keeps the file from landing twice, and compaction
    deletes it where it is. A folder the collector may read but not write (routers and
    the worker under different users) must not stop ingestion."""
    global _told_read_only
    if is_remote(segment.path):
        return
    source = Path(segment.path)
    target = source.parent / INGESTED_DIR
    try:
        target.mkdir(exist_ok=True)
        source.replace(target / source.name)
    except FileNotFoundError:  # moved or deleted meanwhile
        pass
    except OSError as exc:
        if not _told_read_only:
            _told_read_only = True
            log.warning(
                "cannot move ingested segments out of %s (%s): they stay listed, which "
                "slows every collect as they pile up; let the collector write there",
                source.parent,
                exc.strerror or exc,
            )


_told_read_only = False


class TransientIngestError(StoreError):
    """DuckDB failed for a reason that is not the segment's content (memory, disk, network,
    interrupt, internal error). Nothing was recorded or moved: the next run retries."""


def is_bad_file(exc: duckdb.Error) -> bool:
    """True if DuckDB's error is about the file's content (quarantine it), False if it is
    about the environment (retry later).

    By class, as DuckDB 2.0.1 raises them on corrupt, truncated and mistyped segments:
    InvalidInputException (not Parquet, no magic bytes, bad pages, ZSTD failure, invalid
    UTF-8), DataError (ConversionException: a value out of the column's range),
    IntegrityError (ConstraintException: NULL in a NOT NULL column), and the bare
    `duckdb.Error` that the Parquet reader's own errors carry (Thrift "Invalid data",
    "Parquet metadata is corrupt", "Out of buffer"). Memory pressure raises
    OutOfMemoryException; missing files, disk and network problems IOException or
    HTTPException; Ctrl-C InterruptException: none of those is quarantined.
    """
    if isinstance(exc, (duckdb.InvalidInputException, duckdb.DataError, duckdb.IntegrityError)):
        return True
    if type(exc) is duckdb.Error:
        return True
    if isinstance(exc, duckdb.IOException) and not isinstance(exc, duckdb.HTTPException):
        # Message match, because the class cannot tell: a footer whose offsets point past
        # the end of a truncated or corrupt file raises the same IOException as a failing
        # disk. Only this short-read text, seen on corrupt files, blames the file.
        return "Could not read enough bytes from file" in str(exc)
    return False


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _transient(exc: duckdb.Error, segments: list[Segment]) -> TransientIngestError:
    what = segments[0].key if len(segments) == 1 else f"{len(segments)} segment files"
    return TransientIngestError(
        f"collect stopped on {what}: {type(exc).__name__}: {_first_line(exc)}. "
        "The error is not about the file's content, so nothing was recorded or quarantined "
        "for it; run collect again once the cause is fixed."
    )


@dataclass(frozen=True)
class Segment:
    path: str  # local absolute path or URL, as DuckDB reads it
    key: str  # "<instance>/<file name>": the ledger key, stable wherever the root moves
    instance: str
    kind: str
    size: int = 0


@dataclass
class IngestReport:
    segments: int = 0
    rows: int = 0
    events: int = 0
    quarantined: list[tuple[str, str]] = field(default_factory=list)
    retried: list[str] = field(default_factory=list)  # quarantined keys given another try
    seconds: float = 0.0

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0


def _segment(path: str) -> Segment | None:
    parts = path.rstrip("/").split("/")
    if len(parts) < 2:
        return None
    name, instance = parts[-1], parts[-2]
    kind = name.split("-", 1)[0]
    if name.startswith(".") or not name.endswith(SEGMENT_SUFFIX):
        return None
    # A Parquet file under another name is not ignored (it would sit there forever,
    # unexplained): it is quarantined with the reason.
    return Segment(path, f"{instance}/{name}", instance, kind if kind in KINDS else UNKNOWN_KIND)


def _utf8_named(root: Path, path: Path) -> Path:
    """`path`, renamed if its instance folder or file name is not UTF-8 (DuckDB takes
    only UTF-8 paths and keys; one such file stopped every ingest and tick). Undecodable
    bytes become U+FFFD plus a digest of the original name, so no two names collide."""
    relative = path.relative_to(root)
    try:
        str(relative).encode()
        return path
    except UnicodeEncodeError:
        pass
    raw = bytes(relative)
    digest = hashlib.sha256(raw).hexdigest()[:8]
    instance, name = (
        part.encode(errors="surrogateescape").decode(errors="replace") for part in relative.parts
    )
    stem = name.removesuffix(SEGMENT_SUFFIX)
    target = root / instance / f"{stem}-{digest}{SEGMENT_SUFFIX}"
    target.parent.mkdir(exist_ok=True)
    path.rename(target)
    log.warning("segment %r renamed to %s: DuckDB reads UTF-8 paths only", str(relative), target)
    return target


def discover(location: str | Path, con: duckdb.DuckDBPyConnection | None = None) -> list[Segment]:
    """Finished segment files, by instance then name. Temporary `.name.tmp` files are skipped.

    A remote location is listed with DuckDB's `glob` (needs `con`).
    """
    text = str(location)
    found: list[Segment] = []
    if is_remote(text):
        if con is None:
            raise ValueError("listing a remote segment location needs a DuckDB connection")
        rows = con.execute(
            "SELECT file FROM glob(?) ORDER BY file", [join(text, "*", f"*{SEGMENT_SUFFIX}")]
        ).fetchall()
        found = [s for s in (_segment(r[0]) for r in rows) if s is not None]
    else:
        root = Path(text)
        if not root.is_dir():
            return found
        for instance_dir in sorted(p for p in root.iterdir() if p.is_dir()):
            for path in sorted(instance_dir.glob(f"*{SEGMENT_SUFFIX}")):
                try:
                    path = _utf8_named(root, path)
                except FileNotFoundError:  # gone since the listing
                    continue
                segment = _segment(str(path))
                if segment is None:
                    continue
                try:  # the ledger's `bytes` for a file quarantined before its footer is read
                    size = path.lstat().st_size
                except FileNotFoundError:  # gone since the listing (moved, retention)
                    continue
                found.append(replace(segment, size=size))
    return found


UNKNOWN_KIND = "unknown"


def _expected(kind: str) -> dict[str, str]:
    schema: pa.Schema = KINDS[kind][1]
    return {f.name: _DUCKDB_TYPES[f.type] for f in schema}


def _verdict(kind: str, columns: dict[str, str]) -> str | None:
    """None if a file with these (column -> DuckDB type) can be ingested, else why not."""
    expected = _expected(kind)
    missing = [name for name in expected if name not in columns]
    if missing:
        return f"missing columns {missing}"
    for name, want in expected.items():
        have = columns[name]
        if have != want and not (have in _INTEGER_NAMES and want in _INTEGER_NAMES):
            return f"column {name} has type {have}, expected {want}"
    return None


_FOOTERS_SQL = """
SELECT m.file_name, m.num_rows, m.file_size_bytes,
       map(list(s.name), list(s.duckdb_type)) AS columns
FROM parquet_file_metadata($files) m
JOIN parquet_schema($files) s ON s.file_name = m.file_name AND s.duckdb_type IS NOT NULL
GROUP BY ALL
"""


def _not_a_file(path: Path) -> bool:
    """A directory, or a link to nothing. (A file that is simply gone is not blamed: it
    was deleted or moved while we looked, which the next run sees.)"""
    return path.is_dir() or (path.is_symlink() and not path.exists())


def check_segments(
    con: duckdb.DuckDBPyConnection, segments: list[Segment]
) -> list[tuple[Segment, int, str | None]]:
    """(segment with its size, rows, None) or (segment, 0, reason) for each file.

    Reads only footers, all files in one DuckDB query (C++, parallel, works on any
    location DuckDB reads); when a footer is unreadable, again file by file so that only
    the bad file is blamed. An error that is not about a file's content raises
    `TransientIngestError` instead of blaming anyone.
    """
    if not segments:
        return []
    odd = [s for s in segments if not is_remote(s.path) and _not_a_file(Path(s.path))]
    if odd:
        # A directory or a dangling link under a segment's name: DuckDB's "no files
        # found" on it is not about content, and stopped every file of the batch.
        return [(s, 0, "not a regular file (a directory or a dangling link)") for s in odd] + (
            check_segments(con, [s for s in segments if s not in odd])
        )
    if any(s.kind == UNKNOWN_KIND for s in segments):
        named = f"not a segment name (expected {' or '.join(f'{k}-*' for k in KINDS)})"
        return [(s, 0, named) for s in segments if s.kind == UNKNOWN_KIND] + check_segments(
            con, [s for s in segments if s.kind != UNKNOWN_KIND]
        )
    try:
        rows = con.execute(_FOOTERS_SQL, {"files": [s.path for s in segments]}).fetchall()
    except duckdb.Error as exc:
        if not is_bad_file(exc):
            raise _transient(exc, segments) from exc
        if len(segments) == 1:
            return [(segments[0], 0, f"unreadable parquet: {_first_line(exc)}")]
        return [checked for s in segments for checked in check_segments(con, [s])]
    footers = {r[0]: r[1:] for r in rows}
    checked: list[tuple[Segment, int, str | None]] = []
    for s in segments:
        footer = footers.get(s.path)
        if footer is None:
            checked.append((s, 0, "no columns found in the footer"))
            continue
        num_rows, size, columns = footer
        sized = Segment(s.path, s.key, s.instance, s.kind, int(size or 0))
        reason = _verdict(s.kind, dict(columns))
        checked.append((sized, 0 if reason else int(num_rows), reason))
    return checked


def _event_id(key: str, now: datetime) -> str:
    """Unique per quarantine, not per file: a file retried and quarantined again gets a
    second event (the ledger's primary key already stops a double quarantine in a run)."""
    return "quarantine-" + hashlib.sha256(f"{key}@{now.isoformat()}".encode()).hexdigest()[:24]


def _insert_ledger(
    con: duckdb.DuckDBPyConnection,
    entries: list[tuple[Segment, str, int, str | None]],
    now: datetime,
) -> None:
    """One INSERT for the whole batch: `executemany` costs about 1 ms per row."""
    if not entries:
        return
    con.execute(
        "INSERT INTO ingested_segments "
        "(path, router_instance, kind, status, rows, bytes, ingested_at, reason) "
        "SELECT unnest($path), unnest($instance), unnest($kind), unnest($status), "
        "unnest($rows), unnest($bytes), $now, unnest($reason)",
        {
            "path": [s.key for s, _, _, _ in entries],
            "instance": [s.instance for s, _, _, _ in entries],
            "kind": [s.kind for s, _, _, _ in entries],
            "status": [status for _, status, _, _ in entries],
            "rows": [rows for _, _, rows, _ in entries],
            "bytes": [s.size for s, _, _, _ in entries],
            "now": now,
            "reason": [reason for _, _, _, reason in entries],
        },
    )


def _ingest_batch(
    con: duckdb.DuckDBPyConnection,
    good: list[tuple[Segment, int]],
    bad: list[tuple[Segment, str]],
    before_commit: Callable[[], None] | None,
) -> None:
    now = datetime.now(UTC)
    with transaction(con):
        for kind, (table, schema) in KINDS.items():
            files = [s.path for s, _ in good if s.kind == kind]
            if not files:
                continue
            # Name the columns: a newer router may add some, which must not fail the batch.
            columns = ", ".join(schema.names)
            if table == "requests":
                con.execute(
                    f"INSERT INTO requests ({columns}, segment) SELECT {columns}, "
                    f"{_SEGMENT_KEY_SQL} FROM read_parquet(?, union_by_name = true, "
                    "filename = true)",
                    [files],
                )
            else:
                con.execute(
                    f"INSERT INTO {table} ({columns}) SELECT {columns} FROM read_parquet(?, "
                    "union_by_name = true) ON CONFLICT DO NOTHING",
                    [files],
                )
        _insert_ledger(
            con,
            [(s, "ingested", rows, None) for s, rows in good]
            + [(s, "quarantined", 0, reason) for s, reason in bad],
            now,
        )
        for segment, reason in bad:
            con.execute(
                "INSERT INTO router_events VALUES (?, ?, ?, ?, NULL, NULL, ?) "
                "ON CONFLICT DO NOTHING",
                [
                    _event_id(segment.key, now),
                    now,
                    segment.instance,
                    EventKind.SEGMENT_QUARANTINED.value,
                    f"{segment.key}: {reason}",
                ],
            )
        if before_commit is not None:
            before_commit()


def _move_to_quarantine(paths: DataPaths, segment: Segment, reason: str) -> None:
    """Local segments only; a remote one stays put, and the ledger keeps it skipped."""
    if is_remote(segment.path):
        return
    target = paths.quarantine / segment.instance
    target.mkdir(parents=True, exist_ok=True)
    source = Path(segment.path)
    if source.exists() or source.is_symlink():  # a dangling link moves too
        shutil.move(str(source), target / source.name)
    (target / f"{source.name}.reason.txt").write_text(reason + "\n")


def _move_back(paths: DataPaths, location: str | Path, ledger: dict[str, str]) -> None:
    """Local quarantined files go back from `quarantine/<instance>/` to the segments
    location (a remote one never left it)."""
    if is_remote(str(location)):
        return
    for key, status in ledger.items():
        source, target = paths.quarantine / key, Path(location) / key
        if status == "quarantined" and source.exists() and not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(source, target)


def _forget_quarantined(
    con: duckdb.DuckDBPyConnection,
    paths: DataPaths,
    ledger: dict[str, str],
    found: list[Segment],
) -> list[str]:
    """Delete the quarantined ledger rows of files present in `found`, so this run checks
    and ingests them again; returns their keys.

    This cannot land a file twice: a quarantined file never had rows (rows and ledger row
    are one transaction, and only a file that failed gets a quarantined row). The
    `router_events` history stays.
    """
    released = [s.key for s in found if ledger.get(s.key) == "quarantined"]
    if released:
        with transaction(con):
            con.execute(
                "DELETE FROM ingested_segments WHERE status = 'quarantined' "
                "AND list_contains($keys, path)",
                {"keys": released},
            )
    for key in released:
        (paths.quarantine / f"{key}.reason.txt").unlink(missing_ok=True)
        del ledger[key]
    return released


def collect(
    paths: DataPaths,
    *,
    segments: str | Path | None = None,
    batch_files: int = 500,
    before_commit: Callable[[], None] | None = None,
    wait_s: float = 15.0,
    retry_quarantined: bool = False,
) -> IngestReport:
    """Ingest every new segment exactly once.

    `segments`: where to look (default `$ROLLOUT_SEGMENTS_URL`, else `<data dir>/segments`).
    `before_commit` runs inside each transaction just before COMMIT (crash tests).
    `wait_s`: how long to wait for a reader or another writer to release the database.
    `retry_quarantined`: first move quarantined files back and forget their ledger rows,
    so they are checked and ingested again (one still bad is quarantined again).
    Raises `TransientIngestError` when DuckDB fails for a reason other than a file's
    content; the failing batch is rolled back and the next run retries it.
    """
    started = time.perf_counter()
    report = IngestReport()
    location = segments_location(paths, segments)
    with connect(paths.database, wait_s=wait_s) as con:
        if retry_quarantined:
            _move_back(paths, location, _ledger(con, "status = 'quarantined'")[0])
        found = discover(location, con)
        # The ledger rows of the files present only: the whole ledger (a row per segment
        # ever, ~90k a day per instance) was read on every tick, 5 s and 0.3 GB at 1 M.
        ledger, reasons = _ledger(
            con, "path IN (SELECT unnest($keys))", {"keys": [s.key for s in found]}
        )
        if retry_quarantined:
            report.retried = _forget_quarantined(con, paths, ledger, found)
        # A quarantined file the previous run could not move yet: move it now. An
        # ingested one still listed (a run stopped between its commit and the move, or
        # a data dir from before `ingested/`) is set aside now.
        for segment in found:
            if ledger.get(segment.key) == "ingested":
                set_aside(segment)
            elif ledger.get(segment.key) == "quarantined":
                # The run that quarantined it stopped before moving it: its reason stands.
                reason = reasons.get(segment.key) or "quarantined by an earlier run"
                _move_to_quarantine(paths, segment, reason)
        new = [s for s in found if s.key not in ledger]
        for batch in _chunks(new, batch_files):
            good: list[tuple[Segment, int]] = []
            bad: list[tuple[Segment, str]] = []
            for checked, rows, reason in check_segments(con, batch):
                if reason is None:
                    good.append((checked, rows))
                else:
                    bad.append((checked, reason))
            try:
                _ingest_batch(con, good, bad, before_commit)
            except duckdb.Error as exc:
                if not is_bad_file(exc):
                    raise _transient(exc, batch) from exc
                # A file passed the footer check but its pages are bad: isolate it.
                good, more_bad = _ingest_one_by_one(con, good, before_commit)
                bad += more_bad
                _ingest_batch(con, [], bad, None)
            for segment, reason in bad:
                _move_to_quarantine(paths, segment, reason)
            for segment, _ in good:
                set_aside(segment)
            report.segments += len(good)
            report.rows += sum(rows for s, rows in good if s.kind == "requests")
            report.events += sum(rows for s, rows in good if s.kind == "events")
            report.quarantined += [(s.key, reason) for s, reason in bad]
    report.seconds = time.perf_counter() - started
    return report


def _ledger(
    con: duckdb.DuckDBPyConnection, where: str, params: dict[str, object] | None = None
) -> tuple[dict[str, str], dict[str, str | None]]:
    """({path: status}, {path: reason}) of the ledger rows matching `where`."""
    rows = con.execute(
        f"SELECT path, status, reason FROM ingested_segments WHERE {where}", params or {}
    ).fetchall()
    return {path: status for path, status, _ in rows}, {path: reason for path, _, reason in rows}


def _ingest_one_by_one(
    con: duckdb.DuckDBPyConnection,
    good: list[tuple[Segment, int]],
    before_commit: Callable[[], None] | None,
) -> tuple[list[tuple[Segment, int]], list[tuple[Segment, str]]]:
    """Each file in its own transaction: the ones that fail on their content are blamed;
    any other error stops the run (files landed so far stay, with their ledger rows)."""
    landed, bad = [], []
    for item in good:
        try:
            _ingest_batch(con, [item], [], before_commit)
            landed.append(item)
        except duckdb.Error as exc:
            if not is_bad_file(exc):
                raise _transient(exc, [item[0]]) from exc
            values = isinstance(exc, (duckdb.DataError, duckdb.IntegrityError))
            what = "values the table refuses" if values else "unreadable data pages"
            bad.append((item[0], f"{what}: {_first_line(exc)}"))
    return landed, bad


def _chunks(items: list[Segment], size: int) -> Iterable[list[Segment]]:
    for index in range(0, len(items), size):
        yield items[index : index + size]
