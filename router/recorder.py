"""Off-the-request-path recording of metric rows into immutable Parquet segment files.

The request path only appends a tuple to a bounded deque (thread-safe, no lock, no I/O).
A daemon thread drains the deque every `flush_interval_s` or when `flush_rows` rows are
waiting, writes a segment under a temporary name, fsyncs it and renames it into place,
so a reader never sees a half-written file and a crash loses at most the rows still in
memory.

Back-pressure policy: when the disk is slower than the traffic and `max_buffered_rows`
rows are waiting, new rows are dropped (never the request) and counted; the count is
written as a `rows_dropped` router event at the next flush, so the loss is visible in
`router_events` rather than silent (events dropped from a full event buffer are counted
and reported the same way). A failed write puts its rows back in front (the oldest are
kept) and drops the newest beyond the bound, counted the same way. Memory therefore
stays bounded, whether the disk is slow or failing: per stream, at most
`max_buffered_rows` waiting plus the batch being written (up to as many again), so
twice `max_buffered_rows` rows in the worst case.

`close()` is bounded too: if the disk hangs, it gives up after its timeout and logs the
rows it could not write. Rows recorded after `close()` are counted as dropped and logged
(nothing flushes them any more).

A recorder nobody closed (a host that never calls the router's `shutdown()`, as the
legacy router never needed) is closed at interpreter exit, so its last second of rows
still lands. In a child forked from a process that had started it (gunicorn
`--preload`), it starts a flusher of its own: no thread survives a fork, and the
parent's buffered rows are the parent's to write.
"""

from __future__ import annotations

import atexit
import concurrent.futures.thread  # noqa: F401  (see _close_at_exit)
import itertools
import logging
import os
import threading
import time
import uuid
import weakref
from collections import deque
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from router.files import remove_old_files, sync_directory
from router.record import EVENT_SCHEMA, REQUEST_SCHEMA, EventKind, RequestRecord, RouterEvent

log = logging.getLogger(__name__)

SEGMENT_SUFFIX = ".parquet"


class Stream:
    """One kind of row (requests or events) with its own bounded buffer."""

    def __init__(self, name: str, schema: pa.Schema, max_rows: int, noun: str = "rows") -> None:
        self.name = name
        self.noun = noun  # in rows_dropped events: "30 request rows dropped: buffer full"
        self.schema = schema
        self.max_rows = max_rows
        self.buffer: deque[tuple[Any, ...]] = deque()
        self.dropped = 0  # buffer full (or closed); reported as a rows_dropped event
        self.unconvertible = 0  # rows the schema cannot hold; reported the same way
        self.written_rows = 0
        self.written_segments = 0

    def drain(self) -> list[tuple[Any, ...]]:
        count = len(self.buffer)
        return [self.buffer.popleft() for _ in range(count)]

    def requeue(self, rows: list[tuple[Any, ...]]) -> None:
        """Put unwritten rows back in front; drop (and count) the newest over the bound."""
        self.buffer.extendleft(reversed(rows))
        while len(self.buffer) > self.max_rows:
            self.buffer.pop()
            self.dropped += 1


def rows_to_table(rows: list[tuple[Any, ...]], schema: pa.Schema) -> pa.Table:
    columns = list(zip(*rows, strict=True)) if rows else [() for _ in schema]
    arrays = [pa.array(col, type=field.type) for col, field in zip(columns, schema, strict=True)]
    return pa.Table.from_arrays(arrays, schema=schema)


def _table_without_bad_rows(
    rows: list[tuple[Any, ...]], schema: pa.Schema
) -> tuple[pa.Table | None, list[tuple[Any, ...]]]:
    """The rows the schema can hold, as a table and as rows (bad ones found by halving).

    The rows are returned too so that a failed write puts back only these: a bad row is
    dropped and reported once, not again at every retry."""
    try:
        return rows_to_table(rows, schema), rows
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError):
        if len(rows) == 1:
            return None, []
    middle = len(rows) // 2
    left, good_left = _table_without_bad_rows(rows[:middle], schema)
    right, good_right = _table_without_bad_rows(rows[middle:], schema)
    parts = [t for t in (left, right) if t is not None]
    return (pa.concat_tables(parts) if parts else None), good_left + good_right


def write_segment(table: pa.Table, directory: Path, prefix: str, seq: int) -> Path:
    """Write atomically: temporary name, fsync, rename. Returns the final path."""
    directory.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    final = directory / f"{prefix}-{stamp}-{seq:06d}{SEGMENT_SUFFIX}"
    temp = directory / f".{final.name}.tmp"
    with temp.open("wb") as handle:
        pq.write_table(table, handle, compression="zstd")
        handle.flush()
        os.fsync(handle.fileno())
    temp.replace(final)
    sync_directory(directory)
    return final


class SegmentRecorder:
    """Buffers request rows and router events of one router instance and writes segments.

    Segments land in ``<segments_dir>/<instance>/``; one folder per instance keeps many
    processes and machines from ever writing the same name.
    """

    def __init__(
        self,
        segments_dir: Path | str,
        instance: str,
        *,
        flush_rows: int = 5_000,
        flush_interval_s: float = 1.0,
        max_buffered_rows: int = 200_000,
    ) -> None:
        self.directory = Path(segments_dir) / instance
        self.instance = instance
        self.flush_rows = flush_rows
        self.flush_interval_s = flush_interval_s
        self.requests = Stream("requests", REQUEST_SCHEMA, max_buffered_rows, "request rows")
        self.events = Stream(
            "events", EVENT_SCHEMA, max(1_000, max_buffered_rows // 10), "router events"
        )
        self._seq = itertools.count(1)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._io_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        #: Set by close(): nothing flushes any more, so later rows are counted as dropped.
        self._closed = False
        self._warned_closed = False

    # -- hot path ---------------------------------------------------------------------
    def record(self, row: RequestRecord) -> None:
        if self._closed:
            self._drop_after_close(self.requests)
            return
        buffer = self.requests.buffer
        if len(buffer) >= self.requests.max_rows:
            self.requests.dropped += 1
            return
        buffer.append(row)
        if len(buffer) >= self.flush_rows:
            self._wake.set()

    def event(
        self,
        kind: EventKind,
        detail: str,
        *,
        config_version: int | None = None,
        backend: str | None = None,
    ) -> RouterEvent:
        event = self._new_event(kind, detail, config_version=config_version, backend=backend)
        if self._closed:
            self._drop_after_close(self.events)
        elif len(self.events.buffer) < self.events.max_rows:
            self.events.buffer.append(event)
        else:
            self.events.dropped += 1
        return event

    def _new_event(
        self,
        kind: EventKind,
        detail: str,
        *,
        config_version: int | None = None,
        backend: str | None = None,
    ) -> RouterEvent:
        return RouterEvent(
            event_id=uuid.uuid4().hex,
            ts=datetime.now(UTC),
            router_instance=self.instance,
            kind=kind.value,
            config_version=config_version,
            backend=backend,
            detail=detail,
        )

    def _drop_after_close(self, stream: Stream) -> None:
        """Count a row that came too late (a request that outlived shutdown); say so once.

        Dropped, not written on the spot: the caller is the request path (often the event
        loop), where a synchronous one-row segment would be disk I/O per late request."""
        stream.dropped += 1
        if not self._warned_closed:
            self._warned_closed = True
            log.warning(
                "segment recorder %s is closed: rows recorded from now on are dropped "
                "(counted in requests.dropped / events.dropped)",
                self.instance,
            )

    # -- background -------------------------------------------------------------------
    def start(self) -> SegmentRecorder:
        _started.add(self)
        if self._thread is None:
            if self.directory.is_dir():  # what an earlier process of this instance left
                remove_old_files(self.directory, f".*{SEGMENT_SUFFIX}.tmp")
            self._spawn_flusher()
        return self

    def _spawn_flusher(self) -> None:
        self._thread = threading.Thread(
            target=self._run, name=f"segment-recorder-{self.instance}", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.flush_interval_s)
            self._wake.clear()
            try:
                self.flush()
            except Exception:  # keep recording; the rows stay buffered for the next try
                log.exception("segment flush failed; will retry")
                time.sleep(self.flush_interval_s)

    def flush(self) -> list[Path]:
        """Write whatever is buffered now. Safe to call from any thread."""
        with self._io_lock:
            return self._flush_locked()

    def _flush_locked(self) -> list[Path]:
        written: list[Path] = []
        for stream in (self.requests, self.events):
            self._report_losses()  # before the events are drained: written in this flush
            rows = stream.drain()
            if not rows:
                continue
            table, good = _table_without_bad_rows(rows, stream.schema)
            # One unconvertible row must not stop recording for good: drop it, count it,
            # say so in router_events, write the rest.
            stream.unconvertible += len(rows) - len(good)
            if table is None:
                continue
            try:
                path = write_segment(table, self.directory, stream.name, next(self._seq))
            except Exception:  # I/O: keep the good rows for the next try, within the bound
                stream.requeue(good)
                raise
            stream.written_rows += table.num_rows
            stream.written_segments += 1
            written.append(path)
        return written

    def _report_losses(self) -> None:
        """Turn the loss counters into rows_dropped events. A counter goes down only by
        what an event buffered says: while the event buffer is full the count waits for
        a later flush, so memory stays bounded and no loss goes unsaid."""
        for stream in (self.requests, self.events):
            count = stream.dropped
            if count and self._say_lost(f"{count} {stream.noun} dropped: buffer full"):
                stream.dropped -= count
            count = stream.unconvertible
            why = "values the schema cannot hold"
            if count and self._say_lost(f"{count} {stream.name} row(s) dropped: {why}"):
                stream.unconvertible -= count

    def _say_lost(self, detail: str) -> bool:
        """Buffer a rows_dropped event if there is room (even while closing: the final
        flush writes it)."""
        if len(self.events.buffer) >= self.events.max_rows:
            return False
        self.events.buffer.append(self._new_event(EventKind.ROWS_DROPPED, detail))
        return True

    def close(self, timeout_s: float = 30.0) -> None:
        """Stop the flusher and write everything still buffered, within `timeout_s`.

        Never raises and never hangs: a failed final write is logged (the rows stay in
        memory until the process ends); a flusher stuck in a write (a hung mount) is
        given up on, and the rows still buffered are counted as dropped and logged."""
        deadline = time.monotonic() + timeout_s
        self._closed = True
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)
            self._thread = None
        if not self._io_lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            rows, events = len(self.requests.drain()), len(self.events.drain())
            self.requests.dropped += rows
            self.events.dropped += events
            log.error(
                "segment writer stuck in a write for %.0f s: %d request rows and %d events "
                "dropped unwritten (plus the write in progress)",
                timeout_s,
                rows,
                events,
            )
            return
        try:
            self._flush_locked()
        except Exception:
            log.exception(
                "final segment flush failed; %d rows unwritten", len(self.requests.buffer)
            )
        finally:
            self._io_lock.release()

    def _after_fork(self) -> None:
        """In a forked child: no flusher came along, a lock may be held by a thread that
        does not exist here, and the rows buffered before the fork are the parent's."""
        self._io_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        for stream in (self.requests, self.events):
            stream.buffer.clear()
            stream.dropped = stream.unconvertible = 0
        running, self._thread = self._thread is not None, None
        if running and not self._closed:
            # Not start(): its clean-up of temporary files would take the parent's write
            # in progress (same folder until the router gives the child its own id).
            self._spawn_flusher()

    def __enter__(self) -> SegmentRecorder:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


#: Recorders started in this process and not yet garbage: closed at exit, restarted in a
#: forked child.
_started: weakref.WeakSet[SegmentRecorder] = weakref.WeakSet()


@atexit.register
def _close_at_exit() -> None:
    """The first write of a short-lived process may come only now, and pyarrow's first
    conversion imports pandas, which imports `concurrent.futures.thread`: that module
    registers an exit hook, refused this late ("can't register atexit after shutdown").
    It is imported with this module instead."""
    for recorder in list(_started):
        if not recorder._closed:
            waiting = len(recorder.requests.buffer)
            recorder.close(timeout_s=10.0)
            if waiting:
                log.warning(
                    "segment recorder %s was never closed: closed at interpreter exit "
                    "(%d request rows were waiting); call the router's shutdown() to "
                    "write its last heartbeat too",
                    recorder.instance,
                    waiting,
                )


def _after_fork_in_child() -> None:
    for recorder in list(_started):
        recorder._after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


class NullRecorder(SegmentRecorder):
    """Used when `PROD_LB_PERF_COMPARISON=false`: rows are not kept, events still are."""

    def record(self, row: RequestRecord) -> None:
        return None
