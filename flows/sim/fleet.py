"""A fleet of simulated backends on 127.0.0.1, in one process, each on its own port.

`Fleet` runs inside an event loop; `FleetThread` runs one in a background thread for
synchronous callers (tests, benchmarks). `rollout sim serve` runs one in the foreground
and writes a fleet file that other processes read to find the servers.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import uvicorn
from pydantic import BaseModel, ConfigDict

from flows.loopback import QuietServer, bind
from flows.sim.profile import BackendProfile
from flows.sim.servers import SimState, make_app
from router.backends import BackendConfig, BackendKind, CostModel

SIM_API_KEY_ENV = "PERPLEXITY_API_KEY"


class SimBackendSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    kind: BackendKind
    region: str = "eu-central"
    weight: float = 1.0
    profile: BackendProfile = BackendProfile()
    cost: CostModel | None = None
    api_key: str | None = None


def demo_fleet(api_key: str | None = None) -> list[SimBackendSpec]:
    """Two LightRAG instances (one three times slower) and one Perplexity instance."""
    return [
        SimBackendSpec(
            name="lightrag-1",
            kind=BackendKind.LIGHTRAG,
            profile=BackendProfile(latency_ms=60, error_rate=0.005, quality=0.85),
        ),
        SimBackendSpec(
            name="lightrag-2",
            kind=BackendKind.LIGHTRAG,
            region="us-east",
            profile=BackendProfile(latency_ms=180, error_rate=0.01, quality=0.8),
        ),
        SimBackendSpec(
            name="perplexity-1",
            kind=BackendKind.PERPLEXITY,
            region="us-east",
            profile=BackendProfile(
                latency_ms=120, error_rate=0.005, quality=0.9, rate_limit_rate=0.002
            ),
            api_key=api_key,
        ),
    ]


def bench_fleet(api_key: str | None = None) -> list[SimBackendSpec]:
    """The router benchmark's fleet: one fast, one ten times slower, one failing 20 %."""
    return [
        SimBackendSpec(
            name="fast",
            kind=BackendKind.LIGHTRAG,
            profile=BackendProfile(latency_ms=40, latency_sigma=0.3, quality=0.85),
        ),
        SimBackendSpec(
            name="slow",
            kind=BackendKind.LIGHTRAG,
            profile=BackendProfile(latency_ms=400, latency_sigma=0.3, quality=0.85),
        ),
        SimBackendSpec(
            name="flaky",
            kind=BackendKind.LIGHTRAG,
            profile=BackendProfile(latency_ms=40, latency_sigma=0.3, error_rate=0.2, quality=0.85),
        ),
    ]


FLEETS = {"demo": demo_fleet, "bench": bench_fleet}


class FleetMember(BaseModel):
    spec: SimBackendSpec
    url: str

    @property
    def admin_url(self) -> str:
        return f"{self.url}/admin/profile"


class FleetInfo(BaseModel):
    """What other processes need: where each server listens. Never holds the API key."""

    members: list[FleetMember]

    def backend_configs(self, timeout_s: float = 30.0) -> list[BackendConfig]:
        return [
            BackendConfig(
                name=m.spec.name,
                kind=m.spec.kind,
                base_url=m.url,
                region=m.spec.region,
                weight=m.spec.weight,
                cost=m.spec.cost,
                timeout_s=timeout_s,
                api_key_env=SIM_API_KEY_ENV if m.spec.kind is BackendKind.PERPLEXITY else None,
            )
            for m in self.members
        ]

    def member(self, name: str) -> FleetMember:
        for m in self.members:
            if m.spec.name == name:
                return m
        raise KeyError(f"no simulated backend {name!r}; have {[m.spec.name for m in self.members]}")

    def write(self, path: Path) -> None:
        data = self.model_dump(mode="json")
        for m in data["members"]:
            m["spec"].pop("api_key", None)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(data, indent=2))
        tmp.replace(path)

    @classmethod
    def read(cls, path: Path) -> FleetInfo:
        return cls.model_validate_json(Path(path).read_text())


@dataclass
class _Running:
    state: SimState
    server: QuietServer
    task: asyncio.Task[None]
    url: str


class Fleet:
    def __init__(self, specs: Sequence[SimBackendSpec], seed: int = 7, host: str = "127.0.0.1"):
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError(f"simulated backends bind to loopback only, not {host!r}")
        self.specs = list(specs)
        self.seed = seed
        self.host = host
        self.running: dict[str, _Running] = {}

    async def start(self) -> FleetInfo:
        import random

        for index, spec in enumerate(self.specs):
            sock = bind(self.host, 0)
            port = sock.getsockname()[1]
            state = SimState(
                spec.name,
                spec.kind,
                spec.profile,
                api_key=spec.api_key,
                rng=random.Random(self.seed + index),
            )
            config = uvicorn.Config(
                make_app(state),
                log_level="warning",
                access_log=False,
                lifespan="off",
                timeout_keep_alive=30,
            )
            server = QuietServer(config)
            task = asyncio.create_task(server.serve(sockets=[sock]), name=f"sim-{spec.name}")
            self.running[spec.name] = _Running(state, server, task, f"http://{self.host}:{port}")
        for running in self.running.values():
            while not running.server.started:
                if running.task.done():
                    running.task.result()
                await asyncio.sleep(0.01)
        return self.info()

    def info(self) -> FleetInfo:
        return FleetInfo(
            members=[FleetMember(spec=s, url=self.running[s.name].url) for s in self.specs]
        )

    def state(self, name: str) -> SimState:
        return self.running[name].state

    async def stop(self) -> None:
        for running in self.running.values():
            running.server.should_exit = True
        await asyncio.gather(*(r.task for r in self.running.values()), return_exceptions=True)
        self.running.clear()


class FleetThread:
    """A `Fleet` in a daemon thread with its own loop: for synchronous callers."""

    def __init__(self, specs: Sequence[SimBackendSpec], seed: int = 7) -> None:
        self.fleet = Fleet(specs, seed)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, daemon=True, name="sim-fleet"
        )
        self.info: FleetInfo | None = None

    def __enter__(self) -> FleetThread:
        self._thread.start()
        self.info = asyncio.run_coroutine_threadsafe(self.fleet.start(), self._loop).result(30)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.fleet.stop(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


def set_profile(admin_url: str, patch: dict[str, object], arm: str | None = None) -> dict:
    """Change a running simulated backend (what a fault-injection scenario calls)."""
    params = {"arm": arm} if arm else None
    response = httpx.put(admin_url, json=patch, params=params, timeout=5)
    if response.is_error:
        # Say what the server refused, not only the status (a typo'd field, a bad rate).
        try:
            detail = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            detail = response.text
        raise httpx.HTTPStatusError(
            f"{admin_url} refused {patch}: {response.status_code}: {detail}",
            request=response.request,
            response=response,
        )
    return response.json()
