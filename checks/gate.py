"""One evaluation of a phase: query DuckDB, run the suites, apply the policy."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from statistics import NormalDist
from typing import Any

import pandas as pd

from checks.frames import ArmStats, Connection, arm_stats, difference, ratio, window_rows
from checks.gx_suites import Check, GxRunner, SuiteOutcome
from checks.policy import decide
from checks.sample_ratio import sample_ratio
from checks.sequential import (
    ARM_MOMENTS_SQL,
    SHADOW_MOMENTS_SQL,
    ArmSummary,
    ShadowSummary,
    evaluate_arms,
    evaluate_shadow,
    to_records,
)
from checks.suites import (
    comparison_checks,
    data_quality_aggregate_checks,
    data_quality_row_checks,
    guardrail_checks,
)
from checks.thresholds import GateSpec
from checks.verdict import Decision, GateResult, MetricRecord
from router.failback_guard import wilson_lower
from router.modes import DeploymentMode

SPLIT_MODES = (DeploymentMode.CANARY.value, DeploymentMode.AB_TEST.value)

FAILBACKS_SQL = """
SELECT detail FROM router_events
WHERE kind = 'failback' AND config_version = ?
ORDER BY ts
"""


def _records(
    outcome: SuiteOutcome,
    kind: str,
    spec: GateSpec,
    n_legacy: int,
    n_production: int,
    data_quality: bool = False,
) -> list[MetricRecord]:
    records = []
    for check in outcome.outcomes:
        mode = "data_quality" if data_quality else spec.thresholds.mode_of(check.metric).value
        observed = float(check.observed) if isinstance(check.observed, int | float) else None
        shown = f"{check.metric} = {_number(observed)}"
        if check.success:
            reason = f"{shown} within {_number(check.threshold)}"
        else:
            reason = f"{shown} breaks {_number(check.threshold)}"
        if check.detail:
            reason += f"; {check.detail}"
        records.append(
            MetricRecord(
                check_kind=kind,
                metric=check.metric,
                decision=Decision.PASS if check.success else Decision.FAIL,
                reason=reason,
                estimate=float(observed) if observed is not None else None,
                threshold=check.threshold,
                n_legacy=n_legacy,
                n_production=n_production,
                metric_mode=mode,
                critical=not data_quality and mode in ("abort", "pause"),
            )
        )
    return records


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def weigh_error_rate_breach(
    record: MetricRecord, failures: int, n: int, alpha: float
) -> MetricRecord:
    """A breached error-rate guardrail rolls back only beyond noise.

    The guardrail is checked at every evaluation, so an observed rate a hair over the
    limit (24 failures in 466 against 5 %) would roll back a healthy balancer sooner or
    later. The breach stands when the one-sided Wilson lower bound at 1 - alpha is over
    the limit; otherwise the metric is inconclusive, which holds the phase (and the
    plan's `on_max_duration` applies if it never clears)."""
    if record.decision is not Decision.FAIL or record.threshold is None or n == 0:
        return record
    z = NormalDist().inv_cdf(1 - alpha)
    low = wilson_lower(failures, n, z)
    high = 1 - wilson_lower(n - failures, n, z)
    bounds = {"lower_bound": low, "upper_bound": high}
    interval = f"{1 - alpha:.0%} bounds [{low:.2%}, {high:.2%}] over {n} requests"
    if low > record.threshold:
        return replace(record, reason=f"{record.reason}; beyond noise: {interval}", **bounds)
    return replace(
        record,
        decision=Decision.INCONCLUSIVE,
        reason=f"{record.reason}, but within noise ({interval}): holding for more data",
        **bounds,
    )


#: Guardrail metric -> the legacy arm's value of it, for `excuse_shared_breach`.
SHARED_BREACH_METRICS: dict[str, Callable[[ArmStats], float | None]] = {
    "error_rate": lambda arm: arm.error_rate,
    "p95_latency_ms": lambda arm: arm.p95_ms,
}


def excuse_shared_breach(record: MetricRecord, legacy: ArmStats, min_samples: int) -> MetricRecord:
    """A breach legacy shares, as badly or worse, over the same window, holds instead
    of rolling back.

    Backends down, a saturated host, a network incident: every arm breaks the absolute
    limit at once, and sending users back to legacy cannot help them. The comparison
    with legacy (sequential tests) still catches the balancer being worse than legacy
    during the incident; the hold is on record with both values. A production-only
    phase has no legacy arm, so its guardrails always act."""
    value_of = SHARED_BREACH_METRICS.get(record.metric)
    if (
        record.check_kind != "guardrail"
        or record.decision is not Decision.FAIL
        or value_of is None
        or record.threshold is None
        or record.estimate is None
        or legacy.n < min_samples
    ):
        return record
    theirs = value_of(legacy)
    if (
        theirs is None
        or not math.isfinite(theirs)  # NaN compares false to everything: never an excuse
        or theirs <= record.threshold
        or theirs < record.estimate
    ):
        return record
    return replace(
        record,
        decision=Decision.INCONCLUSIVE,
        reason=f"{record.reason}; legacy breaches it too ({_number(theirs)} over "
        f"{legacy.n} requests): an incident beyond the balancer, holding (a rollback "
        "would not help users)",
    )


def _dict_rows(con: Connection, sql: str, params: list[Any]) -> list[dict[str, Any]]:
    cursor = con.execute(sql, params)
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def sequential_records(con: Connection, spec: GateSpec) -> list[MetricRecord]:
    """Anytime-valid comparisons with legacy, on sufficient statistics from SQL.

    Shadow phases compare each shadow with its primary request (paired); canary and
    A/B phases compare the arms' served requests. A production-only phase has no
    concurrent legacy arm: there the absolute guardrails decide alone.
    """
    th = spec.thresholds
    if spec.mode == DeploymentMode.SHADOW.value:
        rows = _dict_rows(con, SHADOW_MOMENTS_SQL, [spec.config_version])
        # No pairs yet still yields three inconclusive records: "nothing compared" must
        # hold the phase, not let it through.
        return to_records(evaluate_shadow(ShadowSummary.from_row(rows[0] if rows else {}), th), th)
    if spec.mode in SPLIT_MODES:
        by_arm = {r["arm"]: r for r in _dict_rows(con, ARM_MOMENTS_SQL, [spec.config_version])}
        production = ArmSummary.from_row(by_arm.get("production", {}))
        legacy = ArmSummary.from_row(by_arm.get("legacy", {}))
        return to_records(evaluate_arms(production, legacy, th), th)
    return [
        MetricRecord(
            "sequential",
            metric,
            Decision.SKIPPED,
            "no concurrent legacy arm in a production_only phase; guardrails decide",
            metric_mode="observe",
            critical=False,
        )
        for metric in ("error_rate", "latency", "cost")
    ]


def evaluate(
    con: Connection,
    spec: GateSpec,
    runner: GxRunner,
    run_name: str,
) -> GateResult:
    version = spec.config_version
    arms = arm_stats(con, version)
    prod, legacy = arms["production"], arms["legacy"]
    records: list[MetricRecord] = []
    docs: list[str] = []
    th = spec.thresholds

    def run(
        name: str,
        checks: list[Check],
        frame: pd.DataFrame,
        params: dict[str, float],
        kind: str,
        dq: bool = False,
    ) -> None:
        outcome = runner.run(name, checks, frame, params, run_name)
        if outcome.docs_url:
            docs.append(outcome.docs_url)
        records.extend(_records(outcome, kind, spec, legacy.n, prod.n, data_quality=dq))

    # -- data quality -------------------------------------------------------------------
    rows = window_rows(con, version, spec.phase_started_at)
    if len(rows):
        run(
            "data_quality_rows",
            data_quality_row_checks(),
            rows,
            {"config_version": float(version)},
            "data_quality",
            True,
        )
    # Freshness per arm that should be receiving traffic: legacy rows arriving must not
    # hide a production arm that went quiet. An arm with no rows yet is the min-rows
    # check's business, not a staleness alarm.
    expected = (
        ("production",)
        if spec.mode == DeploymentMode.PRODUCTION_ONLY.value
        else ("legacy", "production")
    )
    ages = [
        (spec.now - arms[a].last_ts).total_seconds()
        for a in expected
        if arms[a].last_ts is not None
    ]
    staleness = max(ages) if ages else float("inf")
    srm_applies = spec.mode in SPLIT_MODES
    split = sample_ratio(con, version, spec.traffic_percent) if srm_applies else None
    srm = split.p_value if split is not None else None
    expect_legacy = spec.mode != DeploymentMode.PRODUCTION_ONLY.value
    aggregate: dict[str, Any] = {
        "n_production": prod.n,
        "n_legacy": legacy.n,
        "staleness_s": min(staleness, 1e9),
        "srm_p_value": srm if srm is not None else 1.0,
    }
    run(
        "data_quality",
        data_quality_aggregate_checks(expect_legacy, srm_applies and srm is not None),
        pd.DataFrame([aggregate]),
        {
            "min_rows": float(spec.min_samples),
            "freshness_s": th.freshness_s,
            "srm_p_value": th.srm_p_value,
        },
        "data_quality",
        True,
    )
    if split is not None:
        for record in records:
            if record.metric == "sample_ratio":
                record.reason += (
                    f"; production served {split.production_share:.2%} of the requests in "
                    f"its own buckets, {split.expected_share:.2%} expected (Welch test of "
                    f"requests per bucket, {split.production_buckets:,} vs "
                    f"{split.legacy_buckets:,} buckets)"
                )

    # -- guardrails on the production arm -------------------------------------------------
    if prod.n:
        guard_frame = {
            "error_rate": prod.error_rate,
            "p95_ms": prod.p95_ms,
            "cost_mean": prod.cost_mean,
            "quality_mean": prod.quality_mean,
        }
        params = {
            "max_error_rate": th.max_error_rate,
            "max_p95_latency_ms": th.max_p95_latency_ms,
            "max_cost_per_request_usd": th.max_cost_per_request_usd or 0.0,
            "min_mean_quality": th.min_mean_quality or 0.0,
        }
        checks = guardrail_checks(
            guard_frame, th.max_cost_per_request_usd is not None, th.min_mean_quality is not None
        )
        if prod.n >= spec.min_samples:
            run("guardrails", checks, pd.DataFrame([guard_frame]), params, "guardrail")
            records[:] = [
                weigh_error_rate_breach(r, prod.failures, prod.n, th.alpha)
                if (r.check_kind, r.metric) == ("guardrail", "error_rate")
                else r
                for r in records
            ]
            records[:] = [excuse_shared_breach(r, legacy, spec.min_samples) for r in records]

    # -- production against legacy ---------------------------------------------------------
    if prod.n >= spec.min_samples and legacy.n >= spec.min_samples:
        values = {
            "p95_ratio": ratio(prod.p95_ms, legacy.p95_ms),
            "error_rate_diff": difference(prod.error_rate, legacy.error_rate),
            "cost_ratio": ratio(prod.cost_mean, legacy.cost_mean),
            "quality_diff": difference(prod.quality_mean, legacy.quality_mean),
        }
        present = {k: v for k, v in values.items() if v is not None}
        run(
            "comparison",
            comparison_checks(present),
            pd.DataFrame([present]),
            {
                "max_p95_ratio": th.max_p95_ratio,
                "max_error_rate_diff": th.max_error_rate_diff,
                "max_cost_ratio": th.max_cost_ratio,
                "min_quality_diff": th.min_quality_diff,
            },
            "comparison",
        )

    records.extend(sequential_records(con, spec))

    failbacks = [row[0] for row in con.execute(FAILBACKS_SQL, [version]).fetchall()]
    for detail in failbacks:
        records.append(
            MetricRecord(
                "router",
                "router_failback",
                Decision.FAIL,
                detail,
                n_legacy=legacy.n,
                n_production=prod.n,
                metric_mode="abort",
            )
        )
    verdict, reason = decide(spec, records, prod.n, failbacks)
    return GateResult(
        verdict=verdict,
        reason=reason,
        records=records,
        n_legacy=legacy.n,
        n_production=prod.n,
        data_docs_url=docs[-1] if docs else runner.index_url(),
    )
