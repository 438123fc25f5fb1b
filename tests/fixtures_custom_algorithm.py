"""Example custom algorithms for `custom_algorithm='tests.fixtures_custom_algorithm:...'`.

`FewestCalls` is also what a user's own class looks like: a `name`, `choose` and
`observe`, optionally taking the `ProductionLoadBalancingConfig` in its constructor.
"""

from __future__ import annotations

from collections.abc import Sequence

from router.algorithms.base import Choice, Observation, RequestContext
from router.backend_state import BackendState
from router.production_config import ProductionLoadBalancingConfig

SPEC = "tests.fixtures_custom_algorithm:FewestCalls"


class FewestCalls:
    """Rule: the candidate this algorithm has observed least often (first on ties)."""

    name = "fewest_calls"

    def __init__(self, config: ProductionLoadBalancingConfig) -> None:
        self.config = config
        self.calls: dict[str, int] = {}

    def choose(self, candidates: Sequence[BackendState], ctx: RequestContext) -> Choice:
        scores = {b.name: float(self.calls.get(b.name, 0)) for b in candidates}
        picked = min(candidates, key=lambda b: scores[b.name])
        return Choice(picked, f"fewest observed calls ({scores[picked.name]:g})", scores)

    def observe(self, backend: BackendState, observation: Observation) -> None:
        self.calls[backend.name] = self.calls.get(backend.name, 0) + 1


class NoArguments:
    """Constructed without arguments: always the last candidate."""

    name = "last"

    def __init__(self) -> None:
        self.built = True

    def choose(self, candidates: Sequence[BackendState], ctx: RequestContext) -> Choice:
        return Choice(candidates[-1], "last candidate")

    def observe(self, backend: BackendState, observation: Observation) -> None:
        return None


class NoObserve:
    name = "no_observe"

    def choose(self, candidates: Sequence[BackendState], ctx: RequestContext) -> Choice:
        return Choice(candidates[0], "first")


class NoName:
    def choose(self, candidates: Sequence[BackendState], ctx: RequestContext) -> Choice:
        return Choice(candidates[0], "first")

    def observe(self, backend: BackendState, observation: Observation) -> None:
        return None


class BrokenConstructor(NoArguments):
    def __init__(self) -> None:
        raise RuntimeError("missing model file")


class Rogue(NoArguments):
    """Returns a backend that is not a candidate: the wrapper must not route to it."""

    name = "rogue"

    def __init__(self) -> None:
        from router.backends import BackendConfig, BackendKind

        self.outsider = BackendState(
            BackendConfig(name="outsider", kind=BackendKind.LIGHTRAG, base_url="http://x")
        )

    def choose(self, candidates: Sequence[BackendState], ctx: RequestContext) -> Choice:
        return Choice(self.outsider, "remembered backend")


class Crashing(NoArguments):
    """Raises from both methods, as buggy user code does."""

    name = "crashing"

    def choose(self, candidates: Sequence[BackendState], ctx: RequestContext) -> Choice:
        raise KeyError("model_weights")

    def observe(self, backend: BackendState, observation: Observation) -> None:
        raise ZeroDivisionError("no calls yet")
