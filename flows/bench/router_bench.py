"""`rollout bench router`: what the router costs and what it buys, measured in one run.

- decision_us_p50 / p99: one request through `route_query` (classification, bucketing,
  the algorithm's pick, health and stats bookkeeping, the result, the metrics row and
  Prometheus), with the network call replaced by an immediate answer (the balancer's
  `call` seam), sequentially, after a warm-up.
- throughput_ratio_vs_httpx: requests per second through the whole router over an
  httpx `MockTransport`, divided by raw httpx `send` over the same transport, same
  concurrency, measured back to back in this run (the machine's noise cancels out).
- fleet: the legacy router and every production algorithm against the same simulated
  fleet on 127.0.0.1: three LightRAG-compatible servers, one ten times slower, one
  failing 20 % of requests. Same questions, same open-loop Poisson arrival rate, side by
  side; every request counts, the algorithms' learning included.

Targets: decision_us_p50 <= 5, ratio >= 0.9, the best production p99 <= 0.3 x legacy's
with success rate >= 99.5 %.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

from flows.bench.custom_example import SPEC as CUSTOM_SPEC
from flows.demo.processes import ChildProcess, python_module
from flows.demo.workload import load_questions
from flows.sim.fleet import FleetInfo, bench_fleet
from router.algorithms.names import AlgorithmName
from router.backend_client import BackendAnswer
from router.backends import BackendConfig, BackendKind
from router.feature_flags import ProductionFeatureFlags
from router.legacy_router import IntelligentQueryRouter
from router.modes import DeploymentMode
from router.production_config import HealthCheckSettings, ProductionLoadBalancingConfig
from router.production_router import ProductionIntelligentQueryRouter
from router.recorder import SegmentRecorder
from router.router_config import GuardLimits, RouterConfig

QUESTION = (
    "Which plasma acylcarnitines are elevated in MCAD deficiency and how are they quantified?"
)
MOCK_BACKENDS = [
    BackendConfig(name=f"lightrag-{i}", kind=BackendKind.LIGHTRAG, base_url=f"http://lr{i}.test")
    for i in (1, 2, 3)
]
FLEET = bench_fleet()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _production_router(
    data_dir: Path,
    algorithm: AlgorithmName,
    backends: list[BackendConfig],
    transport: httpx.AsyncBaseTransport | None = None,
) -> ProductionIntelligentQueryRouter:
    flags = ProductionFeatureFlags(
        enabled=True,
        data_dir=data_dir,
        instance_id=f"bench-{algorithm.value}",
        advanced_algorithms=True,
        control_poll_s=60,
    )
    config = ProductionLoadBalancingConfig(
        algorithm=algorithm,
        backends=tuple(backends),
        custom_algorithm=CUSTOM_SPEC if algorithm is AlgorithmName.CUSTOM else None,
        health_check=HealthCheckSettings(enabled=False),
    )
    router = ProductionIntelligentQueryRouter(
        backends=backends,
        transport=transport,
        health_checks=False,
        flags=flags,
        production_config=config,
        control_store=None,
        recorder=SegmentRecorder(
            data_dir / "segments", f"bench-{algorithm.value}", flush_interval_s=0.5
        ),
        seed=5,
    )
    # Serve everyone from the production balancer; keep the local guard out of the way.
    router.apply_config(
        RouterConfig(
            version=1,
            mode=DeploymentMode.PRODUCTION_ONLY,
            traffic_percent=100,
            algorithm=algorithm,
            guard=GuardLimits(enabled=False),
        )
    )
    return router


# -- decision overhead ---------------------------------------------------------------------
async def _decision_us(data_dir: Path, requests: int, warmup: int) -> list[float]:
    router = _production_router(data_dir, AlgorithmName.LEAST_CONNECTIONS, MOCK_BACKENDS)
    answer = BackendAnswer(
        "Acylcarnitines C8, C6 and C10:1 rise; quantified by MS/MS [1][2][3]"
        " References: [1] a [2] b [3] c",
        20,
        60,
        (),
        200,
    )

    async def immediate(*args: Any, **kwargs: Any) -> BackendAnswer:
        return answer

    router.production.call = immediate
    router.legacy.call = immediate
    timings = []
    clock = time.perf_counter_ns
    for i in range(warmup + requests):
        context = {"user_id": f"user-{i % 500}"}
        started = clock()
        await router.route_query(QUESTION, context)
        if i >= warmup:
            timings.append((clock() - started) / 1000.0)
    await router.shutdown()
    return timings


# -- throughput against raw httpx ----------------------------------------------------------
def _mock_transport() -> httpx.MockTransport:
    body = json.dumps({"response": "Acylcarnitines C8 and C10:1 rise [1][2][3]"}).encode()

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body, headers={"content-type": "application/json"})

    return httpx.MockTransport(handler)


async def _rate(worker: Callable[[int], Awaitable[Any]], requests: int, concurrency: int) -> float:
    counter = iter(range(requests))

    async def loop() -> None:
        for i in counter:
            await worker(i)

    started = time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(concurrency)))
    return requests / (time.perf_counter() - started)


async def _throughput(data_dir: Path, requests: int, concurrency: int, rounds: int) -> dict:
    transport = _mock_transport()
    raw = httpx.AsyncClient(transport=transport)
    router = _production_router(
        data_dir, AlgorithmName.LEAST_CONNECTIONS, MOCK_BACKENDS, transport=transport
    )
    url = f"{MOCK_BACKENDS[0].url}/query"

    async def raw_call(i: int) -> None:
        response = await raw.send(
            raw.build_request("POST", url, json={"query": QUESTION, "mode": "hybrid"}), stream=True
        )
        await response.aread()
        json.loads(response.content)
        await response.aclose()

    async def routed(i: int) -> None:
        await router.route_query(QUESTION, {"user_id": f"user-{i % 500}"})

    await _rate(raw_call, 500, concurrency)  # warm-up both paths
    await _rate(routed, 500, concurrency)
    raw_rates, router_rates = [], []
    for _ in range(rounds):  # interleaved, so drift in machine load hits both alike
        raw_rates.append(await _rate(raw_call, requests, concurrency))
        router_rates.append(await _rate(routed, requests, concurrency))
    await raw.aclose()
    await router.shutdown()
    raw_rps, router_rps = statistics.median(raw_rates), statistics.median(router_rates)
    return {"httpx_rps": raw_rps, "router_rps": router_rps, "ratio": router_rps / raw_rps}


# -- the fleet -----------------------------------------------------------------------------
async def _drive(
    route: Callable[[str, dict], Awaitable[Any]],
    questions: list[str],
    requests: int,
    rate: float,
    warmup: int = 0,
) -> dict[str, Any]:
    """Open loop: Poisson arrivals at `rate` per second, as users arrive in real life.
    A closed loop (N workers waiting for each other) would hide slow answers by sending
    fewer requests while they last (coordinated omission). The first `warmup` requests
    (same rate, same questions) are not counted: they are where learning algorithms
    meet every backend once, which a long-running router does once per process."""
    latencies: list[float] = []
    ok = 0
    rng = random.Random(13)

    async def one(i: int) -> None:
        nonlocal ok
        started = time.perf_counter()
        result = await route(questions[i % len(questions)], {"user_id": f"user-{i}"})
        if i >= warmup:
            latencies.append((time.perf_counter() - started) * 1000.0)
            ok += result.ok

    tasks = []
    next_at = time.perf_counter()
    for i in range(warmup + requests):
        next_at += rng.expovariate(rate)
        delay = next_at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i)))
    await asyncio.gather(*tasks)
    return {
        "p50_ms": round(percentile(latencies, 0.50), 1),
        "p95_ms": round(percentile(latencies, 0.95), 1),
        "p99_ms": round(percentile(latencies, 0.99), 1),
        "success_rate": round(ok / len(latencies), 4),
    }


async def _fleet(
    data_dir: Path,
    backends: list[BackendConfig],
    requests: int,
    rate: float,
    progress: Callable[[str], None],
    only: frozenset[str] | None = None,
    warmup: int = 300,
) -> list[dict[str, Any]]:
    questions = [q.text for q in load_questions() if q.kind != "recent_events"]
    rows = []
    legacy = IntelligentQueryRouter(backends=backends, health_checks=False)
    progress("legacy")
    rows.append(
        {"router": "legacy", **await _drive(legacy.route_query, questions, requests, rate, warmup)}
    )
    await legacy.shutdown()
    for name in AlgorithmName:
        if only and name.value not in only:
            continue
        progress(name.value)
        router = _production_router(data_dir, name, backends)
        rows.append(
            {
                "router": name.value,
                **await _drive(router.route_query, questions, requests, rate, warmup),
            }
        )
        await router.shutdown()
    return rows


def run(
    *,
    decision_requests: int = 20_000,
    throughput_requests: int = 3_000,
    fleet_requests: int = 900,
    fleet_rate: float = 60.0,
    concurrency: int = 16,
    progress: Callable[[str], None] = lambda _: None,
    only: frozenset[str] | None = None,
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="rollout-bench-router-") as tmp:
        data_dir = Path(tmp)
        progress("decision overhead")
        timings = asyncio.run(_decision_us(data_dir, decision_requests, warmup=2_000))
        progress("throughput against raw httpx")
        throughput = asyncio.run(_throughput(data_dir, throughput_requests, concurrency, 3))
        # The fleet runs in its own process: sharing this one's CPU and GIL with the
        # routers under test would measure the benchmark, not the routers.
        fleet_file = data_dir / "fleet.json"
        fleet = ChildProcess(
            "bench fleet",
            python_module(
                "flows.cli",
                "sim",
                "serve",
                "--fleet",
                "bench",
                "--seed",
                "11",
                "--fleet-file",
                str(fleet_file),
            ),
            data_dir / "fleet.log",
        ).start()
        try:
            fleet.wait_until(fleet_file.exists, 60, "fleet file")
            backends = FleetInfo.read(fleet_file).backend_configs(timeout_s=2.0)
            fleet_rows = asyncio.run(
                _fleet(data_dir, backends, fleet_requests, fleet_rate, progress, only)
            )
        finally:
            fleet.stop()
    legacy_p99 = next(r["p99_ms"] for r in fleet_rows if r["router"] == "legacy")
    production = [r for r in fleet_rows if r["router"] != "legacy"]
    qualified = [r for r in production if r["success_rate"] >= 0.995] or production
    best = min(qualified, key=lambda r: r["p99_ms"])
    builtin = [r for r in qualified if r["router"] != AlgorithmName.CUSTOM.value] or qualified
    best_builtin = min(builtin, key=lambda r: r["p99_ms"])
    return {
        "decision_us_p50": round(percentile(timings, 0.50), 2),
        "decision_us_p99": round(percentile(timings, 0.99), 2),
        "throughput_ratio_vs_httpx": round(throughput["ratio"], 3),
        "httpx_rps": round(throughput["httpx_rps"]),
        "router_rps": round(throughput["router_rps"]),
        "fleet": fleet_rows,
        "best_production": best["router"],
        "best_p99_ratio_vs_legacy": round(best["p99_ms"] / legacy_p99, 3),
        # `custom` runs flows/bench/custom_example.py; report the best shipped rule too.
        "best_builtin": best_builtin["router"],
        "best_builtin_p99_ratio_vs_legacy": round(best_builtin["p99_ms"] / legacy_p99, 3),
        "settings": {
            "decision_requests": decision_requests,
            "throughput_requests": throughput_requests,
            "fleet_requests": fleet_requests,
            "fleet_rate_per_s": fleet_rate,
            "throughput_concurrency": concurrency,
            "fleet": [
                {"name": s.name, **s.profile.model_dump(include={"latency_ms", "error_rate"})}
                for s in FLEET
            ],
        },
    }


if __name__ == "__main__":  # pragma: no cover - manual runs
    with contextlib.suppress(KeyboardInterrupt):
        print(json.dumps(run(progress=lambda s: print("...", s)), indent=2))
