"""`cost_aware`: the cheapest backend that is good and fast enough, within a daily budget."""

from __future__ import annotations

import random
from collections.abc import Sequence

from router.algorithms.base import Choice, Observation, RequestContext
from router.backend_state import BackendState
from router.budget import DailyBudget
from router.production_config import CostSettings

#: Constraint tiers, best first: which constraints a candidate meets.
_TIER_NOTES = (
    "",
    " (latency target relaxed: no candidate of acceptable quality meets it)",
    " (min quality relaxed: no candidate meets it; latency target kept)",
    " (latency target and min quality relaxed: no candidate meets either)",
)


class CostAware:
    """Rule: lowest expected cost per request (`BackendState.expected_cost()`: the
    backend's cost model at its observed average tokens) among the candidates that meet
    both `min_quality` (unknown quality counts as meeting it) and `latency_target_ms`
    (peak-EWMA latency). If none meets both, relax the latency target first (quality
    only), then the quality minimum (latency only), then both; the reason names what
    was relaxed.

    Costs within `tie_tolerance` (relative) of the cheapest count as equal and are
    balanced by the lower `latency * (in_flight + 1) / weight` (random among exact ties),
    so identical self-hosted servers share the load instead of one taking it all.

    Daily budget (`daily_budget_usd`, UTC days, fed by `observe` with each answer's
    cost): once exhausted, only candidates whose expected cost is zero are picked (best
    tier first) or, if none is free, the cheapest; the reason says "budget exhausted".
    """

    name = "cost_aware"

    def __init__(
        self,
        settings: CostSettings | None = None,
        budget: DailyBudget | None = None,
        seed: int | None = None,
        tie_tolerance: float = 0.05,
    ) -> None:
        self.settings = settings or CostSettings()
        # A budget handed in belongs to the router, which records every answer's cost
        # itself; only a budget of our own is fed from `observe`.
        self._owns_budget = budget is None
        self.budget = budget if budget is not None else DailyBudget(self.settings.daily_budget_usd)
        self.tie_tolerance = tie_tolerance
        self._random = random.Random(seed)

    def observe(self, backend: BackendState, observation: Observation) -> None:
        if self._owns_budget:
            self.budget.add(observation.cost_usd)

    def _tier(self, quality: float | None, latency_ms: float) -> int:
        quality_ok = quality is None or quality >= self.settings.min_quality
        latency_ok = latency_ms <= self.settings.latency_target_ms
        return (0 if latency_ok else 1) if quality_ok else (2 if latency_ok else 3)

    def choose(self, candidates: Sequence[BackendState], ctx: RequestContext) -> Choice:
        now = ctx.now
        exhausted = self.budget.exhausted
        scores: dict[str, float] = {}
        # Pass 1: expected costs and the best (tier, cost) on offer. Exhausted: cost
        # first (free ones win), tier only among equal costs.
        best_tier = 4
        cheapest = float("inf")
        for b in candidates:
            cost = b.expected_cost()
            scores[b.name] = cost
            tier = self._tier(b.quality, b.latency.value(now))
            if (
                (cost < cheapest or (cost == cheapest and tier < best_tier))
                if exhausted
                else (tier < best_tier or (tier == best_tier and cost < cheapest))
            ):
                best_tier, cheapest = tier, cost
        limit = cheapest if exhausted else cheapest * (1.0 + self.tie_tolerance)
        # Pass 2: among near-cheapest of the best tier, the least loaded.
        picked: BackendState | None = None
        best_load = float("inf")
        ties = 0
        for b in candidates:
            if scores[b.name] > limit:
                continue
            latency = b.latency.value(now)
            if self._tier(b.quality, latency) != best_tier:
                continue
            load = latency * (b.in_flight + 1) / (b.weight if b.weight > 0 else 1e-9)
            if picked is None or load < best_load:
                picked, best_load, ties = b, load, 1
            elif load == best_load:
                ties += 1
                if self._random.randrange(ties) == 0:
                    picked = b
        assert picked is not None
        cost = scores[picked.name]
        if exhausted:
            spent = self.budget.spent
            what = "free backend" if cost == 0 else "no free backend, cheapest"
            return Choice(
                picked,
                f"budget exhausted (${spent:.4f} of ${self.budget.limit_usd:g} today): "
                f"{what} ${cost:.6f}/request",
                scores,
            )
        return Choice(
            picked, f"cheapest acceptable: ${cost:.6f}/request{_TIER_NOTES[best_tier]}", scores
        )
