"""Retention: rows move to daily Parquet exactly once and the views still see them."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flows.bench.synthetic import make_table, write_request_segments
from flows.nightly import compare
from flows.paths import DataPaths
from flows.store import database
from flows.store.database import StoreError, connect
from flows.store.ingest import collect
from flows.store.retention import archive_files, archived_days, compact
from router.recorder import write_segment
from tests.conftest import ROOT

DAY0 = datetime(2025, 6, 1, tzinfo=UTC)
NOW = datetime(2025, 6, 5, 9, 30, tzinfo=UTC)  # retention 2 -> cutoff 2025-06-03


@pytest.fixture
def paths(tmp_path: Path) -> DataPaths:
    """Four days of traffic (06-01 .. 06-04), 150 rows a day, two instances, ingested."""
    paths = DataPaths.at(tmp_path / "data").ensure()
    for day in range(4):
        for n, instance in enumerate(("app-1", "app-2")):
            write_request_segments(
                paths.segments,
                instance,
                files=1,
                rows=75,
                seed=10 * day + n,
                start=DAY0 + timedelta(days=day, hours=n),
                step_s=60.0,
            )
    assert collect(paths).rows == 600
    return paths


def snapshot(paths: DataPaths, archive: Path | None = None) -> dict[str, object]:
    """What an operator sees, through the sandboxed read-only connection."""
    sandbox = [paths.root, *([archive] if archive else [])]
    with connect(paths.database, read_only=True, sandbox=sandbox) as con:
        return {
            "all": con.execute(
                "SELECT count(*), count(DISTINCT request_id) FROM all_requests"
            ).fetchall(),
            "table": con.execute("SELECT count(*) FROM requests").fetchall(),
            "per_arm": con.execute(
                "SELECT arm, requests, round(p95_ms, 6), round(mean_quality, 9) "
                "FROM arm_summary ORDER BY arm"
            ).fetchall(),
            "daily": con.execute(
                "SELECT day::DATE, legacy_requests, production_requests FROM daily_comparison "
                "ORDER BY day"
            ).fetchall(),
        }


def test_round_trip_and_idempotent_rerun(paths: DataPaths) -> None:
    before = snapshot(paths)
    report = compact(paths, retention=2, now=NOW)
    assert report.cutoff.isoformat() == "2025-06-03"
    assert [(d.isoformat(), n) for d, n in report.days] == [
        ("2025-06-01", 150),
        ("2025-06-02", 150),
    ]
    assert report.rows == 300
    after = snapshot(paths)
    assert after["table"] == [(300,)]
    assert {k: v for k, v in after.items() if k != "table"} == {
        k: v for k, v in before.items() if k != "table"
    }
    files = archive_files_local(paths)
    assert {f.parent.name for f in files} == {"day=2025-06-01", "day=2025-06-02"}
    assert all(f.name.startswith(f"part-{report.batch_id}-") for f in files)

    again = compact(paths, retention=2, now=NOW)
    assert again.rows == 0 and again.batch_id is None
    assert archive_files_local(paths) == files
    assert snapshot(paths) == after


def archive_files_local(paths: DataPaths) -> list[Path]:
    return sorted((paths.root / "archive" / "requests").glob("day=*/part-*.parquet"))


CRASH_AFTER_COPY = """
    import os, sys
    from datetime import datetime
    from flows.paths import DataPaths
    from flows.store.retention import compact
    compact(DataPaths.at(sys.argv[1]), retention=2, now=datetime.fromisoformat(sys.argv[2]),
            after_copy=lambda: os._exit(23))
"""


def test_crash_between_copy_and_delete_neither_doubles_nor_loses(paths: DataPaths) -> None:
    before = snapshot(paths)
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(CRASH_AFTER_COPY), str(paths.root), NOW.isoformat()],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 23, done.stderr
    staged = sorted((paths.root / "archive").glob(".staging-*/day=*/part-*.parquet"))
    assert len(staged) == 2 and not archive_files_local(paths)  # the COPY happened...
    assert snapshot(paths) == before  # ...but nothing is where the views look
    # A crash while moving the files into place: one finished file among the archive's
    # (invisible: its batch is not recorded), one cut short at 0 bytes (as if DuckDB was
    # killed mid-write) still in the staging folder, where it cannot break the views.
    moved = paths.root / "archive" / "requests" / staged[0].parent.name / staged[0].name
    moved.parent.mkdir(parents=True, exist_ok=True)
    staged[0].rename(moved)
    staged[1].write_bytes(b"")
    assert snapshot(paths) == before
    with connect(paths.database) as con:  # a writer (collect, a tick) still opens
        assert con.execute("SELECT count(*) FROM all_requests").fetchone() == (600,)

    report = compact(paths, retention=2, now=NOW)
    assert report.orphans_removed == 2 and report.rows == 300
    assert moved not in archive_files_local(paths)
    assert not list((paths.root / "archive").glob(".staging-*"))
    after = snapshot(paths)
    assert after["all"] == [(600, 600)] and after["table"] == [(300,)]
    assert after["per_arm"] == before["per_arm"]


def test_a_row_that_lands_between_copy_and_delete_stops_the_compaction(
    paths: DataPaths,
) -> None:
    """The DELETE takes every row older than the cutoff: one that arrived after the COPY
    would be deleted without being archived. The counts must match, in one transaction."""

    def late_row() -> None:
        with connect(paths.database) as other:
            old = make_table(1, seed=77, start=DAY0)
            other.execute(f"INSERT INTO requests ({', '.join(old.column_names)}) SELECT * FROM old")

    with pytest.raises(StoreError, match="deleted 301 rows but archived 300"):
        compact(paths, retention=2, now=NOW, after_copy=late_row)
    assert snapshot(paths)["all"] == [(601, 601)]


def test_segments_are_kept_for_the_retention_window_after_ingest(paths: DataPaths) -> None:
    tomorrow = datetime.now(UTC) + timedelta(days=1)
    assert compact(paths, retention=2, now=tomorrow).segments_deleted == 0
    assert len(list(paths.segments.rglob("*.parquet"))) == 8


def test_another_compactions_staging_folder_is_left_alone(paths: DataPaths) -> None:
    """A shared archive: the sweep removes only its own interrupted batch's staging."""
    from flows.store.retention import STAGING_PREFIX

    foreign = paths.root / "archive" / f"{STAGING_PREFIX}someone-else" / "part.parquet"
    foreign.parent.mkdir(parents=True)
    foreign.write_bytes(b"in progress")
    report = compact(paths, retention=2, now=NOW)
    assert foreign.exists() and report.orphans_left >= 1


def test_unknown_archive_files_are_ignored_not_deleted(paths: DataPaths) -> None:
    """E.g. another database sharing the archive location: never ours to delete."""
    compact(paths, retention=2, now=NOW)
    ours = archive_files_local(paths)[0]
    foreign = ours.with_name("part-0123456789abcdef-0000.parquet")
    table = pq.read_table(ours)
    column = table.schema.get_field_index("archive_batch")
    other = pa.array(["0123456789abcdef"] * table.num_rows)
    pq.write_table(table.set_column(column, "archive_batch", other), foreign)
    report = compact(paths, retention=2, now=NOW)
    assert (report.orphans_left, report.orphans_removed) == (1, 0)
    assert foreign.exists()
    assert snapshot(paths)["all"] == [(600, 600)]


def test_late_rows_for_an_archived_day_get_a_second_batch(paths: DataPaths) -> None:
    compact(paths, retention=2, now=NOW)
    late = make_table(20, seed=77, start=DAY0 + timedelta(hours=20), instance="app-3")
    write_segment(late, paths.segments / "app-3", "requests", 1)
    assert collect(paths).rows == 20
    assert snapshot(paths)["all"] == [(620, 620)]
    report = compact(paths, retention=2, now=NOW)
    assert [(d.isoformat(), n) for d, n in report.days] == [("2025-06-01", 20)]
    with connect(paths.database, read_only=True) as con:
        days = archived_days(con)
    assert [(d.isoformat(), rows, batches) for d, rows, batches in days] == [
        ("2025-06-01", 170, 2),
        ("2025-06-02", 150, 1),
    ]
    assert snapshot(paths)["all"] == [(620, 620)]


def test_rows_of_an_open_phase_stay_in_the_table(paths: DataPaths) -> None:
    opened = DAY0 + timedelta(days=1, hours=3)
    with connect(paths.database) as con:
        con.execute(
            "INSERT INTO rollouts VALUES ('r1', 'g', 'p', '{}', 'running', 0, ?, ?, NULL, NULL)",
            [opened, opened],
        )
        con.execute(
            "INSERT INTO config_versions VALUES (1, 'r1', 0, 'canary', 'canary', 5, "
            "'health_aware', NULL, ?, '{}')",
            [opened],
        )
        con.execute(
            "INSERT INTO phases VALUES ('r1', 0, 'canary', 'canary', 5, 1, ?, NULL, NULL)",
            [opened],
        )
    report = compact(paths, retention=0, now=NOW)
    assert report.cutoff.isoformat() == "2025-06-02"
    assert report.held_back and "open phase" in report.held_back
    assert report.rows == 150
    assert snapshot(paths)["all"] == [(600, 600)]


def test_old_ingested_segments_are_deleted_and_never_reingested(paths: DataPaths) -> None:
    pending = write_request_segments(paths.segments, "app-9", files=1, rows=5, seed=99)[0]
    later = datetime.now(UTC) + timedelta(days=3)
    report = compact(paths, retention=2, now=later)
    assert report.segments_deleted == 8
    assert pending.exists()  # not ingested yet: never deleted
    assert sorted(p.name for p in paths.segments.rglob("*.parquet")) == [pending.name]
    with connect(paths.database, read_only=True) as con:
        marked = con.execute(
            "SELECT count(*) FROM ingested_segments WHERE deleted_at IS NOT NULL"
        ).fetchall()
    assert marked == [(8,)]
    assert collect(paths).rows == 5
    assert snapshot(paths)["all"] == [(605, 605)]


def test_ingested_segments_leave_the_listed_folder_and_go_after_two_days(
    paths: DataPaths,
) -> None:
    """Every collect listed every segment kept for the 30-day row retention, a file a
    second per instance: a minute per tick after 12 instance-days, under the write lock,
    and 17-31 GiB per instance. Ingested files are set aside at once, deleted by
    compaction after two days whatever the row retention, and their ledger rows are
    forgotten a week after that."""
    from flows.store.ingest import discover
    from flows.store.retention import LEDGER_KEEP_DAYS

    assert discover(paths.segments) == []  # the 8 ingested files are out of the listing
    aside = sorted(paths.segments.glob("*/ingested/*.parquet"))
    assert len(aside) == 8
    assert (
        compact(paths, retention=30, now=datetime.now(UTC) + timedelta(days=1)).segments_deleted
        == 0
    )
    report = compact(paths, retention=30, now=datetime.now(UTC) + timedelta(days=3))
    assert report.segments_deleted == 8 and not any(p.exists() for p in aside)
    with connect(paths.database) as con:
        con.execute(
            "UPDATE ingested_segments SET deleted_at = deleted_at - ?",
            [timedelta(days=LEDGER_KEEP_DAYS + 1)],
        )
    compact(paths, retention=30, now=datetime.now(UTC) + timedelta(days=3))
    with connect(paths.database, read_only=True) as con:
        assert con.execute("SELECT count(*) FROM ingested_segments").fetchall() == [(0,)]
    assert snapshot(paths)["all"] == [(600, 600)]  # the rows stay, of course


def test_a_folder_the_collector_cannot_write_still_gets_ingested(
    paths: DataPaths, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Routers and the worker under different users: the collector may read a folder
    it cannot write. Setting files aside failed after the commit, and every later tick
    failed before looking at new files: ingestion stopped for good."""

    replace = Path.replace

    def refuse(self: Path, target: Path) -> Path:
        if Path(target).parent.name == "ingested":
            raise PermissionError(13, "Permission denied")
        return replace(self, target)

    monkeypatch.setattr(Path, "replace", refuse)
    write_request_segments(paths.segments, "app-7", files=2, rows=10, seed=70)
    assert collect(paths).rows == 20
    write_request_segments(paths.segments, "app-7", files=1, rows=7, seed=71)
    assert collect(paths).rows == 7
    assert snapshot(paths)["all"] == [(627, 627)]
    assert caplog.text.count("cannot move ingested segments") == 1


def test_a_collect_stopped_before_setting_aside_sets_aside_next_time(paths: DataPaths) -> None:
    """A run that committed but stopped before moving its files (or a data dir from
    before `ingested/`): the next run moves them, and lands nothing twice."""
    instance = paths.segments / "app-1"
    for segment in sorted(instance.glob("ingested/*.parquet")):
        segment.replace(instance / segment.name)
    assert collect(paths).rows == 0
    assert not list(instance.glob("*.parquet")) and len(list(instance.glob("ingested/*"))) == 4
    assert snapshot(paths)["all"] == [(600, 600)]


def test_archive_and_segments_elsewhere(paths: DataPaths, tmp_path: Path) -> None:
    """The scale seam with local stand-ins: a non-default archive and segment folder."""
    shared_archive = tmp_path / "shared" / "archive"
    shared_segments = tmp_path / "shared" / "segments"
    shutil.move(str(paths.segments), shared_segments)
    report = compact(
        paths,
        retention=2,
        now=datetime.now(UTC) + timedelta(days=3),
        archive=str(shared_archive),
        segments=str(shared_segments),
    )
    assert report.archive == str(shared_archive)
    assert report.rows == 600 and report.segments_deleted == 8
    assert not archive_files_local(paths)
    with connect(paths.database, read_only=True) as con:
        assert len(archive_files(con, str(shared_archive))) == 4
    view = snapshot(paths, archive=None)  # the sandbox adds the recorded archive itself
    assert view["all"] == [(600, 600)] and view["table"] == [(0,)]

    # Moving the archive while it holds batches is refused...
    elsewhere = tmp_path / "moved" / "archive"
    with pytest.raises(StoreError, match="holds 4 archived day"):
        compact(paths, retention=2, now=NOW, archive=str(elsewhere))
    # ...until the files are copied and the move is explicit.
    shutil.copytree(shared_archive, elsewhere)
    compact(paths, retention=2, now=NOW, archive=str(elsewhere), relocate_archive=True)
    shutil.rmtree(shared_archive)
    assert snapshot(paths)["all"] == [(600, 600)]


def ledger(paths: DataPaths) -> tuple[list[tuple], list[tuple]]:
    """(the recorded archive location, the locations the archive ledger names)."""
    with connect(paths.database, read_only=True) as con:
        return (
            con.execute(
                "SELECT value FROM store_settings WHERE key = 'archive_location'"
            ).fetchall(),
            con.execute("SELECT DISTINCT location FROM archive_batches").fetchall(),
        )


def test_a_moved_data_dir_keeps_its_archive(paths: DataPaths, tmp_path: Path) -> None:
    """Backup restore, a new container mount: the default archive moves with the data dir."""
    compact(paths, retention=2, now=NOW)
    before = snapshot(paths)
    assert ledger(paths) == ([("archive",)], [("archive",)])  # beside the database
    moved = DataPaths.at(tmp_path / "restored" / "data")
    moved.root.parent.mkdir()
    shutil.move(paths.root, moved.root)

    assert snapshot(moved) == before  # readers first, before any writer
    assert collect(moved).rows == 0
    report = compact(moved, retention=0, now=NOW)
    assert report.archive == str(moved.archive) and report.rows == 300
    assert not paths.root.exists()  # nothing recreated at the old place
    assert snapshot(moved)["all"] == [(600, 600)]
    assert ledger(moved) == ([("archive",)], [("archive",)])


def record_archive_as_before(paths: DataPaths, location: str) -> None:
    """What the code before the relative default recorded: the absolute location."""
    with connect(paths.database) as con:
        con.execute(
            "UPDATE store_settings SET value = ? WHERE key = 'archive_location'", [location]
        )
        con.execute("UPDATE archive_batches SET location = ?", [location])


def test_an_absolute_default_archive_upgrades_in_place(
    paths: DataPaths, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    compact(paths, retention=2, now=NOW)
    before = snapshot(paths)
    record_archive_as_before(paths, str(paths.archive))
    monkeypatch.setattr(database, "_MIGRATED", set())  # the next process's first writer
    assert collect(paths).rows == 0
    assert ledger(paths) == ([("archive",)], [("archive",)])

    moved = DataPaths.at(tmp_path / "moved")
    shutil.move(paths.root, moved.root)
    assert snapshot(moved) == before


def test_a_missing_archive_that_holds_days_fails_loudly(paths: DataPaths, tmp_path: Path) -> None:
    """A database moved before its absolute archive record was upgraded: its recorded
    location is gone. Refused (never a quiet undercount or a new archive there) until the
    archive's new location is recorded with --relocate-archive."""
    compact(paths, retention=2, now=NOW)
    before = snapshot(paths)
    record_archive_as_before(paths, str(paths.archive))
    moved = DataPaths.at(tmp_path / "moved")
    shutil.move(paths.root, moved.root)

    missing = f"{paths.archive}/requests does not exist, but archive_batches records 2"
    fix = f"--archive {moved.archive} --relocate-archive"
    with pytest.raises(StoreError, match=re.escape(missing)) as refused:
        snapshot(moved)
    assert fix in str(refused.value)
    with pytest.raises(StoreError, match=re.escape(fix)):
        compact(moved, retention=2, now=NOW)
    assert not paths.root.exists()

    compact(moved, retention=2, now=NOW, archive=moved.archive, relocate_archive=True)
    assert snapshot(moved) == before
    assert ledger(moved) == ([("archive",)], [("archive",)])


@pytest.mark.parametrize("bad", ["file", "gopher://x/y"])
def test_an_unusable_archive_is_refused_and_not_recorded(
    paths: DataPaths, tmp_path: Path, bad: str
) -> None:
    """A refused `--archive` used to be recorded anyway: every later reader then failed on
    it, and nothing said how to repair it."""
    before = snapshot(paths)
    location = bad
    if bad == "file":
        location = str(tmp_path / "a-file")
        Path(location).write_text("not a folder")
    with pytest.raises(StoreError, match=re.escape(f"archive location {location} is not usable")):
        compact(paths, retention=2, now=NOW, archive=location)
    assert snapshot(paths) == before  # every reader still works
    assert compact(paths, retention=2, now=NOW).rows == 300  # into the default archive
    assert ledger(paths) == ([("archive",)], [("archive",)])


def test_a_data_dir_with_glob_characters(tmp_path: Path) -> None:
    """`[` and `*` in the path are escaped in the archive glob, sandbox included; `?`,
    which DuckDB itself cannot use in a database path, is refused with a clear message."""
    paths = DataPaths.at(tmp_path / "rollout[prod]*" / "data").ensure()
    write_request_segments(paths.segments, "app-1", files=2, rows=50, seed=1, start=DAY0)
    assert collect(paths).rows == 100
    assert compact(paths, retention=2, now=NOW).rows == 100
    assert snapshot(paths)["all"] == [(100, 100)] and snapshot(paths)["table"] == [(0,)]

    asked = DataPaths.at(tmp_path / "rollout?" / "data")
    with pytest.raises(StoreError, match=re.escape(f"{asked.database} contains '?'")):
        compact(asked, retention=2, now=NOW)


def test_the_nightly_comparison_counts_archived_rows(paths: DataPaths) -> None:
    """A window longer than the retention period: archived rows still count."""

    def counts() -> list[tuple[str, str, int, int]]:
        with connect(paths.database) as con:
            rows = compare(con, hours=24 * 5, now=NOW).rows
        return [
            (r["backend"], r["query_category"], r["legacy_requests"], r["production_requests"])
            for r in rows
        ]

    before = counts()
    assert compact(paths, retention=1, now=NOW).rows == 450
    assert counts() == before
    assert sum(legacy + production for *_, legacy, production in before) > 450


def test_retention_from_the_environment_and_the_cli(
    paths: DataPaths, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ROLLOUT_RETENTION_DAYS", "soon")
    with pytest.raises(ValueError, match="ROLLOUT_RETENTION_DAYS='soon'"):
        compact(paths, now=NOW)
    for days in ("-1", "1000000"):  # a million days overflowed the cutoff date
        monkeypatch.setenv("ROLLOUT_RETENTION_DAYS", days)
        with pytest.raises(
            ValueError, match=f"ROLLOUT_RETENTION_DAYS\\) must be 0 to 365,000 days, got {days}"
        ):
            compact(paths, now=NOW)
    monkeypatch.setenv("ROLLOUT_RETENTION_DAYS", "99999")  # "keep for ever" still works
    assert compact(paths, now=NOW).rows == 0
    monkeypatch.setenv("ROLLOUT_RETENTION_DAYS", "3")
    assert compact(paths, now=NOW).cutoff.isoformat() == "2025-06-02"

    cli = [sys.executable, "-m", "flows.cli", "compact", "--data-dir", str(paths.root), "--json"]
    bad = subprocess.run(
        cli, cwd=ROOT, capture_output=True, text=True, env={**env(), "ROLLOUT_RETENTION_DAYS": "x"}
    )
    assert bad.returncode == 2 and "ROLLOUT_RETENTION_DAYS" in bad.stderr
    done = subprocess.run(
        [*cli, "--retention-days", "0"], cwd=ROOT, capture_output=True, text=True, env=env()
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)  # exactly one JSON object
    # Today is long after June 2025: every remaining row (06-02 .. 06-04) is archived.
    assert result["rows"] == 450 and sorted(result["days"]) == [
        "2025-06-02",
        "2025-06-03",
        "2025-06-04",
    ]
    assert snapshot(paths)["all"] == [(600, 600)]


def env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("ROLLOUT_")}


def test_nightly_windows_follow_each_other_across_a_clock_change(paths: DataPaths) -> None:
    """A 02:00 local-time schedule runs 23 or 25 hours apart when clocks change: a fixed
    24-hour window counted one hour twice in spring and never compared one in autumn."""
    from flows.nightly import store

    ends = [DAY0 + timedelta(hours=24), DAY0 + timedelta(hours=49), DAY0 + timedelta(hours=72)]
    windows = []
    with connect(paths.database) as con:
        for end in ends:  # 24 h, then 25 h later (autumn), then 23 h later (spring)
            comparison = compare(con, hours=24, now=end)
            store(con, comparison)
            windows.append((comparison.window_start, comparison.window_end))
        total = con.execute(
            "SELECT count(*) FROM all_requests WHERE ts >= ? AND ts < ? AND NOT is_shadow",
            [windows[0][0], ends[-1]],
        ).fetchall()[0][0]
        compared = con.execute(
            "SELECT sum(legacy_requests + production_requests) FROM nightly_comparisons"
        ).fetchall()[0][0]
    assert [w[0] for w in windows[1:]] == [w[1] for w in windows[:-1]]  # no gap, no overlap
    assert compared == total


def test_rows_that_arrive_after_their_night_was_compared_are_compared_then(
    paths: DataPaths,
) -> None:
    """The next window starts where the last one ended: rows of a router that was
    offline overnight, collected after the run, were never counted by any comparison."""
    from flows.nightly import late_windows, store

    first_end, second_end = DAY0 + timedelta(hours=24), DAY0 + timedelta(hours=48)
    with connect(paths.database) as con:
        store(con, compare(con, hours=24, now=first_end))
        assert late_windows(con, second_end) == []  # nothing new: nothing redone
    write_request_segments(  # the offline router's rows of the first night, late
        paths.segments, "app-3", files=1, rows=40, seed=99, start=DAY0 + timedelta(hours=3)
    )
    collect(paths)
    with connect(paths.database) as con:
        ((redone, counted),) = late_windows(con, second_end)
        assert (redone.window_start, redone.window_end) == (DAY0, first_end)
        store(con, redone)
        store(con, compare(con, hours=24, now=second_end))
        assert late_windows(con, second_end) == []
        total, compared = con.execute(
            "SELECT (SELECT count(*) FROM all_requests WHERE ts < ? AND NOT is_shadow), "
            "(SELECT sum(legacy_requests + production_requests) FROM nightly_comparisons)",
            [second_end],
        ).fetchone()
    assert sum(redone.totals.values()) > counted
    assert compared == total


def test_a_night_with_no_rows_is_compared_again_when_its_rows_arrive(
    paths: DataPaths,
) -> None:
    """An empty window stored nothing, so the next window started after the last stored
    one and the late rows of the only router, offline that night, were never compared."""
    from flows.nightly import late_windows, store

    quiet = DAY0 + timedelta(days=10)  # after the fixture's four days: no rows
    with connect(paths.database) as con:
        store(con, compare(con, hours=24, now=quiet))
        empty = compare(con, hours=24, now=quiet + timedelta(hours=24))
        assert empty.rows == []
        store(con, empty)
    write_request_segments(
        paths.segments, "app-3", files=1, rows=30, seed=98, start=quiet + timedelta(hours=2)
    )
    collect(paths)
    with connect(paths.database) as con:
        ((redone, counted),) = late_windows(con, quiet + timedelta(hours=48))
        assert (redone.window_start, counted) == (quiet, 0)
        store(con, redone)
        stored = con.execute(
            "SELECT sum(legacy_requests + production_requests) FROM nightly_comparisons "
            "WHERE window_start = ?",
            [quiet],
        ).fetchone()
        shadows = con.execute(
            "SELECT count(*) FROM all_requests WHERE is_shadow AND router_instance = 'app-3'"
        ).fetchone()
    assert stored[0] + shadows[0] == 30


def test_a_nightly_comparison_is_stored_whole_once_per_window(paths: DataPaths) -> None:
    """Rows were inserted one commit at a time: a crash kept a partial window that the
    next night started after, and a re-run of the night stored the window twice."""
    from flows.nightly import store

    end = DAY0 + timedelta(hours=24)
    with connect(paths.database) as con:
        comparison = compare(con, hours=24, now=end)
        assert len(comparison.rows) > 1
        # the last row is refused by the table, after the others were written
        broken = [*comparison.rows[:-1], {**comparison.rows[-1], "legacy_requests": "many"}]
        with pytest.raises(duckdb.Error):
            store(con, replace(comparison, rows=broken))
        assert con.execute("SELECT count(*) FROM nightly_comparisons").fetchone() == (0,)

        store(con, comparison)
        again = compare(con, hours=24, now=end)  # the same night, run again
        store(con, again)
        stored = con.execute(
            "SELECT run_id, count(*) FROM nightly_comparisons GROUP BY run_id"
        ).fetchall()
    assert stored == [(again.run_id, len(comparison.rows))]
