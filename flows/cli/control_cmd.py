"""`rollout control serve`: an HTTP control endpoint over the data folder's control store."""

from __future__ import annotations

from typing import Annotated

import typer

from flows.cli.common import DEFAULT_DATA_DIR, DataDir, console, fail, paths

app = typer.Typer(help="The control store routers read configs from.", no_args_is_help=True)


@app.command("serve")
def serve(
    host: Annotated[
        str, typer.Option(help="Interface to listen on (no login: keep it private).")
    ] = ("127.0.0.1"),
    port: Annotated[int, typer.Option(help="Port; 0 picks a free one.")] = 8766,
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Serve DATA_DIR/control over HTTP until Ctrl-C: routers with PROD_LB_CONTROL_URL and
    flows with ROLLOUT_CONTROL_URL pointed here share it without a shared folder."""
    from flows.control_server import make_app
    from flows.loopback import bind, serve_until_stopped
    from router.control_store import FileControlStore

    if not 0 <= port <= 65535:
        fail(f"--port {port}: allowed is 0-65535 (0 picks a free port)")
    store = FileControlStore(paths(data_dir).ensure().control)
    try:
        sock = bind(host, port)
    except OSError as exc:
        fail(str(exc))
    shown = f"[{host}]" if ":" in host else host
    console.print(
        f"control endpoint: http://{shown}:{sock.getsockname()[1]}  (over {store.directory})",
        markup=False,
        highlight=False,
    )

    serve_until_stopped(make_app(store), sock)
