"""In-process analytics behind `export_analytics` and `get_performance_report`.

Bounded: the last `capacity` decisions and per-arm aggregates, so a long-running
process never grows. The durable record is the segment files, not this.
"""

from __future__ import annotations

from collections import defaultdict, deque
from datetime import datetime
from typing import Any

from router.result import RoutingResult


def percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


class Analytics:
    def __init__(self, capacity: int = 10_000) -> None:
        self.recent: deque[tuple[datetime, RoutingResult]] = deque(maxlen=capacity)
        self.latencies: dict[str, deque[float]] = defaultdict(lambda: deque(maxlen=capacity))
        self.counts: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))

    def add(self, when: datetime, result: RoutingResult) -> None:
        self.recent.append((when, result))
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
        rows = []
        for when, result in self.recent:
            if start_time and when < start_time:
                continue
            if end_time and when > end_time:
                continue
            row = result.to_dict()
            row.pop("answer", None)  # answers can carry patient details; analytics must not
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
