"""`round_robin`: each available candidate in turn, ignoring weights and load."""

from __future__ import annotations

from collections.abc import Sequence

from router.algorithms.base import Choice, RequestContext, StatelessAlgorithm
from router.backend_state import BackendState


class RoundRobin(StatelessAlgorithm):
    """Rule: the candidate after the one picked last time, in configuration order.

    The rotation follows backends, not positions in the candidate list, so when a
    backend drops out (ejected, busy) the next in line still gets its turn; and each
    query category rotates on its own, so pathway questions (LightRAG only) alternate
    among LightRAG backends however they interleave with general questions. (A counter
    modulo the list length sent every pathway question to one backend.)
    """

    name = "round_robin"

    def __init__(self) -> None:
        #: Configuration order, learnt from the candidate lists (each is in that order).
        self._rank: dict[str, int] = {}
        #: Per query category: the backend picked last time.
        self._last: dict[str, str] = {}

    def _ranks(self, candidates: Sequence[BackendState]) -> list[int]:
        for backend in candidates:
            if backend.name not in self._rank:
                self._rank[backend.name] = len(self._rank)
        return [self._rank[b.name] for b in candidates]

    def choose(self, candidates: Sequence[BackendState], ctx: RequestContext) -> Choice:
        ranks = self._ranks(candidates)
        previous = self._last.get(ctx.category)
        last = self._rank[previous] if previous is not None else -1
        after = [i for i, rank in enumerate(ranks) if rank > last]
        index = min(after, key=ranks.__getitem__) if after else ranks.index(min(ranks))
        picked = candidates[index]
        self._last[ctx.category] = picked.name
        return Choice(
            picked,
            f"{ctx.category} rotation: {picked.name} after {previous or 'none'} "
            f"({len(candidates)} candidates)",
        )
