"""The Prefect flows. Each is a thin shell over `lifecycle` and `tick`, so the same
logic runs from the UI (deployments), the CLI and the tests."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE

from checks.gx_suites import GxRunner
from flows import lifecycle, progress
from flows.control import control_store, wait_for_ack
from flows.paths import DataPaths
from flows.plan import RolloutPlan
from flows.tick import TickReport, tick

_RUNNERS: dict[str, GxRunner] = {}


def gx_runner(paths: DataPaths) -> GxRunner:
    """One GX context per process and data dir: GX costs seconds to set up, ms to run."""
    key = str(paths.gx.resolve())
    if key not in _RUNNERS:
        _RUNNERS[key] = GxRunner(docs_dir=paths.gx / "docs")
    return _RUNNERS[key]


@task(name="publish-first-phase", cache_policy=NONE)
def start_task(data_dir: str, plan: RolloutPlan, rollout_id: str | None, actor: str) -> dict:
    published = lifecycle.start(DataPaths.at(data_dir), plan, actor=actor, rollout_id=rollout_id)
    return {"rollout_id": published.rollout.rollout_id, "version": published.config.version}


@task(name="wait-for-acknowledgement", cache_policy=NONE)
def ack_task(data_dir: str, version: int, timeout_s: float) -> str:
    status = wait_for_ack(control_store(DataPaths.at(data_dir)), version, timeout_s)
    if status.refused:
        raise RuntimeError(f"config v{version} refused: {status.describe()}")
    return status.describe()


@task(name="evaluate-and-act", cache_policy=NONE)
def tick_task(data_dir: str, rollout_id: str | None, actor: str) -> TickReport:
    paths = DataPaths.at(data_dir)
    return tick(paths, gx_runner(paths), rollout_id=rollout_id, actor=actor)


@flow(name="rollout-start", log_prints=False)
def rollout_start(
    plan: RolloutPlan,
    data_dir: str = "data",
    rollout_id: str | None = None,
    actor: str = "prefect",
) -> dict[str, Any]:
    """Validate the plan, record the rollout and publish phase 1; wait for the routers."""
    logger = get_run_logger()
    started = start_task(data_dir, plan, rollout_id, actor)
    logger.info(
        "rollout %s started: phase 1 published as v%s", started["rollout_id"], started["version"]
    )
    acks = ack_task(data_dir, started["version"], plan.ack_timeout.total_seconds())
    logger.info("acknowledgement: %s", acks)
    return {**started, "acks": acks}


@flow(name="rollout-tick", log_prints=False)
def rollout_tick(
    data_dir: str = "data", rollout_id: str | None = None, actor: str = "gate"
) -> dict[str, Any]:
    """One evaluation: collect new segments, run the checks, decide, act."""
    logger = get_run_logger()
    report = tick_task(data_dir, rollout_id, actor)
    logger.info(
        "%s phase %s: %s (%s) -> %s [legacy %d, production %d]",
        report.rollout_id,
        report.phase_name,
        report.verdict,
        report.reason,
        report.action,
        report.n_legacy,
        report.n_production,
    )
    progress.publish(report)
    return report.__dict__ | {"records": len(report.records)}


@flow(name="rollout-run", log_prints=False)
def rollout_run(
    plan: RolloutPlan,
    data_dir: str = "data",
    rollout_id: str | None = None,
    max_ticks: int = 10_000,
) -> dict[str, Any]:
    """Walk the whole plan in one run: start, then evaluate at each phase's interval
    until the rollout completes, rolls back or is aborted. Used by the demo."""
    started = rollout_start(plan, data_dir, rollout_id)
    rid = started["rollout_id"]
    last: dict[str, Any] = {}
    for _ in range(max_ticks):
        with lifecycle.connect(DataPaths.at(data_dir).database) as con:
            current = lifecycle.get_state(con, rid)
        time.sleep(current.phase.evaluation_interval.total_seconds())
        last = rollout_tick(data_dir, rid)
        if last["state"] in ("completed", "rolled_back", "aborted", "awaiting_approval"):
            break
    return last


def data_dir_str(path: Path | str) -> str:
    return str(Path(path))
