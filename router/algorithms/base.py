"""The algorithm contract: pick one backend among eligible candidates and say why."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from router.backend_state import BackendState


@dataclass(slots=True)
class RequestContext:
    """What an algorithm may know about the request (never the user id)."""

    category: str = "general"
    region: str | None = None
    now: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Choice:
    backend: BackendState
    reason: str
    #: Candidate name -> the score the rule compared (lower or higher is better per rule).
    scores: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Observation:
    """The outcome of one attempt, fed back to algorithms that learn."""

    ok: bool
    latency_ms: float
    cost_usd: float = 0.0
    quality: float | None = None
    health_penalty: bool = True


@runtime_checkable
class Algorithm(Protocol):
    name: str

    def choose(self, candidates: Sequence[BackendState], ctx: RequestContext) -> Choice:
        """Pick from a non-empty sequence of available candidates."""
        ...

    def observe(self, backend: BackendState, observation: Observation) -> None:
        """Learn from an outcome; most rules read `BackendState` and need nothing here."""
        ...


class StatelessAlgorithm:
    """Base for rules that only read `BackendState`."""

    name = "stateless"

    def observe(self, backend: BackendState, observation: Observation) -> None:
        return None
