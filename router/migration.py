"""`ConfigurationMigrator`: legacy `LoadBalancingConfig` -> `ProductionLoadBalancingConfig`.

Every legacy field lands somewhere explicit and the report says where, so an operator
can review the mapping before the first canary instead of discovering it during one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from router.algorithms.names import AlgorithmName
from router.backends import BackendConfig
from router.legacy_config import LoadBalancingConfig
from router.production_config import (
    CircuitBreakerSettings,
    HealthCheckSettings,
    OutlierSettings,
    ProductionLoadBalancingConfig,
)

#: Legacy strategy names (including the historical aliases) -> production algorithm.
STRATEGY_MAP: dict[str, AlgorithmName] = {
    "round_robin": AlgorithmName.ROUND_ROBIN,
    "weighted": AlgorithmName.WEIGHTED_ROUND_ROBIN,
    "weighted_round_robin": AlgorithmName.WEIGHTED_ROUND_ROBIN,
    "least_connections": AlgorithmName.LEAST_CONNECTIONS,
    "least_request": AlgorithmName.LEAST_CONNECTIONS,
    "fastest": AlgorithmName.RESPONSE_TIME,
    "response_time": AlgorithmName.RESPONSE_TIME,
    "health_based": AlgorithmName.HEALTH_AWARE,
    "health_aware": AlgorithmName.HEALTH_AWARE,
}


@dataclass(frozen=True)
class MigrationStep:
    legacy_field: str
    legacy_value: object
    production_field: str
    production_value: object
    note: str = ""


@dataclass
class MigrationReport:
    steps: list[MigrationStep] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def add(
        self, legacy_field: str, legacy_value: object, target: str, value: object, note: str = ""
    ) -> None:
        self.steps.append(MigrationStep(legacy_field, legacy_value, target, value, note))

    def as_rows(self) -> list[dict[str, object]]:
        return [step.__dict__.copy() for step in self.steps]


class ConfigurationMigrator:
    def __init__(self) -> None:
        self.report = MigrationReport()

    def migrate_config(
        self,
        legacy: LoadBalancingConfig,
        *,
        backends: Sequence[BackendConfig] = (),
        algorithm: AlgorithmName | None = None,
        custom_algorithm: str | None = None,
    ) -> ProductionLoadBalancingConfig:
        production, self.report = self.migrate_with_report(
            legacy, backends=backends, algorithm=algorithm, custom_algorithm=custom_algorithm
        )
        return production

    def migrate_with_report(
        self,
        legacy: LoadBalancingConfig,
        *,
        backends: Sequence[BackendConfig] = (),
        algorithm: AlgorithmName | None = None,
        custom_algorithm: str | None = None,
    ) -> tuple[ProductionLoadBalancingConfig, MigrationReport]:
        """`custom_algorithm`: the 'module:Class' an explicit `custom` algorithm needs."""
        report = MigrationReport()
        mapped = STRATEGY_MAP.get(legacy.strategy.lower())
        if algorithm is not None:
            chosen = algorithm
            note = "explicit algorithm (PROD_LB_PRIMARY_ALGORITHM) wins over the legacy strategy"
        elif mapped is not None:
            chosen, note = mapped, ""
        else:
            chosen = AlgorithmName.WEIGHTED_ROUND_ROBIN
            note = f"unknown legacy strategy; known: {', '.join(sorted(STRATEGY_MAP))}"
            report.warnings.append(f"strategy {legacy.strategy!r} is unknown: using {chosen.value}")
        report.add("strategy", legacy.strategy, "algorithm", chosen.value, note)

        health = HealthCheckSettings(interval_s=float(legacy.health_check_interval))
        report.add(
            "health_check_interval",
            legacy.health_check_interval,
            "health_check.interval_s",
            health.interval_s,
        )

        # The legacy rest time becomes the cap: the first ejection is short (the default
        # base, or the rest time if shorter) and doubles on repeats up to it. Mapping it
        # to the base as well (base = cap = 300 s by default) left nothing to grow. The
        # breaker's open wait is short for the same reason: a breaker does not degrade
        # to panic routing, so 300 s failed a category whose only backend was down for
        # three seconds for five minutes (legacy recovered in 0.1 s).
        rest_s = float(legacy.circuit_breaker_timeout)
        breaker = CircuitBreakerSettings(
            minimum_calls=legacy.circuit_breaker_threshold,
            open_wait_s=min(CircuitBreakerSettings().open_wait_s, rest_s),
            slow_call_ms=legacy.response_time_threshold_ms,
        )
        outlier = OutlierSettings(
            consecutive_failures=legacy.circuit_breaker_threshold,
            base_ejection_s=min(OutlierSettings().base_ejection_s, rest_s),
            max_ejection_s=rest_s,
        )
        report.add(
            "circuit_breaker_threshold",
            legacy.circuit_breaker_threshold,
            "outlier.consecutive_failures",
            outlier.consecutive_failures,
            "also circuit_breaker.minimum_calls: the breaker judges rates, not streaks",
        )
        report.add(
            "circuit_breaker_threshold",
            legacy.circuit_breaker_threshold,
            "circuit_breaker.minimum_calls",
            breaker.minimum_calls,
        )
        report.add(
            "circuit_breaker_timeout",
            legacy.circuit_breaker_timeout,
            "circuit_breaker.open_wait_s",
            breaker.open_wait_s,
            "the rest time, at most the default open wait; a passing health check ends it sooner",
        )
        report.add(
            "circuit_breaker_timeout",
            legacy.circuit_breaker_timeout,
            "outlier.max_ejection_s",
            outlier.max_ejection_s,
            f"ejections start at {outlier.base_ejection_s:g} s and double on repeats up to it",
        )
        report.add(
            "response_time_threshold_ms",
            legacy.response_time_threshold_ms,
            "circuit_breaker.slow_call_ms",
            breaker.slow_call_ms,
        )
        report.add(
            "enable_adaptive_routing",
            legacy.enable_adaptive_routing,
            "(none)",
            None,
            "the production algorithms adapt by design; pick `adaptive` to learn "
            "online from rewards",
        )

        production = ProductionLoadBalancingConfig(
            algorithm=chosen,
            custom_algorithm=custom_algorithm,
            backends=tuple(backends),
            health_check=health,
            circuit_breaker=breaker,
            outlier=outlier,
        )
        return production, report
