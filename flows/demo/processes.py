"""Child processes the CLI starts (simulated fleet, application): started in their own
process group, logged to files, and always stopped by whoever started them, on normal
exit, on an exception and on Ctrl-C."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

#: Set for every child: it stops itself when this parent is gone (see `orphaned`), so
#: even a parent killed with SIGKILL leaves nothing running.
PARENT_PID_ENV = "ROLLOUT_PARENT_PID"


def orphaned() -> bool:
    """True in a child whose starting parent has died (the child was re-parented)."""
    expected = os.environ.get(PARENT_PID_ENV)
    return bool(expected) and str(os.getppid()) != expected


async def stop_when_orphaned(stop: asyncio.Event, every_s: float = 1.0) -> None:
    """For the children's event loops: set `stop` once the parent is gone."""
    while not stop.is_set():
        if orphaned():
            stop.set()
            return
        await asyncio.sleep(every_s)


@contextmanager
def exit_on_signals(*signals: signal.Signals) -> Iterator[None]:
    """SIGTERM, SIGHUP...: leave through normal exception handling, so every `finally`
    that stops a child runs (a closed terminal or `kill` must not leave orphans)."""

    def _exit(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, _exit) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class ChildProcess:
    def __init__(
        self,
        name: str,
        args: Sequence[str],
        log_path: Path,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.args = list(args)
        self.log_path = log_path
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> ChildProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            self.args,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(self.env or {}), PARENT_PID_ENV: str(os.getpid())},
            start_new_session=True,  # Ctrl-C in the terminal goes to us; we stop the child
        )
        log.close()
        return self

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_until(self, ready: Callable[[], bool], timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if ready():
                return
            if not self.running:
                raise RuntimeError(
                    f"{self.name} exited before {what} (code {self.returncode}); "
                    f"log: {self.log_path}\n{self.tail()}"
                )
            time.sleep(0.1)
        raise TimeoutError(f"{self.name}: no {what} after {timeout_s:g}s; log: {self.log_path}")

    @property
    def returncode(self) -> int | None:
        return self.process.poll() if self.process else None

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout_s: float = 15.0) -> int | None:
        """SIGTERM the process group, wait, then SIGKILL. Safe to call twice."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)
        return self.process.returncode


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]
