"""What every HTTP server this tool starts shares: a socket bound before serving, and a
uvicorn server that leaves signal handling to its owner.

Binding first makes a taken port a clear error and port 0 a known port; several servers
can then share one process (the simulated fleet) or one CLI command (the dashboard).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import signal
import socket
from collections.abc import Iterator
from typing import Any

import uvicorn


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        hint = (
            "pick another --port (0 picks a free one)"
            if exc.errno == errno.EADDRINUSE
            else "is the host an address of this machine? (127.0.0.1 is)"
        )
        raise OSError(f"cannot listen on {host}:{port} ({exc.strerror}); {hint}") from exc
    # Listening at once: a client told the URL may connect before the server loop has
    # started; it waits in the backlog instead of being refused.
    sock.listen(2048)
    return sock


class QuietServer(uvicorn.Server):
    """The owner handles signals (and stops when orphaned), not each server."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def serve(app: Any, sock: socket.socket, stop: asyncio.Event) -> None:
    """Serve `app` on `sock` until `stop` is set or the server fails."""
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
    server = QuietServer(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    server.should_exit = True
    stopper.cancel()
    await task


def serve_until_stopped(app: Any, sock: socket.socket) -> None:
    """For a CLI command: serve until Ctrl-C, SIGTERM, SIGHUP, or the parent that started
    this process is gone."""
    from flows.demo.processes import stop_when_orphaned

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(sig, stop.set)
        watchdog = asyncio.create_task(stop_when_orphaned(stop))
        await serve(app, sock, stop)
        watchdog.cancel()

    asyncio.run(main())
