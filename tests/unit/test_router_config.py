"""`RouterConfig` validation: what a control document may say before any router applies it."""

from __future__ import annotations

import json
from datetime import datetime

import pytest
from pydantic import BaseModel, ConfigDict, ValidationError

from flows.control import legacy_only_config, phase_config
from flows.plan import default_plan
from router.algorithms.round_robin import RoundRobin
from router.backends import BackendConfig, BackendKind
from router.balancer import Balancer
from router.health_policy import ConsecutiveFailures
from router.modes import DeploymentMode
from router.production_config import CircuitBreakerSettings
from router.router_config import GuardLimits, RouterConfig


@pytest.mark.parametrize("weight", ["Infinity", "-Infinity", "NaN", "-1"])
@pytest.mark.parametrize("arm", ["legacy_weights", "production_weights"])
def test_a_weight_that_is_not_a_finite_number_at_least_zero_is_refused(
    arm: str, weight: str
) -> None:
    """Pydantic reads Infinity and NaN from JSON; an infinite weight broke weighted round
    robin for every user of the arm (an AssertionError reached the caller)."""

    def document(value: str) -> str:
        return f'{{"version": 2, "mode": "legacy_only", "{arm}": {{"lightrag-1": {value}}}}}'

    with pytest.raises(ValidationError, match="weights must be finite numbers >= 0"):
        RouterConfig.model_validate_json(document(weight))
    good = json.loads(document("2.5"))
    assert RouterConfig.model_validate(good).model_dump()[arm] == {"lightrag-1": 2.5}


@pytest.mark.parametrize("weight", [float("inf"), float("nan"), -0.5])
def test_balancer_set_weights_refuses_non_finite_weights_and_changes_nothing(
    weight: float,
) -> None:
    backends = [
        BackendConfig(name=n, kind=BackendKind.LIGHTRAG, base_url=f"http://{n}.test")
        for n in ("a", "b")
    ]
    balancer = Balancer(
        "legacy",
        backends,
        RoundRobin(),
        None,
        ConsecutiveFailures(3, 60.0),
        max_attempts=2,
        deadline_s=5.0,
    )
    with pytest.raises(ValueError, match="finite numbers >= 0"):
        balancer.set_weights({"a": 2.0, "b": weight})
    assert [s.weight for s in balancer.states] == [1.0, 1.0]


def test_a_backend_weight_must_be_finite() -> None:
    with pytest.raises(ValidationError):
        BackendConfig(name="a", kind=BackendKind.LIGHTRAG, base_url="http://a", weight="inf")


class _FirstReleaseGuard(BaseModel):
    """`GuardLimits` as the first release (d0773f6) declared it: routers refuse extras."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
    error_rate: float = 0.05
    p95_latency_ms: float = 5000.0
    min_requests: int = 20
    window: int = 200
    canary_max_hours: float | None = None


class _FirstReleaseConfig(BaseModel):
    """`RouterConfig` of the first release, frozen here on purpose."""

    model_config = ConfigDict(extra="forbid")
    version: int
    mode: str = "legacy_only"
    traffic_percent: float = 0.0
    algorithm: str = "least_connections"
    legacy_weights: dict[str, float] = {}
    production_weights: dict[str, float] = {}
    shadow_sample_rate: float = 1.0
    shadow_max_concurrency: int = 16
    salt: str = "rollout-v1"
    guard: _FirstReleaseGuard = _FirstReleaseGuard()
    rollout_id: str | None = None
    phase: str | None = None
    reason: str = ""
    published_at: datetime


def test_routers_of_the_first_release_apply_documents_that_use_nothing_new() -> None:
    """Flows are upgraded before the fleet: an old router refused every document that
    named a newer field, even at its default, so a rollback left it on the canary."""
    plan = default_plan()
    documents = [
        legacy_only_config(7, "ro-1", "rollout-v1", "rollback by on-call: 5xx"),
        phase_config(plan, 1, 8, "ro-1", "promoted"),  # a later phase: no re-arm
        RouterConfig(
            version=9,
            mode=DeploymentMode.CANARY,
            traffic_percent=5,
            production_weights={"lightrag-1": 2.0},
        ),
    ]
    for document in documents:
        old = _FirstReleaseConfig.model_validate_json(document.to_json())
        assert old.mode == document.mode.value and old.version == document.version
        assert RouterConfig.model_validate_json(document.to_json()) == document
    # what an old router cannot do is still sent, and refused by it
    uses_new = [
        phase_config(plan, 0, 10, "ro-2", "started", rearm=True),
        RouterConfig(version=11, guard=GuardLimits(confidence=0.999)),
        RouterConfig(version=12, breaker=CircuitBreakerSettings()),
    ]
    for document in uses_new:
        assert RouterConfig.model_validate_json(document.to_json()) == document
        with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
            _FirstReleaseConfig.model_validate_json(document.to_json())
