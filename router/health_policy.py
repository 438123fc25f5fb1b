"""Passive health: what one attempt's outcome does to a backend's availability.

`HealthPolicy.observe` runs after every attempt. The legacy router skips a backend
after N consecutive failures for a fixed rest; the production balancer uses outlier
ejection with growing ejection times and circuit breakers (see `outlier.py`,
`circuit_breaker.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from router.backend_state import BackendState
from router.failures import BackendFailure


class HealthPolicy(Protocol):
    def observe(
        self,
        backend: BackendState,
        pool: Sequence[BackendState],
        failure: BackendFailure | None,
        latency_ms: float,
        now: float,
    ) -> str | None:
        """Update availability; return a human-readable event when it changed."""
        ...

    def allows(self, backend: BackendState, now: float) -> bool:
        """Whether the policy lets a request go to `backend` now."""
        ...

    def describe(self, backend: BackendState, now: float) -> dict[str, object]: ...


class ConsecutiveFailures:
    """The legacy rule: `threshold` failures in a row rest a backend for `rest_s` seconds."""

    def __init__(self, threshold: int, rest_s: float) -> None:
        self.threshold = threshold
        self.rest_s = rest_s

    def observe(
        self,
        backend: BackendState,
        pool: Sequence[BackendState],
        failure: BackendFailure | None,
        latency_ms: float,
        now: float,
    ) -> str | None:
        if failure is None:
            backend.consecutive_failures = 0
            return None
        if not failure.health_penalty:
            return None
        backend.consecutive_failures += 1
        if backend.consecutive_failures >= self.threshold and now >= backend.ejected_until:
            backend.ejected_until = now + self.rest_s
            backend.ejections += 1
            backend.consecutive_failures = 0
            return f"{backend.name} rested {self.rest_s:g}s after {self.threshold} failures"
        return None

    def allows(self, backend: BackendState, now: float) -> bool:
        return now >= backend.ejected_until

    def describe(self, backend: BackendState, now: float) -> dict[str, object]:
        return {
            "ejected": now < backend.ejected_until,
            "ejected_for_s": round(max(0.0, backend.ejected_until - now), 3),
            "consecutive_failures": backend.consecutive_failures,
        }
