"""`rollout backtest`: simulated canaries judged by our sequential gate, a fixed-threshold
gate (Argo/Flagger style) and a repeated Mann-Whitney gate (Kayenta style), side by side
on the same data (see `checks.backtest`)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from flows.cli.common import console, err_console, fail

SHORT = {
    "error_x2": "err×2",
    "error_x3": "err×3",
    "p95_plus20": "p95+20%",
    "p95_plus50": "p95+50%",
    "cost_plus30": "cost+30%",
}


def _requests(value: int | None) -> str:
    if value is None:
        return "never"
    return f"{value / 1000:.1f}k" if value >= 1000 else str(value)


def _table(result: dict[str, Any]) -> Table:
    """One row per gate: A/A false rollbacks, power and median requests per scenario."""
    gates = result["gates"]
    scenarios = list(gates[0]["power"])
    s = result["settings"]
    table = Table(
        title=(
            f"{s['runs']} runs per scenario, {s['production_share']:.0%} canary, a look every "
            f"{s['batch_requests']} requests up to {s['budget_requests']:,} "
            f"(~{s['expected_production_budget']:,} production), alpha {s['alpha']:g}"
        ),
        caption="power: share of runs rolled back within the budget; n: median requests "
        "(both arms) to the rollback, over all runs",
        box=box.SIMPLE_HEAD,
        padding=(0, 1),
        pad_edge=False,
    )
    table.add_column("gate", no_wrap=True)
    table.add_column("A/A false\nrollback", justify="right")
    for name in scenarios:
        table.add_column(f"power\n{SHORT.get(name, name)}", justify="right")
    for name in scenarios:
        table.add_column(f"n\n{SHORT.get(name, name)}", justify="right")
    for g in gates:
        table.add_row(
            g["gate"],
            f"{g['false_rollback_rate']:.3f}",
            *(f"{g['power'][n]:.3f}" for n in scenarios),
            *(_requests(g["median_requests_to_detect"][n]) for n in scenarios),
        )
    return table


def _simulate(run: Callable[..., dict[str, Any]], **settings: Any) -> dict[str, Any]:
    """`run(progress=..., **settings)` under a progress bar on stderr."""
    with Progress(console=err_console, transient=True) as progress:
        task = progress.add_task("simulating", total=1.0)
        return run(progress=lambda done: progress.update(task, completed=done), **settings)


def backtest(
    runs: Annotated[
        int, typer.Option(min=10, help="Simulated rollouts per scenario (A/A and each A/B).")
    ] = 1000,
    seed: Annotated[
        int, typer.Option(help="Seed of the simulation (results are reproducible).")
    ] = 7,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print exactly one JSON object on stdout.")
    ] = False,
    budget: Annotated[
        int, typer.Option(min=200, help="Phase sample budget: requests over both arms.")
    ] = 100_000,
    batch: Annotated[int, typer.Option(min=10, help="Requests between two looks.")] = 200,
    alpha: Annotated[
        float, typer.Option(min=1e-6, max=0.5, help="Our gate's false-rollback rate.")
    ] = 0.01,
) -> None:
    """Simulate rollouts evaluated after every batch: A/A and injected regressions
    (error_x2, error_x3, p95_plus20, p95_plus50, cost_plus30) at a 5 % canary split."""
    from checks.backtest import run_backtest

    if batch > budget:
        fail(f"--batch {batch} is larger than --budget {budget}")
    result = _simulate(
        run_backtest,
        runs=runs,
        seed=seed,
        budget_requests=budget,
        batch_requests=batch,
        alpha=alpha,
    )
    if json_output:
        print(json.dumps(result))
        return
    # The table needs about 110 columns: never squeeze it into a narrow console.
    Console(width=max(console.width, 120)).print(_table(result))
    unmet = [name for name, ok in result["targets"].items() if not ok]
    console.print(
        f"targets for the sequential gate: {'all met' if not unmet else 'not met: ' + ', '.join(unmet)}"
        f"; {result['elapsed_s']:.1f}s",
        highlight=False,
    )


def backtest_users(
    runs: Annotated[int, typer.Option(min=10, help="Simulated A/A phases.")] = 100,
    seed: Annotated[int, typer.Option(help="Seed (results are reproducible).")] = 41,
    users: Annotated[
        int,
        typer.Option(min=100, max=10_000, help="Users (each hashes to a bucket of its own)."),
    ] = 5000,
    activity: Annotated[
        float, typer.Option(min=0, max=3, help="Log-normal spread of questions per user.")
    ] = 1.0,
    latency_spread: Annotated[
        float, typer.Option(min=0, max=2, help="Spread of each user's log-latency offset.")
    ] = 0.2,
    error_spread: Annotated[
        float, typer.Option(min=0, max=3, help="Log-normal spread of each user's error rate.")
    ] = 1.0,
    cost_spread: Annotated[
        float, typer.Option(min=0, max=2, help="Spread of each user's log-cost offset.")
    ] = 0.3,
    budget: Annotated[
        int, typer.Option(min=2_000, help="Phase sample budget: requests over both arms.")
    ] = 100_000,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print exactly one JSON object on stdout.")
    ] = False,
) -> None:
    """A/A canaries (5 %) whose users differ, sticky by user as real splits are: false
    rollbacks of the tests judged per request against the gate's, which counts each arm
    by its user buckets."""
    from checks.user_backtest import run_user_backtest

    result = _simulate(
        run_user_backtest,
        runs=runs,
        seed=seed,
        users=users,
        activity_sigma=activity,
        latency_sigma=latency_spread,
        error_sigma=error_spread,
        cost_sigma=cost_spread,
        budget_requests=budget,
    )
    if json_output:
        print(json.dumps(result))
        return
    s = result["settings"]
    table = Table(
        title=f"{s['runs']} A/A phases, {s['users']:,} users, {s['production_share']:.0%} canary, "
        f"up to {s['budget_requests']:,} requests",
        box=box.SIMPLE_HEAD,
    )
    table.add_column("tests judged")
    table.add_column("false rollback", justify="right")
    table.add_column("by metric")
    for way, label in (("per_request", "per request"), ("clustered", "by user bucket (the gate)")):
        metrics = ", ".join(f"{m} {c}" for m, c in sorted(result["by_metric"][way].items()))
        table.add_row(label, f"{result['false_rollback_rate'][way]:.3f}", metrics or "-")
    console.print(table)
    console.print(f"{result['elapsed_s']:.1f}s", highlight=False)
