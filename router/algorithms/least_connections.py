"""`least_connections`: fewest in-flight requests, by power of two choices."""

from __future__ import annotations

import random
from collections.abc import Sequence

from router.algorithms.base import Choice, RequestContext, StatelessAlgorithm
from router.backend_state import BackendState


def load_of(backend: BackendState) -> float:
    return backend.in_flight / backend.weight if backend.weight > 0 else float("inf")


class LeastConnections(StatelessAlgorithm):
    """Rule: with three candidates or fewer, the one with the fewest in-flight requests
    per unit of weight (ties broken at random); with more, two distinct candidates drawn
    at random and the less loaded of the two (Envoy's least-request P2C), which avoids
    herding every router onto the same "least loaded" backend.
    """

    name = "least_connections"
    full_scan_max = 3

    def __init__(self, seed: int | None = None) -> None:
        self._random = random.Random(seed)

    def choose(self, candidates: Sequence[BackendState], ctx: RequestContext) -> Choice:
        if len(candidates) <= self.full_scan_max:
            pool = list(candidates)
            rule = "full scan"
        else:
            pool = self._random.sample(list(candidates), 2)
            rule = "power of two choices"
        scores = {b.name: load_of(b) for b in pool}
        low = min(scores.values())
        tied = [b for b in pool if scores[b.name] == low]
        picked = tied[0] if len(tied) == 1 else self._random.choice(tied)
        return Choice(picked, f"{rule}: fewest in-flight per weight ({low:g})", scores)
