"""The router's local guard: fail back to legacy at once when production breaks a hard limit.

It watches the production arm's most recent requests (shadow executions included: a
failing shadow is not worth its load either). The flow's next evaluation sees the
`failback` event and confirms the rollback by publishing `legacy_only`.

The guard is checked on every request, so a bare observed rate over a small window
would trip on noise sooner or later (3 timeouts in 20 requests on a busy machine is
15 %). It therefore trips only when the one-sided Wilson lower bound of the rate, at
`GuardLimits.confidence` (99.99 %), is over the limit: a real breakdown (35 % errors)
still trips within the first 20 requests, 10 % errors against a 5 % limit after about
150, and a blip does not. The level is that high because the window is re-tested on
every request, thousands of looks per phase, and the flow rolls back on any failback:
at 99 %, an arm erring at 2 % against a 3 % limit tripped in 45 % of 30,000-request
phases; at 99.99 %, in 2.5 % (moderate breaches are the gate's job: its sequential
tests stay valid however often they look).

It also watches the legacy arm, when it has traffic. A breach that legacy shows as
badly or worse over the same stretch of time as production's window (backends down, a
starved host) is not the new balancer's doing, and sending users to legacy would not
help them: the guard holds. Legacy is kept as per-second running totals for the last
hour, so the comparison costs two lookups whatever legacy's share of traffic. Without
legacy traffic (production_only) the guard acts on production alone.
"""

from __future__ import annotations

import bisect
import math
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from statistics import NormalDist

from router.router_config import GuardLimits


class _Window:
    """The most recent outcomes of one arm: error count and count over the p95 limit."""

    def __init__(self, size: int, limit_ms: float, clock: Callable[[], float]) -> None:
        self.items: deque[tuple[float, bool, float]] = deque(maxlen=size)
        self.limit_ms = limit_ms
        self.clock = clock
        self.errors = 0
        #: Requests slower than the p95 limit. The p95 is over the limit exactly when
        #: enough of them are: an O(1) check per request.
        self.slow = 0
        #: When the newest request that has left the window was seen: the window covers
        #: the time since then.
        self.began_after = -math.inf

    def add(self, ok: bool, latency_ms: float) -> None:
        items = self.items
        if len(items) == items.maxlen:
            self.began_after, old_ok, old_latency = items[0]
            self.errors -= not old_ok
            self.slow -= old_latency > self.limit_ms
        items.append((self.clock(), ok, latency_ms))
        self.errors += not ok
        self.slow += latency_ms > self.limit_ms

    def rates(self) -> tuple[float, float]:
        """(error rate, share over the p95 limit); zeros when empty."""
        n = len(self.items)
        return (self.errors / n, self.slow / n) if n else (0.0, 0.0)


#: Legacy outcomes are kept as per-second running totals for this long: bounded memory
#: whatever legacy's traffic, and any stretch of time is two lookups away.
LEGACY_HISTORY_S = 3600
LEGACY_SECOND_S = 1.0


class _Timeline:
    """Legacy outcomes as running totals per second: (second, n, errors, slow), each
    count cumulative up to the end of that second."""

    def __init__(self, limit_ms: float, clock: Callable[[], float]) -> None:
        self.seconds: deque[tuple[int, int, int, int]] = deque(maxlen=LEGACY_HISTORY_S)
        self.limit_ms = limit_ms
        self.clock = clock
        self.n = self.errors = self.slow = 0
        #: The totals up to the oldest second no longer kept.
        self.dropped = (0, 0, 0)

    def add(self, ok: bool, latency_ms: float) -> None:
        self.n += 1
        self.errors += not ok
        self.slow += latency_ms > self.limit_ms
        second = int(self.clock() // LEGACY_SECOND_S)
        entry = (second, self.n, self.errors, self.slow)
        seconds = self.seconds
        if seconds and seconds[-1][0] == second:
            seconds[-1] = entry
            return
        if len(seconds) == seconds.maxlen:
            self.dropped = seconds[0][1:]
        seconds.append(entry)

    def since(self, after: float) -> tuple[int, float, float]:
        """(count, error rate, share over the p95 limit) of the outcomes from the second
        holding `after` on, at most LEGACY_HISTORY_S back. O(log n)."""
        first = int(after // LEGACY_SECOND_S) if math.isfinite(after) else -(2**62)
        i = bisect.bisect_left(self.seconds, first, key=lambda entry: entry[0])
        before = self.seconds[i - 1][1:] if i else self.dropped
        n = self.n - before[0]
        if n <= 0:
            return 0, 0.0, 0.0
        return n, (self.errors - before[1]) / n, (self.slow - before[2]) / n


class FailbackGuard:
    def __init__(self, limits: GuardLimits, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.reset(limits)

    def reconfigure(self, limits: GuardLimits, *, rearm: bool) -> None:
        """New limits from a new document. A tripped guard stays tripped (keeping its
        reason) unless `rearm`: the failback must survive until a flow has seen it."""
        if self.tripped and not rearm:
            reason, tripped_at = self.reason, self.tripped_at
            self.reset(limits)
            self.reason, self.tripped_at = reason, tripped_at
            return
        self.reset(limits)

    def reset(self, limits: GuardLimits) -> None:
        self.limits = limits
        self.production = _Window(limits.window, limits.p95_latency_ms, self.clock)
        # Legacy may serve many times production's traffic (a 5 % canary: 19 times): it
        # is compared over the same stretch of time, not the same number of requests.
        self.legacy = _Timeline(limits.p95_latency_ms, self.clock)
        self.reason: str | None = None
        self.tripped_at: datetime | None = None
        self.z = NormalDist().inv_cdf(limits.confidence)

    @property
    def tripped(self) -> bool:
        return self.reason is not None

    def trip(self, reason: str) -> str:
        if self.reason is None:
            self.reason = reason
            self.tripped_at = datetime.now(UTC)
        return self.reason

    def observe_legacy(self, ok: bool, latency_ms: float) -> None:
        """Record one legacy outcome: the reference a breach is judged against."""
        if self.limits.enabled and not self.tripped:
            self.legacy.add(ok, latency_ms)

    def _shared(self, k: int, n: int, limit: float, which: int) -> bool:
        """Legacy, over enough requests in the time production's window covers, breaches
        the same limit, and production (`k` of `n`) is not worse than it beyond noise (a
        pooled two-proportion z statistic at most the guard's z times sqrt 2: as strict
        as comparing two one-sided bounds at z, since this too is re-tested on every
        request; 4 shared 30 % outages in 200 tripped at z alone). A point comparison
        (legacy's rate at least production's), re-tested on every request, tripped on
        nearly every outage both arms shared. A count-based legacy window would cover a
        far shorter time when legacy carries most traffic, and a stall of a second or
        two would look like production's fault."""
        n_legacy, *rates = self.legacy.since(self.production.began_after)
        if n_legacy < self.limits.min_requests or rates[which] <= limit:
            return False
        return not worse_beyond_noise(k, n, rates[which], n_legacy, self.z * math.sqrt(2))

    def observe(self, ok: bool, latency_ms: float) -> str | None:
        """Record one production outcome; return the reason if this one trips the guard."""
        if not self.limits.enabled or self.tripped:
            return None
        window = self.production
        window.add(ok, latency_ms)
        n = len(window.items)
        if n < self.limits.min_requests:
            return None
        error_rate, _ = window.rates()
        if (
            error_rate > self.limits.error_rate
            and self._beyond_noise(window.errors, n, self.limits.error_rate)
            and not self._shared(window.errors, n, self.limits.error_rate, 0)
        ):
            return self.trip(
                f"production error rate {error_rate:.1%} over the last {n} requests "
                f"exceeds the hard limit {self.limits.error_rate:.1%}"
                f"{self._evidence(window.errors, n)}"
            )
        # p95 = sorted(latencies)[p95_index(n)] is above the limit iff at least
        # n - p95_index(n) latencies are, i.e. more than 5 % of them.
        if (
            window.slow >= n - p95_index(n)
            and self._beyond_noise(window.slow, n, 0.05)
            and not self._shared(window.slow, n, 0.05, 1)
        ):
            p95 = sorted(latency for _, _, latency in window.items)[p95_index(n)]
            return self.trip(
                f"production p95 latency {p95:.0f} ms over the last {n} requests "
                f"exceeds the hard limit {window.limit_ms:.0f} ms"
                f"{self._evidence(window.slow, n, 'share over the limit ')}"
            )
        return None

    def _beyond_noise(self, k: int, n: int, limit: float) -> bool:
        return self.z <= 0 or wilson_lower(k, n, self.z) > limit

    def _evidence(self, k: int, n: int, what: str = "") -> str:
        if self.z <= 0:
            return ""
        level = f"{self.limits.confidence * 100:.2f}".rstrip("0").rstrip(".") + "%"
        return f" ({what}{level} lower bound {wilson_lower(k, n, self.z):.1%})"

    def check_staleness(self, published_at: datetime, split_active: bool) -> str | None:
        """Dead-man's switch: a split nobody re-published for `canary_max_hours` ends."""
        limit = self.limits.canary_max_hours
        if not self.limits.enabled or self.tripped or not split_active or limit is None:
            return None
        age_h = (datetime.now(UTC) - published_at).total_seconds() / 3600.0
        if age_h > limit:
            return self.trip(
                f"traffic split is {age_h:.1f} h old with no new config: "
                f"over the {limit:g} h maximum (canary_max_hours: PROD_LB_CANARY_MAX_HOURS, "
                "or the published document's guard)"
            )
        return None


def wilson_lower(k: int, n: int, z: float) -> float:
    """One-sided Wilson score lower bound of a binomial proportion k/n."""
    p = k / n
    z2n = z * z / n
    centre = p + z2n / 2
    spread = z * math.sqrt(p * (1 - p) / n + z2n / (4 * n))
    return (centre - spread) / (1 + z2n)


def worse_beyond_noise(k: int, n: int, rate_b: float, n_b: int, z: float) -> bool:
    """Whether k/n is above rate_b (over n_b) by more than z pooled standard errors."""
    rate = k / n
    pooled = (k + rate_b * n_b) / (n + n_b)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n + 1 / n_b))
    if se == 0:
        return rate > rate_b
    return (rate - rate_b) / se > max(z, 0.0)


def p95_index(n: int) -> int:
    """0-based index of the p95 in `n` sorted samples, by nearest rank: ceil(0.95 n) - 1.

    In integers, so 20 samples give index 18 (one outlier in 20 is not the p95).
    """
    return max(0, (95 * n + 99) // 100 - 1)
