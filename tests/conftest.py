"""Shared fixtures. Prefect settings are read at import time, so the environment for the
whole session is fixed here, before anything imports Prefect."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from router.control_store import Acknowledgement

os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="rollout-tests-prefect-")
os.environ.pop("PREFECT_API_URL", None)  # never talk to a real server from tests
os.environ.pop("PREFECT_API_KEY", None)
os.environ["DO_NOT_TRACK"] = "1"
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING"
os.environ["PREFECT_SERVER_LOGGING_LEVEL"] = "WARNING"
os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "120"
os.environ["GX_ANALYTICS_ENABLED"] = "false"
for _name in list(os.environ):
    if _name.startswith("PROD_LB_") or _name == "ROLLOUT_DATA_DIR":
        del os.environ[_name]

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """One Prefect API for the whole session (it takes ~10 s to start)."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    with (
        temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}),
        prefect_test_harness(server_startup_timeout=120),
    ):
        yield


@contextlib.contextmanager
def cli_server(*args: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """`python -m flows.cli ARGS` serving in its own process group: yields the process and
    the first line it prints (where it listens); killed on the way out if still running."""
    process = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
        start_new_session=True,
    )
    try:
        assert process.stdout is not None
        yield process, process.stdout.readline()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)


def heartbeat(
    instance: str, applied_version: int, mode: str = "shadow", **fields: Any
) -> Acknowledgement:
    """A router's acknowledgement written just now (refusals via `refused_version` and
    `refused_reason`), as the control store holds it."""
    from datetime import UTC, datetime

    from router.control_store import Acknowledgement

    now = datetime.now(UTC)
    return Acknowledgement(
        instance=instance,
        applied_version=applied_version,
        effective_mode=mode,
        configured_mode=mode,
        traffic_percent=0,
        heartbeat_at=now,
        started_at=now,
        **fields,
    )
