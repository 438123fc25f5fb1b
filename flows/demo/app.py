"""The application process: the embedded router answering a stream of user questions.

This is what a real service looks like from the rollout's point of view: it builds a
`ProductionIntelligentQueryRouter` from its `PROD_LB_*` environment, polls the control
store, and records one row per request. The load generator stands in for users:
Poisson arrivals at `rate` per second from many distinct users.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from flows.demo.processes import stop_when_orphaned
from flows.demo.workload import Users, load_questions
from flows.paths import DataPaths
from router.control_store import atomic_write
from router.feature_flags import load_flags
from router.legacy_config import LoadBalancingConfig
from router.production_router import ProductionIntelligentQueryRouter

log = logging.getLogger("rollout.app")


#: How long the last questions may take to finish once the app is told to stop.
PENDING_WAIT_S = 8.0


@dataclass
class LoadSpec:
    rate: float = 40.0
    users: int = 2000
    max_concurrency: int = 256
    duration_s: float = 0.0  # 0: until stopped
    seed: int = 11
    workload: Path | None = None
    #: the legacy router's rest (`circuit_breaker_timeout`); None: its default (300 s)
    legacy_rest_s: int | None = None


async def generate_load(
    router: ProductionIntelligentQueryRouter, spec: LoadSpec, stop: asyncio.Event
) -> dict[str, int]:
    rng = random.Random(spec.seed)
    questions = load_questions(spec.workload)
    users = Users(spec.users, rng)
    gate = asyncio.Semaphore(spec.max_concurrency)
    counts = {"sent": 0, "ok": 0, "failed": 0, "shed": 0}
    pending: set[asyncio.Task[None]] = set()

    async def ask(text: str, user: str) -> None:
        try:
            result = await router.route_query(text, {"user_id": user})
            counts["ok" if result.ok else "failed"] += 1
        finally:
            gate.release()

    deadline = time.monotonic() + spec.duration_s if spec.duration_s > 0 else float("inf")
    next_at = time.monotonic()
    while not stop.is_set() and time.monotonic() < deadline:
        next_at += rng.expovariate(spec.rate)
        delay = next_at - time.monotonic()
        if delay > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            if stop.is_set():
                break
        if gate.locked():
            counts["shed"] += 1  # the app is saturated: a real service would queue or 503
            if counts["shed"] == 1:
                log.warning(
                    "all %d in-flight slots are busy: questions are shed from now on "
                    "(this machine is not keeping up with %g per second)",
                    spec.max_concurrency,
                    spec.rate,
                )
            continue
        await gate.acquire()
        question = rng.choice(questions)
        task = asyncio.create_task(ask(question.text, users.pick()))
        pending.add(task)
        task.add_done_callback(pending.discard)
        counts["sent"] += 1
    if pending:  # bounded well inside the 15 s a stopping parent waits before killing
        await asyncio.wait(pending, timeout=PENDING_WAIT_S)
    return counts


async def run_app(spec: LoadSpec) -> dict[str, int]:
    flags = load_flags()
    legacy = (
        LoadBalancingConfig(circuit_breaker_timeout=spec.legacy_rest_s)
        if spec.legacy_rest_s is not None
        else None  # a caller's legacy config also picks the production algorithm
    )
    router = ProductionIntelligentQueryRouter(legacy, flags=flags)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    watchdog = asyncio.create_task(stop_when_orphaned(stop))
    await router.start()
    log.info(
        "app %s started: %d backends, control store %s",
        router.instance_id,
        len(router.backends),
        flags.data_dir / "control",
    )
    try:
        counts = await generate_load(router, spec, stop)
        # Before the router's shutdown drain: a parent stopping us kills after 15 s.
        report = {"instance": router.instance_id, "rate": spec.rate, **counts}
        atomic_write(DataPaths(flags.data_dir).load_report(router.instance_id), json.dumps(report))
    finally:
        watchdog.cancel()
        await router.shutdown()
    log.info("app %s stopped: %s", router.instance_id, counts)
    return counts
