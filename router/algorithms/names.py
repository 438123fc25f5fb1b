"""The names operators use to pick an algorithm (in env files, plans and RouterConfig)."""

from __future__ import annotations

from enum import StrEnum


class AlgorithmName(StrEnum):
    ROUND_ROBIN = "round_robin"
    WEIGHTED_ROUND_ROBIN = "weighted_round_robin"
    LEAST_CONNECTIONS = "least_connections"
    RESPONSE_TIME = "response_time"
    HEALTH_AWARE = "health_aware"
    COST_AWARE = "cost_aware"
    QUALITY_AWARE = "quality_aware"
    GEOGRAPHIC = "geographic"
    ADAPTIVE = "adaptive"
    CUSTOM = "custom"


#: Algorithms that need `PROD_LB_ADVANCED_ALGORITHMS=true`: they act on cost, quality,
#: region or learned rewards, which an operator should opt into knowingly.
ADVANCED_ALGORITHMS = frozenset(
    {
        AlgorithmName.COST_AWARE,
        AlgorithmName.QUALITY_AWARE,
        AlgorithmName.GEOGRAPHIC,
        AlgorithmName.ADAPTIVE,
        AlgorithmName.CUSTOM,
    }
)
