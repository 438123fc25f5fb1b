"""`rollout bench ...`: measure the hot paths on this machine."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

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
