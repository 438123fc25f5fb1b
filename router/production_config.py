"""Static configuration of the production load balancer.

Static means: set when the application starts (from `PROD_LB_*` variables or code).
What a rollout changes at run time (mode, traffic percent, algorithm, weights, guard
limits) travels in `RouterConfig` documents instead.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from router.algorithms.names import AlgorithmName
from router.backends import BackendConfig


class HealthCheckSettings(BaseModel):
    """Active checks: LightRAG `GET /health`, Perplexity `GET /models`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    interval_s: float = Field(default=10.0, gt=0)
    timeout_s: float = Field(default=2.0, gt=0)
    unhealthy_after: int = Field(default=2, ge=1, description="failed checks in a row")
    healthy_after: int = Field(default=1, ge=1, description="passed checks in a row")


class CircuitBreakerSettings(BaseModel):
    """A resilience4j-style breaker per backend over a count-based sliding window."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    window_type: str = Field(default="count", pattern="^(count|time)$")
    window_size: int = Field(default=50, ge=1, description="calls, or seconds for a time window")
    minimum_calls: int = Field(default=10, ge=1)
    failure_rate_threshold: float = Field(default=0.5, gt=0, le=1)
    slow_call_rate_threshold: float = Field(default=0.8, gt=0, le=1)
    slow_call_ms: float = Field(default=2000.0, gt=0)
    open_wait_s: float = Field(default=30.0, gt=0)
    half_open_probes: int = Field(default=3, ge=1)


class OutlierSettings(BaseModel):
    """Envoy-style passive outlier ejection."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    consecutive_failures: int = Field(default=5, ge=1)
    failure_rate: float = Field(default=0.5, gt=0, le=1)
    window: int = Field(default=20, ge=1, description="recent calls considered for the rate")
    minimum_calls: int = Field(default=10, ge=1)
    base_ejection_s: float = Field(default=10.0, gt=0)
    max_ejection_s: float = Field(default=300.0, gt=0)
    max_ejection_percent: float = Field(default=50.0, gt=0, le=100)


class RetrySettings(BaseModel):
    """Retries go only to backends not yet tried, within a budget and the deadline."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_attempts: int = Field(default=3, ge=1, le=10)
    budget_ratio: float = Field(default=0.2, ge=0, le=1, description="share of in-flight")
    min_retries_in_flight: int = Field(default=3, ge=0)
    deadline_s: float = Field(default=30.0, gt=0)


class CostSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    daily_budget_usd: float | None = Field(default=None, gt=0)
    min_quality: float = Field(default=0.0, ge=0, le=1)
    latency_target_ms: float = Field(default=5000.0, gt=0)


class AdaptiveSettings(BaseModel):
    """The adaptive (Thompson sampling) algorithm's reward: exponents of its factors."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    latency_weight: float = Field(default=1.0, ge=0)
    cost_weight: float = Field(default=0.2, ge=0)
    quality_weight: float = Field(default=0.3, ge=0)
    latency_target_ms: float = Field(default=500.0, gt=0, description="latency scoring 0.5")
    cost_target_usd: float = Field(default=0.01, gt=0)
    decay: float = Field(default=0.995, gt=0, le=1, description="forgetting per own observation")
    half_life_s: float = Field(default=60.0, gt=0, description="idle backends drift back")


class ProductionLoadBalancingConfig(BaseModel):
    # its backends' errors must not echo a pasted key either (the outer model decides)
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    algorithm: AlgorithmName = AlgorithmName.LEAST_CONNECTIONS
    custom_algorithm: str | None = Field(default=None, description="module:Class for `custom`")
    backends: tuple[BackendConfig, ...] = ()
    health_check: HealthCheckSettings = HealthCheckSettings()
    circuit_breaker: CircuitBreakerSettings = CircuitBreakerSettings()
    outlier: OutlierSettings = OutlierSettings()
    retry: RetrySettings = RetrySettings()
    cost: CostSettings = CostSettings()
    adaptive: AdaptiveSettings = AdaptiveSettings()
    quality_min: float = Field(default=0.0, ge=0, le=1)
    quality_exploration: float = Field(default=0.05, ge=0, le=1)
    max_response_bytes: int = Field(default=2_000_000, gt=0)
    region: str = "eu-central"

    @model_validator(mode="after")
    def _custom_needs_path(self) -> ProductionLoadBalancingConfig:
        if self.algorithm is AlgorithmName.CUSTOM and not self.custom_algorithm:
            raise ValueError("algorithm 'custom' needs custom_algorithm='module:Class'")
        names = [b.name for b in self.backends]
        if len(names) != len(set(names)):
            raise ValueError(f"backend names must be unique, got {names}")
        return self
