"""How a simulated backend behaves, changeable while it runs (`PUT /admin/profile`)."""

from __future__ import annotations

import math
import random

from pydantic import BaseModel, ConfigDict, Field


class BackendProfile(BaseModel):
    """Latency is log-normal around `latency_ms` (the median) with spread `latency_sigma`.

    Faults are drawn per request in this order: timeout (hang past any client timeout),
    429 with `Retry-After`, 5xx error. `quality` is the chance an answer carries
    citations and detail: what a quality scorer can see in the content.
    """

    model_config = ConfigDict(extra="forbid")

    latency_ms: float = Field(default=120.0, ge=0)
    latency_sigma: float = Field(default=0.35, ge=0, le=3)
    error_rate: float = Field(default=0.0, ge=0, le=1)
    timeout_rate: float = Field(default=0.0, ge=0, le=1)
    hang_s: float = Field(default=30.0, ge=0)
    rate_limit_rate: float = Field(default=0.0, ge=0, le=1)
    retry_after_s: float = Field(default=1.0, ge=0)
    quality: float = Field(default=0.85, ge=0, le=1)
    tokens_scale: float = Field(default=1.0, gt=0)
    #: An outage: every request and the health endpoint answer 503 at once, so active
    #: health checks see it too (partial faults leave `/health` green, as real servers do).
    down: bool = False


class ProfilePatch(BaseModel):
    """A partial update; absent fields keep their value."""

    model_config = ConfigDict(extra="forbid")

    latency_ms: float | None = Field(default=None, ge=0)
    latency_sigma: float | None = Field(default=None, ge=0, le=3)
    error_rate: float | None = Field(default=None, ge=0, le=1)
    timeout_rate: float | None = Field(default=None, ge=0, le=1)
    hang_s: float | None = Field(default=None, ge=0)
    rate_limit_rate: float | None = Field(default=None, ge=0, le=1)
    retry_after_s: float | None = Field(default=None, ge=0)
    quality: float | None = Field(default=None, ge=0, le=1)
    tokens_scale: float | None = Field(default=None, gt=0)
    down: bool | None = None

    def apply(self, profile: BackendProfile) -> BackendProfile:
        return profile.model_copy(update=self.model_dump(exclude_none=True))


class Fault:
    OK = "ok"
    TIMEOUT = "timeout"
    RATE_LIMITED = "rate_limited"
    ERROR = "error"


def draw_fault(profile: BackendProfile, rng: random.Random) -> str:
    roll = rng.random()
    if roll < profile.timeout_rate:
        return Fault.TIMEOUT
    roll -= profile.timeout_rate
    if roll < profile.rate_limit_rate:
        return Fault.RATE_LIMITED
    roll -= profile.rate_limit_rate
    if roll < profile.error_rate:
        return Fault.ERROR
    return Fault.OK


def draw_latency_s(profile: BackendProfile, rng: random.Random) -> float:
    if profile.latency_ms <= 0:
        return 0.0
    return profile.latency_ms * math.exp(rng.gauss(0.0, profile.latency_sigma)) / 1000.0
