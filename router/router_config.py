"""`RouterConfig`: the versioned document a rollout publishes and every router instance applies."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from statistics import NormalDist
from typing import Any

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, model_validator

from router.algorithms.names import AlgorithmName
from router.modes import DeploymentMode
from router.production_config import CircuitBreakerSettings


class GuardLimits(BaseModel):
    """Hard limits for the router's local auto-failback (checked on the production arm)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    error_rate: float = Field(default=0.05, gt=0, le=1, description="fraction of requests")
    p95_latency_ms: float = Field(default=5000.0, gt=0, allow_inf_nan=False)
    min_requests: int = Field(default=20, ge=1)
    window: int = Field(default=200, ge=1, le=10_000, description="most recent production requests")
    confidence: float = Field(
        default=0.9999,
        ge=0.5,
        lt=1,
        description="trip only when the one-sided Wilson lower bound at this level is over "
        "the limit; 0.5 trips on the observed rate alone. High because the bound is "
        "re-checked on every request: at 0.99 a production arm at 2/3 of a 3 % limit "
        "tripped in 45 % of 30,000-request phases",
    )
    canary_max_hours: float | None = Field(
        default=None,
        gt=0,
        allow_inf_nan=False,
        description="fail back if a split outlives this with no new config",
    )

    @model_validator(mode="after")
    def _can_trip(self) -> GuardLimits:
        """Limits the guard could never reach would switch auto-failback off in silence."""
        if self.min_requests > self.window:
            raise ValueError(
                f"guard min_requests ({self.min_requests}) must be at most its window "
                f"({self.window}): the guard never holds more than window requests"
            )
        reachable = highest_trippable_error_rate(self.window, self.confidence)
        if self.error_rate >= reachable:
            raise ValueError(
                f"guard error_rate {self.error_rate:.1%} can never trip: at confidence "
                f"{self.confidence:g}, even {self.window} failures in {self.window} requests "
                f"only bound the rate above {reachable:.1%}; use a limit below that"
            )
        return self


def highest_trippable_error_rate(window: int, confidence: float) -> float:
    """The Wilson lower bound of `window` failures in `window` requests, n / (n + z^2):
    an error-rate limit at or above it can never trip the guard."""
    z = max(0.0, NormalDist().inv_cdf(confidence))
    return window / (window + z * z)


class RouterConfig(BaseModel):
    """One version of the routing policy.

    Versions only grow. An instance applies a document atomically between requests and
    acknowledges the version; rows routed under it carry `config_version`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: int = Field(ge=0, strict=True)  # "6" or 6.0 is no version: they compare apart
    mode: DeploymentMode = DeploymentMode.LEGACY_ONLY
    traffic_percent: float = Field(default=0.0, ge=0, le=100)
    algorithm: AlgorithmName = AlgorithmName.LEAST_CONNECTIONS
    legacy_weights: dict[str, float] = Field(default_factory=dict)
    production_weights: dict[str, float] = Field(default_factory=dict)
    shadow_sample_rate: float = Field(default=1.0, ge=0, le=1)
    shadow_max_concurrency: int = Field(default=16, ge=1)
    salt: str = Field(default="rollout-v1", min_length=1)
    guard: GuardLimits = GuardLimits()
    #: The production arm's breakers; None: the host's (`ProductionLoadBalancingConfig`).
    #: A breaker keeps its state (an open one stays open) and its window when only
    #: thresholds change.
    breaker: CircuitBreakerSettings | None = None
    rollout_id: str | None = None
    phase: str | None = None
    #: A tripped failback guard stays tripped across new documents (a flow that has not
    #: seen the failback yet must not switch production back on); only a document with
    #: `rearm_guard` (the first phase of a new rollout), or one of another rollout, arms
    #: it again.
    rearm_guard: bool = False
    reason: str = ""
    #: With its UTC offset: a naive time cannot be compared with the router's clock (a
    #: hand-written document without one stopped every heartbeat of the fleet).
    published_at: AwareDatetime = Field(default_factory=lambda: datetime.now(UTC))

    def to_json(self, indent: int | None = None) -> str:
        """The document as published. Fields added after the first release
        (`LATER_FIELDS`) are left out while at their default, so older routers (which
        refuse unknown fields) still apply every document that uses nothing they lack:
        flows can be upgraded before the fleet, and a rollback reaches an old router."""
        exclude: dict[str, Any] = {
            name: True for name in LATER_FIELDS if getattr(self, name) == LATER_FIELDS[name]
        }
        guard_defaults = GuardLimits()
        late_guard = {
            n for n in LATER_GUARD_FIELDS if getattr(self.guard, n) == getattr(guard_defaults, n)
        }
        if late_guard:
            exclude["guard"] = late_guard
        return self.model_dump_json(indent=indent, exclude=exclude or None)

    @model_validator(mode="after")
    def _percent_fits_mode(self) -> RouterConfig:
        check_mode_percent(self.mode, self.traffic_percent)
        for weights in (self.legacy_weights, self.production_weights):
            bad = {k: v for k, v in weights.items() if not (math.isfinite(v) and v >= 0)}
            if bad:
                # Infinity and NaN are valid JSON floats to pydantic: an infinite weight
                # broke weighted round robin for every user of the arm.
                raise ValueError(f"weights must be finite numbers >= 0, got {bad}")
        return self

    @property
    def production_share(self) -> float:
        """Share of users whose answer comes from the production balancer."""
        if self.mode is DeploymentMode.PRODUCTION_ONLY:
            return 1.0
        if self.mode in (DeploymentMode.CANARY, DeploymentMode.AB_TEST):
            return self.traffic_percent / 100.0
        return 0.0


#: Fields of `RouterConfig` added after the first release (d0773f6), with the default at
#: which `to_json` leaves them out; and those of `GuardLimits`.
LATER_FIELDS: dict[str, Any] = {"breaker": None, "rearm_guard": False}
LATER_GUARD_FIELDS = ("confidence",)


def check_mode_percent(mode: DeploymentMode, percent: float) -> None:
    """The one rule tying mode to traffic percent, shared by env flags, configs and plans."""
    if mode in (DeploymentMode.LEGACY_ONLY, DeploymentMode.SHADOW) and percent != 0:
        raise ValueError(
            f"mode {mode.value} serves no production traffic: traffic_percent must be 0"
        )
    if mode is DeploymentMode.PRODUCTION_ONLY and percent != 100:
        raise ValueError("mode production_only serves all traffic: traffic_percent must be 100")
    if mode in (DeploymentMode.CANARY, DeploymentMode.AB_TEST) and not 0 < percent < 100:
        raise ValueError(f"mode {mode.value} needs a traffic_percent above 0 and below 100")
