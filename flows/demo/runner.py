"""`rollout demo`: a real, compressed five-phase rollout on this machine.

Starts the simulated fleet and the application as child processes, runs the
`rollout-run` flow in this process, shows live progress, and ends with a
legacy-vs-production table computed by SQL from DuckDB. Every child is stopped on the
way out, whether the rollout completed, rolled back, failed or was interrupted.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from flows.demo.processes import ChildProcess, python_module
from flows.paths import DataPaths
from flows.plan import RolloutPlan, load_plan
from flows.prefect_env import prefect_session
from flows.resources import resource
from flows.sim.fleet import SIM_API_KEY_ENV, FleetInfo, set_profile
from flows.store.phase_names import NOT_A_PHASE_SQL
from router.control_store import FileControlStore

DEMO_PLAN = resource("deployments/plans/demo.yaml")
APP_INSTANCE = "demo-app-1"

#: What `--inject-regression PHASE` does to the production path during that phase.
REGRESSION = {"error_rate": 0.35, "latency_ms": 400.0}
#: Above this share of questions shed, the demo says the machine did not keep up.
SATURATED_SHARE = 0.01
#: Each attempt's timeout: 15x the simulated backends' p95, so a host stall of a few
#: seconds (shared CI machines have them) shows as latency on both arms, not as errors.
DEMO_BACKEND_TIMEOUT_S = 5.0
#: The legacy router's rest in the demo's compressed clock (see where the app starts).
DEMO_LEGACY_REST_S = 20

FINAL_TABLE_SQL = """
SELECT r.arm,
       count(*)                                                        AS requests,
       avg(CASE WHEN r.outcome = 'ok' THEN 1.0 ELSE 0.0 END)           AS success_rate,
       quantile_cont(r.latency_ms, 0.5)                                AS p50_ms,
       quantile_cont(r.latency_ms, 0.95)                               AS p95_ms,
       avg(r.cost_usd)                                                 AS cost_per_request_usd,
       avg(r.quality_score)                                            AS mean_quality
FROM phase_requests r  -- the phases' rows: not a rollback's, nor after completion
WHERE r.rollout_id = ?
  AND NOT r.is_shadow  -- what users got: a shadow answer is discarded
GROUP BY r.arm ORDER BY r.arm
"""

PHASE_TABLE_SQL = f"""
SELECT phase_index + 1 AS phase, phase_name, arm, requests, success_rate, p50_ms, p95_ms,
       cost_per_request_usd, mean_quality
FROM arm_summary WHERE rollout_id = ? AND phase_name NOT IN {NOT_A_PHASE_SQL}
ORDER BY phase_index, arm
"""


@dataclass
class DemoSettings:
    data_dir: Path
    fast: bool = False
    inject_regression: str | None = None
    plan_path: Path = DEMO_PLAN
    rate: float | None = None
    users: int = 2000
    seed: int = 11
    #: Serve `rollout dashboard` during the run on this port (0: any free port).
    dashboard_port: int | None = None


@dataclass
class DemoOutcome:
    rollout_id: str | None
    state: str
    reason: str
    seconds: float
    database: Path
    final_rows: list[tuple[Any, ...]] = field(default_factory=list)
    regression_injected_at: str | None = None
    #: The application's own counts (sent, ok, failed, shed), when it left them.
    load: dict[str, Any] | None = None

    def load_lines(self) -> list[str]:
        """What the application saw, and whether the machine kept up with the load: a
        saturated app sheds questions and its latency grows, which the gate then reads
        as the balancer's fault."""
        if not self.load:
            return []
        load = self.load
        offered = load["sent"] + load["shed"]
        lines = [
            f"application: {load['sent']} questions sent, {load['ok']} answered, "
            f"{load['failed']} failed, {load['shed']} shed"
        ]
        if offered and load["shed"] / offered > SATURATED_SHARE:
            lines.append(
                f"the application shed {load['shed'] / offered:.1%} of the questions: this "
                f"machine did not keep up with {load['rate']:g} per second, so the numbers "
                "above measure the machine more than the balancer; close other work or "
                "pass a lower --rate"
            )
        return lines


@contextmanager
def live_display(view: Any, console: Console) -> Iterator[None]:
    """rich's Live, ending on a fresh line: when the output is not a terminal (a log
    file, a pipe, CI), Live leaves its last line open and the next print would continue
    it."""
    try:
        with Live(view, console=console, refresh_per_second=4):
            yield
    finally:
        if not console.is_terminal:
            console.line()


class LiveView:
    """What the operator watches: phase, state, requests per arm, last verdict."""

    def __init__(self, plan: RolloutPlan) -> None:
        self.plan = plan
        self.started = time.monotonic()
        self.last: Any = None
        self.history: list[str] = []
        self.status = "starting"
        self.dashboard_url: str | None = None

    def update(self, report: Any) -> None:
        self.last = report
        line = (
            f"{time.monotonic() - self.started:5.0f}s  phase {report.phase_index + 1 if report.phase_index is not None else '-'}"
            f" {report.phase_name or '':10} {report.verdict or '':18} -> {report.action}"
        )
        if not self.history or self.history[-1] != line:
            self.history.append(line)

    def __rich__(self) -> Group:
        table = Table(title="rollout progress", expand=False)
        for column in (
            "elapsed",
            "phase",
            "state",
            "legacy rows",
            "production rows",
            "last verdict",
            "why",
        ):
            table.add_column(column)
        report = self.last
        if report is None:
            table.add_row(
                f"{time.monotonic() - self.started:.0f}s", "-", "", "", "", "", Text(self.status)
            )
        else:
            index = report.phase_index if report.phase_index is not None else 0
            table.add_row(
                f"{time.monotonic() - self.started:.0f}s",
                Text(f"{index + 1}/{len(self.plan.phases)} {report.phase_name}"),
                report.state,
                str(report.n_legacy),
                str(report.n_production),
                report.verdict or "",
                Text((report.reason or "")[:70]),  # plan names and reasons are data, not markup
            )
        parts: list[Any] = [table, Text("\n".join(self.history[-8:]), style="dim")]
        if self.dashboard_url:
            parts.insert(0, Text(f"live dashboard: {self.dashboard_url}", style="bold"))
        return Group(*parts)


def _wait_for_heartbeat(store: FileControlStore, instance: str) -> bool:
    return any(a.instance == instance and a.age_s() < 5 for a in store.read_acks())


def _start_dashboard(paths: DataPaths, port: int) -> tuple[ChildProcess, str] | None:
    """The dashboard as a child process, on `port` or, if that is taken, any free port.
    A dashboard that cannot start is reported, never a reason to fail the demo."""
    log = paths.runs / "dashboard.log"
    for attempt in dict.fromkeys((port, 0)):
        log.unlink(missing_ok=True)
        child = ChildProcess(
            "dashboard",
            python_module(
                "flows.cli", "dashboard", "--port", str(attempt), "--data-dir", str(paths.root)
            ),
            log,
        ).start()
        try:
            child.wait_until(lambda c=child: "dashboard: http" in c.tail(5), 30, "dashboard URL")
        except (RuntimeError, TimeoutError):
            child.stop()
            continue
        url = next(w for w in child.tail(5).split() if w.startswith("http://"))
        return child, url
    return None


def run_demo(settings: DemoSettings, console: Console) -> DemoOutcome:
    from flows import progress
    from flows.rollout_flows import rollout_run
    from flows.store.database import connect
    from flows.store.ingest import collect

    paths = DataPaths.at(settings.data_dir).ensure()
    plan = load_plan(settings.plan_path)
    if settings.fast:
        plan = plan.compressed(0.5)
    rate = settings.rate if settings.rate is not None else (120.0 if settings.fast else 80.0)
    phase_names = [p.name for p in plan.phases]
    target = settings.inject_regression
    if target is not None:
        matches = [n for n in phase_names if n == target or n.startswith(target)]
        if not matches:
            raise ValueError(
                f"--inject-regression {target!r}: no such phase; phases: {phase_names}"
            )
        target = matches[0]
    _abort_leftovers(paths)
    api_key = f"sim-{secrets.token_hex(12)}"
    env = {SIM_API_KEY_ENV: api_key}
    fleet_file = paths.runs / "fleet.json"
    fleet_file.unlink(missing_ok=True)
    fleet = ChildProcess(
        "simulated fleet",
        python_module(
            "flows.cli",
            "sim",
            "serve",
            "--fleet-file",
            str(fleet_file),
            "--data-dir",
            str(paths.root),
        ),
        paths.runs / "fleet.log",
        env,
    )
    app: ChildProcess | None = None
    dashboard: ChildProcess | None = None
    started = time.monotonic()
    outcome = DemoOutcome(None, "not started", "", 0.0, paths.database.resolve())
    view = LiveView(plan)
    injected: dict[str, str] = {}

    def inject() -> None:
        for member in FleetInfo.read(fleet_file).members:
            set_profile(member.admin_url, REGRESSION, arm="production")
        injected["phase"] = str(target)
        view.history.append(f"injected a regression into the production path: {REGRESSION}")

    def on_tick(report: Any) -> None:
        view.update(report)
        if target and not injected and report.phase_name == target and report.state == "running":
            inject()

    unsubscribe = progress.subscribe(on_tick)
    try:
        with live_display(view, console):
            if settings.dashboard_port is not None:
                view.status = "starting the dashboard"
                served = _start_dashboard(paths, settings.dashboard_port)
                if served is None:
                    view.history.append(f"the dashboard did not start; see {paths.runs}")
                else:
                    dashboard, view.dashboard_url = served
            view.status = "starting the simulated fleet"
            fleet.start()
            fleet.wait_until(fleet_file.exists, 30, "fleet file")
            info = FleetInfo.read(fleet_file)
            backends_file = paths.runs / "backends.json"
            backends_file.write_text(
                json.dumps(
                    [
                        b.model_dump(mode="json")
                        for b in info.backend_configs(timeout_s=DEMO_BACKEND_TIMEOUT_S)
                    ],
                    indent=2,
                )
            )
            store = FileControlStore(paths.control)
            view.status = "starting the application (embedded router + users)"
            paths.load_report(APP_INSTANCE).unlink(missing_ok=True)  # an earlier run's
            app = ChildProcess(
                "application",
                python_module(
                    "flows.cli",
                    "app",
                    "run",
                    "--rate",
                    str(rate),
                    "--users",
                    str(settings.users),
                    "--seed",
                    str(settings.seed),
                    # The legacy router rests a backend 300 s after 5 failures or slow
                    # (> 2 s) answers in a row. With weeks compressed into minutes, one
                    # stall of a busy machine rested the slow LightRAG server for the rest
                    # of the demo in the legacy arm only, and the gate (rightly) found
                    # production slower than that lucky legacy. The rest shrinks with the
                    # clock (production's ejection cap follows it through the migrator).
                    "--legacy-rest-s",
                    str(DEMO_LEGACY_REST_S),
                ),
                paths.runs / "app.log",
                {
                    **env,
                    "PROD_LB_ENABLED": "true",
                    "PROD_LB_DEPLOYMENT_MODE": "legacy_only",
                    "PROD_LB_BACKENDS_FILE": str(backends_file),
                    "PROD_LB_DATA_DIR": str(paths.root),
                    "PROD_LB_INSTANCE_ID": APP_INSTANCE,
                    "PROD_LB_CONTROL_POLL_S": "0.2",
                    "PROD_LB_PRIMARY_ALGORITHM": plan.algorithm.value,
                    "PROD_LB_REQUEST_TIMEOUT_S": str(DEMO_BACKEND_TIMEOUT_S),
                },
            )
            app.start()
            view.status = "starting the Prefect API"
            with prefect_session():
                app.wait_until(
                    lambda: _wait_for_heartbeat(store, APP_INSTANCE), 60, "router heartbeat"
                )
                if target and target == phase_names[0]:
                    inject()
                view.status = "rollout running"
                last = rollout_run(plan, str(paths.root))
        outcome.rollout_id = last.get("rollout_id")
        outcome.state = last.get("state", "unknown")
        outcome.reason = last.get("reason", "")
    finally:
        unsubscribe()
        if app is not None:
            app.stop()
            outcome.load = _read_load(paths)
        fleet.stop()
        if dashboard is not None:
            dashboard.stop()
        collect(paths)  # the rows the app flushed on its way out
        outcome.seconds = time.monotonic() - started
    outcome.regression_injected_at = injected.get("phase")
    if outcome.rollout_id:
        with connect(paths.database, read_only=True) as con:
            outcome.final_rows = con.execute(FINAL_TABLE_SQL, [outcome.rollout_id]).fetchall()
            phase_rows = con.execute(PHASE_TABLE_SQL, [outcome.rollout_id]).fetchall()
        console.print(_phase_table(phase_rows))
        console.print(_final_table(outcome.final_rows))
    return outcome


def _read_load(paths: DataPaths) -> dict[str, Any] | None:
    try:
        return json.loads(paths.load_report(APP_INSTANCE).read_text())
    except (OSError, ValueError):
        return None  # the app was killed before it could say: the demo goes on without


def _abort_leftovers(paths: DataPaths) -> None:
    """Start from legacy: a demo killed mid-run leaves an active rollout (abort it), and
    a finished one leaves its last phase live (production_only after a completed run),
    which the new app would otherwise apply while Prefect starts, stamping its rows
    with the old rollout's version."""
    from flows import lifecycle
    from flows.control import control_store
    from flows.store.database import connect
    from flows.store.rollouts import active_rollouts

    if paths.database.exists():
        with connect(paths.database) as con:
            leftovers = [r.rollout_id for r in active_rollouts(con)]
        for rollout_id in leftovers:
            lifecycle.abort(
                paths, reason="superseded by a new demo run", actor="demo", rollout_id=rollout_id
            )
    live = control_store(paths).current_or_none()
    if live is not None and live.mode.value != "legacy_only":
        lifecycle.rollback(paths, reason="reset before a new demo run", actor="demo")


def _fmt(value: Any, kind: str) -> str:
    if value is None:
        return "-"
    if kind == "pct":
        return f"{value:.2%}"
    if kind == "ms":
        return f"{value:.0f}"
    if kind == "usd":
        return f"{value:.5f}"
    if kind == "q":
        return f"{value:.3f}"
    return str(value)


def _final_table(rows: list[tuple[Any, ...]]) -> Table:
    table = Table(title="legacy vs production (whole rollout, SQL over DuckDB)")
    for column in (
        "arm",
        "requests",
        "success rate",
        "p50 ms",
        "p95 ms",
        "cost/request USD",
        "mean quality",
    ):
        table.add_column(column, justify="right")
    for arm, n, success, p50, p95, cost, quality in rows:
        table.add_row(
            arm,
            str(n),
            _fmt(success, "pct"),
            _fmt(p50, "ms"),
            _fmt(p95, "ms"),
            _fmt(cost, "usd"),
            _fmt(quality, "q"),
        )
    return table


def _phase_table(rows: list[tuple[Any, ...]]) -> Table:
    table = Table(title="per phase and arm (view arm_summary)")
    for column in (
        "phase",
        "name",
        "arm",
        "requests",
        "success",
        "p50 ms",
        "p95 ms",
        "cost USD",
        "quality",
    ):
        table.add_column(column, justify="right")
    for phase, name, arm, n, success, p50, p95, cost, quality in rows:
        table.add_row(
            str(phase),
            Text(str(name)),
            arm,
            str(n),
            _fmt(success, "pct"),
            _fmt(p50, "ms"),
            _fmt(p95, "ms"),
            _fmt(cost, "usd"),
            _fmt(quality, "q"),
        )
    return table
