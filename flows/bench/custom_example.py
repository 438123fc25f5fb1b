"""An example `custom` algorithm (`flows.bench.custom_example:FastestRecentMedian`).

What a user's own class looks like: `name`, `choose`, `observe`. Used by the router
benchmark so `custom` is measured like every other algorithm.
"""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Sequence

from router.algorithms.base import Choice, Observation, RequestContext
from router.backend_state import BackendState

SPEC = "flows.bench.custom_example:FastestRecentMedian"


class FastestRecentMedian:
    """Rule: the lowest median latency over the last 20 outcomes (failures count as 5 s);
    a backend with fewer than 3 outcomes is tried first."""

    name = "fastest_recent_median"

    def __init__(self) -> None:
        self.samples: dict[str, deque[float]] = {}

    def choose(self, candidates: Sequence[BackendState], ctx: RequestContext) -> Choice:
        scores = {}
        for backend in candidates:
            recent = self.samples.get(backend.name)
            if recent is None or len(recent) < 3:
                return Choice(backend, "too few outcomes yet: measure it", {backend.name: 0.0})
            scores[backend.name] = statistics.median(recent)
        picked = min(candidates, key=lambda b: scores[b.name])
        return Choice(picked, f"lowest recent median {scores[picked.name]:.0f} ms", scores)

    def observe(self, backend: BackendState, observation: Observation) -> None:
        if not observation.health_penalty:
            return
        sample = observation.latency_ms if observation.ok else 5000.0
        self.samples.setdefault(backend.name, deque(maxlen=20)).append(sample)
