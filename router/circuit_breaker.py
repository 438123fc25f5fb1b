"""A resilience4j-style circuit breaker, one per backend.

A breaker stops sending requests to a backend whose recent calls mostly fail or are
slow, waits, then lets a few trial calls decide whether it has recovered. Every time is
a value passed in as `now` (``time.monotonic()`` seconds in the router), so the state
machine is deterministic under test and never sleeps.

States and rules (defaults from `CircuitBreakerSettings`):

- **CLOSED**: every call is permitted and its outcome goes into a sliding window.

  * ``window_type="count"`` (default): the last ``window_size`` (50) recorded calls.
  * ``window_type="time"``: the calls recorded in the last ``window_size`` seconds, at
    one-second resolution (per-second buckets, like resilience4j): at time ``now`` the
    window holds the calls of the whole seconds ``floor(now) - window_size + 1`` to
    ``floor(now)``. Memory is bounded by ``window_size`` buckets, not by the call rate.

  After each recorded call, if the window holds at least ``minimum_calls`` (10) calls
  (for a count window, capped at ``window_size`` so a misconfiguration cannot disable
  the breaker) and either

  * failure rate = failed / calls >= ``failure_rate_threshold`` (0.5), or
  * slow-call rate = slow / calls >= ``slow_call_rate_threshold`` (0.8), where a call
    is slow when its latency is strictly greater than ``slow_call_ms`` (2000 ms),
    successes and failures alike,

  the breaker goes OPEN. The failure rule is checked first (it names the reason).
- **OPEN**: no call is permitted for ``open_wait_s`` (30 s); outcomes arriving meanwhile
  (calls started earlier, or sent anyway because the router degraded) are ignored.
  The window is cleared; the numbers that tripped it are kept for `snapshot`. The
  first `permits`/`on_start`/`record` at or after ``opened_at + open_wait_s`` moves it
  to HALF_OPEN (there is no timer).
- **HALF_OPEN**: exactly ``half_open_probes`` (3) trial calls are permitted. `on_start`
  takes a probe slot, so concurrent requests cannot exceed the limit: `permits` is
  false once ``probes in flight + probe results == half_open_probes``. An outcome
  arriving while a probe is in flight is taken as that probe's result. As soon as
  ``failed probes / half_open_probes >= failure_rate_threshold`` or
  ``slow probes / half_open_probes >= slow_call_rate_threshold`` (the rate over all
  probes can then no longer fall below the threshold) the breaker re-opens for
  another ``open_wait_s``; when all probes have reported without that, it CLOSES
  with an empty window.

Failures without a health penalty (`BackendFailure.health_penalty` is false: 4xx client
errors, 429 rate limits) are ignored entirely: not counted in any rate. In HALF_OPEN
such an outcome only frees the probe slot it held, so another probe can be sent.

A probe whose outcome never arrives (the request was cancelled) would hold its slot
forever. Two guards free it: callers that know how many calls to the backend are still
running pass it as ``outstanding`` (probe slots beyond that count are freed at once),
and any slot older than ``probe_lease_s`` (default 600 s, the largest
`BackendConfig.timeout_s`) is freed.

Every state change is queued as a `BreakerTransition` for the owner to collect with
`drain_transitions` (the owner turns them into router events). All operations are O(1)
amortised and never log: they run on every request. Not thread-safe: one breaker
belongs to one event loop.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from enum import StrEnum

from router.failures import BackendFailure
from router.production_config import CircuitBreakerSettings

#: A probe slot is freed after this long without an outcome (the largest backend timeout).
DEFAULT_PROBE_LEASE_S = 600.0


#: How long a breaker stays open, at least, before a request that no other backend
#: could take is let through as a half-open probe (`probe_as_last_resort`).
LAST_RESORT_AFTER_S = 1.0


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True, slots=True)
class BreakerTransition:
    """A state change and the numbers that caused it, in words."""

    state: BreakerState
    message: str
    at: float


def pct(rate: float) -> str:
    """0.625 -> '62.5%', 0.5 -> '50%': enough precision to compare with a threshold."""
    return f"{round(rate * 100, 1):g}%"


class _CountWindow:
    """The last `size` calls, with running totals (O(1) per call)."""

    __slots__ = ("_calls", "calls", "failures", "size", "slow")

    def __init__(self, size: int) -> None:
        self.size = size
        self._calls: deque[tuple[bool, bool]] = deque(maxlen=size)
        self.calls = self.failures = self.slow = 0

    def add(self, failed: bool, slow: bool, now: float) -> None:
        if len(self._calls) == self.size:
            old_failed, old_slow = self._calls[0]
            self.calls -= 1
            self.failures -= old_failed
            self.slow -= old_slow
        self._calls.append((failed, slow))
        self.calls += 1
        self.failures += failed
        self.slow += slow

    def expire(self, now: float) -> None:
        return None

    def totals(self, now: float) -> tuple[int, int, int]:
        return self.calls, self.failures, self.slow

    def clear(self) -> None:
        self._calls.clear()
        self.calls = self.failures = self.slow = 0

    def describe(self) -> str:
        return f"over the last {self.calls} calls"


class _TimeWindow:
    """Calls of the last `size` whole seconds, in per-second buckets [second, calls,
    failures, slow]; old buckets are dropped lazily (O(1) amortised)."""

    __slots__ = ("_buckets", "calls", "failures", "size", "slow")

    def __init__(self, size: int) -> None:
        self.size = size
        self._buckets: deque[list[int]] = deque()
        self.calls = self.failures = self.slow = 0

    def expire(self, now: float) -> None:
        horizon = math.floor(now) - self.size
        buckets = self._buckets
        while buckets and buckets[0][0] <= horizon:
            _, calls, failures, slow = buckets.popleft()
            self.calls -= calls
            self.failures -= failures
            self.slow -= slow

    def add(self, failed: bool, slow: bool, now: float) -> None:
        self.expire(now)
        second = math.floor(now)
        buckets = self._buckets
        if buckets and buckets[-1][0] >= second:  # same second (or a clock step back)
            bucket = buckets[-1]
        else:
            bucket = [second, 0, 0, 0]
            buckets.append(bucket)
        bucket[1] += 1
        bucket[2] += failed
        bucket[3] += slow
        self.calls += 1
        self.failures += failed
        self.slow += slow

    def totals(self, now: float) -> tuple[int, int, int]:
        """Totals at `now` without dropping anything (for read-only views)."""
        horizon = math.floor(now) - self.size
        calls, failures, slow = self.calls, self.failures, self.slow
        for second, c, f, s in self._buckets:
            if second > horizon:
                break
            calls, failures, slow = calls - c, failures - f, slow - s
        return calls, failures, slow

    def clear(self) -> None:
        self._buckets.clear()
        self.calls = self.failures = self.slow = 0

    def describe(self) -> str:
        return f"over {self.calls} calls in the last {self.size}s"


def _window(settings: CircuitBreakerSettings) -> _CountWindow | _TimeWindow:
    if settings.window_type == "time":
        return _TimeWindow(settings.window_size)
    return _CountWindow(settings.window_size)


def _minimum_calls(settings: CircuitBreakerSettings) -> int:
    if settings.window_type == "time":
        return settings.minimum_calls
    return min(settings.minimum_calls, settings.window_size)


class CircuitBreaker:
    """One backend's breaker; see the module docstring for the exact rules."""

    def __init__(
        self,
        settings: CircuitBreakerSettings,
        name: str = "backend",
        *,
        probe_lease_s: float = DEFAULT_PROBE_LEASE_S,
    ) -> None:
        self.settings = settings
        self.name = name
        self.probe_lease_s = probe_lease_s
        self.window: _CountWindow | _TimeWindow = _window(settings)
        self.minimum_calls = _minimum_calls(settings)
        self.state = BreakerState.CLOSED
        self.open_until = 0.0
        #: When it last opened (`probe_early` only trusts checks that started after).
        self.opened_at = float("-inf")
        self.times_opened = 0
        #: Start times of probes in flight (HALF_OPEN), oldest first.
        self.probes: deque[float] = deque()
        self.probe_calls = self.probe_failures = self.probe_slow = 0
        #: What tripped the breaker last: calls, failure rate, slow-call rate.
        self.trip: tuple[int, float, float] = (0, 0.0, 0.0)
        self.last_message: str | None = None
        self.transitions: deque[BreakerTransition] = deque(maxlen=16)
        #: The policy that owns this breaker (lets it be cached on the backend's state).
        self.owner: object | None = None

    def reconfigure(self, settings: CircuitBreakerSettings) -> None:
        """New thresholds from a published document. The state stays (an open breaker
        keeps waiting out its open time); the window's calls stay unless its type or
        size changed, when it starts empty."""
        if settings == self.settings:
            return
        if (settings.window_type, settings.window_size) != (
            self.settings.window_type,
            self.settings.window_size,
        ):
            self.window = _window(settings)
        self.settings = settings
        self.minimum_calls = _minimum_calls(settings)

    # -- queries ----------------------------------------------------------------------
    def state_at(self, now: float) -> BreakerState:
        """The state a call at `now` would see, without changing anything."""
        if self.state is BreakerState.OPEN and now >= self.open_until:
            return BreakerState.HALF_OPEN
        return self.state

    def blocks(self, now: float) -> bool:
        """True while OPEN and still waiting: no call at all would be permitted."""
        return self.state is BreakerState.OPEN and now < self.open_until

    def permits(self, now: float, outstanding: int | None = None) -> bool:
        """Whether a call may start now. `outstanding`: calls to this backend still
        running, if known (frees probe slots whose outcome can no longer arrive)."""
        self._advance(now)
        if self.state is BreakerState.CLOSED:
            return True
        if self.state is BreakerState.OPEN:
            return False
        self._reclaim(now, outstanding)
        return len(self.probes) + self.probe_calls < self.settings.half_open_probes

    def probe_early(self, now: float, checked_at: float) -> bool:
        """End the open wait now if an active health check that started at `checked_at`,
        after the breaker opened, passed: the next calls are its half-open probes, which
        close it or open it again. A backend that was down for seconds otherwise stayed
        cut off for the whole open wait (300 s migrated from a legacy config), failing
        every question only it could answer. Once per opening: a check that passes while
        queries fail lets probes through at most once per check interval."""
        if self.state is not BreakerState.OPEN or now >= self.open_until:
            return False
        if checked_at < self.opened_at:
            return False
        self._half_open_early(now, "an active health check passed")
        return True

    def probe_as_last_resort(self, now: float) -> bool:
        """End the open wait now because no other backend could take a request at all:
        that request fails anyway, so it may as well be a half-open probe. At most once
        per `LAST_RESORT_AFTER_S` of being open, so a backend that stays down gets a few
        probes a second, never the whole load."""
        if self.state is not BreakerState.OPEN or now >= self.open_until:
            return False
        if now - self.opened_at < LAST_RESORT_AFTER_S:
            return False
        self._half_open_early(now, "no other backend could take the request")
        return True

    def _half_open_early(self, now: float, why: str) -> None:
        self.open_until = now
        self._to(
            BreakerState.HALF_OPEN,
            now,
            f"{self.name} breaker half-open early: {why}; "
            f"allowing {self.settings.half_open_probes} probe calls",
        )

    # -- events -----------------------------------------------------------------------
    def on_start(self, now: float, outstanding: int | None = None) -> bool:
        """A call is starting; in HALF_OPEN it takes a probe slot if one is free.

        `outstanding`: other calls to this backend still running, not counting this
        one. Returns whether the call was permitted (a call sent anyway because the
        router degraded is not counted as a probe).
        """
        if not self.permits(now, outstanding):
            return False
        if self.state is BreakerState.HALF_OPEN:
            self.probes.append(now)
        return True

    def record(self, failure: BackendFailure | None, latency_ms: float, now: float) -> None:
        """Record one call's outcome and change state if a rule says so."""
        self._advance(now)
        state = self.state
        if failure is not None and not failure.health_penalty:
            if state is BreakerState.HALF_OPEN and self.probes:
                self.probes.popleft()
            return
        failed = failure is not None
        slow = latency_ms > self.settings.slow_call_ms
        if state is BreakerState.CLOSED:
            self._record_closed(failed, slow, now)
        elif state is BreakerState.HALF_OPEN and self.probes:
            self.probes.popleft()
            self._record_probe(failed, slow, now)
        # OPEN, or HALF_OPEN with no probe in flight: a late call, ignored.

    def drain_transitions(self) -> list[BreakerTransition]:
        out = list(self.transitions)
        self.transitions.clear()
        return out

    # -- state machine ----------------------------------------------------------------
    def _record_closed(self, failed: bool, slow: bool, now: float) -> None:
        s = self.settings
        window = self.window
        window.add(failed, slow, now)
        if window.calls < self.minimum_calls:
            return
        failure_rate = window.failures / window.calls
        slow_rate = window.slow / window.calls
        if failure_rate >= s.failure_rate_threshold:
            why = f"failure rate {pct(failure_rate)} {window.describe()} >= {pct(s.failure_rate_threshold)}"
        elif slow_rate >= s.slow_call_rate_threshold:
            why = (
                f"slow-call rate {pct(slow_rate)} (> {s.slow_call_ms:g} ms) {window.describe()}"
                f" >= {pct(s.slow_call_rate_threshold)}"
            )
        else:
            return
        self._open(now, f"{self.name} breaker opened: {why}", window.calls, failure_rate, slow_rate)

    def _record_probe(self, failed: bool, slow: bool, now: float) -> None:
        s = self.settings
        n = s.half_open_probes
        self.probe_calls += 1
        self.probe_failures += failed
        self.probe_slow += slow
        failure_rate = self.probe_failures / n
        slow_rate = self.probe_slow / n
        if failure_rate >= s.failure_rate_threshold:
            why = (
                f"{self.probe_failures} of {n} half-open probes failed "
                f"({pct(failure_rate)} >= {pct(s.failure_rate_threshold)})"
            )
        elif slow_rate >= s.slow_call_rate_threshold:
            why = (
                f"{self.probe_slow} of {n} half-open probes slower than {s.slow_call_ms:g} ms "
                f"({pct(slow_rate)} >= {pct(s.slow_call_rate_threshold)})"
            )
        elif self.probe_calls >= n:
            self._to(
                BreakerState.CLOSED,
                now,
                f"{self.name} breaker closed: {n - self.probe_failures} of {n} half-open probes "
                f"succeeded (failure rate {pct(failure_rate)} < {pct(s.failure_rate_threshold)}, "
                f"slow-call rate {pct(slow_rate)} < {pct(s.slow_call_rate_threshold)})",
            )
            return
        else:
            return
        self._open(
            now, f"{self.name} breaker re-opened: {why}", self.probe_calls, failure_rate, slow_rate
        )

    def _open(
        self, now: float, message: str, calls: int, failure_rate: float, slow_rate: float
    ) -> None:
        self.times_opened += 1
        self.opened_at = now
        self.open_until = now + self.settings.open_wait_s
        self.trip = (calls, failure_rate, slow_rate)
        self._to(BreakerState.OPEN, now, message)

    def _advance(self, now: float) -> None:
        if self.state is BreakerState.OPEN and now >= self.open_until:
            self._to(
                BreakerState.HALF_OPEN,
                now,
                f"{self.name} breaker half-open after {self.settings.open_wait_s:g}s open: "
                f"allowing {self.settings.half_open_probes} probe calls",
            )

    def _to(self, state: BreakerState, now: float, message: str) -> None:
        self.state = state
        self.window.clear()
        self.probes.clear()
        self.probe_calls = self.probe_failures = self.probe_slow = 0
        self.last_message = message
        self.transitions.append(BreakerTransition(state, message, now))

    def _reclaim(self, now: float, outstanding: int | None) -> None:
        probes = self.probes
        if not probes:
            return
        expired = now - self.probe_lease_s
        while probes and probes[0] <= expired:
            probes.popleft()
        if outstanding is not None:
            while len(probes) > max(outstanding, 0):
                probes.popleft()

    # -- reporting --------------------------------------------------------------------
    def snapshot(self, now: float) -> dict[str, object]:
        """JSON-friendly state for health reports; changes nothing.

        The rates are those of the window that matters in the current state: the
        sliding window (CLOSED), the probes so far (HALF_OPEN), or what tripped the
        breaker (OPEN).
        """
        state = self.state_at(now)
        if state is BreakerState.CLOSED:
            calls, failures, slow = self.window.totals(now)
            failure_rate = failures / calls if calls else 0.0
            slow_rate = slow / calls if calls else 0.0
        elif state is BreakerState.HALF_OPEN and self.state is BreakerState.HALF_OPEN:
            calls = self.probe_calls
            failure_rate = self.probe_failures / calls if calls else 0.0
            slow_rate = self.probe_slow / calls if calls else 0.0
        elif state is BreakerState.HALF_OPEN:  # due, not yet moved: no probe results yet
            calls, failure_rate, slow_rate = 0, 0.0, 0.0
        else:
            calls, failure_rate, slow_rate = self.trip
        in_flight = len(self.probes) if self.state is BreakerState.HALF_OPEN else 0
        return {
            "breaker_state": state.value,
            "breaker_window_calls": calls,
            "breaker_failure_rate": round(failure_rate, 4),
            "breaker_slow_call_rate": round(slow_rate, 4),
            "breaker_open_for_s": round(max(0.0, self.open_until - now), 3)
            if state is BreakerState.OPEN
            else 0.0,
            "breaker_probes_in_flight": in_flight,
            "breaker_probes_completed": self.probe_calls
            if self.state is BreakerState.HALF_OPEN
            else 0,
            "breaker_times_opened": self.times_opened,
            "breaker_reason": self.last_message,
        }
