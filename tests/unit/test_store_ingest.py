"""Exactly-once collection: crashes, bad files, re-runs, late segments, many instances."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import pytest

from flows.bench.synthetic import make_table, write_request_segments
from flows.paths import DataPaths
from flows.store import ingest
from flows.store.database import connect
from flows.store.ingest import collect, discover
from router.record import EVENT_SCHEMA, RouterEvent
from router.recorder import rows_to_table, write_segment
from tests.conftest import ROOT


@pytest.fixture
def paths(tmp_path: Path) -> DataPaths:
    return DataPaths.at(tmp_path / "data").ensure()


def counts(paths: DataPaths) -> tuple[int, int, int]:
    """(rows, distinct request ids, ledger rows) read through a read-only connection."""
    with connect(paths.database, read_only=True) as con:
        rows, distinct = con.execute(
            "SELECT count(*), count(DISTINCT request_id) FROM requests"
        ).fetchall()[0]
        ledger = con.execute("SELECT coalesce(sum(rows), 0) FROM ingested_segments").fetchall()
    return int(rows), int(distinct), int(ledger[0][0])


def run_python(code: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


CRASH_BEFORE_COMMIT = """
    import os, sys
    from flows.paths import DataPaths
    from flows.store.ingest import collect
    calls = []
    def crash():
        calls.append(1)
        if len(calls) == int(sys.argv[2]):
            os._exit(17)
    collect(DataPaths.at(sys.argv[1]), batch_files=int(sys.argv[3]), before_commit=crash)
"""


def test_crash_before_commit_then_rerun_gives_exact_rows(paths: DataPaths) -> None:
    for seed, instance in enumerate(("app-1", "app-2")):
        write_request_segments(paths.segments, instance, files=3, rows=400, seed=seed)
    done = run_python(CRASH_BEFORE_COMMIT, str(paths.root), "1", "500")
    assert done.returncode == 17, done.stderr
    assert counts(paths) == (0, 0, 0)  # rows and ledger rolled back together

    report = collect(paths)
    assert report.rows == 2_400 and not report.quarantined
    assert counts(paths) == (2_400, 2_400, 2_400)
    assert collect(paths).rows == 0  # idempotent
    assert counts(paths) == (2_400, 2_400, 2_400)


def test_crash_after_first_batch_keeps_it_and_rerun_adds_only_the_rest(paths: DataPaths) -> None:
    write_request_segments(paths.segments, "app-1", files=4, rows=250)
    done = run_python(CRASH_BEFORE_COMMIT, str(paths.root), "2", "2")  # dies in batch 2
    assert done.returncode == 17, done.stderr
    assert counts(paths) == (500, 500, 500)
    assert collect(paths).rows == 500
    assert counts(paths) == (1_000, 1_000, 1_000)


def test_sigkill_between_insert_and_commit(paths: DataPaths) -> None:
    """A real kill (SIGKILL, no Python cleanup) while the transaction is open."""
    write_request_segments(paths.segments, "app-1", files=3, rows=300)
    marker = paths.root / "inside-transaction"
    code = """
        import sys, time
        from pathlib import Path
        from flows.paths import DataPaths
        from flows.store.ingest import collect
        def hang():
            Path(sys.argv[2]).write_text("x")
            time.sleep(60)
        collect(DataPaths.at(sys.argv[1]), before_commit=hang)
    """
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), str(paths.root), str(marker)], cwd=ROOT
    )
    try:
        deadline = time.monotonic() + 30
        while not marker.exists():
            assert proc.poll() is None, "collector exited early"
            assert time.monotonic() < deadline, "collector never reached the commit"
            time.sleep(0.05)
        proc.kill()
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert collect(paths).rows == 900
    assert counts(paths) == (900, 900, 900)


def test_corrupt_and_partial_segments_are_quarantined_while_others_land(
    paths: DataPaths,
) -> None:
    write_request_segments(paths.segments, "app-1", files=3, rows=100)
    good = write_request_segments(paths.segments, "app-2", files=1, rows=100, seed=5)[0]
    folder = paths.segments / "app-2"
    data = good.read_bytes()
    (folder / "requests-t-000010.parquet").write_bytes(data[: len(data) // 2])  # partial
    (folder / "requests-t-000011.parquet").write_bytes(b"not parquet at all")
    damaged = bytearray(data)
    damaged[200:1_500] = b"\x55" * 1_300  # footer intact, pages garbage
    (folder / "requests-t-000012.parquet").write_bytes(bytes(damaged))
    wrong = make_table(10).drop(["latency_ms"])
    write_segment(wrong, folder, "requests", 13)
    (folder / "export.parquet").write_bytes(data)  # readable, but nobody's segment

    report = collect(paths)
    assert report.rows == 400
    bad = dict(report.quarantined)
    wrong_key = next(k for k in bad if k.endswith("-000013.parquet"))
    assert set(bad) == {
        "app-2/requests-t-000010.parquet",
        "app-2/requests-t-000011.parquet",
        "app-2/requests-t-000012.parquet",
        "app-2/export.parquet",
        wrong_key,
    }
    assert bad["app-2/export.parquet"] == "not a segment name (expected requests-* or events-*)"
    assert bad["app-2/requests-t-000010.parquet"].startswith("unreadable parquet")
    assert bad["app-2/requests-t-000012.parquet"].startswith("unreadable data pages")
    assert bad[wrong_key] == "missing columns ['latency_ms']"
    for key in bad:
        name = key.split("/")[1]
        assert (paths.quarantine / "app-2" / name).exists()
        assert (paths.quarantine / "app-2" / f"{name}.reason.txt").read_text().strip()
        assert not (folder / name).exists()
    with connect(paths.database, read_only=True) as con:
        events = con.execute(
            "SELECT router_instance, detail FROM router_events WHERE kind = 'segment_quarantined'"
        ).fetchall()
        statuses = con.execute(
            "SELECT status, count(*) FROM ingested_segments GROUP BY ALL ORDER BY 1"
        ).fetchall()
    assert len(events) == 5 and all(instance == "app-2" for instance, _ in events)
    assert statuses == [("ingested", 4), ("quarantined", 5)]
    again = collect(paths)
    assert again.rows == 0 and again.quarantined == []
    assert counts(paths)[0] == 400


def test_many_instance_folders_and_provenance_audit(paths: DataPaths) -> None:
    for n in range(5):
        write_request_segments(paths.segments, f"host{n}-app", files=2, rows=50 + n, seed=n)
    events = [RouterEvent("e1", datetime.now(UTC), "host0-app", "failback", 3, "lightrag-1", "p95")]
    write_segment(rows_to_table(events, EVENT_SCHEMA), paths.segments / "host0-app", "events", 9)
    (paths.segments / "host1-app" / ".requests-x.parquet.tmp").write_bytes(b"half written")
    report = collect(paths)
    assert report.rows == sum(2 * (50 + n) for n in range(5))
    assert report.events == 1 and report.segments == 11
    with connect(paths.database, read_only=True) as con:
        per_instance = con.execute(
            "SELECT router_instance, count(*) FROM requests GROUP BY ALL ORDER BY 1"
        ).fetchall()
        mismatched = con.execute(
            """SELECT l.path FROM ingested_segments l
               LEFT JOIN (SELECT segment, count(*) AS n FROM requests GROUP BY segment) r
                 ON r.segment = l.path
               WHERE l.kind = 'requests' AND l.rows <> coalesce(r.n, 0)"""
        ).fetchall()
        failback = con.execute("SELECT kind, backend FROM router_events").fetchall()
    assert per_instance == [(f"host{n}-app", 2 * (50 + n)) for n in range(5)]
    assert mismatched == []
    assert failback == [("failback", "lightrag-1")]


def _register_phases(paths: DataPaths) -> None:
    now = datetime.now(UTC)
    with connect(paths.database) as con:
        for version, index, name in ((7, 0, "shadow"), (8, 1, "canary-5")):
            con.execute(
                "INSERT INTO config_versions VALUES (?, 'r1', ?, ?, 'canary', 5, "
                "'health_aware', NULL, ?, '{}')",
                [version, index, name, now],
            )
            con.execute(
                "INSERT INTO phases VALUES ('r1', ?, ?, 'canary', 5, ?, ?, NULL, NULL)",
                [index, name, version, now],
            )


def test_late_segment_counts_for_the_phase_it_was_routed_under(paths: DataPaths) -> None:
    _register_phases(paths)
    start = datetime(2025, 6, 1, tzinfo=UTC)
    write_request_segments(paths.segments, "app-1", files=2, rows=100, config_version=7)
    collect(paths)
    write_request_segments(
        paths.segments, "app-1", files=1, rows=100, seed=3, config_version=8, start=start
    )
    collect(paths)  # phase 2 is running now...
    late = make_table(60, seed=99, config_version=7, start=start - timedelta(hours=1))
    write_segment(late, paths.segments / "app-9-was-offline", "requests", 1)
    assert collect(paths).rows == 60  # ...when a segment of phase 1 shows up
    with connect(paths.database, read_only=True) as con:
        per_phase = con.execute(
            "SELECT phase_name, sum(requests) FROM arm_summary GROUP BY ALL ORDER BY 1"
        ).fetchall()
        timeline = con.execute(
            "SELECT name, legacy_requests + production_requests FROM phase_timeline ORDER BY 1"
        ).fetchall()
    assert per_phase == [("canary-5", 100), ("shadow", 260)]
    assert timeline == [("canary-5", 100), ("shadow", 260)]


def test_segments_at_another_location_and_through_duckdb_listing(
    paths: DataPaths, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scale seam: a non-default folder, and the remote (DuckDB glob) code path."""
    shared = tmp_path / "shared-bucket" / "segments"
    write_request_segments(shared, "machine-a", files=2, rows=70)
    write_request_segments(shared, "machine-b", files=1, rows=30, seed=4)
    (shared / "machine-b" / "requests-bad-000009.parquet").write_bytes(b"garbage")
    assert collect(paths).rows == 0  # the default folder is empty

    monkeypatch.setattr(ingest, "is_remote", lambda location: True)  # list via DuckDB glob
    with duckdb.connect() as con:
        keys = [s.key for s in discover(str(shared), con)]
    assert len(keys) == 4 and keys[0].startswith("machine-a/")
    report = collect(paths, segments=str(shared))
    assert report.rows == 170
    assert [k for k, _ in report.quarantined] == ["machine-b/requests-bad-000009.parquet"]
    assert (shared / "machine-b" / "requests-bad-000009.parquet").exists()  # remote: not moved
    assert collect(paths, segments=str(shared)).rows == 0

    monkeypatch.undo()
    monkeypatch.setenv("ROLLOUT_SEGMENTS_URL", str(shared))
    write_request_segments(shared, "machine-c", files=1, rows=11)
    assert collect(paths).rows == 11
    assert counts(paths)[:2] == (181, 181)
