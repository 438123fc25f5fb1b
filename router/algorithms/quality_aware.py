"""`quality_aware`: the backend with the best rolling answer quality, with exploration."""

from __future__ import annotations

import random
from collections.abc import Sequence

from router.algorithms.base import Choice, RequestContext, StatelessAlgorithm
from router.algorithms.least_connections import load_of
from router.backend_state import BackendState

#: Score shown for a candidate whose quality has not been measured yet.
UNMEASURED = -1.0


class QualityAware(StatelessAlgorithm):
    """Rule, in order:

    1. Measure first: a candidate with no quality yet (`BackendState.quality is None`)
       and fewer than `probe_calls` attempts is picked (the least loaded such one), so
       every backend gets a rolling quality. After `probe_calls` attempts without a
       quality (it keeps failing, or quality scoring is off) it ranks below every
       measured backend instead, so a broken backend is not retried forever.
    2. Explore: with probability `exploration`, a candidate uniformly at random, so a
       backend that improved can show it.
    3. Exploit: the highest quality, which is at or above `quality_min` whenever any
       candidate is; if none reaches the minimum, the best one anyway and the reason
       says so (refusing every backend would fail the user instead). Ties go to the
       least in-flight per weight, then at random.

    Exploration covers every candidate, including ones below the minimum: that is the
    only traffic that can show a degraded backend has recovered.

    `BackendState.quality` is the balancer's moving average (0.9 old, 0.1 new) of the
    heuristic answer score in `router.quality`.
    """

    name = "quality_aware"

    def __init__(
        self,
        quality_min: float = 0.0,
        exploration: float = 0.05,
        seed: int | None = None,
        probe_calls: int = 3,
    ) -> None:
        if not 0.0 <= exploration <= 1.0:
            raise ValueError(f"exploration must be within [0, 1], got {exploration}")
        self.quality_min = quality_min
        self.exploration = exploration
        self.probe_calls = probe_calls
        self._random = random.Random(seed)

    def choose(self, candidates: Sequence[BackendState], ctx: RequestContext) -> Choice:
        scores: dict[str, float] = {}
        probe: BackendState | None = None
        best: BackendState | None = None
        best_quality = UNMEASURED - 1.0
        best_load = 0.0
        ties = 0
        for b in candidates:
            quality = b.quality
            if quality is None:
                scores[b.name] = UNMEASURED
                if b.calls < self.probe_calls and (probe is None or load_of(b) < load_of(probe)):
                    probe = b
                quality = UNMEASURED
            else:
                scores[b.name] = quality
            load = load_of(b)
            if quality > best_quality or (quality == best_quality and load < best_load):
                best, best_quality, best_load, ties = b, quality, load, 1
            elif quality == best_quality and load == best_load:
                ties += 1
                if self._random.randrange(ties) == 0:
                    best = b
        if probe is not None:
            return Choice(probe, f"measuring: no quality yet after {probe.calls} calls", scores)
        if self.exploration > 0 and self._random.random() < self.exploration:
            picked = candidates[self._random.randrange(len(candidates))]
            return Choice(picked, f"exploring (p={self.exploration:g}): uniform pick", scores)
        assert best is not None
        if best.quality is None:
            return Choice(best, "no candidate has a measured quality", scores)
        if best_quality >= self.quality_min:
            return Choice(best, f"highest quality {best_quality:.3f}", scores)
        return Choice(
            best,
            f"highest quality {best_quality:.3f}, below minimum {self.quality_min:g} "
            "(no candidate meets it)",
            scores,
        )
