"""What the router knows about one backend right now: load, latency, success, quality.

One `BackendState` per backend per balancer. Algorithms read it; the balancer updates
it after every attempt. All times are `time.monotonic()` seconds.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from router.backends import BackendConfig, BackendKind


class PeakEwma:
    """Peak-sensitive moving average of latency (Finagle/Linkerd/tower `PeakEwma`).

    A sample above the estimate replaces it at once, so a backend turning slow is
    avoided immediately; samples below pull it down with time constant `tau_s`, so it
    earns its way back. Reading decays the estimate toward the backend's *floor*, not
    toward zero (decaying to zero, as tower does, had the demo probe its slow, paid
    backend over and over): the floor is a slow average of its answers, raised by
    failures (`observe_failure`: the time a refused request took says nothing about how
    fast the backend answers, so a backend failing fast never looks fast).

    The floor itself relaxes toward the best level the backend has shown, with time
    constant `recover_s`. Without that, a backend that an outage or one very slow answer
    put above its rivals got no traffic, hence no answers to bring it back down, and was
    starved for good after it recovered. A backend that was always slow has its own
    level as its best, so idleness never makes it look fast.
    """

    __slots__ = (
        "best_ms",
        "estimate_ms",
        "floor_at",
        "floor_ms",
        "recover_s",
        "samples",
        "tau_s",
        "updated_at",
    )

    #: Weight of a new answer in the floor: a spike moves it by 5 %, a backend that
    #: stays slow moves it past its rivals within a few probes.
    FLOOR_ALPHA = 0.05
    #: `recover_s` in units of `tau_s` unless given.
    RECOVER_TAUS = 6.0

    def __init__(
        self,
        initial_ms: float,
        tau_s: float = 10.0,
        now: float = 0.0,
        recover_s: float | None = None,
    ) -> None:
        self.estimate_ms = initial_ms
        self.floor_ms = initial_ms
        self.best_ms = initial_ms
        self.tau_s = tau_s
        self.recover_s = recover_s if recover_s is not None else tau_s * self.RECOVER_TAUS
        self.updated_at = now
        self.floor_at = now
        self.samples = 0

    def floor(self, now: float) -> float:
        excess = self.floor_ms - self.best_ms
        if excess <= 0.0:
            return self.floor_ms
        return self.best_ms + excess * math.exp(-max(0.0, now - self.floor_at) / self.recover_s)

    def observe(self, sample_ms: float, now: float) -> None:
        self.samples += 1
        if self.samples == 1:
            # The default only stands in until there is evidence: the first real sample
            # replaces it, or a fast backend would look as slow as the default for ~tau.
            self.estimate_ms = self.floor_ms = self.best_ms = sample_ms
            self.updated_at = self.floor_at = now
            return
        current = self.value(now)
        if sample_ms > current:
            self.estimate_ms = sample_ms
        else:
            weight = math.exp(-max(0.0, now - self.updated_at) / self.tau_s)
            self.estimate_ms = current * weight + sample_ms * (1.0 - weight)
        self.updated_at = now
        floor = self.floor(now)
        self.floor_ms = floor + self.FLOOR_ALPHA * (sample_ms - floor)
        self.floor_at = now
        self.best_ms = min(self.best_ms, self.floor_ms)

    def observe_failure(self, sample_ms: float, now: float) -> None:
        """A failed attempt, charged `sample_ms` (its time plus any detour it caused).

        An answer from this backend now costs at least that: the estimate and the floor
        are raised to it (never lowered); the floor then relaxes over `recover_s`."""
        current = self.value(now)
        if sample_ms > current:
            self.estimate_ms = sample_ms
            self.updated_at = now
        floor = self.floor(now)
        if sample_ms > floor:
            self.floor_ms = sample_ms
            self.floor_at = now

    def value(self, now: float) -> float:
        weight = math.exp(-max(0.0, now - self.updated_at) / self.tau_s)
        return self.estimate_ms * weight + self.floor(now) * (1.0 - weight)


@dataclass(eq=False, slots=True)
class BackendState:
    config: BackendConfig
    name: str = ""
    kind: BackendKind = BackendKind.LIGHTRAG
    weight: float = 1.0
    in_flight: int = 0
    latency: PeakEwma = field(default_factory=lambda: PeakEwma(500.0))
    outcomes: deque[bool] = field(default_factory=lambda: deque(maxlen=50))
    consecutive_failures: int = 0
    quality: float | None = None
    tokens_in_avg: float = 0.0
    tokens_out_avg: float = 0.0
    calls: int = 0
    #: Retry-After from a 429 (unavailable, not unhealthy) or a 503 (down until then).
    unavailable_until: float = 0.0
    #: The status that set `unavailable_until`: a 503's wait is an outage, not a rate limit.
    unavailable_status: int = 429
    #: Set by active health checks.
    healthy: bool = True
    #: Set by passive outlier ejection or the legacy consecutive-failure rule.
    ejected_until: float = 0.0
    ejections: int = 0
    #: The health policy's breaker for this backend, cached here for the request path.
    breaker: Any = None

    def __post_init__(self) -> None:
        self.name = self.config.name
        self.kind = self.config.kind
        self.weight = self.config.weight

    def success_rate(self, prior: float = 1.0, prior_weight: int = 2) -> float:
        """Smoothed with a small prior so one early failure does not zero a backend."""
        ok = sum(self.outcomes)
        return (ok + prior * prior_weight) / (len(self.outcomes) + prior_weight)

    def available(self, now: float) -> bool:
        return self.healthy and now >= self.ejected_until and now >= self.unavailable_until

    def expected_cost(self) -> float:
        tokens_in = self.tokens_in_avg or 50.0
        tokens_out = self.tokens_out_avg or 250.0
        return self.config.cost_model.cost(int(tokens_in), int(tokens_out))
