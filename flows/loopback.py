"""What every HTTP server this tool starts shares: a socket bound before serving, and a
uvicorn server that leaves signal handling to its owner.

Binding first makes a taken port a clear error and port 0 a known port; several servers
can then share one process (the simulated fleet) or one CLI command (the dashboard).
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

import uvicorn


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(
            f"cannot listen on {host}:{port} ({exc.strerror}); pick another --port "
            "(0 picks a free one)"
        ) from exc
    return sock


class QuietServer(uvicorn.Server):
    """The owner handles signals (and stops when orphaned), not each server."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield
