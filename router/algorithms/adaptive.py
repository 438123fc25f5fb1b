"""`adaptive`: discounted Thompson sampling on a reward of success, latency, cost, quality."""

from __future__ import annotations

import random
from collections.abc import Sequence

from router.algorithms.base import Choice, Observation, RequestContext
from router.backend_state import BackendState
from router.production_config import AdaptiveSettings


class Adaptive:
    """Rule: for each candidate draw `x ~ Beta(1 + S, 1 + F)` from its discounted reward
    totals and pick the highest draw (Thompson sampling). A backend never observed
    draws from Beta(1, 1), so it is tried.

    Reward of one attempt, in [0, 1], with the exponents of `AdaptiveSettings`:

        failed attempt:      r = 0   (a fast or cheap failure is worth nothing)
        successful attempt:  r = L ** w_l * C ** w_c * Q ** w_q
            L = T_l / (T_l + latency_ms)    1 when instant, 0.5 at latency_target_ms
            C = T_c / (T_c + cost_usd)      1 when free,    0.5 at cost_target_usd
            Q = quality                     factor left out when unmeasured

    A product, not a weighted sum: a success that is ten times slower is worth about
    half as much, so the posteriors of a fast and a slow backend separate after tens of
    observations instead of hundreds, and a clearly worse backend is rarely re-explored.

    Update (discounted Thompson sampling, Raj & Kalyani 2017, discounted per backend):
    an observation multiplies the observed backend's `S` and `F` by `decay` and adds `r`
    to `S` and `1 - r` to `F`, so its memory is about `1 / (1 - decay)` of its own
    observations (200 at 0.995) and a backend that degrades loses traffic within tens of
    its requests. Separately, every backend's totals halve every `half_life_s` seconds
    of wall time: a backend left alone drifts back to the uninformed prior and is
    re-tried, which is how a recovery is noticed, at a pace set by time rather than by
    the other backends' traffic (discounting by others' traffic re-explores a bad
    backend a few percent of the time at any request rate). Failures that are not the
    backend's fault (`health_penalty=False`, for example a rate limit) are not learned
    from.
    """

    name = "adaptive"

    def __init__(self, settings: AdaptiveSettings | None = None, seed: int | None = None) -> None:
        self.settings = settings or AdaptiveSettings()
        self._random = random.Random(seed)
        #: Backend name -> [S, F, t]: discounted reward and shortfall totals, as of time t.
        self._stats: dict[str, list[float]] = {}
        self._now = 0.0  # the clock of the latest decision (observations follow decisions)

    def _aged(self, stats: list[float], now: float) -> tuple[float, float]:
        age = now - stats[2]
        if age <= 0:
            return stats[0], stats[1]
        factor = 0.5 ** (age / self.settings.half_life_s)
        return stats[0] * factor, stats[1] * factor

    def reward(self, observation: Observation) -> float:
        if not observation.ok:
            return 0.0
        s = self.settings
        latency = s.latency_target_ms / (s.latency_target_ms + max(0.0, observation.latency_ms))
        cost = s.cost_target_usd / (s.cost_target_usd + max(0.0, observation.cost_usd))
        r = latency**s.latency_weight * cost**s.cost_weight
        if observation.quality is not None:
            r *= min(1.0, max(0.0, observation.quality)) ** s.quality_weight
        return r

    def observe(self, backend: BackendState, observation: Observation) -> None:
        if not observation.ok and not observation.health_penalty:
            return
        r = self.reward(observation)
        decay = self.settings.decay
        stats = self._stats.get(backend.name)
        if stats is None:
            stats = self._stats[backend.name] = [0.0, 0.0, self._now]
        s, f = self._aged(stats, self._now)
        stats[0] = s * decay + r
        stats[1] = f * decay + (1.0 - r)
        stats[2] = self._now

    def posterior_mean(self, name: str) -> float:
        stats = self._stats.get(name)
        s, f = self._aged(stats, self._now) if stats else (0.0, 0.0)
        return (1.0 + s) / (2.0 + s + f)

    def choose(self, candidates: Sequence[BackendState], ctx: RequestContext) -> Choice:
        stats = self._stats
        now = self._now = max(self._now, ctx.now)
        draw = self._random.betavariate
        scores: dict[str, float] = {}
        picked = candidates[0]
        best = -1.0
        for b in candidates:
            found = stats.get(b.name)
            s, f = self._aged(found, now) if found else (0.0, 0.0)
            x = draw(1.0 + s, 1.0 + f)
            scores[b.name] = x
            if x > best:
                picked, best = b, x
        found = stats.get(picked.name)
        s, f = self._aged(found, now) if found else (0.0, 0.0)
        return Choice(
            picked,
            f"highest Thompson draw {best:.3f} (mean reward {(1.0 + s) / (2.0 + s + f):.3f} "
            f"over {s + f:.1f} effective observations)",
            scores,
        )
