"""`weighted_round_robin`: nginx's smooth weighted round robin."""

from __future__ import annotations

from collections.abc import Sequence

from router.algorithms.base import Choice, RequestContext, StatelessAlgorithm
from router.backend_state import BackendState


class WeightedRoundRobin(StatelessAlgorithm):
    """Rule: every pick adds each candidate's weight to its running score, picks the
    highest score and subtracts the total weight from it.

    Over any window of `sum(weights)` picks with a stable candidate set, each backend is
    picked exactly `weight` times (weights scaled to integers), and picks interleave
    smoothly instead of arriving in bursts. A zero weight is never picked unless every
    candidate has weight zero, when picks fall back to plain rotation.
    """

    name = "weighted_round_robin"

    def __init__(self, weights: dict[str, float] | None = None) -> None:
        self.weights = dict(weights or {})
        self._current: dict[str, float] = {}
        self._rotation = 0

    def weight_of(self, backend: BackendState) -> float:
        return self.weights.get(backend.name, backend.weight)

    def choose(self, candidates: Sequence[BackendState], ctx: RequestContext) -> Choice:
        weights = [self.weight_of(b) for b in candidates]
        total = sum(weights)
        if total <= 0:
            picked = candidates[self._rotation % len(candidates)]
            self._rotation += 1
            return Choice(picked, "all weights are zero: plain rotation")
        current = self._current
        best = None
        best_score = float("-inf")
        for backend, weight in zip(candidates, weights, strict=True):
            if weight <= 0:
                continue  # drained: its score must not win when others' went negative
            score = current.get(backend.name, 0.0) + weight
            current[backend.name] = score
            if score > best_score:
                best, best_score = backend, score
        assert best is not None
        current[best.name] = best_score - total
        return Choice(best, f"highest running weight {best_score:g} (total {total:g})")
