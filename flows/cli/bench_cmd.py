"""`rollout bench ...`: measure the hot paths on this machine."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Annotated

import typer

from flows.demo.processes import exit_on_signals

app = typer.Typer(help="Benchmarks of the hot paths.", no_args_is_help=True)


@app.command("store")
def store(
    as_json: Annotated[bool, typer.Option("--json", help="Print exactly one JSON object.")] = False,
    rows: Annotated[int, typer.Option(min=1, help="Rows behind the gate query.")] = 10_000_000,
    ingest_rows: Annotated[int, typer.Option(min=1, help="Rows to ingest.")] = 2_000_000,
    segment_rows: Annotated[
        int, typer.Option(min=1, help="Rows through the segment recorder.")
    ] = 200_000,
    repeats: Annotated[int, typer.Option(min=1, help="Ingest runs (best is reported).")] = 2,
    workdir: Annotated[
        Path | None, typer.Option(help="Scratch folder (default: the system temp folder).")
    ] = None,
) -> None:
    """Segment writing, ingest into DuckDB, and the gate's query over 10 M rows."""
    from flows.bench.store_bench import run

    result = run(
        as_json,
        rows,
        ingest_rows=ingest_rows,
        segment_rows=segment_rows,
        repeats=repeats,
        workdir=workdir,
    )
    if as_json:
        print(json.dumps(result))


@app.command("router")
def router(
    as_json: Annotated[bool, typer.Option("--json", help="Print exactly one JSON object.")] = False,
    decision_requests: Annotated[int, typer.Option(min=100, help="Timed requests.")] = 20_000,
    fleet_requests: Annotated[int, typer.Option(min=100, help="Requests per router.")] = 900,
    fleet_rate: Annotated[float, typer.Option(min=1, help="Arrivals per second.")] = 60.0,
    only: Annotated[
        list[str] | None,
        typer.Option("--only", help="Production algorithms to run on the fleet (repeatable)."),
    ] = None,
) -> None:
    """Router overhead, throughput against raw httpx, and every algorithm on one fleet."""
    from rich.console import Console
    from rich.table import Table

    from flows.bench.router_bench import run

    err = Console(stderr=True)
    with exit_on_signals(signal.SIGTERM, signal.SIGHUP):  # the fleet process is stopped
        result = run(
            decision_requests=decision_requests,
            fleet_requests=fleet_requests,
            fleet_rate=fleet_rate,
            progress=lambda step: err.print(f"[dim]... {step}[/]"),
            only=frozenset(only) if only else None,
        )
    if as_json:
        print(json.dumps(result))
        return
    console = Console()
    summary = Table("measure", "value", "target", title="router overhead")
    summary.add_row("decision µs p50", f"{result['decision_us_p50']:.1f}", "<= 5")
    summary.add_row("decision µs p99", f"{result['decision_us_p99']:.1f}", "")
    summary.add_row(
        "throughput vs raw httpx", f"{result['throughput_ratio_vs_httpx']:.2f}", ">= 0.9"
    )
    summary.add_row(
        f"best p99 / legacy p99 ({result['best_production']})",
        f"{result['best_p99_ratio_vs_legacy']:.2f}",
        "<= 0.3",
    )
    summary.add_row(
        f"best built-in p99 / legacy p99 ({result['best_builtin']})",
        f"{result['best_builtin_p99_ratio_vs_legacy']:.2f}",
        "",
    )
    console.print(summary)
    fleet = Table(
        "router",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "success",
        title="fleet: fast, 10x slow, 20 % failing (open loop)",
    )
    for row in result["fleet"]:
        fleet.add_row(
            row["router"],
            f"{row['p50_ms']:.0f}",
            f"{row['p95_ms']:.0f}",
            f"{row['p99_ms']:.0f}",
            f"{row['success_rate']:.2%}",
        )
    console.print(fleet)
