"""Passive outlier ejection for a pool of backends, after Envoy's `outlier_detection`.

Where a circuit breaker protects one backend from overload, outlier ejection takes a
misbehaving backend out of the pool for a while so the others serve its share. Rules
(defaults from `OutlierSettings`):

- **Counted outcomes**: successes and failures with a health penalty. Failures without
  one (4xx client errors, 429 rate limits) are ignored entirely. Outcomes observed while
  the backend is ejected (calls sent anyway because the router degraded) are ignored
  too, so a backend is not punished twice for one episode.
- **Consecutive failures**: ``consecutive_failures`` (5) counted failures in a row eject
  the backend. A success resets the streak (kept in `BackendState.consecutive_failures`).
- **Failure rate**: over the last ``window`` (20) counted outcomes, with at least
  ``minimum_calls`` (10) of them (capped at ``window``), a failure rate
  ``>= failure_rate`` (0.5) ejects the backend.
- **Ejection time**: ``base_ejection_s * 2**k`` (10 s, 20 s, 40 s, ...), capped at
  ``max_ejection_s`` (300 s), where ``k`` is how many times the backend has been ejected
  in a row. A backend that stays in the pool for ``max_ejection_s`` after returning
  starts again at ``k = 0``, so an old incident does not lengthen a new one.
  `BackendState.ejections` counts all ejections ever.
- **Pool limits**: an ejection happens only if afterwards at most
  ``max_ejection_percent`` (50 %) of the pool is ejected, except that one backend may
  always be ejected when none is (Envoy's rule, so a small pool is still protected).
  Independently, a backend is **never** ejected when it is the last available backend of
  its kind (LightRAG or Perplexity: some questions may only go to one kind). Instead the
  detector reports that the ejection was skipped, once per failure streak, and the
  router degrades (keeps routing to it).
- **Ejection** sets `BackendState.ejected_until` and clears the backend's streak and
  window, so it comes back with a clean slate. **Return** is automatic when
  ``now >= ejected_until``; `check_return` reports it the first time it is called after
  that (the owner calls it from `allows`/`on_start`/`observe`).

"Available" for the pool rules means `BackendState.available(now)` (healthy, not
ejected, not rate limited) unless the owner passes a stricter `is_available` (the
production policy adds "its breaker is not open"). `observe` is O(1) except when a rule
fires (then O(pool size)); nothing logs.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from router.backend_state import BackendState
from router.circuit_breaker import pct
from router.failures import BackendFailure
from router.production_config import OutlierSettings
from router.record import EventKind

Availability = Callable[[BackendState, float], bool]


@dataclass(frozen=True, slots=True)
class OutlierEvent:
    """An ejection, a return, or a skipped ejection (kind BACKEND_UNHEALTHY)."""

    kind: EventKind
    backend: str
    message: str


class _Track:
    """What the detector remembers about one backend."""

    __slots__ = (
        "ejected",
        "failures",
        "last_ejection",
        "outcomes",
        "returned_at",
        "skipped",
        "streak",
    )

    def __init__(self, window: int) -> None:
        self.outcomes: deque[bool] = deque(maxlen=window)  # True = failed
        self.failures = 0
        #: Ejected and its return not yet reported.
        self.ejected = False
        #: Ejections in a row (the exponent of the ejection time).
        self.streak = 0
        self.returned_at: float | None = None
        self.last_ejection: str | None = None
        #: Why the last due ejection was skipped; cleared by a success or an ejection.
        self.skipped: str | None = None

    def push(self, failed: bool) -> None:
        outcomes = self.outcomes
        if len(outcomes) == outcomes.maxlen and outcomes[0]:
            self.failures -= 1
        outcomes.append(failed)
        self.failures += failed

    def clear(self) -> None:
        self.outcomes.clear()
        self.failures = 0


def _default_available(backend: BackendState, now: float) -> bool:
    return backend.available(now)


class OutlierDetector:
    """Ejects outliers from one pool; see the module docstring for the exact rules."""

    def __init__(self, settings: OutlierSettings, *, is_available: Availability | None = None):
        self.settings = settings
        self.minimum_calls = min(settings.minimum_calls, settings.window)
        self.is_available = is_available or _default_available
        self.tracks: dict[str, _Track] = {}

    def track(self, backend: BackendState) -> _Track:
        track = self.tracks.get(backend.name)
        if track is None:
            track = self.tracks[backend.name] = _Track(self.settings.window)
        return track

    def ejection_time(self, streak: int) -> float:
        """``base_ejection_s * 2**streak`` capped at ``max_ejection_s``."""
        s = self.settings
        return min(s.base_ejection_s * 2.0 ** min(streak, 64), s.max_ejection_s)

    def awaiting_return(self, backend: BackendState) -> bool:
        """Whether the backend was ejected and its return has not been reported yet."""
        track = self.tracks.get(backend.name)
        return track is not None and track.ejected

    def check_return(self, backend: BackendState, now: float) -> OutlierEvent | None:
        """Report a backend's return the first time it is seen after its ejection ended."""
        track = self.tracks.get(backend.name)
        if track is None or not track.ejected or now < backend.ejected_until:
            return None
        track.ejected = False
        track.returned_at = backend.ejected_until
        return OutlierEvent(
            EventKind.BACKEND_RETURNED,
            backend.name,
            f"{backend.name} returned to the pool after ejection #{backend.ejections} "
            f"({track.last_ejection})",
        )

    def observe(
        self,
        backend: BackendState,
        pool: Sequence[BackendState],
        failure: BackendFailure | None,
        now: float,
    ) -> list[OutlierEvent]:
        """Count one outcome; return what changed (a return, an ejection or a skip)."""
        events: list[OutlierEvent] = []
        returned = self.check_return(backend, now)
        if returned is not None:
            events.append(returned)
        if now < backend.ejected_until:
            return events
        if failure is not None and not failure.health_penalty:
            return events
        track = self.track(backend)
        if failure is None:
            backend.consecutive_failures = 0
            track.push(False)
            track.skipped = None
            return events
        backend.consecutive_failures += 1
        track.push(True)
        s = self.settings
        calls = len(track.outcomes)
        if backend.consecutive_failures >= s.consecutive_failures:
            why = f"{backend.consecutive_failures} failures in a row"
        elif calls >= self.minimum_calls and track.failures / calls >= s.failure_rate:
            rate = track.failures / calls
            why = f"failure rate {pct(rate)} over the last {calls} calls >= {pct(s.failure_rate)}"
        else:
            return events
        event = self._eject(backend, track, pool, why, now)
        if event is not None:
            events.append(event)
        return events

    def _eject(
        self,
        backend: BackendState,
        track: _Track,
        pool: Sequence[BackendState],
        why: str,
        now: float,
    ) -> OutlierEvent | None:
        blocked = self._blocked_by(backend, pool, now)
        if blocked is not None:
            if track.skipped is not None:
                track.skipped = blocked
                return None  # reported once per streak
            track.skipped = blocked
            return OutlierEvent(
                EventKind.BACKEND_UNHEALTHY,
                backend.name,
                f"{backend.name} ejection skipped ({why}): {blocked}; routing degrades to it",
            )
        if (
            track.returned_at is not None
            and now - track.returned_at >= self.settings.max_ejection_s
        ):
            track.streak = 0
        duration = self.ejection_time(track.streak)
        track.streak += 1
        track.ejected = True
        track.skipped = None
        track.clear()
        backend.consecutive_failures = 0
        backend.ejected_until = now + duration
        backend.ejections += 1
        track.last_ejection = f"ejected for {duration:g}s: {why}"
        return OutlierEvent(
            EventKind.BACKEND_EJECTED,
            backend.name,
            f"{backend.name} ejected for {duration:g}s: {why} (ejection #{backend.ejections})",
        )

    def _blocked_by(
        self, backend: BackendState, pool: Sequence[BackendState], now: float
    ) -> str | None:
        """Why the pool rules forbid ejecting `backend` now, or None."""
        others = [s for s in pool if s is not backend]
        if not any(s.kind is backend.kind and self.is_available(s, now) for s in others):
            return f"it is the last available {backend.kind.value} backend"
        size = len(others) + 1
        ejected = sum(1 for s in others if now < s.ejected_until)
        limit = self.settings.max_ejection_percent
        if ejected and (ejected + 1) * 100 > limit * size:
            return (
                f"{ejected} of {size} backends already ejected and max_ejection_percent is "
                f"{limit:g}%"
            )
        return None

    def describe(self, backend: BackendState, now: float) -> dict[str, object]:
        """JSON-friendly ejection state; changes nothing."""
        track = self.tracks.get(backend.name)
        calls = len(track.outcomes) if track else 0
        failures = track.failures if track else 0
        return {
            "ejected": now < backend.ejected_until,
            "ejected_for_s": round(max(0.0, backend.ejected_until - now), 3),
            "ejections": backend.ejections,
            "consecutive_failures": backend.consecutive_failures,
            "outlier_window_calls": calls,
            "outlier_failure_rate": round(failures / calls, 4) if calls else 0.0,
            "ejection_reason": track.last_ejection if track else None,
            "ejection_skipped": track.skipped if track else None,
        }
