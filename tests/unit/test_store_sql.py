"""`rollout sql`: read-only, sandboxed, three output formats; writes refused with exit 2."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.bench.synthetic import write_request_segments
from flows.cli.app import app
from flows.cli.sql_cmd import EXAMPLES
from flows.paths import DataPaths
from flows.store.ingest import collect
from flows.store.retention import compact


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> DataPaths:
    """A store with 200 rows, half of them archived to a non-default archive folder."""
    root = tmp_path_factory.mktemp("sql")
    paths = DataPaths.at(root / "data").ensure()
    start = datetime(2025, 6, 1, tzinfo=UTC)
    for day in range(2):
        write_request_segments(
            paths.segments, "app-1", files=1, rows=100, seed=day, start=start + timedelta(days=day)
        )
    collect(paths)
    compact(paths, retention=0, now=start + timedelta(days=1, hours=1), archive=root / "arch")
    return paths


def rollout_sql(data: DataPaths, *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, ["sql", "--data-dir", str(data.root), *args])
    return result.exit_code, result.stdout, result.stderr


@pytest.mark.parametrize(
    "statement",
    [
        "INSERT INTO requests SELECT * FROM requests",
        "DELETE FROM requests",
        "COPY requests TO '{leak}'",
        "COPY (SELECT 1) TO '{leak}'",
        "ATTACH '{leak}' AS other",
        "INSTALL httpfs",
        "SELECT 1; DROP TABLE requests",
        "CREATE TABLE x AS SELECT 1",
        "SET threads = 1",
        "EXPORT DATABASE '{leak}'",
        # EXPLAIN ANALYZE runs what it explains; the data dir itself is readable (and
        # DuckDB's allowed directories are writable too), so this wrote files there.
        "EXPLAIN ANALYZE COPY (SELECT 1) TO '{inside}'",
        "/* why */ explain analyze COPY requests TO '{inside}'",
        "EXPLAIN (FORMAT json) COPY (SELECT 1) TO '{inside}'",
        "EXPLAIN ANALYZE SELECT 1; COPY (SELECT 1) TO '{inside}'",
    ],
)
def test_write_statements_are_refused_with_exit_2(
    data: DataPaths, tmp_path: Path, statement: str
) -> None:
    leak = tmp_path / "leak.csv"
    inside = data.root / "control" / "planted.csv"
    code, out, err = rollout_sql(data, statement.format(leak=leak, inside=inside))
    assert code == 2, (out, err)
    assert "refused" in err and "read-only" in err
    assert not leak.exists() and not inside.exists()
    code, out, _ = rollout_sql(data, "SELECT count(*) AS n FROM all_requests", "--format", "csv")
    assert (code, out.splitlines()) == (0, ["n", "200"])


@pytest.mark.parametrize(
    "statement",
    [
        "EXPLAIN SELECT 1",
        "explain analyze SELECT count(*) FROM all_requests",
        "EXPLAIN (FORMAT json) SELECT 1",
    ],
)
def test_explaining_a_select_is_allowed(data: DataPaths, statement: str) -> None:
    code, out, err = rollout_sql(data, statement, "--format", "json")
    assert code == 0, (out, err)
    assert json.loads(out), out


def test_reading_files_outside_the_store_is_blocked(data: DataPaths) -> None:
    code, _, err = rollout_sql(data, "SELECT * FROM read_text('/etc/hostname')")
    assert code == 2 and "query failed" in err


def test_select_as_table_csv_and_json(data: DataPaths) -> None:
    query = "SELECT arm, count(*) AS n FROM all_requests GROUP BY arm ORDER BY arm"
    code, out, _ = rollout_sql(data, query)
    assert code == 0 and "arm" in out and "legacy" in out and "2 row(s)" in out

    code, out, _ = rollout_sql(data, query, "--format", "csv")
    rows = list(csv.reader(io.StringIO(out)))
    assert (
        code == 0
        and rows[0] == ["arm", "n"]
        and [r[0] for r in rows[1:]]
        == [
            "legacy",
            "production",
        ]
    )
    assert sum(int(r[1]) for r in rows[1:]) == 200

    code, out, _ = rollout_sql(data, query, "--format", "json")
    parsed = json.loads(out)
    assert code == 0 and [r["arm"] for r in parsed] == ["legacy", "production"]
    assert sum(r["n"] for r in parsed) == 200


def test_archived_rows_are_readable_through_the_sandbox(data: DataPaths) -> None:
    code, out, err = rollout_sql(
        data,
        "SELECT (SELECT count(*) FROM requests) AS in_table, "
        "(SELECT count(*) FROM archived_requests) AS archived, "
        "(SELECT sum(requests) FROM arm_summary) AS in_views",
        "--format",
        "json",
    )
    assert code == 0, err
    assert json.loads(out) == [{"in_table": 100, "archived": 100, "in_views": 200}]


def test_every_example_query_runs(data: DataPaths) -> None:
    code, out, _ = rollout_sql(data, "--examples")
    assert code == 0 and "arm_summary" in out
    for title, query in EXAMPLES.items():
        code, _, err = rollout_sql(data, query, "--format", "json")
        assert code == 0, (title, err)


def test_brackets_in_values_and_names_are_printed_as_typed(data: DataPaths) -> None:
    """Values went through rich markup: `[legacy] 3 errors` printed as ` 3 errors` and a
    `[/]` crashed the command."""
    code, out, err = rollout_sql(data, """SELECT '[legacy] 3 errors' AS "[b]col", 'a [/] b' AS v""")
    assert code == 0, err
    assert "[legacy] 3 errors" in out and "[b]col" in out and "a [/] b" in out


@pytest.mark.parametrize("query", [";", " ; ;", "/* nothing */"])
def test_a_query_without_a_statement_is_refused_with_exit_2(data: DataPaths, query: str) -> None:
    code, out, err = rollout_sql(data, query)
    assert code == 2 and out == ""
    assert "no statement" in err


def test_json_keeps_every_column_and_stays_valid_json(data: DataPaths) -> None:
    """A join's repeated names overwrote each other (`decisions JOIN gate_evaluations`
    lost the decision's reason); NaN came out as a bare `NaN` that strict parsers
    refuse."""
    code, out, err = rollout_sql(
        data,
        "SELECT 1 AS id, 'first' AS v, 'second' AS v, 'nan'::DOUBLE AS x, "
        "'-inf'::DOUBLE AS y, 1.5::DOUBLE AS z",
        "--format",
        "json",
    )
    assert code == 0, err
    assert "NaN" not in out and "Infinity" not in out
    assert json.loads(out) == [
        {"id": 1, "v": "first", "v_2": "second", "x": None, "y": None, "z": 1.5}
    ]


def test_nested_and_time_values_are_written_as_data_not_python_reprs(data: DataPaths) -> None:
    query = (
        "SELECT [TIMESTAMPTZ '2026-01-02 03:04:05+00'] AS times, {'ok': 3} AS counts, "
        "INTERVAL '1 day 2 hours 3.5 seconds' AS took, '\\xff'::BLOB AS raw"
    )
    code, out, err = rollout_sql(data, query, "--format", "json")
    assert code == 0, err
    (row,) = json.loads(out)
    assert row == {
        "times": ["2026-01-02T03:04:05+00:00"],
        "counts": {"ok": 3},
        "took": "P1DT2H0M3.5S",
        "raw": "ff",
    }
    code, out, err = rollout_sql(data, query, "--format", "csv")
    assert code == 0, err
    assert "\r" not in out and "datetime" not in out and "timedelta" not in out
    header, cells = list(csv.reader(io.StringIO(out)))
    assert header == ["times", "counts", "took", "raw"]
    assert json.loads(cells[0]) == ["2026-01-02T03:04:05+00:00"]
    assert json.loads(cells[1]) == {"ok": 3} and cells[2] == "P1DT2H0M3.5S"


def test_a_query_may_start_with_a_comment_line_as_the_examples_print_them(
    data: DataPaths,
) -> None:
    code, out, err = rollout_sql(data, "-- how many\nSELECT 41 + 1 AS answer", "--format", "csv")
    assert code == 0, err
    assert out.splitlines() == ["answer", "42"]


def test_csv_spells_out_infinities_and_a_mistyped_option_is_named(data: DataPaths) -> None:
    code, out, err = rollout_sql(
        data, "SELECT 'inf'::DOUBLE AS y, '-inf'::DOUBLE AS z, NULL AS n", "--format", "csv"
    )
    assert code == 0, err
    assert out.splitlines() == ["y,z,n", "inf,-inf,"]  # an empty cell is NULL only
    code, out, err = rollout_sql(data, "--exmaples")
    assert code == 2 and out == ""
    assert "no such option: --exmaples" in err


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("PRAGMA table_info('ingested_segments')", "path"),
        ("CALL pragma_table_info('requests')", "config_version"),
        ("PRAGMA show_tables", "requests"),
        ("CALL duckdb_views()", "arm_summary"),
        ("PIVOT (SELECT arm FROM all_requests) ON arm USING count(*)", "production"),
    ],
)
def test_catalogue_pragmas_and_pivot_are_reads(data: DataPaths, query: str, expected: str) -> None:
    code, out, err = rollout_sql(data, query, "--format", "csv")
    assert code == 0, err
    assert expected in out


@pytest.mark.parametrize(
    "query", ["PRAGMA threads = 1", "PRAGMA enable_profiling", "CALL duckdb_secrets()"]
)
def test_setting_pragmas_and_other_calls_are_refused(data: DataPaths, query: str) -> None:
    code, _, err = rollout_sql(data, query)
    assert code == 2 and "refused" in err and "catalogue pragmas" in err


def test_the_table_prints_nested_values_as_json(data: DataPaths) -> None:
    code, out, err = rollout_sql(data, "SELECT {'ok': 3} AS counts, ['a', 'b'] AS names")
    assert code == 0, err
    assert '{"ok": 3}' in out and '["a", "b"]' in out
    assert "{'ok'" not in out


def test_the_table_never_shows_everyday_numbers_in_scientific_notation(data: DataPaths) -> None:
    code, out, err = rollout_sql(
        data, "SELECT 604800.0::DOUBLE AS duration_s, 0.0050341::DOUBLE AS cost, 136.4::DOUBLE AS p"
    )
    assert code == 0, err
    assert "604800" in out and "0.005034" in out and "136.4" in out
    assert "e+05" not in out


@pytest.mark.parametrize("wait", ["nan", "-5", "inf"])
def test_a_wait_that_is_no_number_of_seconds_is_refused(data: DataPaths, wait: str) -> None:
    """--wait nan waited forever on a held lock, and -5 said "waited -5s"."""
    code, _, err = rollout_sql(data, "--wait", wait, "SELECT 1")
    assert code == 2 and "give seconds from 0 to 3600" in err
