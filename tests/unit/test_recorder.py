"""The segment recorder's back-pressure: memory stays bounded and every loss is counted
in `router_events`, whether the disk is slow (buffer full) or failing (writes raise)."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import router.recorder as recorder_module
from flows.bench.synthetic import make_records
from router.record import EventKind
from router.recorder import SegmentRecorder
from router.router_config import RouterConfig


def _rows(tmp_path: Path, stream: str) -> list[dict]:
    files = sorted((tmp_path / "segments" / "r1").glob(f"{stream}-*.parquet"))
    return [row for f in files for row in pq.read_table(f).to_pylist()]


def test_a_full_buffer_drops_new_rows_and_says_how_many(tmp_path: Path) -> None:
    recorder = SegmentRecorder(tmp_path / "segments", "r1", max_buffered_rows=100)
    records = make_records(130, seed=3)
    for record in records:  # no flusher running: the disk "never keeps up"
        recorder.record(record)
    assert len(recorder.requests.buffer) == 100
    recorder.flush()
    kept = _rows(tmp_path, "requests")
    assert [r["request_id"] for r in kept] == [r.request_id for r in records[:100]]
    (event,) = [e for e in _rows(tmp_path, "events") if e["kind"] == "rows_dropped"]
    assert event["detail"] == "30 request rows dropped: buffer full"


def test_a_failing_disk_keeps_memory_bounded_and_the_oldest_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = SegmentRecorder(tmp_path / "segments", "r1", max_buffered_rows=100)
    records = iter(make_records(600, seed=4))
    real_write = recorder_module.write_segment

    def disk_full(*args: object, **kwargs: object) -> Path:
        for _ in range(100):  # traffic keeps arriving while the write hangs, then fails
            recorder.record(next(records))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(recorder_module, "write_segment", disk_full)
    first_batch = [next(records) for _ in range(100)]
    for record in first_batch:
        recorder.record(record)
    for _ in range(5):
        with pytest.raises(OSError):
            recorder.flush()
        assert len(recorder.requests.buffer) <= 100
    monkeypatch.setattr(recorder_module, "write_segment", real_write)
    recorder.flush()  # the disk is back
    kept = _rows(tmp_path, "requests")
    # The oldest rows survive (they were first in line); everything newer was counted.
    assert [r["request_id"] for r in kept] == [r.request_id for r in first_batch]
    dropped = [e for e in _rows(tmp_path, "events") if e["kind"] == "rows_dropped"]
    assert sum(int(e["detail"].split()[0]) for e in dropped) == 500


def test_a_bad_row_is_reported_once_even_when_the_write_is_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = SegmentRecorder(tmp_path / "segments", "r1")
    good, bad = make_records(2, seed=5)
    recorder.record(good)
    recorder.record(bad._replace(tokens_in=-(2**40)))  # does not fit the int32 column
    real_write = recorder_module.write_segment
    calls = []

    def fails_once(*args: object, **kwargs: object) -> Path:
        calls.append(1)
        if len(calls) == 1:
            raise OSError("disk hiccup")
        return real_write(*args, **kwargs)

    monkeypatch.setattr(recorder_module, "write_segment", fails_once)
    with pytest.raises(OSError):
        recorder.flush()
    assert list(recorder.requests.buffer) == [good]  # only the row that converted
    recorder.flush()
    assert [r["request_id"] for r in _rows(tmp_path, "requests")] == [good.request_id]
    assert recorder.requests.written_rows == 1
    dropped = [e["detail"] for e in _rows(tmp_path, "events") if e["kind"] == "rows_dropped"]
    assert dropped == ["1 requests row(s) dropped: values the schema cannot hold"]


def test_events_dropped_from_a_full_event_buffer_are_reported(tmp_path: Path) -> None:
    recorder = SegmentRecorder(tmp_path / "segments", "r1")
    bound = recorder.events.max_rows
    for i in range(bound + 5):
        recorder.event(EventKind.BACKEND_UNHEALTHY, f"event {i}")
    assert len(recorder.events.buffer) == bound
    recorder.flush()  # the buffer was full: the report waits, the count is kept
    recorder.flush()
    dropped = [e["detail"] for e in _rows(tmp_path, "events") if e["kind"] == "rows_dropped"]
    assert dropped == ["5 router events dropped: buffer full"]
    assert recorder.events.dropped == 0


def test_a_row_recorded_after_close_is_counted_as_dropped_and_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    recorder = SegmentRecorder(tmp_path / "segments", "r1")
    early, late, later = make_records(3, seed=6)
    recorder.record(early)
    recorder.close()
    with caplog.at_level(logging.WARNING, logger="router.recorder"):
        recorder.record(late)
        recorder.record(later)
    assert [r["request_id"] for r in _rows(tmp_path, "requests")] == [early.request_id]
    assert not recorder.requests.buffer and recorder.requests.dropped == 2
    assert len([r for r in caplog.records if "is closed" in r.getMessage()]) == 1


def test_close_gives_up_on_a_hung_write_and_counts_what_it_could_not_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A flusher stuck in a write (a hung mount) must not hang close(), hence shutdown."""
    entered, release = threading.Event(), threading.Event()

    def hung_write(*args: object, **kwargs: object) -> Path:
        entered.set()
        release.wait(5)
        raise OSError("mount came back too late")

    monkeypatch.setattr(recorder_module, "write_segment", hung_write)
    recorder = SegmentRecorder(tmp_path / "segments", "r1", flush_interval_s=0.01).start()
    first, second = make_records(2, seed=7)
    recorder.record(first)
    assert entered.wait(5)
    recorder.record(second)  # arrives while the write hangs
    closer = threading.Thread(target=recorder.close, kwargs={"timeout_s": 0.2}, daemon=True)
    with caplog.at_level(logging.ERROR, logger="router.recorder"):
        closer.start()
        closer.join(5)
    release.set()
    assert not closer.is_alive()
    assert recorder.requests.dropped == 1 and not recorder.requests.buffer
    assert "stuck in a write" in caplog.text


def test_temporary_files_left_by_a_dead_writer_are_removed(tmp_path: Path) -> None:
    """A host killed mid-write left `.requests-....parquet.tmp` files in the segment
    folder and `.router_config.json.*.tmp` in the control folder for good."""
    import os
    import time

    from router.control_store import FileControlStore

    folder = tmp_path / "segments" / "r1"
    folder.mkdir(parents=True)
    dead = folder / ".requests-r1-20260101T000000000000Z-000001.parquet.tmp"
    writing = folder / ".requests-r1-20260101T000000000000Z-000002.parquet.tmp"
    for temp in (dead, writing):
        temp.write_bytes(b"PAR1")
    hours_ago = time.time() - 2 * 3600
    os.utime(dead, (hours_ago, hours_ago))
    recorder = SegmentRecorder(tmp_path / "segments", "r1").start()
    recorder.close()
    assert not dead.exists() and writing.exists()  # another process may still write it

    control = tmp_path / "control"
    store = FileControlStore(control)
    stale = control / ".router_config.json.abc123.tmp"
    stale_ack = control / "acks" / ".app-1.json.abc123.tmp"
    stale_ack.parent.mkdir(parents=True)
    for temp in (stale, stale_ack):
        temp.write_text("{")
        os.utime(temp, (hours_ago, hours_ago))
    store.publish(RouterConfig(version=1))
    assert not stale.exists() and not stale_ack.exists() and store.current().version == 1
