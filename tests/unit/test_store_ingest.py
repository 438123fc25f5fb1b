"""Exactly-once collection: crashes, bad files, re-runs, late segments, many instances."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import pyarrow as pa
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


def test_segments_whose_names_are_not_utf8_are_renamed_and_land(paths: DataPaths) -> None:
    """DuckDB takes UTF-8 paths only: one such file stopped every collect and tick, and was
    never quarantined. Renamed (U+FFFD and a digest of the old name), it lands once."""
    write_request_segments(paths.segments, "app-1", files=2, rows=100)
    first, second = sorted((paths.segments / "app-1").glob("*.parquet"))
    odd_name = paths.segments / "app-1" / os.fsdecode(b"requests-\xff-1.parquet")
    first.rename(odd_name)
    odd_folder = paths.segments / os.fsdecode(b"app-\xfe")
    odd_folder.mkdir()
    second.rename(odd_folder / second.name)

    assert collect(paths).rows == 200
    assert collect(paths).rows == 0  # once
    names = sorted(str(p.relative_to(paths.segments)) for p in paths.segments.rglob("*.parquet"))
    assert len(names) == 2 and all("\ufffd" in n for n in names)
    assert counts(paths)[0] == 200


def test_an_event_written_twice_lands_once_and_neither_segment_is_quarantined(
    paths: DataPaths,
) -> None:
    """A router may write an event again (a retried flush after a failed rename): its id
    is the key, and the copy is not a reason to quarantine the segment."""
    event = RouterEvent("e7", datetime.now(UTC), "app-1", "failback", 3, "lightrag-1", "p95")
    for seq in (1, 2):
        write_segment(rows_to_table([event], EVENT_SCHEMA), paths.segments / "app-1", "events", seq)
    report = collect(paths)
    assert (report.segments, report.quarantined) == (2, [])
    with connect(paths.database, read_only=True) as con:
        assert con.execute("SELECT event_id FROM router_events").fetchall() == [("e7",)]


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
    # Repaired where it lies (remote files never move): a retry forgets the ledger row.
    spare = write_request_segments(tmp_path / "spare", "machine-b", files=1, rows=25, seed=9)[0]
    (shared / "machine-b" / "requests-bad-000009.parquet").write_bytes(spare.read_bytes())
    retried = collect(paths, segments=str(shared), retry_quarantined=True)
    assert retried.retried == ["machine-b/requests-bad-000009.parquet"]
    assert retried.rows == 25 and retried.quarantined == []
    assert collect(paths, segments=str(shared), retry_quarantined=True).retried == []

    monkeypatch.undo()
    monkeypatch.setenv("ROLLOUT_SEGMENTS_URL", str(shared))
    write_request_segments(shared, "machine-c", files=1, rows=11)
    assert collect(paths).rows == 11
    assert counts(paths)[:2] == (206, 206)


def _ledger(paths: DataPaths) -> list[tuple[str, int]]:
    with connect(paths.database, read_only=True) as con:
        rows = con.execute("SELECT status, count(*) FROM ingested_segments GROUP BY 1 ORDER BY 1")
        return rows.fetchall()


def test_out_of_memory_during_the_batch_quarantines_nothing_and_the_rerun_lands_all(
    paths: DataPaths,
) -> None:
    """A transient engine error is no verdict on the files: roll back, raise, retry later."""
    write_request_segments(paths.segments, "app-1", files=3, rows=200)

    def out_of_memory() -> None:  # after the INSERTs ran, inside the transaction
        raise duckdb.OutOfMemoryException("Out of Memory Error: could not allocate block")

    with pytest.raises(ingest.TransientIngestError, match="OutOfMemoryException") as raised:
        collect(paths, before_commit=out_of_memory)
    assert "3 segment files" in str(raised.value) and "nothing was recorded" in str(raised.value)
    assert counts(paths) == (0, 0, 0) and _ledger(paths) == []
    assert not any(paths.quarantine.rglob("*.parquet"))
    assert len(list((paths.segments / "app-1").glob("*.parquet"))) == 3

    report = collect(paths)
    assert report.rows == 600 and report.quarantined == []
    assert counts(paths) == (600, 600, 600)
    assert collect(paths).rows == 0
    assert counts(paths) == (600, 600, 600)


def test_a_segment_gone_while_checking_footers_is_not_quarantined(
    paths: DataPaths, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An IOException about a missing file (not its content) raises instead of blaming it."""
    write_request_segments(paths.segments, "app-1", files=2, rows=100)
    listed = discover(paths.segments)
    gone = paths.segments / "app-1" / "requests-t-000009.parquet"
    phantom = ingest.Segment(str(gone), "app-1/requests-t-000009.parquet", "app-1", "requests")
    monkeypatch.setattr(ingest, "discover", lambda location, con=None: [*listed, phantom])
    with pytest.raises(ingest.TransientIngestError, match=re.escape(str(gone))):
        collect(paths)
    assert _ledger(paths) == [] and counts(paths) == (0, 0, 0)
    monkeypatch.undo()
    assert collect(paths).rows == 200 and counts(paths) == (200, 200, 200)


@pytest.mark.parametrize(
    ("error", "bad_file"),
    [
        (duckdb.InvalidInputException("No magic bytes found at end of file"), True),
        (duckdb.ConversionException("Type INT64 with value 1099511627776 can't be cast"), True),
        (duckdb.ConstraintException("NOT NULL constraint failed: requests.request_id"), True),
        (duckdb.Error("TProtocolException: Invalid data"), True),
        (duckdb.IOException('Could not read enough bytes from file "x.parquet"'), True),
        (duckdb.OutOfMemoryException("could not allocate block of size 256.0 KiB"), False),
        (duckdb.IOException("Could not write file: No space left on device"), False),
        (duckdb.HTTPException("HTTP GET error: Could not read enough bytes from file"), False),
        (duckdb.InterruptException("Interrupted!"), False),
        (duckdb.InternalException("Attempted to access index 3"), False),
    ],
)
def test_only_errors_about_the_file_content_quarantine(error: duckdb.Error, bad_file: bool) -> None:
    assert ingest.is_bad_file(error) is bad_file


def test_retry_quarantined_lands_a_repaired_file_once_and_requarantines_a_bad_one(
    paths: DataPaths, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from flows.cli.app import app

    write_request_segments(paths.segments, "app-1", files=2, rows=100)
    fixed = write_request_segments(tmp_path / "spare", "app-2", files=1, rows=70, seed=7)[0]
    folder = paths.segments / "app-2"
    folder.mkdir()
    (folder / "requests-t-000001.parquet").write_bytes(fixed.read_bytes()[:300])  # truncated
    (folder / "requests-t-000002.parquet").write_bytes(b"not parquet at all")
    report = collect(paths)
    assert report.rows == 200 and len(report.quarantined) == 2
    assert _ledger(paths) == [("ingested", 2), ("quarantined", 2)]
    # The operator repairs one file in quarantine/ (e.g. the router's complete copy).
    (paths.quarantine / "app-2" / "requests-t-000001.parquet").write_bytes(fixed.read_bytes())

    assert collect(paths).rows == 0  # without the option the ledger keeps skipping them
    result = CliRunner().invoke(
        app, ["collect", "--retry-quarantined", "--json", "--data-dir", str(paths.root)]
    )
    assert result.exit_code == 0, result.output
    retried = json.loads(result.output)
    assert sorted(retried["retried"]) == [
        "app-2/requests-t-000001.parquet",
        "app-2/requests-t-000002.parquet",
    ]
    assert retried["rows"] == 70
    assert [key for key, _ in retried["quarantined"]] == ["app-2/requests-t-000002.parquet"]
    assert retried["quarantined"][0][1].startswith("unreadable parquet")
    assert counts(paths) == (270, 270, 270)
    assert _ledger(paths) == [("ingested", 3), ("quarantined", 1)]
    assert (folder / "ingested" / "requests-t-000001.parquet").exists()  # landed: set aside
    assert not (paths.quarantine / "app-2" / "requests-t-000001.parquet").exists()
    assert not (paths.quarantine / "app-2" / "requests-t-000001.parquet.reason.txt").exists()
    assert (paths.quarantine / "app-2" / "requests-t-000002.parquet.reason.txt").exists()
    assert not (folder / "requests-t-000002.parquet").exists()

    again = collect(paths, retry_quarantined=True)  # exactly once: the landed file stays put
    assert again.retried == ["app-2/requests-t-000002.parquet"] and again.rows == 0
    assert counts(paths) == (270, 270, 270)
    with connect(paths.database, read_only=True) as con:
        events = con.execute(
            "SELECT count(*) FROM router_events WHERE kind = 'segment_quarantined'"
        ).fetchall()[0][0]
    assert events == 4  # 2 first quarantines + 1 per retry of the still-bad file: history kept


def test_values_the_table_refuses_are_quarantined_as_bad_content(paths: DataPaths) -> None:
    """ConversionException and ConstraintException are about the file: quarantine it."""
    write_request_segments(paths.segments, "app-1", files=1, rows=50)
    table = make_table(10, seed=3)
    tokens = table.schema.get_field_index("tokens_in")
    too_big = table.set_column(tokens, pa.field("tokens_in", pa.int64()), pa.array([2**40] * 10))
    write_segment(too_big, paths.segments / "app-2", "requests", 1)
    ids = table.schema.get_field_index("request_id")
    no_ids = table.set_column(ids, "request_id", pa.array([None] * 10, pa.string()))
    write_segment(no_ids, paths.segments / "app-2", "requests", 2)

    report = collect(paths)
    assert report.rows == 50 and counts(paths) == (50, 50, 50)
    reasons = sorted(reason for _, reason in report.quarantined)
    assert len(reasons) == 2
    assert reasons[0].startswith("values the table refuses: Constraint Error: NOT NULL")
    assert reasons[1].startswith("values the table refuses: Conversion Error")
    assert _ledger(paths) == [("ingested", 1), ("quarantined", 2)]


def test_a_directory_or_dangling_link_under_a_segment_name_is_quarantined_not_fatal(
    paths: DataPaths,
) -> None:
    """DuckDB's "no files found" on a dangling link is not about any file's content, so
    it stopped every `rollout collect`, and no other instance's rows landed either."""
    write_request_segments(paths.segments, "app-1", files=2, rows=100)
    folder = paths.segments / "app-3"
    folder.mkdir()
    (folder / "requests-t-000001.parquet").symlink_to(folder / "gone.parquet")
    (folder / "requests-t-000002.parquet").mkdir()

    report = collect(paths)
    assert report.rows == 200 and counts(paths) == (200, 200, 200)
    reasons = dict(report.quarantined)
    assert set(reasons) == {"app-3/requests-t-000001.parquet", "app-3/requests-t-000002.parquet"}
    assert all(r.startswith("not a regular file") for r in reasons.values())
    assert not list(folder.iterdir())  # both moved to quarantine/app-3
    assert (paths.quarantine / "app-3" / "requests-t-000001.parquet").is_symlink()
    assert collect(paths).quarantined == []


def test_a_quarantine_the_crash_left_unmoved_keeps_its_reason(
    paths: DataPaths, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ledger row commits before the file moves: a crash in between left the next
    run writing "quarantined by an earlier run" beside the file instead of why."""
    write_request_segments(paths.segments, "app-1", files=1, rows=100)
    bad = paths.segments / "app-1" / "requests-t-000005.parquet"
    bad.write_bytes(b"not parquet at all")
    moves = []

    def crash_before_moving(*args: object) -> None:
        moves.append(args)
        raise SystemExit("crash after commit")

    monkeypatch.setattr(ingest, "_move_to_quarantine", crash_before_moving)
    with pytest.raises(SystemExit):
        collect(paths)
    monkeypatch.undo()
    assert moves and bad.exists()
    collect(paths)
    reason = (paths.quarantine / "app-1" / f"{bad.name}.reason.txt").read_text()
    assert reason.startswith("unreadable parquet"), reason
    with connect(paths.database, read_only=True) as con:
        (size,) = con.execute(
            "SELECT bytes FROM ingested_segments WHERE path = ?", [f"app-1/{bad.name}"]
        ).fetchone()
    assert size == len(b"not parquet at all")
