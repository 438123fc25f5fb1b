"""`round_robin`: each available candidate in turn, ignoring weights and load."""

from __future__ import annotations

from collections.abc import Sequence

from router.algorithms.base import Choice, RequestContext, StatelessAlgorithm
from router.backend_state import BackendState


class RoundRobin(StatelessAlgorithm):
    """Rule: the candidate after the one picked last time, in configuration order."""

    name = "round_robin"

    def __init__(self) -> None:
        self._counter = 0

    def choose(self, candidates: Sequence[BackendState], ctx: RequestContext) -> Choice:
        picked = candidates[self._counter % len(candidates)]
        self._counter += 1
        return Choice(picked, f"turn {self._counter} of {len(candidates)} candidates")
