"""What a phase promises: thresholds, metric modes and what to do at maximum duration.

Defined here (not in the plan) because the checks interpret them; the plan model in
`flows.plan` embeds them, keeping imports pointing from flows to checks.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field, field_validator


class MetricMode(StrEnum):
    """Argo-style action of a metric: observe (dry run: reported, never acts), warn
    (reported as a warning, never acts), pause (holds the rollout for a human), abort
    (rolls back)."""

    OBSERVE = "observe"
    WARN = "warn"
    PAUSE = "pause"
    ABORT = "abort"

    @property
    def acts(self) -> bool:
        """Pause and abort change the rollout; observe and warn are only reported."""
        return self in (MetricMode.PAUSE, MetricMode.ABORT)


class MaxDurationPolicy(StrEnum):
    """What happens when a phase reaches its maximum duration without a decision."""

    PROMOTE = "promote"
    ROLLBACK = "rollback"
    ASK = "ask"
    HOLD = "hold"


#: Names a plan's `metric_modes` may use, one per check (the record's `metric`):
#: the sequential comparisons with legacy, the absolute guardrails on production and the
#: point-estimate comparisons. The error-rate guardrail is `error_rate_limit`, apart from
#: the comparison `error_rate`, so quieting one never quiets the other.
SEQUENTIAL_METRICS = ("error_rate", "latency", "latency_p95", "cost")
GUARDRAIL_METRICS = ("error_rate_limit", "p95_latency_ms", "cost_per_request", "mean_quality")
COMPARISON_METRICS = ("p95_ratio", "error_rate_diff", "cost_ratio", "quality_diff")
METRIC_MODE_KEYS = SEQUENTIAL_METRICS + GUARDRAIL_METRICS + COMPARISON_METRICS

#: Metrics that roll back (mode `abort`) unless the plan sets another mode: the
#: sequential comparisons with legacy and every absolute guardrail (a hard limit the plan
#: wrote down is a hard limit). The point-estimate comparisons (p95_ratio, ...) warn:
#: `latency_p95` is the check on the tail that acts (`checks.sequential`).
CRITICAL_METRICS = SEQUENTIAL_METRICS + GUARDRAIL_METRICS


class Thresholds(BaseModel):
    """Absolute guardrails on the production arm and margins against legacy."""

    model_config = ConfigDict(extra="forbid")

    max_error_rate: float = Field(default=0.05, gt=0, le=1)
    max_p95_latency_ms: float = Field(default=5000.0, gt=0)
    max_cost_per_request_usd: float | None = Field(default=None, gt=0)
    min_mean_quality: float | None = Field(default=None, ge=0, le=1)
    max_p95_ratio: float = Field(default=1.25, gt=1, description="production / legacy")
    max_error_rate_diff: float = Field(default=0.02, ge=0, le=1, description="production - legacy")
    max_cost_ratio: float = Field(default=1.3, gt=1, description="production / legacy")
    min_quality_diff: float = Field(default=-0.1, ge=-1, le=1, description="production - legacy")
    alpha: float = Field(
        default=0.01,
        gt=0,
        lt=0.5,
        description="chance of any false rollback over the phase (split over the checks)",
    )
    srm_p_value: float = Field(default=0.001, gt=0, lt=0.5, description="sample-ratio alarm")
    freshness_s: float = Field(default=120.0, gt=0, description="newest row at most this old")
    metric_modes: dict[str, MetricMode] = Field(default_factory=dict)

    @field_validator("metric_modes")
    @classmethod
    def _known_metrics(cls, modes: dict[str, MetricMode]) -> dict[str, MetricMode]:
        """A misspelt key would silently leave its metric at the default mode."""
        unknown = sorted(set(modes) - set(METRIC_MODE_KEYS))
        if unknown:
            raise ValueError(
                f"unknown metric_modes key(s) {', '.join(unknown)}; allowed: "
                f"{', '.join(METRIC_MODE_KEYS)}"
            )
        return modes

    def mode_of(self, metric: str) -> MetricMode:
        if metric in self.metric_modes:
            return self.metric_modes[metric]
        return MetricMode.ABORT if metric in CRITICAL_METRICS else MetricMode.WARN


@dataclass(frozen=True)
class GateSpec:
    """Everything the gate needs to know about the phase being evaluated."""

    config_version: int
    mode: str
    traffic_percent: float
    shadow_sample_rate: float
    thresholds: Thresholds
    min_samples: int
    min_duration_s: float
    max_duration_s: float
    phase_started_at: datetime
    now: datetime
    requires_approval: bool = False
    on_max_duration: MaxDurationPolicy = MaxDurationPolicy.ASK

    @property
    def elapsed_s(self) -> float:
        return (self.now - self.phase_started_at).total_seconds()
