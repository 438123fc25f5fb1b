"""The legacy LoadBalancingConfig carried over to the production balancer's settings."""

from __future__ import annotations

import pytest

from router.algorithms.names import AlgorithmName
from router.legacy_config import LoadBalancingConfig
from router.migration import ConfigurationMigrator
from router.outlier import OutlierDetector


def migrated(**legacy: object):
    return ConfigurationMigrator().migrate_with_report(LoadBalancingConfig(**legacy))


def test_the_drop_in_defaults_keep_ejections_growing_up_to_the_legacy_rest_time() -> None:
    """`ProductionIntelligentQueryRouter()` migrates the legacy defaults (a skipped
    backend rests 300 s). Mapping 300 s to both the first ejection and the cap left a
    flapping backend out for 300 s from its first ejection and nothing to grow; the rest
    time is the cap, and ejections start short."""
    production, report = migrated()
    detector = OutlierDetector(production.outlier)
    assert [detector.ejection_time(k) for k in range(7)] == [10, 20, 40, 80, 160, 300, 300]
    (step,) = [s for s in report.steps if s.production_field == "outlier.max_ejection_s"]
    assert (step.legacy_value, step.production_value) == (300, 300.0)
    assert "start at 10 s and double" in step.note
    # A breaker never degrades to panic routing: 300 s open failed every question only
    # that backend could answer for five minutes after a three-second outage.
    assert production.circuit_breaker.open_wait_s == 30


@pytest.mark.parametrize(("rest_s", "times"), [(5, [5, 5, 5]), (30, [10, 20, 30])])
def test_a_legacy_rest_time_caps_the_ejections(rest_s: int, times: list[float]) -> None:
    production, _ = migrated(circuit_breaker_timeout=rest_s)
    detector = OutlierDetector(production.outlier)
    assert [detector.ejection_time(k) for k in range(3)] == times
    assert production.circuit_breaker.open_wait_s == rest_s


def test_an_unknown_legacy_strategy_falls_back_with_a_warning() -> None:
    production, report = migrated(strategy="fastest-please")
    assert production.algorithm is AlgorithmName.WEIGHTED_ROUND_ROBIN
    assert any("'fastest-please' is unknown" in w for w in report.warnings)
