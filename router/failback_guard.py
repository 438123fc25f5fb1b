"""The router's local guard: fail back to legacy at once when production breaks a hard limit.

It watches the production arm's most recent requests (shadow executions included: a
failing shadow is not worth its load either). The flow's next evaluation sees the
`failback` event and confirms the rollback by publishing `legacy_only`.

The guard is checked on every request, so a bare observed rate over a small window
would trip on noise sooner or later (3 timeouts in 20 requests on a busy machine is
15 %). It therefore trips only when the one-sided Wilson lower bound of the rate, at
`GuardLimits.confidence`, is over the limit: a real breakdown (35 % errors) still trips
within the first 20 requests, a blip does not.
"""

from __future__ import annotations

import math
from collections import deque
from datetime import UTC, datetime
from statistics import NormalDist

from router.router_config import GuardLimits


class FailbackGuard:
    def __init__(self, limits: GuardLimits) -> None:
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
        self.window: deque[tuple[bool, float]] = deque(maxlen=limits.window)
        self.errors = 0
        #: Requests in the window slower than the p95 limit. The p95 is over the limit
        #: exactly when enough of them are (see `observe`): an O(1) check per request,
        #: so the guard trips on the very request that crosses the limit.
        self.slow = 0
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

    def observe(self, ok: bool, latency_ms: float) -> str | None:
        """Record one production outcome; return the reason if this one trips the guard."""
        if not self.limits.enabled or self.tripped:
            return None
        window = self.window
        limit_ms = self.limits.p95_latency_ms
        if len(window) == window.maxlen:
            old_ok, old_latency = window[0]
            self.errors -= not old_ok
            self.slow -= old_latency > limit_ms
        window.append((ok, latency_ms))
        self.errors += not ok
        self.slow += latency_ms > limit_ms
        n = len(window)
        if n < self.limits.min_requests:
            return None
        error_rate = self.errors / n
        if error_rate > self.limits.error_rate and self._beyond_noise(
            self.errors, n, self.limits.error_rate
        ):
            return self.trip(
                f"production error rate {error_rate:.1%} over the last {n} requests "
                f"exceeds the hard limit {self.limits.error_rate:.1%}"
                f"{self._evidence(self.errors, n)}"
            )
        # p95 = sorted(latencies)[p95_index(n)] is above the limit iff at least
        # n - p95_index(n) latencies are, i.e. more than 5 % of them.
        if self.slow >= n - p95_index(n) and self._beyond_noise(self.slow, n, 0.05):
            p95 = sorted(latency for _, latency in window)[p95_index(n)]
            return self.trip(
                f"production p95 latency {p95:.0f} ms over the last {n} requests "
                f"exceeds the hard limit {limit_ms:.0f} ms"
                f"{self._evidence(self.slow, n, 'share over the limit ')}"
            )
        return None

    def _beyond_noise(self, k: int, n: int, limit: float) -> bool:
        return self.z <= 0 or wilson_lower(k, n, self.z) > limit

    def _evidence(self, k: int, n: int, what: str = "") -> str:
        if self.z <= 0:
            return ""
        level = f"{self.limits.confidence:.0%}"
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
                f"over the {limit:g} h maximum (PROD_LB_CANARY_MAX_HOURS)"
            )
        return None


def wilson_lower(k: int, n: int, z: float) -> float:
    """One-sided Wilson score lower bound of a binomial proportion k/n."""
    p = k / n
    z2n = z * z / n
    centre = p + z2n / 2
    spread = z * math.sqrt(p * (1 - p) / n + z2n / (4 * n))
    return (centre - spread) / (1 + z2n)


def p95_index(n: int) -> int:
    """0-based index of the p95 in `n` sorted samples, by nearest rank: ceil(0.95 n) - 1.

    In integers, so 20 samples give index 18 (one outlier in 20 is not the p95).
    """
    return max(0, (95 * n + 99) // 100 - 1)
