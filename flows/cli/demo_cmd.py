"""`rollout demo` and `rollout app run`: the five-phase rollout on loopback, end to end."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import signal
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from flows.cli.common import DEFAULT_DATA_DIR, DataDir, console, fail
from flows.demo.processes import exit_on_signals
from flows.paths import DATA_DIR_ENV
from flows.prefect_env import configure_prefect


def demo(
    fast: Annotated[bool, typer.Option("--fast", help="Halve every phase; more traffic.")] = False,
    inject_regression: Annotated[
        str | None,
        typer.Option(
            "--inject-regression",
            metavar="PHASE",
            help="Degrade the production path when this phase starts (e.g. canary): the "
            "rollout must end in a recorded rollback.",
        ),
    ] = None,
    plan: Annotated[
        Path | None, typer.Option(help="Plan YAML (default: deployments/plans/demo.yaml).")
    ] = None,
    rate: Annotated[float | None, typer.Option(help="Questions per second from the app.")] = None,
    dashboard: Annotated[
        bool, typer.Option(help="Serve the live dashboard (127.0.0.1) while the demo runs.")
    ] = True,
    dashboard_port: Annotated[
        int, typer.Option(help="Its port; a free one if taken (0: always a free one).")
    ] = 8765,
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Run a compressed five-phase rollout against simulated backends on 127.0.0.1."""
    if not 0 <= dashboard_port <= 65535:
        fail(f"--dashboard-port {dashboard_port}: allowed is 0-65535")
    if rate is not None and not (math.isfinite(rate) and rate > 0):
        # checked before any process starts (0 silently became the default rate)
        fail(f"--rate {rate:g}: give questions per second above 0, or leave it out")
    configure_prefect()
    from flows.demo.runner import DEMO_PLAN, DemoSettings, run_demo
    from flows.plan import PlanError

    settings = DemoSettings(
        Path(data_dir),
        fast=fast,
        inject_regression=inject_regression,
        plan_path=plan or DEMO_PLAN,
        rate=rate,
        dashboard_port=dashboard_port if dashboard else None,
    )
    try:
        with exit_on_signals(signal.SIGTERM, signal.SIGHUP):
            outcome = run_demo(settings, console)
    except (PlanError, ValueError) as exc:
        fail(str(exc))
    except (KeyboardInterrupt, SystemExit) as exc:
        console.print("\n[yellow]interrupted: every process the demo started has been stopped[/]")
        code = exc.code if isinstance(exc, SystemExit) and isinstance(exc.code, int) else 130
        raise typer.Exit(code) from None
    console.print(
        f"rollout [bold]{escape(str(outcome.rollout_id))}[/] ended [bold]{escape(outcome.state)}[/] "
        f"after {outcome.seconds:.0f}s: {escape(outcome.reason)}",
        highlight=False,
    )
    for line in outcome.load_lines():
        console.print(line, markup=False, highlight=False)
    if outcome.regression_injected_at:
        console.print(
            f"regression injected into the production path at phase "
            f"{outcome.regression_injected_at}",
            markup=False,
            highlight=False,
        )
    console.print(
        f"metrics database: {outcome.database}  (try: rollout sql --data-dir "
        f'{data_dir} "SELECT * FROM arm_summary")',
        markup=False,
        highlight=False,
    )
    console.print(
        f"dashboard of this run: rollout dashboard --data-dir {data_dir}",
        markup=False,
        highlight=False,
    )
    expected = "rolled_back" if inject_regression else "completed"
    if outcome.state != expected:
        console.print(f"[red]expected the rollout to end {expected}[/]")
        raise typer.Exit(1)


app_cli = typer.Typer(
    help="The application process (embedded router + load).", no_args_is_help=True
)


@app_cli.command("run")
def app_run(
    rate: Annotated[float, typer.Option(help="Questions per second (Poisson).")] = 40.0,
    users: Annotated[int, typer.Option(help="Distinct users asking.")] = 2000,
    duration: Annotated[float, typer.Option(help="Seconds to run; 0 until SIGTERM.")] = 0.0,
    seed: Annotated[int, typer.Option()] = 11,
    workload: Annotated[Path | None, typer.Option(help="Questions (JSON lines).")] = None,
    legacy_rest_s: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Seconds the legacy router rests a failing or slow backend (its "
            "circuit_breaker_timeout; default 300). The demo passes 20: its clock is compressed.",
        ),
    ] = None,
    fleet_file: Annotated[
        Path | None,
        typer.Option(help="Use the backends of a running `rollout sim serve` (its fleet file)."),
    ] = None,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            "--data-dir",
            envvar=DATA_DIR_ENV,
            help="Where the router writes segments and reads its control store, unless "
            "PROD_LB_DATA_DIR is set (that wins); else data/. The flows must use the same.",
        ),
    ] = None,
) -> None:
    """Route questions through ProductionIntelligentQueryRouter configured by PROD_LB_*."""
    from flows.demo.app import LoadSpec, run_app
    from router.settings_errors import SettingsError

    if data_dir is not None and "PROD_LB_DATA_DIR" not in os.environ:
        os.environ["PROD_LB_DATA_DIR"] = str(data_dir)  # the router reads its own variable
    if fleet_file is not None:
        import json

        from flows.cli.sim_cmd import read_fleet_file

        info = read_fleet_file(fleet_file)
        backends_file = fleet_file.with_name("backends.json")
        backends_file.write_text(
            json.dumps([b.model_dump(mode="json") for b in info.backend_configs(timeout_s=5.0)])
        )
        os.environ["PROD_LB_BACKENDS_FILE"] = str(backends_file)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request is noise
    if not (math.isfinite(rate) and rate > 0) or users <= 0:
        fail(f"--rate ({rate:g}) and --users ({users}) must be numbers above 0")
    if not (math.isfinite(duration) and duration >= 0):
        fail(f"--duration ({duration:g}) must be 0 (until SIGTERM) or a number of seconds")
    try:
        counts = asyncio.run(
            run_app(
                LoadSpec(
                    rate=rate,
                    users=users,
                    duration_s=duration,
                    seed=seed,
                    workload=workload,
                    legacy_rest_s=legacy_rest_s,
                )
            )
        )
    except SettingsError as exc:
        fail(exc.lines)
    except ValueError as exc:  # e.g. no backends configured at all
        fail(str(exc).splitlines()[0])
    console.print(counts)
