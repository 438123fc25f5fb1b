"""Schema: migrations upgrade in place, views work on an empty store, docs match the DDL."""

from __future__ import annotations

import os
import re
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pytest

from flows.bench.synthetic import make_table, write_request_segments
from flows.demo.runner import FINAL_TABLE_SQL
from flows.paths import DataPaths
from flows.store import database
from flows.store.database import StoreError, archive_location, connect, schema_version
from flows.store.ingest import collect
from flows.store.schema import LATEST_VERSION, MACROS, MIGRATIONS, REQUEST_COLUMN_NAMES
from tests.conftest import ROOT

#: The views as schema version 1 shipped them (they read `requests` directly).
V1_VIEWS = {
    "arm_summary": "SELECT r.config_version, r.arm, count(*) AS requests FROM requests r "
    "GROUP BY ALL",
    "shadow_pairs": "SELECT s.request_id FROM requests s WHERE s.is_shadow",
}


def make_v1_database(path: Path, rows: int = 300) -> list[tuple]:
    """A database exactly as the version-1 code left it, with data; returns its rows."""
    con = duckdb.connect(str(path))
    con.execute(
        "CREATE TABLE schema_version "
        "(version INTEGER PRIMARY KEY, description VARCHAR, applied_at TIMESTAMPTZ)"
    )
    version, description, statements = MIGRATIONS[0]
    assert version == 1
    for statement in statements:
        con.execute(statement)
    con.execute("INSERT INTO schema_version VALUES (1, ?, ?)", [description, datetime.now(UTC)])
    for macro in MACROS:
        con.execute(macro)
    for name, sql in V1_VIEWS.items():
        con.execute(f"CREATE VIEW {name} AS {sql}")
    v1_rows = make_table(rows, seed=11)  # noqa: F841 - read by DuckDB's replacement scan
    con.execute("INSERT INTO requests SELECT * FROM v1_rows")
    con.execute(
        "INSERT INTO ingested_segments VALUES "
        "('app-1/requests-old-000001.parquet', 'app-1', 'requests', 'ingested', ?, 1234, "
        "now(), NULL)",
        [rows],
    )
    con.execute(
        "INSERT INTO config_versions VALUES (1, 'r0', 0, 'shadow', 'shadow', 0, "
        "'health_aware', NULL, now(), '{}')"
    )
    before = con.execute("SELECT * FROM requests ORDER BY request_id").fetchall()
    con.close()
    return before


def test_v1_database_upgrades_in_place_with_data_intact(tmp_path: Path) -> None:
    paths = DataPaths.at(tmp_path / "data").ensure()
    before = make_v1_database(paths.database)

    with connect(paths.database) as con:
        assert schema_version(con) == LATEST_VERSION == 3
        after = con.execute(
            f"SELECT {', '.join(REQUEST_COLUMN_NAMES[:-1])} FROM requests ORDER BY request_id"
        ).fetchall()
        segments = con.execute("SELECT count(*) FROM requests WHERE segment IS NULL").fetchall()
        compression = con.execute(
            "SELECT DISTINCT compression FROM pragma_storage_info('requests') "
            "WHERE column_name = 'request_id' AND segment_type = 'VARCHAR'"
        ).fetchall()
        ledger = con.execute("SELECT path, rows, deleted_at FROM ingested_segments").fetchall()
        per_arm = con.execute("SELECT sum(requests) FROM arm_summary").fetchall()
        phase = con.execute("SELECT DISTINCT phase_name FROM arm_summary").fetchall()
        tables = {r[0] for r in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
    assert after == before
    assert segments == [(300,)]
    assert compression == [("Uncompressed",)]
    assert ledger == [("app-1/requests-old-000001.parquet", 300, None)]
    assert per_arm == [(300,)] and phase == [("shadow",)]
    assert {"archive_batches", "store_settings"} <= tables
    assert "requests_v2" not in tables

    # The upgraded store keeps working: new segments land next to the old rows.
    write_request_segments(paths.segments, "app-2", files=2, rows=50, seed=3)
    assert collect(paths).rows == 100
    with connect(paths.database, read_only=True) as con:
        assert con.execute("SELECT count(*), count(segment) FROM all_requests").fetchall() == [
            (400, 100)
        ]


def test_a_failed_migration_leaves_the_previous_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "metrics.duckdb"
    with connect(path):
        pass
    step = LATEST_VERSION + 1
    broken = (step, "broken", ["CREATE TABLE half_done (a INTEGER)", "SELECT * FROM no_such"])
    monkeypatch.setattr(database, "MIGRATIONS", [*MIGRATIONS, broken])
    monkeypatch.setattr(database, "LATEST_VERSION", step)
    with pytest.raises(duckdb.CatalogException), connect(path):
        pass
    monkeypatch.undo()
    with connect(path) as con:
        assert schema_version(con) == LATEST_VERSION
        tables = {r[0] for r in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
    assert "half_done" not in tables


def test_a_newer_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "metrics.duckdb"
    with connect(path) as con:
        con.execute("INSERT INTO schema_version VALUES (99, 'future', now())")
    with pytest.raises(StoreError, match="newer than this code"), connect(path):
        pass
    # readers too: they failed with "Table ... arm_summary does not exist"
    with pytest.raises(StoreError, match="newer than this code"), connect(path, read_only=True):
        pass


def test_an_older_database_stays_readable_for_the_commands_that_then_upgrade_it(
    tmp_path: Path,
) -> None:
    """`rollout start`, `tick`, `approve` and `abort` read before they write: refusing
    an older schema to readers locked them out of the upgrade their write would do."""
    path = tmp_path / "metrics.duckdb"
    make_v1_database(path)
    with connect(path, read_only=True) as con:
        assert schema_version(con) == 1
        assert con.execute("SELECT count(*) FROM rollouts").fetchall() == [(0,)]
    with connect(path) as con:  # a writer upgrades it in place
        assert schema_version(con) == LATEST_VERSION


def test_views_answer_on_an_empty_store_from_any_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    paths = DataPaths.at("relative-data").ensure()  # relative on purpose
    with connect(paths.database):
        pass
    monkeypatch.chdir("/")
    absolute = tmp_path / "relative-data" / "metrics.duckdb"
    with connect(absolute, read_only=True) as con:
        for view in (
            "all_requests",
            "archived_requests",
            "arm_summary",
            "phase_requests",
            "phase_timeline",
            "daily_comparison",
            "backend_health",
            "shadow_pairs",
        ):
            assert con.execute(f"SELECT count(*) FROM {view}").fetchall() == [(0,)], view
        names = [r[0] for r in con.execute("DESCRIBE all_requests").fetchall()]
        recorded = con.execute("SELECT value FROM store_settings").fetchall()[0][0]
        location = archive_location(con, absolute)
    assert names == list(REQUEST_COLUMN_NAMES)
    assert recorded == "archive"  # the default: beside the database, wherever it moves
    assert os.path.isabs(location) and location == str(tmp_path / "relative-data" / "archive")


def test_daily_comparison_keeps_days_with_one_arm_only(tmp_path: Path) -> None:
    paths = DataPaths.at(tmp_path).ensure()
    day1 = make_table(40, seed=1, start=datetime(2025, 6, 1, tzinfo=UTC))
    day2 = make_table(40, seed=2, start=datetime(2025, 6, 2, tzinfo=UTC))
    with connect(paths.database) as con:
        con.execute(f"INSERT INTO requests ({', '.join(day1.column_names)}) SELECT * FROM day1")
        con.execute(
            f"INSERT INTO requests ({', '.join(day2.column_names)}) "
            "SELECT * FROM day2 WHERE arm = 'production'"
        )
        rows = con.execute(
            "SELECT day::DATE, legacy_requests IS NULL, production_requests > 0, "
            "p95_rel_diff IS NULL FROM daily_comparison ORDER BY day"
        ).fetchall()
    assert [(str(d), a, b, c) for d, a, b, c in rows] == [
        ("2025-06-01", False, True, False),
        ("2025-06-02", True, True, True),
    ]


def test_daily_comparison_has_utc_days_in_a_users_own_time_zone(tmp_path: Path) -> None:
    """A user's own DuckDB session runs in the host's zone: in Los Angeles, the day
    boundaries moved and the same rows made four days instead of three."""
    paths = DataPaths.at(tmp_path).ensure()
    rows = make_table(300, seed=3, start=datetime(2025, 6, 1, tzinfo=UTC), step_s=600.0)
    with connect(paths.database) as con:
        con.execute(f"INSERT INTO requests ({', '.join(rows.column_names)}) SELECT * FROM rows")
    query = "SELECT day, legacy_requests + production_requests FROM daily_comparison ORDER BY day"
    answers = {}
    for zone in ("UTC", "America/Los_Angeles", "Asia/Kolkata"):
        with duckdb.connect(str(paths.database), read_only=True) as plain:
            plain.execute(f"SET TimeZone = '{zone}'")
            answers[zone] = [(d.astimezone(UTC), n) for d, n in plain.execute(query).fetchall()]
    assert [d.isoformat() for d, _ in answers["UTC"]] == [
        "2025-06-01T00:00:00+00:00",
        "2025-06-02T00:00:00+00:00",
        "2025-06-03T00:00:00+00:00",
    ]
    assert answers["America/Los_Angeles"] == answers["UTC"] == answers["Asia/Kolkata"]


def test_phase_timeline_counts_every_version_of_a_republished_phase(tmp_path: Path) -> None:
    """lifecycle.py republishes a phase under a new version (restore, reconcile): the rows
    routed under the earlier version still belong to the phase, as in `arm_summary`."""
    with connect(tmp_path / "metrics.duckdb") as con:
        for version in (7, 8):  # 7: published at phase start; 8: the same phase republished
            con.execute(
                "INSERT INTO config_versions VALUES (?, 'r1', 0, 'canary-5', 'canary', 5, "
                "'health_aware', NULL, now(), '{}')",
                [version],
            )
        con.execute(
            "INSERT INTO config_versions VALUES (9, 'r1', 1, 'canary-25', 'canary', 25, "
            "'health_aware', NULL, now(), '{}')"
        )
        con.execute(
            "INSERT INTO phases VALUES ('r1', 0, 'canary-5', 'canary', 5, 8, now(), NULL, NULL), "
            "('r1', 1, 'canary-25', 'canary', 25, 9, now(), NULL, NULL)"
        )
        for version, n in ((7, 900), (8, 100), (9, 50)):
            rows = make_table(n, seed=version, config_version=version, mode="canary")
            con.execute(f"INSERT INTO requests ({', '.join(rows.column_names)}) SELECT * FROM rows")
        timeline = con.execute(
            "SELECT phase_index, legacy_requests + production_requests FROM phase_timeline "
            "ORDER BY phase_index"
        ).fetchall()
        summary = con.execute(
            "SELECT phase_index, sum(requests) FROM arm_summary GROUP BY ALL ORDER BY phase_index"
        ).fetchall()
    assert timeline == [(0, 1000), (1, 50)]
    assert timeline == summary


def test_rows_under_a_rollbacks_document_are_not_the_phases(tmp_path: Path) -> None:
    """The legacy_only document of a rollback carries the phase it ended and stays live
    until the next rollout: a finished phase kept gaining its rows (a 100 % production
    phase showed 1,257 legacy requests in a demo database)."""
    with connect(tmp_path / "metrics.duckdb") as con:
        con.execute(
            "INSERT INTO config_versions VALUES (2, 'r1', 1, 'canary-5', 'canary', 5, "
            "'health_aware', NULL, now(), '{}'), (3, 'r1', 1, 'rollback', 'legacy_only', 0, "
            "'health_aware', NULL, now(), '{}')"
        )
        con.execute(
            "INSERT INTO phases VALUES "
            "('r1', 1, 'canary-5', 'canary', 5, 2, now(), now(), 'rolled_back')"
        )
        for version, n in ((2, 400), (3, 300)):
            rows = make_table(n, seed=version, config_version=version, mode="canary")
            con.execute(f"INSERT INTO requests ({', '.join(rows.column_names)}) SELECT * FROM rows")
        (counted,) = con.execute(
            "SELECT legacy_requests + production_requests FROM phase_timeline"
        ).fetchone()
        by_name = dict(
            con.execute("SELECT phase_name, sum(requests) FROM arm_summary GROUP BY ALL").fetchall()
        )
    assert counted == 400
    assert by_name == {"canary-5": 400, "rollback": 300}


def test_rows_after_a_completed_rollout_are_not_its_last_phases(tmp_path: Path) -> None:
    """A completed rollout's last document stays live: a report read weeks later counted
    every production request since as the 100 % phase's, against the rollout's legacy."""
    ended = datetime(2025, 6, 1, 0, 10, tzinfo=UTC)
    with connect(tmp_path / "metrics.duckdb") as con:
        con.execute(
            "INSERT INTO config_versions VALUES (4, 'r1', 3, 'full', 'production_only', 100, "
            "'health_aware', NULL, now(), '{}'), (5, NULL, NULL, NULL, 'production_only', 100, "
            "'health_aware', NULL, now(), '{}')"
        )
        con.execute(
            "INSERT INTO rollouts VALUES ('r1', 'default', 'five-weeks', '{}', 'completed', 3, "
            "$start, $ended, $ended, 'completed')",
            {"start": datetime(2025, 6, 1, tzinfo=UTC), "ended": ended},
        )
        con.execute(
            "INSERT INTO phases VALUES "
            "('r1', 3, 'full', 'production_only', 100, 4, $start, $ended, 'completed')",
            {"start": datetime(2025, 6, 1, tzinfo=UTC), "ended": ended},
        )
        # 1,000 rows one second apart from midnight: 600 before the end, 400 after it.
        rows = make_table(1000, seed=4, config_version=4, mode="production_only", step_s=1.0)
        con.execute(f"INSERT INTO requests ({', '.join(rows.column_names)}) SELECT * FROM rows")
        outside = make_table(50, seed=5, config_version=5, mode="production_only")
        con.execute(
            f"INSERT INTO requests ({', '.join(outside.column_names)}) SELECT * FROM outside"
        )
        (counted,) = con.execute(
            "SELECT legacy_requests + production_requests FROM phase_timeline"
        ).fetchone()
        phase_rows = con.execute(
            "SELECT rollout_id, phase_name, count(*), max(ts) <= $ended FROM phase_requests "
            "GROUP BY ALL",
            {"ended": ended},
        ).fetchall()
        by_name = dict(
            con.execute(
                "SELECT phase_name, sum(requests) FROM arm_summary WHERE rollout_id = 'r1' "
                "GROUP BY ALL"
            ).fetchall()
        )
        final = con.execute(FINAL_TABLE_SQL, ["r1"]).fetchall()
        (served,) = con.execute(  # the final table shows what users got: no shadow rows
            "SELECT count(*) FROM all_requests WHERE config_version = 4 AND ts <= $ended "
            "AND NOT is_shadow",
            {"ended": ended},
        ).fetchone()
        total = con.execute("SELECT count(*) FROM all_requests").fetchall()
    assert counted == 601  # ts 0 s .. 600 s: the end itself still counts
    assert phase_rows == [("r1", "full", 601, True)]
    assert by_name == {"full": 601, "after completion": 399}
    assert sum(row[1] for row in final) == served < 601
    assert total == [(1050,)]  # nothing is lost: the views only attribute


def test_readers_see_this_codes_views_before_any_writer_upgrades_them(tmp_path: Path) -> None:
    """After an upgrade, views change only when a writer (collect, a tick) connects:
    `rollout report` and the dashboard crashed on `phase_requests` until then."""
    database = tmp_path / "metrics.duckdb"
    with connect(database) as con:
        rows = make_table(20, seed=1)
        con.execute(f"INSERT INTO requests ({', '.join(rows.column_names)}) SELECT * FROM rows")
    older = duckdb.connect(str(database))  # what the previous release's writer left
    older.execute("DROP VIEW phase_timeline")
    older.execute("DROP VIEW phase_requests")
    older.execute("UPDATE store_settings SET value = 'older' WHERE key = 'views'")
    older.close()
    with connect(database, read_only=True, sandbox=[tmp_path]) as con:
        assert con.execute("SELECT count(*) FROM phase_requests").fetchall() == [(0,)]
        assert con.execute("SELECT count(*) FROM phase_timeline").fetchall() == [(0,)]
        assert con.execute("SELECT sum(requests) FROM arm_summary").fetchall() == [(20,)]
    with connect(database) as con:  # a writer brings the file itself up to date
        pass
    plain = duckdb.connect(str(database), read_only=True)
    assert plain.execute("SELECT count(*) FROM phase_requests").fetchall() == [(0,)]
    plain.close()


def documented_columns() -> dict[str, list[str]]:
    """{table or view: [column, ...]} from the column tables of docs/schema.md."""
    text = (ROOT / "docs" / "schema.md").read_text()
    found: dict[str, list[str]] = {}
    for section in re.split(r"^### ", text, flags=re.MULTILINE)[1:]:
        name = re.match(r"`(\w+)`", section)
        assert name, section[:40]
        rows = re.findall(r"^\| `(\w+)` \| ([A-Z ]+?) \| (yes|no) \|", section, re.MULTILINE)
        found[name.group(1)] = [f"{c} {t.strip()} {n}" for c, t, n in rows]
    return found


def test_docs_describe_every_table_and_view_column_by_column(tmp_path: Path) -> None:
    short = {"TIMESTAMP WITH TIME ZONE": "TIMESTAMPTZ"}
    with connect(tmp_path / "metrics.duckdb") as con:
        relations = [
            r[0]
            for r in con.execute(
                "SELECT table_name FROM information_schema.tables ORDER BY table_name"
            ).fetchall()
        ]
        actual = {
            name: [
                f"{c} {short.get(t, t)} {'yes' if n == 'YES' else 'no'}"
                for c, t, n, *_ in con.execute(f"DESCRIBE {name}").fetchall()
            ]
            for name in relations
        }
    assert documented_columns() == actual


def test_report_and_dashboard_on_an_old_file_say_how_to_upgrade_it(tmp_path: Path) -> None:
    """Before any writer of this release ran, they crashed on a view the file lacks."""
    from typer.testing import CliRunner

    from flows.cli.app import app
    from flows.dashboard.view import read_view
    from flows.paths import DataPaths

    paths = DataPaths.at(tmp_path / "data").ensure()
    make_v1_database(paths.database)
    hint = "run `rollout collect` once to upgrade it in place"
    assert hint in (read_view(paths).problem or "")
    result = CliRunner().invoke(app, ["report", "--data-dir", str(paths.root)])
    assert result.exit_code == 2 and "schema v1" in result.output and hint in result.output
    with connect(paths.database):  # what `rollout collect` does first
        pass
    assert read_view(paths).problem is None


def test_a_file_whose_later_steps_changed_no_table_is_read_with_this_releases_views(
    tmp_path: Path,
) -> None:
    """Version 3 changed no table: a version-2 file (a copy made before the upgrade, say)
    is read with the current views, not refused."""
    from flows.dashboard.view import read_view
    from flows.paths import DataPaths

    paths = DataPaths.at(tmp_path / "data").ensure()
    with connect(paths.database) as con:
        con.execute("DELETE FROM schema_version WHERE version > 2")
        con.execute("DROP VIEW phase_requests")  # as a version-2 writer left it
        con.execute("UPDATE store_settings SET value = 'older' WHERE key = 'views'")
    with connect(paths.database, read_only=True) as con:
        assert schema_version(con) == 2
        assert con.execute("SELECT count(*) FROM phase_requests").fetchall() == [(0,)]
    assert read_view(paths).problem is None
