"""`health_aware`: traffic in proportion to weight times recent success rate squared."""

from __future__ import annotations

import random
from collections.abc import Sequence

from router.algorithms.base import Choice, RequestContext, StatelessAlgorithm
from router.backend_state import BackendState


class HealthAware(StatelessAlgorithm):
    """Rule: pick at random with probability proportional to
    `weight * success_rate() ** 2`, over the candidates that are not ejected
    (`ejected_until > ctx.now`).

    `success_rate()` is the last 50 outcomes smoothed with a prior of two successes, so
    one early failure does not starve a backend. Squaring sharpens the preference: a
    backend at 50 % success gets a quarter of a healthy one's share, not half. Random
    (seeded) rather than round robin so several router instances do not move in step.

    The balancer already filters ejected backends out; if it hands over only ejected
    ones (its degraded mode), they are all scored and the reason says "degraded". A
    weight comes from `weights` (the rollout's production weights) if named there, else
    from the backend. If every score is zero (all weights zero), picks are uniform.
    """

    name = "health_aware"

    def __init__(self, weights: dict[str, float] | None = None, seed: int | None = None) -> None:
        self.weights = dict(weights or {})
        self._random = random.Random(seed)

    def choose(self, candidates: Sequence[BackendState], ctx: RequestContext) -> Choice:
        now = ctx.now
        degraded = all(b.ejected_until > now for b in candidates)
        weights = self.weights
        scores: dict[str, float] = {}
        total = 0.0
        usable = 0
        for b in candidates:
            if not degraded and b.ejected_until > now:
                scores[b.name] = 0.0
                continue
            score = weights.get(b.name, b.weight) * b.success_rate() ** 2
            scores[b.name] = score
            total += score
            usable += 1
        if total > 0:
            point = self._random.random() * total
            picked = None
            for b in candidates:
                score = scores[b.name]
                if score > 0:
                    picked = b
                    point -= score
                    if point < 0:
                        break
            assert picked is not None
        else:  # every usable score is zero: uniform among the usable ones
            index = self._random.randrange(usable)
            picked = candidates[0]
            for b in candidates:
                if degraded or b.ejected_until <= now:
                    if index == 0:
                        picked = b
                        break
                    index -= 1
        share = scores[picked.name] / total if total > 0 else 1.0 / usable
        prefix = "degraded: every candidate is ejected; " if degraded else ""
        return Choice(
            picked,
            f"{prefix}weighted by success rate^2: {picked.success_rate():.2f} ({share:.0%} share)",
            scores,
        )
