"""Assembles the command groups."""

from __future__ import annotations

import typer

from flows.cli import (
    backtest_cmd,
    bench_cmd,
    collect_cmd,
    config_cmd,
    control_cmd,
    dashboard_cmd,
    demo_cmd,
    sim_cmd,
    sql_cmd,
    store_cmd,
)

app = typer.Typer(
    name="rollout",
    help="Roll out a new load balancer inside an embedded query router, safely.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(config_cmd.app, name="config")
app.add_typer(control_cmd.app, name="control")
app.add_typer(sim_cmd.app, name="sim")
app.add_typer(demo_cmd.app_cli, name="app")
app.command("demo")(demo_cmd.demo)
# A query may start with a `-- comment` line (as `--examples` prints them): not an option.
app.command("sql", context_settings={"ignore_unknown_options": True})(sql_cmd.sql)
app.command("collect")(collect_cmd.collect_cmd)
app.command("backtest")(backtest_cmd.backtest)
app.command("backtest-users")(backtest_cmd.backtest_users)
app.command("dashboard")(dashboard_cmd.dashboard)

from flows.cli import rollout_cmd  # noqa: E402

for _name in (
    "start",
    "status",
    "tick",
    "approve",
    "promote",
    "rollback",
    "abort",
    "report",
    "nightly",
    "deploy",
):
    app.command(_name)(getattr(rollout_cmd, _name))
app.command("compact")(store_cmd.compact)
app.add_typer(bench_cmd.app, name="bench")
