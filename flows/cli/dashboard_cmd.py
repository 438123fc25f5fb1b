"""`rollout dashboard`: serve the live dashboard on loopback until Ctrl-C."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape

from flows.cli.common import DEFAULT_DATA_DIR, DataDir, console, existing, fail
from flows.paths import DataPaths

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def dashboard(
    host: Annotated[
        str,
        typer.Option(
            help="Interface to listen on. The dashboard has no login: keep "
            "it on loopback unless a proxy in front of it authenticates."
        ),
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port; 0 picks a free one.")] = 8765,
    refresh: Annotated[
        float, typer.Option(help="Seconds between database reads (and page refreshes).")
    ] = 2.0,
    rollout_id: Annotated[
        str | None, typer.Option("--rollout-id", help="Which rollout (default: the latest).")
    ] = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Live view of the rollout: phase, per-arm metrics and charts, the last gate
    evaluation, decisions, router instances and events. Read-only; never blocks the
    flows for more than one short read per refresh."""
    from flows.dashboard.server import make_app
    from flows.loopback import bind, serve_until_stopped

    if not 0 <= port <= 65535:
        fail(f"--port {port}: allowed is 0-65535 (0 picks a free port)")
    if not 0.5 <= refresh <= 300:
        fail(f"--refresh {refresh:g}: allowed is 0.5 to 300 seconds")
    paths = existing(data_dir)
    if rollout_id is not None:  # as status and report do: say so now, not on the page
        _check_rollout_id(paths, rollout_id)
    try:
        sock = bind(host, port)
    except OSError as exc:
        fail(str(exc))
    bound_port = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    if host not in LOOPBACK:
        console.print(
            f"[yellow]warning:[/] listening on {escape(host)}: anyone who reaches it can read it"
        )
    console.print(
        f"dashboard: http://{shown}:{bound_port}/  (Ctrl-C stops it)", markup=False, highlight=False
    )
    serve_until_stopped(make_app(paths, rollout_id=rollout_id, refresh_s=refresh), sock)


def _check_rollout_id(paths: DataPaths, rollout_id: str) -> None:
    from flows.store.database import StoreError, connect
    from flows.store.rollouts import get_rollout

    if not paths.database.exists():
        fail(f"no rollout {rollout_id!r}: no metrics database in {paths.root} yet")
    try:
        with connect(paths.database, read_only=True) as con:
            known = get_rollout(con, rollout_id) is not None
    except StoreError:
        return  # busy or older: the page shows the problem and retries
    if not known:
        fail(f"no rollout {rollout_id!r} in {paths.root}")
