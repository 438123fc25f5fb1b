"""`response_time`: peak-EWMA latency times load (Finagle/Linkerd/tower)."""

from __future__ import annotations

import random
from collections.abc import Sequence

from router.algorithms.base import Choice, RequestContext, StatelessAlgorithm
from router.backend_state import BackendState


def cost_of(backend: BackendState, now: float) -> float:
    weight = backend.weight if backend.weight > 0 else 1e-9
    load = backend.latency.value(now) * (backend.in_flight + 1) / weight
    # Expected time to an answer: a backend answering a share p of its requests needs
    # 1/p tries per answer (p smoothed, so one early failure costs x1.5, not x infinity).
    return load / backend.success_rate()


class ResponseTime(StatelessAlgorithm):
    """Rule: lowest `peak_ewma_latency_ms * (in_flight + 1) / weight / success_rate`.

    The latency estimate jumps up on a slow sample and decays back over time toward the
    backend's baseline (see `PeakEwma`). A backend that fails fast does not look fast:
    failures never lower its estimate (the balancer charges them the detour they caused)
    and its recent success rate divides its score. Full scan up to three candidates,
    power of two choices above.
    """

    name = "response_time"
    full_scan_max = 3

    def __init__(self, seed: int | None = None) -> None:
        self._random = random.Random(seed)

    def choose(self, candidates: Sequence[BackendState], ctx: RequestContext) -> Choice:
        pool = (
            list(candidates)
            if len(candidates) <= self.full_scan_max
            else self._random.sample(list(candidates), 2)
        )
        scores = {b.name: cost_of(b, ctx.now) for b in pool}
        picked = min(pool, key=lambda b: scores[b.name])
        return Choice(picked, f"lowest latency x load cost {scores[picked.name]:.1f}", scores)
