"""The legacy router's configuration, kept field for field so existing callers keep working."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class LoadBalancingConfig(BaseModel):
    """Configuration of the legacy `IntelligentQueryRouter` (weighted round robin)."""

    model_config = ConfigDict(extra="forbid")

    strategy: str = "weighted_round_robin"
    health_check_interval: int = Field(default=60, gt=0, description="seconds")
    circuit_breaker_threshold: int = Field(
        default=5, gt=0, description="consecutive failures before a backend is skipped"
    )
    circuit_breaker_timeout: int = Field(
        default=300, gt=0, description="seconds a skipped backend rests"
    )
    response_time_threshold_ms: float = Field(default=2000.0, gt=0)
    enable_adaptive_routing: bool = True
