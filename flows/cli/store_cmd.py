"""`rollout compact`: archive old rows to daily Parquet and delete old segment files."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from flows.cli.common import DEFAULT_DATA_DIR, DataDir, console, existing, fail, fail_store


def compact(
    retention_days: Annotated[
        int | None,
        typer.Option(
            "--retention-days",
            min=0,
            help="Days of rows to keep in the DuckDB table "
            "(default: $ROLLOUT_RETENTION_DAYS, else 30).",
            show_default=False,
        ),
    ] = None,
    archive: Annotated[
        str | None,
        typer.Option(
            help="Archive location: a folder or a URL DuckDB writes (s3://bucket/prefix) "
            "(default: $ROLLOUT_ARCHIVE_URL, else the one the database records, "
            "else DATA_DIR/archive).",
            show_default=False,
        ),
    ] = None,
    segments: Annotated[
        str | None,
        typer.Option(
            help="Segment location (default: $ROLLOUT_SEGMENTS_URL, else DATA_DIR/segments).",
            show_default=False,
        ),
    ] = None,
    relocate_archive: Annotated[
        bool,
        typer.Option(
            "--relocate-archive",
            help="Accept a new --archive although batches live at the old one "
            "(copy the files there first).",
        ),
    ] = False,
    wait: Annotated[
        float, typer.Option(help="Seconds to wait while another process holds the database.")
    ] = 15.0,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False,
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Move rows older than the retention window into daily Parquet files (read back by
    the views) and delete local segment files ingested over two days ago (or the window,
    if shorter). Safe to re-run."""
    from flows.store.database import StoreError
    from flows.store.retention import compact as run_compact

    try:
        report = run_compact(
            existing(data_dir).ensure(),
            retention=retention_days,
            archive=archive,
            segments=segments,
            relocate_archive=relocate_archive,
            wait_s=wait,
        )
    except StoreError as exc:
        fail_store(exc)
    except ValueError as exc:
        fail(str(exc))
    if as_json:
        print(
            json.dumps(
                {
                    "retention_days": report.retention_days,
                    "cutoff": report.cutoff.isoformat(),
                    "archive": report.archive,
                    "batch_id": report.batch_id,
                    "rows": report.rows,
                    "days": {d.isoformat(): n for d, n in report.days},
                    "held_back": report.held_back,
                    "orphans_removed": report.orphans_removed,
                    "orphans_left": report.orphans_left,
                    "segments_deleted": report.segments_deleted,
                    "segments_left": report.segments_left,
                    "seconds": round(report.seconds, 3),
                }
            )
        )
        return
    console.print(
        f"archived {report.rows} rows from {len(report.days)} day(s) before "
        f"{report.cutoff} (keeping {report.retention_days} day(s)) to {report.archive}; "
        f"deleted {report.segments_deleted} ingested segment file(s) "
        f"in {report.seconds:.2f}s",
        markup=False,
        highlight=False,
    )
    if report.days:
        table = Table("day", "rows")
        for day, rows in report.days:
            table.add_row(day.isoformat(), str(rows))
        console.print(table)
    if report.held_back:
        console.print(f"[yellow]held back[/]: {escape(report.held_back)}", highlight=False)
    if report.orphans_removed:
        console.print(
            f"removed {report.orphans_removed} archive file(s) of an interrupted run",
            highlight=False,
        )
    for count, what in (
        (report.orphans_left, "uncommitted archive file(s) (ignored by the views)"),
        (report.segments_left, "old remote segment file(s)"),
    ):
        if count:
            console.print(
                f"[yellow]left[/] {count} {what}: remote files are not deleted; "
                "use the bucket's lifecycle rules",
                highlight=False,
            )
