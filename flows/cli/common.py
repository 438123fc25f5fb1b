"""Options and output helpers shared by every command."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console

from flows.paths import DATA_DIR_ENV, DataPaths

console = Console()
err_console = Console(stderr=True)

DataDir = Annotated[
    Path,
    typer.Option(
        "--data-dir",
        envvar=DATA_DIR_ENV,
        help="Where the metrics database, segments and control files live.",
        show_default=True,
    ),
]
DEFAULT_DATA_DIR = Path("data")


def paths(data_dir: Path) -> DataPaths:
    return DataPaths.at(data_dir)


def fail(lines: str | list[str], code: int = 2) -> NoReturn:
    """Print each problem on its own line to stderr and exit (2: bad input)."""
    for line in [lines] if isinstance(lines, str) else lines:
        err_console.print(f"[red]error:[/red] {line}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)
