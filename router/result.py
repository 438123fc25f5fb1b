"""What `route_query` returns: the legacy routing prediction plus the answer and its facts."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
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
    explanation: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
