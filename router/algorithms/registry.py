"""Build an algorithm from its name and the production configuration."""

from __future__ import annotations

from collections.abc import Callable

from router.algorithms.adaptive import Adaptive
from router.algorithms.base import Algorithm
from router.algorithms.cost_aware import CostAware
from router.algorithms.custom import CustomAlgorithm
from router.algorithms.geographic import Geographic
from router.algorithms.health_aware import HealthAware
from router.algorithms.least_connections import LeastConnections
from router.algorithms.names import AlgorithmName
from router.algorithms.quality_aware import QualityAware
from router.algorithms.response_time import ResponseTime
from router.algorithms.round_robin import RoundRobin
from router.algorithms.weighted_round_robin import WeightedRoundRobin
from router.budget import DailyBudget
from router.production_config import ProductionLoadBalancingConfig

Factory = Callable[[ProductionLoadBalancingConfig, dict[str, float], int | None], Algorithm]

#: Algorithms that spend against the instance's daily budget get the shared counter.
BUDGETED = frozenset({AlgorithmName.COST_AWARE})

FACTORIES: dict[AlgorithmName, Factory] = {
    AlgorithmName.ROUND_ROBIN: lambda cfg, weights, seed: RoundRobin(),
    AlgorithmName.WEIGHTED_ROUND_ROBIN: lambda cfg, weights, seed: WeightedRoundRobin(weights),
    AlgorithmName.LEAST_CONNECTIONS: lambda cfg, weights, seed: LeastConnections(seed),
    AlgorithmName.RESPONSE_TIME: lambda cfg, weights, seed: ResponseTime(seed),
    AlgorithmName.HEALTH_AWARE: lambda cfg, weights, seed: HealthAware(weights, seed),
    AlgorithmName.COST_AWARE: lambda cfg, weights, seed: CostAware(cfg.cost, seed=seed),
    AlgorithmName.QUALITY_AWARE: lambda cfg, weights, seed: QualityAware(
        cfg.quality_min, cfg.quality_exploration, seed
    ),
    AlgorithmName.GEOGRAPHIC: lambda cfg, weights, seed: Geographic(cfg.region, weights, seed),
    AlgorithmName.ADAPTIVE: lambda cfg, weights, seed: Adaptive(cfg.adaptive, seed),
    AlgorithmName.CUSTOM: lambda cfg, weights, seed: CustomAlgorithm(cfg.custom_algorithm, cfg),
}


def available_algorithms() -> list[str]:
    return [name.value for name in FACTORIES]


def build_algorithm(
    name: AlgorithmName | str,
    config: ProductionLoadBalancingConfig,
    weights: dict[str, float] | None = None,
    seed: int | None = None,
    *,
    budget: DailyBudget | None = None,
) -> Algorithm:
    """`budget`: the router's own daily spend counter, shared across config changes;
    without it a budgeted algorithm keeps its own."""
    try:
        key = AlgorithmName(name)
        factory = FACTORIES[key]
    except (KeyError, ValueError):
        raise ValueError(
            f"algorithm {name!r} is not available; available: {', '.join(available_algorithms())}"
        ) from None
    if key in BUDGETED and budget is not None:
        return CostAware(config.cost, seed=seed, budget=budget)
    return factory(config, dict(weights or {}), seed)
