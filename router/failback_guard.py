"""The router's local guard: fail back to legacy at once when production breaks a hard limit.

It watches the production arm's most recent requests (shadow executions included: a
failing shadow is not worth its load either). The flow's next evaluation sees the
`failback` event and confirms the rollback by publishing `legacy_only`.
"""

from __future__ import annotations

from collections import deque
from datetime import UTC, datetime

from router.router_config import GuardLimits

CHECK_EVERY = 10


class FailbackGuard:
    def __init__(self, limits: GuardLimits) -> None:
        self.reset(limits)

    def reset(self, limits: GuardLimits) -> None:
        self.limits = limits
        self.window: deque[tuple[bool, float]] = deque(maxlen=limits.window)
        self.errors = 0
        self.reason: str | None = None
        self.tripped_at: datetime | None = None
        self._since_check = 0

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
        if len(window) == window.maxlen and not window[0][0]:
            self.errors -= 1
        window.append((ok, latency_ms))
        if not ok:
            self.errors += 1
        self._since_check += 1
        if len(window) < self.limits.min_requests:
            return None
        error_rate = self.errors / len(window)
        if error_rate > self.limits.error_rate:
            return self.trip(
                f"production error rate {error_rate:.1%} over the last {len(window)} requests "
                f"exceeds the hard limit {self.limits.error_rate:.1%}"
            )
        if self._since_check >= CHECK_EVERY or not ok:
            self._since_check = 0
            latencies = sorted(latency for _, latency in window)
            p95 = latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))]
            if p95 > self.limits.p95_latency_ms:
                return self.trip(
                    f"production p95 latency {p95:.0f} ms over the last {len(window)} requests "
                    f"exceeds the hard limit {self.limits.p95_latency_ms:.0f} ms"
                )
        return None

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
