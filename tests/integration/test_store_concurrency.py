"""Readers and writers in separate processes: bounded waits, clear messages, whole batches.

DuckDB allows one read-write process per file and a read-only process blocks a writer,
so these run real processes (threads of one process share the database instance).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from flows.bench.synthetic import write_request_segments
from flows.paths import DataPaths
from flows.store.database import StoreLocked, connect
from flows.store.ingest import collect
from tests.conftest import ROOT

HOLD = """
    import sys, time
    from pathlib import Path
    from flows.store.database import connect
    with connect(Path(sys.argv[1]), read_only=sys.argv[2] == "read") as con:
        con.execute("SELECT count(*) FROM all_requests").fetchall()
        print("ready", flush=True)
        time.sleep(float(sys.argv[3]))
"""


@contextmanager
def holder(database: Path, mode: str, seconds: float) -> Iterator[subprocess.Popen[str]]:
    """Another process holding the database open (`read` or `write`) for `seconds`."""
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(HOLD), str(database), mode, str(seconds)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield proc
    finally:
        proc.kill()
        proc.wait(timeout=10)


@pytest.fixture
def paths(tmp_path: Path) -> DataPaths:
    paths = DataPaths.at(tmp_path / "data").ensure()
    write_request_segments(paths.segments, "app-1", files=2, rows=100)
    collect(paths)
    write_request_segments(paths.segments, "app-2", files=2, rows=100, seed=2)
    return paths


def test_collect_waits_for_a_reader_then_succeeds(paths: DataPaths) -> None:
    with holder(paths.database, "read", 1.5):
        started = time.monotonic()
        report = collect(paths, wait_s=30)
        waited = time.monotonic() - started
    assert report.rows == 200
    assert waited > 0.5  # it really waited for the reader to go


def test_collect_gives_up_with_a_clear_message(paths: DataPaths) -> None:
    with holder(paths.database, "read", 60), pytest.raises(StoreLocked) as caught:
        collect(paths, wait_s=0.5)
    message = str(caught.value)
    assert "is locked by another process; waited 0.5s to write" in message
    assert "Conflicting lock" in message
    assert collect(paths, wait_s=5).rows == 200  # nothing was half-done


def test_rollout_sql_waits_for_a_writer_or_explains(paths: DataPaths) -> None:
    cli = [sys.executable, "-m", "flows.cli", "sql", "--data-dir", str(paths.root)]
    query = "SELECT count(*) AS n FROM all_requests"
    with holder(paths.database, "write", 60):
        done = subprocess.run(
            [*cli, "--wait", "0.5", query], cwd=ROOT, capture_output=True, text=True, timeout=60
        )
    assert done.returncode == 1  # busy, retry later (2 means bad input)
    assert "locked by another process; waited 0.5s to read" in done.stderr
    with holder(paths.database, "write", 1.5):
        done = subprocess.run(
            [*cli, "--wait", "30", "--format", "csv", query],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["n", "200"]


WRITER_LOOP = """
    import sys, time
    from flows.paths import DataPaths
    from flows.store.ingest import collect
    paths, total = DataPaths.at(sys.argv[1]), 0
    deadline = time.monotonic() + float(sys.argv[2])
    while time.monotonic() < deadline:
        total += collect(paths, wait_s=30).rows
        time.sleep(0.05)
    print(total)
"""


def test_concurrent_reader_and_writer_see_only_whole_segments(paths: DataPaths) -> None:
    """A collector process runs while segments keep arriving and this process reads."""
    writer = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(WRITER_LOOP), str(paths.root), "4"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    seen = []
    try:
        for round_ in range(8):
            write_request_segments(
                paths.segments, f"app-{3 + round_}", files=1, rows=100, seed=10 + round_
            )
            with connect(paths.database, read_only=True, wait_s=30) as con:
                seen.append(con.execute("SELECT count(*) FROM requests").fetchall()[0][0])
            time.sleep(0.2)
        out, _ = writer.communicate(timeout=60)
    finally:
        if writer.poll() is None:
            writer.kill()
    assert writer.returncode == 0
    assert all(n % 100 == 0 for n in seen), seen  # never half a segment
    assert seen == sorted(seen)
    collect(paths)
    with connect(paths.database, read_only=True) as con:
        final = con.execute("SELECT count(*), count(DISTINCT request_id) FROM requests").fetchall()
    assert final == [(1_200, 1_200)]
    assert int(out.strip()) >= 200
