"""Options and output helpers shared by every command."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.text import Text

from flows.paths import DATA_DIR_ENV, DataPaths

# Piped output (CI logs, files) is not a terminal: give tables room instead of rich's
# default 80 columns, which truncates them.
console = Console(width=None if sys.stdout.isatty() else 140)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 200)

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
    found = DataPaths.at(data_dir)
    if found.root.exists() and not found.root.is_dir():
        fail(f"--data-dir {found.root} is a file: give a folder (it is created if missing)")
    return found


def existing(data_dir: Path) -> DataPaths:
    """For commands that act on an existing rollout: a mistyped --data-dir must fail,
    not quietly create an empty directory and act on nobody."""
    found = DataPaths.at(data_dir)
    if not found.root.is_dir():
        fail(
            f"no data directory at {found.root}: pass --data-dir or set ROLLOUT_DATA_DIR "
            "(rollout demo, rollout start and rollout app run create one)"
        )
    return found


def literal(value: object) -> Text:
    """Data (ids, reasons, comments, SQL values) as typed: `[oncall]` or `[/]` in it is
    text, not rich markup that would vanish or crash the command."""
    return Text("" if value is None else str(value))


def print_error(line: str) -> None:
    """One `error: ...` line on stderr; the message is data, never markup."""
    err_console.print(Text.assemble(("error:", "red"), " ", line), soft_wrap=True)


def fail_store(exc: Exception) -> NoReturn:
    """A store problem: exit 1 when the database is busy (locked: retry later), 2 when
    the input is wrong (no database there, a bad --wait)."""
    from flows.store.database import StoreLocked

    fail(str(exc), code=1 if isinstance(exc, StoreLocked) else 2)


def fail(lines: str | list[str], code: int = 2) -> NoReturn:
    """Print each problem on its own line to stderr and exit (2: bad input)."""
    for line in [lines] if isinstance(lines, str) else lines:
        print_error(line)
    raise typer.Exit(code)
