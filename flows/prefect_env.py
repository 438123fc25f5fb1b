"""Running flows from the CLI: Prefect settings and the ephemeral API's lifetime.

No telemetry (these machines may have no network and nobody asked for it), console
logs at WARNING (the live display is the interface; run logs still reach the Prefect
API and UI). Without `PREFECT_API_URL`, Prefect starts a temporary API server in a
subprocess; `prefect_session` starts it up front (its lazy start is not thread-safe),
turns SIGTERM into a normal exit so the server is always stopped, and drains logs and
events before stopping it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from types import FrameType


def configure_prefect(console_level: str = "WARNING") -> None:
    """Call before importing Prefect: settings are read at import time."""
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", console_level)
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")


def _reap_with_this_process(server: object) -> None:
    """Prefect's server is Prefect's child, not ours: if this process is killed outright
    (SIGKILL runs no cleanup), a watcher stops the server instead of leaving it behind."""
    process = getattr(server, "server_process", None)
    if process is None:
        return
    subprocess.Popen(
        [sys.executable, "-m", "flows.demo.reaper", str(os.getpid()), str(process.pid)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


@contextmanager
def prefect_session(in_process: bool = True) -> Iterator[str]:
    """Yield the API URL in use ("ephemeral" when this process started one)."""
    configure_prefect()
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    previous = signal.signal(signal.SIGTERM, _terminate)
    server = None
    with ExitStack() as stack:
        if in_process:
            # Heartbeats detect crashed *deployment* runs; a flow run inside this very
            # process needs none, and each costs ~1 s at the end of every sync run.
            stack.enter_context(
                temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None})
            )
        # The effective setting, not just the environment: a test harness or a profile
        # may point Prefect at a server that is not ours to start or stop.
        from prefect.settings import get_current_settings

        url = get_current_settings().api.url
        if not url:
            from prefect.server.api.server import SubprocessASGIServer

            server = SubprocessASGIServer()
            server.start(
                timeout=int(os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"])
            )
            _reap_with_this_process(server)
        try:
            yield url or "ephemeral"
        finally:
            if server is not None:
                from prefect.events.worker import EventsWorker
                from prefect.logging.handlers import APILogWorker

                APILogWorker.drain_all(timeout=5)
                EventsWorker.drain_all(timeout=5)
                server.stop()
            signal.signal(signal.SIGTERM, previous)
