"""The rollout commands' output and refusals, in process (no Prefect server, no routers):
data is printed as typed, and a refused request is one line on stderr with exit code 2."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import pytest
from click.testing import Result
from typer.testing import CliRunner

from flows import lifecycle
from flows.cli import rollout_cmd
from flows.cli.app import app
from flows.demo.runner import DEMO_PLAN
from flows.paths import DataPaths
from flows.plan import load_plan
from flows.store.database import connect
from tests.conftest import ROOT

REASON = "see [oncall] runbook [/] step 2 and/or [bold]x[/bold] \\"


@pytest.fixture
def running(tmp_path: Path) -> DataPaths:
    paths = DataPaths.at(tmp_path / "data").ensure()
    lifecycle.start(paths, load_plan(DEMO_PLAN), actor="test", rollout_id="ro-real")
    return paths


def cli(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(app, list(args), env=env)


def one_error_line(result: Result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0].removeprefix("error: ")


def test_a_reason_with_brackets_round_trips_through_status_report_and_sql(
    running: DataPaths,
) -> None:
    """`[/]` in a reason crashed status and report (MarkupError) for good; `[oncall]`
    vanished from the tables."""
    lifecycle.rollback(running, reason=REASON, actor="alice", rollout_id="ro-real")
    data = ["--data-dir", str(running.root)]

    status = cli("status", *data)
    assert status.exit_code == 0, status.output
    assert "rollout ro-real (demo)" in status.stdout
    assert REASON in status.stdout

    report = cli("report", *data)
    assert report.exit_code == 0, report.output
    assert f"rolled back: {REASON}" in report.stdout

    sql = cli("sql", "SELECT reason FROM decisions WHERE actor = 'alice'", *data)
    assert sql.exit_code == 0, sql.output
    assert REASON in sql.stdout


@pytest.mark.parametrize("command", ["status", "report", "tick", "approve", "rollback"])
@pytest.mark.parametrize("rollout_id", ["bogus", "x[/]y"])
def test_an_unknown_rollout_id_is_one_line_and_exit_2_everywhere(
    running: DataPaths, command: str, rollout_id: str
) -> None:
    result = cli(command, "--rollout-id", rollout_id, "--data-dir", str(running.root))
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    assert one_error_line(result).startswith(f"no rollout {rollout_id!r}")


def test_starting_while_a_rollout_is_active_is_refused_before_any_flow_runs(
    running: DataPaths, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rollout_cmd, "prefect_session", _no_flow_may_run)
    result = cli("start", "--plan", str(DEMO_PLAN), "--data-dir", str(running.root))
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    assert one_error_line(result).startswith(
        "rollout ro-real (router group 'demo') is already running"
    )


def test_start_says_how_long_it_waits_for_the_routers_before_waiting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no router running, start used to be silent for the whole ack timeout."""
    import flows.rollout_flows

    events: list[str] = []

    def fake_start(*args: Any, **kwargs: Any) -> dict[str, Any]:
        events.append("flow ran")
        return {"rollout_id": "ro-1", "version": 1, "acks": "1/1 applied"}

    def note(text: object, **kwargs: Any) -> None:
        events.append(str(text))

    monkeypatch.setattr(rollout_cmd, "prefect_session", nullcontext)
    monkeypatch.setattr(flows.rollout_flows, "rollout_start", fake_start)
    monkeypatch.setattr(rollout_cmd.err_console, "print", note)
    result = cli("start", "--plan", str(DEMO_PLAN), "--data-dir", str(tmp_path / "data"))
    assert result.exit_code == 0, result.output
    timeout = load_plan(DEMO_PLAN).ack_timeout.total_seconds()
    assert len(events) == 2 and events[1] == "flow ran", events
    assert f"waiting up to {timeout:g}s for the routers" in events[0]
    assert "started rollout ro-1" in result.stdout


@pytest.mark.parametrize("hours", ["-5", "0", "nan", "1e12"])
def test_nightly_needs_a_window_above_zero_hours(
    running: DataPaths, monkeypatch: pytest.MonkeyPatch, hours: str
) -> None:
    monkeypatch.setattr(rollout_cmd, "prefect_session", _no_flow_may_run)
    result = cli("nightly", "--hours", hours, "--data-dir", str(running.root))
    assert result.exit_code == 2, result.output
    assert "--hours" in one_error_line(result)


def test_deploy_against_a_dead_prefect_server_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port nobody listens on once closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/api"
    result = cli("deploy", "--data-dir", str(tmp_path / "data"), env={"PREFECT_API_URL": url})
    assert result.exit_code == 1, result.output
    assert one_error_line(result).startswith(f"no Prefect server answers at {url}")


def test_deploy_refuses_a_relative_worker_data_dir(tmp_path: Path) -> None:
    result = cli("deploy", "--data-dir", str(tmp_path / "data"), "--worker-data-dir", "data")
    assert result.exit_code == 2, result.output
    assert one_error_line(result).startswith("--worker-data-dir 'data' is not an absolute path")


def test_deploy_gives_the_flows_the_workers_data_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On Kubernetes the flow runs see the volume's mount path, not this machine's."""
    import subprocess

    seen: list[dict[str, str]] = []

    def fake_run(args: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        seen.append(kwargs["env"])
        return subprocess.CompletedProcess(args, 0, "deployed", "")

    monkeypatch.setattr(subprocess, "run", fake_run)
    monkeypatch.setattr(rollout_cmd, "_check_server", lambda url: None)
    env = {"PREFECT_API_URL": "http://127.0.0.1:9/api"}
    args = ["deploy", "--data-dir", str(tmp_path / "data")]
    result = cli(*args, "--worker-data-dir", "/data", env=env)
    assert result.exit_code == 0, result.output
    assert {e["ROLLOUT_DATA_DIR"] for e in seen} == {"/data"}
    seen.clear()
    assert cli(*args, env=env).exit_code == 0
    assert {e["ROLLOUT_DATA_DIR"] for e in seen} == {str((tmp_path / "data").resolve())}


def test_status_json_keeps_the_reason_verbatim(running: DataPaths) -> None:
    lifecycle.rollback(running, reason=REASON, actor="alice", rollout_id="ro-real")
    result = cli("status", "--json", "--data-dir", str(running.root))
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["decisions"][0]["reason"] == REASON


def _no_flow_may_run() -> Any:
    raise AssertionError("a refused command must not start a Prefect session")


def test_a_promotion_the_routers_refuse_is_undone_and_exits_1(
    running: DataPaths, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It exited 0 with "0/1 instance(s) applied": scripts took the promotion as done,
    and the database claimed a phase no router served until a tick came by."""
    from flows import control
    from tests.conftest import heartbeat

    router = heartbeat("app-1", 1)

    def refused(store: control.Store, version: int, timeout_s: float) -> control.AckStatus:
        return control.AckStatus(
            version, live=[router], pending=["app-1"], refused=[("app-1", "cannot apply")]
        )

    monkeypatch.setattr(control, "wait_for_ack", refused)
    result = cli("promote", "--reason", "skip shadow", "--data-dir", str(running.root))
    assert result.exit_code == 1, result.output
    assert "v2 was not applied by every router: restored the previous config as v3" in (
        result.stderr
    )
    live = control.control_store(running).current()
    assert (live.version, live.phase) == (3, "shadow")


def test_the_report_lists_decisions_and_counts_only_what_users_got(running: DataPaths) -> None:
    """It promised every decision and printed none; and it counted shadow executions
    (discarded answers) as production, hiding a canary's regression behind them."""
    from flows.bench.synthetic import make_table
    from flows.store.database import connect

    with connect(running.database) as con:
        rows = make_table(400, seed=3, config_version=1, mode="shadow")
        con.execute(f"INSERT INTO requests ({', '.join(rows.column_names)}) SELECT * FROM rows")
        con.execute("UPDATE requests SET is_shadow = (arm = 'production')")
        served = con.execute(
            "SELECT count(*) FROM requests WHERE arm = 'production' AND NOT is_shadow"
        ).fetchall()[0][0]
        rollout = lifecycle.resolve_active(con, None)
        assert rollout is not None
        lifecycle.promote(con, running, rollout, reason="by hand", actor="alice", override=True)
    report = cli("report", "--data-dir", str(running.root), "--json")
    assert report.exit_code == 0, report.output
    arms = {a["arm"]: a["requests"] for a in json.loads(report.stdout)["arms"]}
    assert arms.get("production", 0) == served == 0
    text = cli("report", "--data-dir", str(running.root))
    assert "decisions" in text.stdout and "manual override of the gate" in text.stdout


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["app", "run", "--rate", "nan", "--duration", "1"], "--rate (nan)"),
        (["app", "run", "--rate", "5", "--duration", "-3"], "--duration (-3)"),
        (["demo", "--rate", "0"], "--rate 0: give questions per second above 0"),
        (["demo", "--rate", "-2"], "--rate -2"),
    ],
)
def test_load_settings_that_are_no_rate_are_refused_before_anything_starts(
    args: list[str], says: str, tmp_path: Path
) -> None:
    """--rate nan shed 4,400,014 questions with exit 0; --duration -3 ran forever;
    `demo --rate 0` silently became 80."""
    result = cli(*args, "--data-dir", str(tmp_path))
    assert result.exit_code == 2, result.output
    assert says in one_error_line(result)


def test_a_broken_fleet_file_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    fleet = tmp_path / "fleet.json"
    fleet.write_text("{}")
    result = cli("app", "run", "--fleet-file", str(fleet), "--duration", "1")
    assert result.exit_code == 2, result.output
    assert "is not a fleet file" in one_error_line(result)


def test_sim_serve_never_overwrites_a_file_that_is_not_its_own(tmp_path: Path) -> None:
    """It wrote the fleet's URLs over the file, then deleted it on exit."""
    kept = tmp_path / "important.txt"
    kept.write_text("keep me")
    for target in (kept, tmp_path):
        result = cli("sim", "serve", "--fleet-file", str(target))
        assert result.exit_code == 2, result.output
        assert f"--fleet-file {target} exists and is not a fleet file" in one_error_line(result)
    assert kept.read_text() == "keep me"


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("lightrag-1", '{"error_rate": NaN}'), "NaN is not a number a backend profile can hold"),
        (("lightrag-1", '{"latency_ms": Infinity}'), "Infinity is not a number"),
        (("lightrag-1", "{}", "--arm", "bogus"), "'bogus' is not one of 'legacy', 'production'"),
    ],
)
def test_sim_set_refuses_what_no_profile_can_hold(
    tmp_path: Path, args: tuple[str, ...], says: str
) -> None:
    from flows.sim.fleet import FleetInfo, FleetMember, demo_fleet

    fleet = tmp_path / "fleet.json"
    spec = next(s for s in demo_fleet() if s.name == "lightrag-1")
    FleetInfo(members=[FleetMember(spec=spec, url="http://127.0.0.1:9")]).write(fleet)
    result = cli("sim", "set", *args, "--fleet-file", str(fleet))  # refused before any call
    assert result.exit_code == 2, result.output
    assert says in " ".join(result.output.replace("│", " ").split())


@pytest.mark.parametrize(
    ("content", "says"),
    [(b'{"id": 1, "text": "caf\xe9"}\n', "is not UTF-8 text (byte 22)"), (None, "is a folder")],
)
def test_a_workload_that_cannot_be_read_is_named(
    tmp_path: Path, content: bytes | None, says: str
) -> None:
    """A non-UTF-8 workload was a traceback naming no file; a folder was 'not found'."""
    from flows.demo.workload import load_questions

    workload = tmp_path / "questions.jsonl"
    if content is None:
        workload.mkdir()
    else:
        workload.write_bytes(content)
    with pytest.raises((ValueError, OSError), match=re.escape(f"workload {workload} {says}")):
        load_questions(workload)


def test_the_dashboard_refuses_an_unknown_rollout_before_serving(running: DataPaths) -> None:
    """It started serving and only the page said "no rollout 'nope'"."""
    result = cli("dashboard", "--rollout-id", "nope", "--data-dir", str(running.root))
    assert result.exit_code == 2
    assert "no rollout 'nope'" in one_error_line(result)


def test_a_host_that_is_not_this_machine_is_named_as_the_problem(running: DataPaths) -> None:
    result = cli("dashboard", "--host", "192.0.2.1", "--data-dir", str(running.root))
    assert result.exit_code == 2
    line = one_error_line(result)
    assert "an address of this machine" in line and "pick another --port" not in line


def test_a_rollout_id_outside_the_safe_characters_is_one_line_and_exit_2(tmp_path: Path) -> None:
    """It surfaced as a Prefect ParameterTypeError traceback after the flow had started."""
    result = cli("start", "--dry-run", "--rollout-id", "team/x", "--data-dir", str(tmp_path))
    assert result.exit_code == 2, result.output
    assert one_error_line(result) == (
        "--rollout-id 'team/x': allowed are 1 to 64 letters, digits, '_', '.' and '-'"
    )


def _rollout(*args: str | bytes) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args], capture_output=True, timeout=60, cwd=ROOT
    )


def _state(paths: DataPaths) -> tuple[str, int]:
    with connect(paths.database, read_only=True) as con:
        rollout = lifecycle.get_state(con, "ro-real")
    return rollout.state, rollout.phase_index


def test_an_argument_that_is_not_utf8_is_refused_before_anything_runs(running: DataPaths) -> None:
    """Lone surrogates reached pydantic and DuckDB: an emergency `rollback --reason` with a
    stray byte failed with a traceback and left the routers on the canary."""
    before = _state(running)
    result = _rollout("rollback", "--reason", b"oops \xff", "--data-dir", str(running.root))
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.decode().splitlines()
    assert line == (
        "error: argument 3 ('oops \\udcff') is not valid UTF-8: give every option, reason and "
        "path as UTF-8 text"
    )
    assert _state(running) == before == ("running", 0)  # nothing half-done
    retried = _rollout("rollback", "--reason", "oops", "--data-dir", str(running.root))
    assert retried.returncode == 0, retried.stderr


def test_an_environment_variable_that_is_not_utf8_is_named_not_shown(tmp_path: Path) -> None:
    """`deploy` with a stray byte in PREFECT_API_URL's host was a traceback."""
    env = {**os.environb, b"PREFECT_API_URL": b"http://key\xff@prefect.example/api"}
    result = subprocess.run(
        [sys.executable, "-m", "flows.cli", "deploy", "--data-dir", str(tmp_path)],
        capture_output=True,
        timeout=60,
        cwd=ROOT,
        env=env,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.decode().splitlines() == [
        "error: environment variable PREFECT_API_URL is not valid UTF-8: set it as UTF-8 text"
    ]


def test_a_file_where_the_data_dir_belongs_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    file = tmp_path / "data"
    file.write_text("not a folder")
    for command in (("control", "serve", "--port", "0"), ("start",)):
        result = _rollout(*command, "--data-dir", str(file))  # start: before Prefect starts
        assert result.returncode == 2, result.stderr
        (line,) = result.stderr.decode().splitlines()
        assert line.startswith("error: ") and str(file) in line


@pytest.mark.parametrize(
    ("command", "refusal"),
    [
        (("promote", "--reason", "x"), "no active rollout to promote"),
        (("abort", "--reason", "x"), "no active rollout to abort"),
        (("approve",), "nothing awaits approval (state: no active rollout)"),
    ],
)
def test_acting_on_a_folder_without_rollouts_creates_nothing(
    tmp_path: Path, command: tuple[str, ...], refusal: str
) -> None:
    """They created an empty metrics.duckdb, then said there was no rollout."""
    result = cli(*command, "--data-dir", str(tmp_path))
    assert result.exit_code == 2, result.output
    assert one_error_line(result) == (
        f"{refusal}: {tmp_path} has no metrics database (pass --data-dir)"
    )
    assert list(tmp_path.iterdir()) == []


def test_an_existing_path_may_have_any_bytes(tmp_path: Path) -> None:
    """Paths on Linux are bytes: a profile named in Latin-1 worked before the UTF-8 check."""
    profile = tmp_path / os.fsdecode(b"canary-caf\xe9.env")
    profile.write_text("PROD_LB_ENABLED=false\n")
    result = _rollout("config", "validate", "--profile", os.fsencode(profile))
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("error", "code"),
    [(OSError(30, "Read-only file system"), 1), (FileExistsError(17, "File exists"), 2)],
)
def test_environment_errors_are_one_line_and_bugs_keep_their_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], error: OSError, code: int
) -> None:
    import flows.cli

    def failing() -> None:
        raise error

    monkeypatch.setattr(sys, "argv", ["rollout"])
    monkeypatch.setattr(flows.cli, "app", failing)
    with pytest.raises(SystemExit) as exited:
        flows.cli.main()
    assert exited.value.code == code
    assert capsys.readouterr().err.startswith(f"error: [Errno {error.errno}]")

    def timing_out() -> None:
        raise TimeoutError  # an OSError subclass that is a bug here, not the disk

    monkeypatch.setattr(flows.cli, "app", timing_out)
    with pytest.raises(TimeoutError):
        flows.cli.main()
