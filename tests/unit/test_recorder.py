"""The segment recorder's back-pressure: memory stays bounded and every loss is counted
in `router_events`, whether the disk is slow (buffer full) or failing (writes raise)."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

import router.recorder as recorder_module
from flows.bench.synthetic import make_records
from router.recorder import SegmentRecorder


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
