"""Exactly-once collection of segment files into the metrics database.

New files are checked (readable footer, expected columns), then ingested in ONE
transaction together with their ledger rows in `ingested_segments`. A crash before the
commit leaves neither rows nor ledger entries; a crash after it leaves both, and the
ledger makes the next run skip those files. A file that cannot be read goes to
`quarantine/` with its reason in `router_events` (recorded in the same transaction),
while the others land.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from flows.paths import DataPaths
from flows.store.database import connect
from router.record import EVENT_SCHEMA, REQUEST_SCHEMA, EventKind
from router.recorder import SEGMENT_SUFFIX

KINDS = {"requests": ("requests", REQUEST_SCHEMA), "events": ("router_events", EVENT_SCHEMA)}


@dataclass(frozen=True)
class Segment:
    path: Path
    key: str  # "<instance>/<file name>": the ledger key, stable wherever the root moves
    instance: str
    kind: str


@dataclass
class IngestReport:
    segments: int = 0
    rows: int = 0
    events: int = 0
    quarantined: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0


def discover(segments_dir: Path) -> list[Segment]:
    """Finished segment files, oldest name first. Temporary `.name.tmp` files are skipped."""
    found = []
    if not segments_dir.is_dir():
        return found
    for instance_dir in sorted(p for p in segments_dir.iterdir() if p.is_dir()):
        for path in sorted(instance_dir.glob(f"*{SEGMENT_SUFFIX}")):
            if path.name.startswith("."):
                continue
            kind = path.name.split("-", 1)[0]
            if kind not in KINDS:
                continue
            found.append(Segment(path, f"{instance_dir.name}/{path.name}", instance_dir.name, kind))
    return found


def check_segment(segment: Segment) -> tuple[int, str | None]:
    """(rows, None) if the file is ingestible, else (0, reason)."""
    expected: pa.Schema = KINDS[segment.kind][1]
    try:
        metadata = pq.read_metadata(segment.path)
        schema = pq.read_schema(segment.path)
    except Exception as exc:  # pyarrow raises several types for a bad footer
        return 0, f"unreadable parquet: {exc}"
    missing = [name for name in expected.names if name not in schema.names]
    if missing:
        return 0, f"missing columns {missing}"
    for name in expected.names:
        have, want = schema.field(name).type, expected.field(name).type
        if have != want and not (pa.types.is_integer(have) and pa.types.is_integer(want)):
            return 0, f"column {name} has type {have}, expected {want}"
    return metadata.num_rows, None


def _event_id(key: str) -> str:
    return "quarantine-" + hashlib.sha256(key.encode()).hexdigest()[:24]


def _ingest_batch(
    con: duckdb.DuckDBPyConnection,
    good: list[tuple[Segment, int]],
    bad: list[tuple[Segment, str]],
    before_commit: Callable[[], None] | None,
) -> None:
    now = datetime.now(UTC)
    con.execute("BEGIN TRANSACTION")
    try:
        for kind, (table, _schema) in KINDS.items():
            files = [str(s.path) for s, _ in good if s.kind == kind]
            if not files:
                continue
            insert = (
                f"INSERT INTO {table} BY NAME SELECT * FROM read_parquet(?, union_by_name=true)"
            )
            if table == "router_events":
                insert += " ON CONFLICT DO NOTHING"
            con.execute(insert, [files])
        ledger = [
            (s.key, s.instance, s.kind, "ingested", rows, s.path.stat().st_size, now, None)
            for s, rows in good
        ] + [
            (s.key, s.instance, s.kind, "quarantined", 0, _size(s.path), now, reason)
            for s, reason in bad
        ]
        if ledger:
            con.executemany("INSERT INTO ingested_segments VALUES (?, ?, ?, ?, ?, ?, ?, ?)", ledger)
        for segment, reason in bad:
            con.execute(
                "INSERT INTO router_events VALUES (?, ?, ?, ?, NULL, NULL, ?) "
                "ON CONFLICT DO NOTHING",
                [
                    _event_id(segment.key),
                    now,
                    segment.instance,
                    EventKind.SEGMENT_QUARANTINED.value,
                    f"{segment.key}: {reason}",
                ],
            )
        if before_commit is not None:
            before_commit()
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _move_to_quarantine(paths: DataPaths, segment: Segment, reason: str) -> None:
    target = paths.quarantine / segment.instance
    target.mkdir(parents=True, exist_ok=True)
    if segment.path.exists():
        shutil.move(str(segment.path), target / segment.path.name)
    (target / f"{segment.path.name}.reason.txt").write_text(reason + "\n")


def collect(
    paths: DataPaths,
    *,
    batch_files: int = 500,
    before_commit: Callable[[], None] | None = None,
) -> IngestReport:
    """Ingest every new segment under `paths.segments` exactly once."""
    started = time.perf_counter()
    report = IngestReport()
    with connect(paths.database) as con:
        ledger = dict(con.execute("SELECT path, status FROM ingested_segments").fetchall())
        # A quarantined file the previous run could not move yet: move it now.
        pending = [s for s in discover(paths.segments) if s.key in ledger]
        for segment in pending:
            if ledger[segment.key] == "quarantined":
                _move_to_quarantine(paths, segment, "quarantined by an earlier run")
        new = [s for s in discover(paths.segments) if s.key not in ledger]
        for batch in _chunks(new, batch_files):
            good: list[tuple[Segment, int]] = []
            bad: list[tuple[Segment, str]] = []
            for segment in batch:
                rows, reason = check_segment(segment)
                if reason is None:
                    good.append((segment, rows))
                else:
                    bad.append((segment, reason))
            try:
                _ingest_batch(con, good, bad, before_commit)
            except duckdb.Error:
                # A file passed the footer check but its pages are bad: isolate it.
                good, more_bad = _ingest_one_by_one(con, good, before_commit)
                bad += more_bad
                _ingest_batch(con, [], bad, None)
            for segment, reason in bad:
                _move_to_quarantine(paths, segment, reason)
            report.segments += len(good)
            report.rows += sum(rows for s, rows in good if s.kind == "requests")
            report.events += sum(rows for s, rows in good if s.kind == "events")
            report.quarantined += [(s.key, reason) for s, reason in bad]
    report.seconds = time.perf_counter() - started
    return report


def _ingest_one_by_one(
    con: duckdb.DuckDBPyConnection,
    good: list[tuple[Segment, int]],
    before_commit: Callable[[], None] | None,
) -> tuple[list[tuple[Segment, int]], list[tuple[Segment, str]]]:
    landed, bad = [], []
    for item in good:
        try:
            _ingest_batch(con, [item], [], before_commit)
            landed.append(item)
        except duckdb.Error as exc:
            bad.append((item[0], f"unreadable data pages: {str(exc).splitlines()[0]}"))
    return landed, bad


def _chunks(items: list[Segment], size: int) -> Iterable[list[Segment]]:
    for index in range(0, len(items), size):
        yield items[index : index + size]
