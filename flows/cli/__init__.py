"""The `rollout` command line. Heavy imports (Prefect, GX) happen inside commands, so
`rollout config validate` answers in a fraction of a second."""

from __future__ import annotations

from flows.cli.app import app


def main() -> None:
    app()


__all__ = ["app", "main"]
