"""`rollout collect`: ingest new segment files into DuckDB exactly once."""

from __future__ import annotations

from typing import Annotated

import typer

from flows.cli.common import DEFAULT_DATA_DIR, DataDir, console, existing


def collect_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False,
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Ingest new segment files (exactly once); quarantine unreadable ones."""
    import json

    from flows.store.ingest import collect

    report = collect(existing(data_dir).ensure())
    if as_json:
        print(
            json.dumps(
                {
                    "segments": report.segments,
                    "rows": report.rows,
                    "events": report.events,
                    "quarantined": report.quarantined,
                    "seconds": round(report.seconds, 3),
                }
            )
        )
        return
    console.print(
        f"ingested {report.rows} rows and {report.events} events from "
        f"{report.segments} segment(s) in {report.seconds:.2f}s",
        highlight=False,
    )
    for key, reason in report.quarantined:
        console.print(f"[yellow]quarantined[/] {key}: {reason}", highlight=False)
