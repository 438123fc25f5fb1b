"""The `rollout` command line. Heavy imports (Prefect, GX) happen inside commands, so
`rollout config validate` answers in a fraction of a second."""

from __future__ import annotations

import os
import sys

from flows.cli.app import app
from flows.cli.common import print_error

#: Errors an operator can act on, by class name (matched along the exception's class
#: hierarchy so importing this table costs nothing), with the exit code they get:
#: 2 for bad input or a request the current state refuses, 1 for a failure to act.
#: Anything else is a bug and keeps its traceback.
ACTIONABLE = {
    "RecordingDeferred": 1,
    "PlanError": 2,
    "SettingsError": 2,
    "RolloutError": 2,
    "StoreError": 1,
    "AcknowledgementFailed": 1,
    "HTTPError": 1,
    "FileNotFoundError": 2,
    "IsADirectoryError": 2,
    "NotADirectoryError": 2,
    "PermissionError": 1,
    "FileExistsError": 2,
}
#: Matched on the exact class only: a plain OSError is the environment (a read-only or
#: full disk, says its message); its subclasses (TimeoutError, ConnectionResetError, ...)
#: are not all that, and keep their traceback unless listed above.
ACTIONABLE_EXACT = {"OSError": 1}


def _check_utf8(args: list[str]) -> None:
    """Undecodable bytes in an argument reached DuckDB and pydantic as lone surrogates and
    failed deep inside with a traceback; an emergency `rollback --reason` did nothing."""
    for position, arg in enumerate(args, start=1):
        try:
            arg.encode()
        except UnicodeEncodeError:
            if os.path.lexists(arg.partition("=")[2] or arg):
                continue  # a path that exists (`--profile X` or `--profile=X`): any bytes

            print_error(
                f"argument {position} ({ascii(arg)[:80]}) is not valid UTF-8: give every "
                "option, reason and path as UTF-8 text"
            )
            sys.exit(2)


#: Environment variables the CLI and what it starts read, by prefix.
OUR_ENV_PREFIXES = ("ROLLOUT_", "PROD_LB_", "PREFECT_")


def _check_env_utf8() -> None:
    """As for arguments: an undecodable byte in PREFECT_API_URL failed `deploy` with a
    traceback. Names the variable, never its value (it may hold a key)."""
    for name, value in os.environ.items():
        if not name.startswith(OUR_ENV_PREFIXES):
            continue
        try:
            value.encode()
        except UnicodeEncodeError:
            print_error(f"environment variable {name} is not valid UTF-8: set it as UTF-8 text")
            sys.exit(2)


def main() -> None:
    _check_utf8(sys.argv[1:])
    _check_env_utf8()
    try:
        app()
    except Exception as exc:
        code = ACTIONABLE_EXACT.get(type(exc).__name__) or next(
            (ACTIONABLE[c.__name__] for c in type(exc).__mro__ if c.__name__ in ACTIONABLE), None
        )
        if code is None:
            raise
        print_error(str(exc))
        sys.exit(code)


__all__ = ["app", "main"]
