"""`rollout collect`: ingest new segment files into DuckDB exactly once."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape

from flows.cli.common import DEFAULT_DATA_DIR, DataDir, console, existing


def collect_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False,
    retry_quarantined: Annotated[
        bool,
        typer.Option(
            "--retry-quarantined",
            help="First move quarantined segments back from quarantine/<instance>/ to the "
            "segments location, forget their ledger rows (their router_events stay) and "
            "ingest them again, exactly once; a file still bad is quarantined again with "
            "its reason. For files quarantined by mistake or repaired since.",
        ),
    ] = False,
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Ingest new segment files (exactly once); quarantine the ones whose content is bad.

    A DuckDB failure that is not about a file (out of memory, disk full, network,
    interrupt) stops with an error and records nothing: run collect again once it is fixed.
    """
    import json

    from flows.store.ingest import collect

    report = collect(existing(data_dir).ensure(), retry_quarantined=retry_quarantined)
    if as_json:
        print(
            json.dumps(
                {
                    "segments": report.segments,
                    "rows": report.rows,
                    "events": report.events,
                    "quarantined": report.quarantined,
                    "retried": report.retried,
                    "seconds": round(report.seconds, 3),
                }
            )
        )
        return
    if retry_quarantined:
        console.print(f"retried {len(report.retried)} quarantined segment(s)", highlight=False)
    console.print(
        f"ingested {report.rows} rows and {report.events} events from "
        f"{report.segments} segment(s) in {report.seconds:.2f}s",
        highlight=False,
    )
    for key, reason in report.quarantined:
        console.print(f"[yellow]quarantined[/] {escape(key)}: {escape(reason)}", highlight=False)
