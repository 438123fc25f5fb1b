"""Passive health: what one attempt's outcome does to a backend's availability.

The balancer calls `on_start` just before an attempt (so a policy can count half-open
probes) and `observe` after it; `allows` filters candidates. The legacy router rests a
backend after N consecutive failures; the production balancer combines outlier
ejection and a circuit breaker per backend (`ProductionHealth`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from router.backend_state import BackendState
from router.circuit_breaker import DEFAULT_PROBE_LEASE_S, BreakerState, CircuitBreaker
from router.failures import BackendFailure
from router.outlier import OutlierDetector, OutlierEvent
from router.production_config import CircuitBreakerSettings, OutlierSettings
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

    def on_cancelled(self, backend: BackendState, latency_ms: float, now: float) -> None:
        """The caller gave up on an attempt after `latency_ms`: no failure of the
        backend's, but maybe a slow call."""
        ...

    def allows(self, backend: BackendState, now: float) -> bool:
        """Whether the policy lets a request go to `backend` now (may advance state)."""
        ...

    def would_allow(self, backend: BackendState, now: float) -> bool:
        """The same answer without changing anything: for status pages and scrapes."""
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

    def on_cancelled(self, backend: BackendState, latency_ms: float, now: float) -> None:
        """The legacy rule counts failures only; a caller's cancel is none."""

    def allows(self, backend: BackendState, now: float) -> bool:
        return now >= backend.ejected_until

    def would_allow(self, backend: BackendState, now: float) -> bool:
        return now >= backend.ejected_until

    def describe(self, backend: BackendState, now: float) -> dict[str, object]:
        return {
            "ejected": now < backend.ejected_until,
            "ejected_for_s": round(max(0.0, backend.ejected_until - now), 3),
            "consecutive_failures": backend.consecutive_failures,
        }


#: Which event `observe` returns first when several are due: bad news before good.
EVENT_PRIORITY: dict[EventKind, int] = {
    EventKind.BREAKER_OPENED: 5,
    EventKind.BACKEND_EJECTED: 4,
    EventKind.BACKEND_UNHEALTHY: 3,  # an ejection was due but skipped
    EventKind.BREAKER_HALF_OPEN: 2,
    EventKind.BREAKER_CLOSED: 1,
    EventKind.BACKEND_RETURNED: 1,
}

_BREAKER_EVENT = {
    BreakerState.OPEN: EventKind.BREAKER_OPENED,
    BreakerState.HALF_OPEN: EventKind.BREAKER_HALF_OPEN,
    BreakerState.CLOSED: EventKind.BREAKER_CLOSED,
}


class ProductionHealth:
    """The production balancer's passive health: a `CircuitBreaker` per backend plus one
    `OutlierDetector` for the pool (rules and defaults in `router.circuit_breaker` and
    `router.outlier`).

    - `allows`: the backend's breaker permits a call *and* the backend is not ejected.
    - `on_start`: takes a half-open probe slot when the breaker is half-open.
    - `observe`: feeds both, and returns at most one `HealthEvent`. When several are due
      at once, the most important goes first (`EVENT_PRIORITY`: breaker opened, then
      ejected, then a skipped ejection, then half-open / closed / returned); the others
      stay queued and come out of the next `observe` calls, one each, so every event
      keeps its own kind and backend. `drain_events` empties the queue at once.
    - Changes seen outside `observe` (a breaker turning half-open in `allows`, an
      ejected backend coming back) are queued the same way; the recorder stamps them
      when they come out, so under no traffic they are late, never lost (the queue
      keeps the newest `max_pending`).
    - A due ejection that the pool rules forbid is reported once per failure streak as
      `BACKEND_UNHEALTHY` ("... ejection skipped ...": there is no dedicated kind).

    For the outlier pool rules, a peer is available when `BackendState.available` and
    its breaker is not open and waiting; so ejection never takes out the last such
    backend of a kind, while the breaker may still open on it (the balancer degrades).
    Relies on the caller keeping `BackendState.in_flight` as `Balancer` does (raised
    before `on_start`, lowered when the attempt ends, cancelled or not): that is how a
    probe whose outcome never arrives gives its half-open slot back.
    """

    def __init__(
        self,
        breaker: CircuitBreakerSettings,
        outlier: OutlierSettings,
        *,
        probe_lease_s: float = DEFAULT_PROBE_LEASE_S,
        max_pending: int = 64,
    ) -> None:
        self.breaker_settings = breaker
        self.outlier_settings = outlier
        self.probe_lease_s = probe_lease_s
        self.breakers: dict[str, CircuitBreaker] = {}
        self.outlier = OutlierDetector(outlier, is_available=self._available)
        self._pending: deque[HealthEvent] = deque(maxlen=max_pending)

    def reconfigure_breakers(self, settings: CircuitBreakerSettings) -> None:
        """Every breaker, present and future, uses `settings` (see `reconfigure`)."""
        self.breaker_settings = settings
        for breaker in self.breakers.values():
            breaker.reconfigure(settings)

    def breaker(self, backend: BackendState) -> CircuitBreaker:
        found = backend.breaker  # cached on the state: this runs several times per request
        if found is not None and found.owner is self:
            return found
        found = self.breakers.get(backend.name)
        if found is None:
            found = self.breakers[backend.name] = CircuitBreaker(
                self.breaker_settings, backend.name, probe_lease_s=self.probe_lease_s
            )
            found.owner = self
        backend.breaker = found
        return found

    def _available(self, backend: BackendState, now: float) -> bool:
        found = self.breakers.get(backend.name)
        return backend.available(now) and (found is None or not found.blocks(now))

    def _collect(self, breaker: CircuitBreaker) -> None:
        if breaker.transitions:
            for t in breaker.drain_transitions():
                self._pending.append(HealthEvent(_BREAKER_EVENT[t.state], breaker.name, t.message))

    def _queue(self, event: OutlierEvent | None) -> None:
        if event is not None:
            self._pending.append(HealthEvent(event.kind, event.backend, event.message))

    # -- HealthPolicy -----------------------------------------------------------------
    def on_start(self, backend: BackendState, now: float) -> None:
        breaker = self.breaker(backend)
        # The balancer counts this attempt in `in_flight` before calling us.
        breaker.on_start(now, backend.in_flight - 1)
        self._collect(breaker)
        self._queue(self.outlier.check_return(backend, now))

    def on_cancelled(self, backend: BackendState, latency_ms: float, now: float) -> None:
        """A call cancelled after the breaker's slow-call threshold counts as a slow call
        (not a failure). A backend that hangs while callers time out first otherwise
        never shows in its breaker, and algorithms that do not weigh latency
        (least_connections, round_robin) kept sending it a share of users for good."""
        if latency_ms <= self.breaker_settings.slow_call_ms:
            return
        breaker = self.breaker(backend)
        breaker.record(None, latency_ms, now)
        self._collect(breaker)

    def allows(self, backend: BackendState, now: float) -> bool:
        breaker = self.breaker(backend)
        if (
            breaker.state is BreakerState.CLOSED
            and not breaker.transitions
            and now >= backend.ejected_until
            and not self.outlier.awaiting_return(backend)
        ):
            return True  # the common case, without the bookkeeping below
        permitted = breaker.permits(now, backend.in_flight)
        self._collect(breaker)
        if now < backend.ejected_until:
            return False
        self._queue(self.outlier.check_return(backend, now))
        return permitted

    def would_allow(self, backend: BackendState, now: float) -> bool:
        found = self.breakers.get(backend.name)
        if now < backend.ejected_until:
            return False
        return found is None or found.state_at(now) is not BreakerState.OPEN

    def observe(
        self,
        backend: BackendState,
        pool: Sequence[BackendState],
        failure: BackendFailure | None,
        latency_ms: float,
        now: float,
    ) -> HealthEvent | None:
        breaker = self.breaker(backend)
        breaker.record(failure, latency_ms, now)
        self._collect(breaker)
        for event in self.outlier.observe(backend, pool, failure, now):
            self._queue(event)
        pending = self._pending
        if not pending:
            return None
        best = max(pending, key=lambda e: EVENT_PRIORITY.get(e.kind, 0))  # first on ties
        pending.remove(best)
        return best

    def drain_events(self) -> list[HealthEvent]:
        """Every queued event, most important first (for callers that record them all)."""
        events = sorted(self._pending, key=lambda e: -EVENT_PRIORITY.get(e.kind, 0))
        self._pending.clear()
        return events

    def describe(self, backend: BackendState, now: float) -> dict[str, object]:
        """Breaker and ejection state for `get_health_status()`; keys are stable:

        ``breaker_state`` (closed/open/half_open), ``breaker_window_calls``,
        ``breaker_failure_rate``, ``breaker_slow_call_rate`` (0..1; the sliding window when
        closed, the probes when half-open, what tripped it when open),
        ``breaker_open_for_s``, ``breaker_probes_in_flight``, ``breaker_probes_completed``,
        ``breaker_times_opened``, ``breaker_reason`` (last transition, words and numbers);
        ``ejected``, ``ejected_for_s``, ``ejections`` (times ever), ``consecutive_failures``,
        ``outlier_window_calls``, ``outlier_failure_rate``, ``ejection_reason``,
        ``ejection_skipped`` (why a due ejection did not happen, or null).
        """
        found = self.breakers.get(backend.name)
        breaker = found or CircuitBreaker(self.breaker_settings, backend.name)
        return {**breaker.snapshot(now), **self.outlier.describe(backend, now)}
