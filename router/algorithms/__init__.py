"""Load-balancing algorithms, each a small class with one documented rule."""

from router.algorithms.base import Algorithm, Choice, Observation, RequestContext
from router.algorithms.names import AlgorithmName
from router.algorithms.registry import available_algorithms, build_algorithm

__all__ = [
    "Algorithm",
    "AlgorithmName",
    "Choice",
    "Observation",
    "RequestContext",
    "available_algorithms",
    "build_algorithm",
]
