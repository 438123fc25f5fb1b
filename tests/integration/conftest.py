"""A live rollout target for flow tests: simulated backends on loopback and a real
application process routing through ProductionIntelligentQueryRouter."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from flows.demo.processes import ChildProcess
from flows.paths import DataPaths
from flows.sim.fleet import SIM_API_KEY_ENV, FleetThread, demo_fleet
from router.control_store import FileControlStore
from tests.conftest import ROOT

SIM_KEY = "sim-test-key-0123456789"


@dataclass
class LiveApp:
    paths: DataPaths
    fleet: FleetThread
    app: ChildProcess
    instance: str

    @property
    def store(self) -> FileControlStore:
        return FileControlStore(self.paths.control)

    def stop_app(self) -> None:
        self.app.stop()


def start_app(paths: DataPaths, backends_file: Path, instance: str, rate: float) -> ChildProcess:
    env = {
        SIM_API_KEY_ENV: SIM_KEY,
        "PROD_LB_ENABLED": "true",
        "PROD_LB_BACKENDS_FILE": str(backends_file),
        "PROD_LB_DATA_DIR": str(paths.root),
        "PROD_LB_INSTANCE_ID": instance,
        "PROD_LB_CONTROL_POLL_S": "0.1",
        "PROD_LB_PRIMARY_ALGORITHM": "response_time",
        "PROD_LB_REQUEST_TIMEOUT_S": "2",
    }
    app = ChildProcess(
        instance,
        [sys.executable, "-m", "flows.cli", "app", "run", "--rate", str(rate), "--users", "500"],
        paths.runs / f"{instance}.log",
        env,
    ).start()
    store = FileControlStore(paths.control)
    try:
        app.wait_until(
            lambda: any(a.instance == instance and a.age_s() < 5 for a in store.read_acks()),
            60,
            "router heartbeat",
        )
    except BaseException:
        app.stop()  # never leave the app running when the fixture could not start
        raise
    return app


@pytest.fixture
def live_app(tmp_path: Path) -> Iterator[LiveApp]:
    paths = DataPaths.at(tmp_path / "data").ensure()
    with FleetThread(demo_fleet(api_key=SIM_KEY)) as fleet:
        assert fleet.info is not None
        backends_file = paths.runs / "backends.json"
        backends_file.write_text(
            json.dumps(
                [b.model_dump(mode="json") for b in fleet.info.backend_configs(timeout_s=2.0)]
            )
        )
        app = start_app(paths, backends_file, "test-app-1", rate=60)
        try:
            yield LiveApp(paths, fleet, app, "test-app-1")
        finally:
            app.stop()


def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.2) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


__all__ = ["ROOT", "LiveApp", "live_app", "wait_for"]
