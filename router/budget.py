"""A daily spend limit in USD, so a cost-aware router cannot overspend a day's budget.

Days are UTC days of wall-clock time (`time.time()`), not of the monotonic clock the
balancer uses: a budget is an accounting period people reason about in calendar days.
The tracker is per router process; a fleet-wide budget needs a shared counter (a seam
left for later: feed `add` from it).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

SECONDS_PER_DAY = 86_400


def utc_day(epoch_s: float) -> int:
    """Days since 1970-01-01 UTC (POSIX time has no leap seconds, so this is exact)."""
    return int(epoch_s // SECONDS_PER_DAY)


class DailyBudget:
    """Spend of the current UTC day against `limit_usd`; resets at 00:00 UTC.

    `limit_usd=None` means no budget: never exhausted, `remaining()` is infinite.
    Exhausted means spent >= limit; the request that crosses the limit is not refused
    (its cost is only known afterwards), every later one sees the budget exhausted.
    """

    __slots__ = ("_clock", "_day", "_spent", "limit_usd")

    def __init__(self, limit_usd: float | None, clock: Callable[[], float] = time.time) -> None:
        if limit_usd is not None and not limit_usd > 0:
            raise ValueError(f"daily budget must be > 0 USD or None, got {limit_usd!r}")
        self.limit_usd = limit_usd
        self._clock = clock
        self._day = utc_day(clock())
        self._spent = 0.0

    def _roll(self) -> None:
        day = utc_day(self._clock())
        if day != self._day:
            self._day, self._spent = day, 0.0

    def add(self, cost_usd: float) -> None:
        """Record spend; negative or non-finite amounts are ignored (never refund)."""
        if cost_usd > 0 and math.isfinite(cost_usd):
            self._roll()
            self._spent += cost_usd

    @property
    def spent(self) -> float:
        self._roll()
        return self._spent

    def remaining(self) -> float:
        if self.limit_usd is None:
            return math.inf
        return max(0.0, self.limit_usd - self.spent)

    @property
    def exhausted(self) -> bool:
        return self.limit_usd is not None and self.spent >= self.limit_usd

    def __repr__(self) -> str:
        return f"DailyBudget(limit_usd={self.limit_usd}, spent={self._spent:.6f})"
