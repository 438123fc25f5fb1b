"""`RouterConfig` validation: what a control document may say before any router applies it."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from router.algorithms.round_robin import RoundRobin
from router.backends import BackendConfig, BackendKind
from router.balancer import Balancer
from router.health_policy import ConsecutiveFailures
from router.router_config import RouterConfig


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
