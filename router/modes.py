"""Deployment modes and arms: the vocabulary shared by the router, the flows and the checks."""

from __future__ import annotations

from enum import StrEnum


class DeploymentMode(StrEnum):
    """How traffic is split between the legacy router and the production balancer."""

    LEGACY_ONLY = "legacy_only"
    SHADOW = "shadow"
    CANARY = "canary"
    AB_TEST = "ab_test"
    PRODUCTION_ONLY = "production_only"


class Arm(StrEnum):
    """Which balancer routed a request."""

    LEGACY = "legacy"
    PRODUCTION = "production"


def allowed_values(enum: type[StrEnum]) -> str:
    return ", ".join(member.value for member in enum)
