"""In-process analytics behind `export_analytics` and `get_performance_report`.

Bounded: the last `capacity` decisions and per-arm aggregates, so a long-running
process never grows. The durable record is the segment files, not this.
"""

from __future__ import annotations

from collections import defaultdict, deque
from datetime import UTC, datetime
from operator import attrgetter
from typing import Any

from router.result import RoutingResult

#: What a decision keeps for `export_analytics`: no answer text (clinical answers can
#: identify people) and no explanation (it would pin the whole response in memory).
KEPT = (
    "request_id",
    "routing_decision",
    "confidence",
    "arm",
    "mode",
    "algorithm",
    "config_version",
    "backend",
    "attempts",
    "outcome",
    "error",
    "latency_ms",
    "cost_usd",
    "quality_score",
    "category",
)
_kept = attrgetter(*KEPT)  # one C call per decision instead of a generator


def _aware(moment: datetime | None) -> datetime | None:
    """A naive datetime is the host's local time, as `datetime.now()` gives it: the legacy
    router's callers pass `datetime.now() - timedelta(hours=1)`, and reading that as UTC
    gave an empty or shifted window on any host not running in UTC."""
    if moment is not None and moment.tzinfo is None:
        return moment.astimezone(UTC)
    return moment


def percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


class Analytics:
    def __init__(self, capacity: int = 10_000) -> None:
        self.recent: deque[tuple[datetime, tuple[Any, ...]]] = deque(maxlen=capacity)
        self.latencies: dict[str, deque[float]] = defaultdict(lambda: deque(maxlen=capacity))
        self.counts: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))

    def add(self, when: datetime, result: RoutingResult) -> None:
        self.recent.append((when, _kept(result)))
        counts = self.counts[result.arm]
        counts["requests"] += 1
        counts["ok"] += result.ok
        counts["cost_usd"] += result.cost_usd
        if result.quality_score is not None:
            counts["quality_sum"] += result.quality_score
            counts["quality_n"] += 1
        self.latencies[result.arm].append(result.latency_ms)

    def export(
        self, start_time: datetime | None = None, end_time: datetime | None = None
    ) -> list[dict[str, Any]]:
        start_time, end_time = _aware(start_time), _aware(end_time)
        rows = []
        for when, values in list(self.recent):
            if start_time and when < start_time:
                continue
            if end_time and when > end_time:
                continue
            row = dict(zip(KEPT, values, strict=True))
            row["timestamp"] = when.isoformat()
            rows.append(row)
        return rows

    def report(self) -> dict[str, Any]:
        arms = {}
        for arm, counts in self.counts.items():
            n = counts["requests"]
            lat = sorted(self.latencies[arm])
            arms[arm] = {
                "requests": int(n),
                "success_rate": counts["ok"] / n if n else None,
                "p50_ms": percentile(lat, 0.5),
                "p95_ms": percentile(lat, 0.95),
                "p99_ms": percentile(lat, 0.99),
                "cost_per_request_usd": counts["cost_usd"] / n if n else None,
                "mean_quality": counts["quality_sum"] / counts["quality_n"]
                if counts["quality_n"]
                else None,
            }
        return {"arms": arms, "window_requests": len(self.recent)}
