"""Passive health: what one attempt's outcome does to a backend's availability.

The balancer calls `on_start` just before an attempt (so a policy can count half-open
probes) and `observe` after it; `allows` filters candidates. The legacy router rests a
backend after N consecutive failures; the production balancer combines outlier
ejection and a circuit breaker per backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from router.backend_state import BackendState
from router.failures import BackendFailure
from router.record import EventKind


@dataclass(frozen=True, slots=True)
class HealthEvent:
    """A change an operator must be able to find later (goes to `router_events`)."""

    kind: EventKind
    backend: str
    message: str


class HealthPolicy(Protocol):
    def on_start(self, backend: BackendState, now: float) -> None:
        """An attempt to `backend` is about to start."""
        ...

    def observe(
        self,
        backend: BackendState,
        pool: Sequence[BackendState],
        failure: BackendFailure | None,
        latency_ms: float,
        now: float,
    ) -> HealthEvent | None:
        """Record an attempt's outcome; return an event when availability changed."""
        ...

    def allows(self, backend: BackendState, now: float) -> bool:
        """Whether the policy lets a request go to `backend` now."""
        ...

    def describe(self, backend: BackendState, now: float) -> dict[str, object]:
        """State for `get_health_status()`."""
        ...


class ConsecutiveFailures:
    """The legacy rule: `threshold` failures in a row rest a backend for `rest_s` seconds."""

    def __init__(self, threshold: int, rest_s: float) -> None:
        self.threshold = threshold
        self.rest_s = rest_s

    def on_start(self, backend: BackendState, now: float) -> None:
        return None

    def observe(
        self,
        backend: BackendState,
        pool: Sequence[BackendState],
        failure: BackendFailure | None,
        latency_ms: float,
        now: float,
    ) -> HealthEvent | None:
        if failure is None:
            backend.consecutive_failures = 0
            return None
        if not failure.health_penalty:
            return None
        return self._count_failure(backend, now, "failures")

    def _count_failure(self, backend: BackendState, now: float, what: str) -> HealthEvent | None:
        backend.consecutive_failures += 1
        if backend.consecutive_failures >= self.threshold and now >= backend.ejected_until:
            backend.ejected_until = now + self.rest_s
            backend.ejections += 1
            backend.consecutive_failures = 0
            return HealthEvent(
                EventKind.BACKEND_EJECTED,
                backend.name,
                f"{backend.name} rested {self.rest_s:g}s after {self.threshold} {what} in a row",
            )
        return None

    def allows(self, backend: BackendState, now: float) -> bool:
        return now >= backend.ejected_until

    def describe(self, backend: BackendState, now: float) -> dict[str, object]:
        return {
            "ejected": now < backend.ejected_until,
            "ejected_for_s": round(max(0.0, backend.ejected_until - now), 3),
            "consecutive_failures": backend.consecutive_failures,
        }
