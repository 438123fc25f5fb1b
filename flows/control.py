"""Publishing `RouterConfig` documents for a rollout and waiting for instances to apply them."""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass, field

from flows.paths import DataPaths
from flows.plan import RolloutPlan
from flows.store.phase_names import ROLLBACK_PHASE
from router.control_store import Acknowledgement, FileControlStore
from router.http_control_store import HttpControlStore
from router.modes import DeploymentMode
from router.router_config import GuardLimits, RouterConfig

#: Publish to and read heartbeats from an HTTP control endpoint instead of the folder
#: (set it where the routers have PROD_LB_CONTROL_URL).
CONTROL_URL_ENV = "ROLLOUT_CONTROL_URL"


#: What the flows publish through: a folder, or an HTTP endpoint for a fleet.
Store = FileControlStore | HttpControlStore


@functools.lru_cache(maxsize=8)
def _http_store(url: str) -> HttpControlStore:
    """One client per endpoint: the flows ask for the store often, and each
    `HttpControlStore` holds a connection pool."""
    return HttpControlStore(url)


def control_store(paths: DataPaths) -> Store:
    url = os.environ.get(CONTROL_URL_ENV)
    if url:
        return _http_store(url)
    return FileControlStore(paths.control)


#: Characters of a reason a published document carries; the whole text stays in DuckDB
#: (decisions, transitions). Unbounded, an alert pasting a log excerpt into a rollback
#: reason made the document too large for the HTTP control endpoint: the rollback failed.
MAX_DOCUMENT_REASON = 2_000


def brief(reason: str) -> str:
    if len(reason) <= MAX_DOCUMENT_REASON:
        return reason
    return reason[: MAX_DOCUMENT_REASON - 1] + "…"


def phase_config(
    plan: RolloutPlan,
    phase_index: int,
    version: int,
    rollout_id: str,
    reason: str,
    *,
    rearm: bool = False,
) -> RouterConfig:
    """`rearm`: only a new rollout's first document re-arms a tripped guard. A phase-1
    republish or restore re-armed it too, and the failback was never judged."""
    phase = plan.phases[phase_index]
    th = phase.thresholds
    return RouterConfig(
        version=version,
        mode=phase.mode,
        traffic_percent=phase.traffic_percent,
        algorithm=plan.algorithm_for(phase),
        shadow_sample_rate=phase.shadow_sample_rate,
        production_weights=phase.production_weights,
        breaker=plan.breaker_for(phase),
        salt=plan.salt,
        guard=GuardLimits(
            # The router's local guard is the fast, blunt backstop: it trips at twice the
            # gate's error threshold so the gate, with its statistics, decides first (and
            # at 50 % errors whatever the plan says). Hosts' PROD_LB_ROLLBACK_* variables
            # can make it stricter (`ProductionFeatureFlags.bound_guard`).
            error_rate=min(0.5, th.max_error_rate * 2),
            p95_latency_ms=th.max_p95_latency_ms * 2,
            min_requests=20,
        ),
        rollout_id=rollout_id,
        phase=phase.name,
        reason=brief(reason),
        rearm_guard=rearm,
    )


def legacy_only_config(
    version: int, rollout_id: str | None, salt: str, reason: str
) -> RouterConfig:
    return RouterConfig(
        version=version,
        mode=DeploymentMode.LEGACY_ONLY,
        traffic_percent=0,
        salt=salt,
        rollout_id=rollout_id,
        phase=ROLLBACK_PHASE,
        reason=brief(reason),
    )


@dataclass
class AckStatus:
    version: int
    live: list[Acknowledgement] = field(default_factory=list)
    applied: list[str] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)
    #: why the heartbeats could not be read this time (an endpoint restarting)
    error: str | None = None

    @property
    def complete(self) -> bool:
        return bool(self.live) and not self.pending

    def describe(self) -> str:
        if self.error is not None:
            return f"heartbeats unreadable: {self.error}"
        if not self.live:
            return "no live router instance (no heartbeat in the last 15 s)"
        parts = [f"{len(self.applied)}/{len(self.live)} instance(s) applied v{self.version}"]
        if self.refused:
            parts.append("refused by " + ", ".join(f"{i} ({r})" for i, r in self.refused))
        return "; ".join(parts)


def ack_status(store: Store, version: int) -> AckStatus:
    """Who runs `version`, among instances whose heartbeat is not stale (`is_stale`).
    An unreadable store is no news (no live instance, `error` says why), not a failure:
    a control endpoint restarting must not fail a wait that would have outlasted it."""
    status = AckStatus(version)
    try:
        acks = store.read_acks()
    except OSError as exc:
        status.error = str(exc)
        return status
    for ack in acks:
        if ack.is_stale():
            continue
        status.live.append(ack)
        # A router running a higher version refuses this one as older: not applied.
        if ack.applied_version >= version and ack.refused_version != version:
            status.applied.append(ack.instance)
        else:
            status.pending.append(ack.instance)
            if ack.refused_version == version and ack.refused_reason:
                status.refused.append((ack.instance, ack.refused_reason))
    return status


def wait_for_ack(store: Store, version: int, timeout_s: float, poll_s: float = 0.1) -> AckStatus:
    """Until every live instance applied `version` (or refused it), or `timeout_s` passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = ack_status(store, version)
        if status.complete or status.refused or time.monotonic() >= deadline:
            return status
        time.sleep(poll_s)
