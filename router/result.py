"""What `route_query` returns: the legacy routing prediction plus the answer and its facts."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any


@dataclass(slots=True)
class RoutingResult:
    # -- the legacy `RoutingPrediction` fields ------------------------------------------
    routing_decision: str
    confidence: float
    reasoning: list[str]
    metadata: dict[str, Any]
    # -- what the production router adds -------------------------------------------------
    request_id: str
    answer: str | None
    arm: str
    mode: str
    algorithm: str
    config_version: int
    backend: str | None
    attempts: int
    outcome: str
    error: str | None
    latency_ms: float
    cost_usd: float
    quality_score: float | None
    category: str
    #: Builds the explanation on first access: most callers never read it, and building
    #: it on every request would cost more than the routing decision itself.
    explain: Callable[[], dict[str, Any]] | None = field(default=None, repr=False, compare=False)
    _explanation: dict[str, Any] | None = field(default=None, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"

    @property
    def explanation(self) -> dict[str, Any]:
        """Candidate scores, the reason for the pick, every attempt and why it stopped."""
        if self._explanation is None:
            self._explanation = self.explain() if self.explain is not None else {}
        return self._explanation

    def to_dict(self) -> dict[str, Any]:
        data = {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if not f.name.startswith(("explain", "_"))
        }
        data["explanation"] = self.explanation
        return data
