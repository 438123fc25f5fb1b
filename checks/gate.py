"""One evaluation of a phase: query DuckDB, run the suites, apply the policy."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import pandas as pd

from checks.frames import (
    ArmStats,
    Connection,
    arm_stats,
    difference,
    phase_integrity,
    ratio,
    window_rows,
)
from checks.gx_suites import Check, GxRunner, SuiteOutcome
from checks.policy import decide
from checks.sample_ratio import sample_ratio, shadow_coverage, shadows_yielded
from checks.sequential import (
    ARM_CLUSTER_SQL,
    ARM_MOMENTS_SQL,
    ARM_TAIL_SAMPLES_SQL,
    MIN_N,
    SHADOW_MOMENTS_SQL,
    SHADOW_TAIL_SAMPLES_SQL,
    TAIL_LEGACY_SQL,
    TAIL_PRODUCTION_SQL,
    TAIL_SHARE,
    ArmSummary,
    SequentialResult,
    ShadowSummary,
    TailCounts,
    binomial_cs,
    clustered,
    evaluate_arms,
    evaluate_shadow,
    explain_clustering,
    latency_tail_test,
    mean_cs,
    phase_metric_alpha,
    tail_ranks,
    to_records,
)
from checks.suites import (
    comparison_checks,
    data_quality_aggregate_checks,
    data_quality_row_checks,
    guardrail_checks,
)
from checks.thresholds import SEQUENTIAL_METRICS, GateSpec, Thresholds
from checks.verdict import Decision, GateResult, MetricRecord
from router.modes import DeploymentMode

SPLIT_MODES = (DeploymentMode.CANARY.value, DeploymentMode.AB_TEST.value)

FAILBACKS_SQL = """
SELECT detail FROM router_events
WHERE kind = 'failback' AND config_version = ?
ORDER BY ts
"""

#: Production rows with a latency, and how many exceed the p95 limit: the same rows as
#: `checks.frames.ARM_AGGREGATES_SQL`'s p95 (shadow executions and failures included).
OVER_P95_LIMIT_SQL = """
SELECT count(latency_ms) AS n, count(*) FILTER (WHERE latency_ms > ?) AS over
FROM requests
WHERE config_version = ? AND arm = 'production'
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
        metric_mode = spec.thresholds.mode_of(check.metric)
        mode = "data_quality" if data_quality else metric_mode.value
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
                critical=not data_quality and metric_mode.acts,
            )
        )
    return records


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def weigh_breach(
    record: MetricRecord, count: int, n: int, share_limit: float, alpha: float, what: str
) -> MetricRecord:
    """A breached guardrail rolls back only when a confidence sequence says so.

    The guardrails are checked at every evaluation, so a fixed-sample rule (a point
    estimate, or a Wilson bound at the full alpha) re-run at each look rolls back a
    healthy balancer sooner or later: 12.5 % of phases at an error rate equal to the
    limit, 5 % with a p95 5 % under it. The breach stands when the lower bound of
    `binomial_cs` (valid at every look) on the share of `count` in `n` is above
    `share_limit`: the error rate against the limit, or the share of requests slower
    than the p95 limit against 5 %. Otherwise the metric is inconclusive, which holds the
    phase (and asks a human at the maximum duration)."""
    if record.decision is not Decision.FAIL or record.threshold is None or n == 0:
        return record
    low, high = (float(b) for b in binomial_cs(count, n, alpha))
    interval = (
        f"{what} {count / n:.2%} of {n}, {1 - alpha:.2%} confidence sequence "
        f"[{low:.2%}, {high:.2%}] against {share_limit:.2%}"
    )
    if low > share_limit:
        return replace(record, reason=f"{record.reason}; beyond noise: {interval}")
    return replace(
        record,
        decision=Decision.INCONCLUSIVE,
        reason=f"{record.reason}, but within noise ({interval}): holding for more data",
    )


#: Production's values behind a mean guardrail: the same rows as
#: `checks.frames.ARM_AGGREGATES_SQL`'s cost_mean and quality_mean (shadow executions
#: included; requests without a quality score left out).
PRODUCTION_MEAN_SQL = """
SELECT count({column}), avg({column}), coalesce(var_samp({column}), 0)
FROM requests
WHERE config_version = ? AND arm = 'production'
"""
#: Mean guardrail -> (its column, whether a mean above the limit breaks it).
MEAN_GUARDRAILS = {"cost_per_request": ("cost_usd", True), "mean_quality": ("quality_score", False)}
#: Mixing scale of the mean guardrails' confidence sequences as a share of the limit: the
#: bounds are tightest for means about 10 % away from it, where a breach starts to matter.
MEAN_GUARDRAIL_TAU_SHARE = 0.1


def weigh_mean_breach(
    record: MetricRecord, n: int, mean: float, variance: float, alpha: float
) -> MetricRecord:
    """A breached cost-per-request or mean-quality guardrail rolls back only beyond noise.

    Like `weigh_breach`, for a mean: a point estimate over the limit, re-checked at every
    evaluation, sooner or later rolls back a balancer whose true mean sits just inside
    it. The breach stands when the one-sided confidence-sequence bound (`mean_cs`, valid
    at every look) on the limit's side lies beyond it, over at least `MIN_N` values (the
    bound's plug-in variance needs them: the production request count does not say how
    many answers were scored); otherwise the metric is inconclusive and the phase holds.
    The record carries the bounds and their n either way."""
    if record.threshold is None or n == 0 or record.metric not in MEAN_GUARDRAILS:
        return record
    limit = record.threshold
    tau = MEAN_GUARDRAIL_TAU_SHARE * limit if limit > 0 else 1e-9
    # The spread is never taken below tau: equal values so far (one flat price, one
    # coarse score) say nothing yet about the rest.
    low, high = mean_cs(n, mean, variance, alpha, tau, min_variance=tau * tau)
    record = replace(record, lower_bound=low, upper_bound=high, n_production=n)
    if record.decision is not Decision.FAIL:
        return record
    if n < MIN_N:
        return replace(
            record,
            decision=Decision.INCONCLUSIVE,
            reason=f"{record.reason}, but over only {n} values (at least {MIN_N} needed to "
            "judge it): holding for more data",
        )
    above = MEAN_GUARDRAILS[record.metric][1]
    interval = (
        f"mean {mean:.4g} of {n}, one-sided {1 - alpha:.2%} confidence-sequence bounds "
        f"[{low:.4g}, {high:.4g}] against {limit:.4g}"
    )
    if (low > limit) if above else (high < limit):
        return replace(record, reason=f"{record.reason}; beyond noise: {interval}")
    return replace(
        record,
        decision=Decision.INCONCLUSIVE,
        reason=f"{record.reason}, but within noise ({interval}): holding for more data",
    )


def weigh_guardrail_breaches(
    con: Connection, records: list[MetricRecord], spec: GateSpec, prod: ArmStats
) -> list[MetricRecord]:
    """`weigh_breach` and `weigh_mean_breach` for the guardrails that act (mode abort or
    pause), each at its share of alpha (`checks.sequential.rollback_checks`). A guardrail
    in mode warn or observe never acts, so its breach is reported as it is."""
    th = spec.thresholds
    a = phase_metric_alpha(th)
    out = []
    for r in records:
        if r.check_kind != "guardrail":
            pass
        elif r.metric == "error_rate_limit":
            if r.critical:
                r = weigh_breach(r, prod.failures, prod.n, th.max_error_rate, a, "failures")
            if prod.n:  # the record shows the bounds on the rate itself, breached or not
                low, high = binomial_cs(prod.failures, prod.n, a)
                r = replace(r, lower_bound=float(low), upper_bound=float(high))
        elif r.metric == "p95_latency_ms" and r.failed and r.critical:
            n, over = con.execute(
                OVER_P95_LIMIT_SQL, [th.max_p95_latency_ms, spec.config_version]
            ).fetchone()
            r = weigh_breach(r, int(over), int(n), TAIL_SHARE, a, "slower than the limit:")
        elif r.metric in MEAN_GUARDRAILS:
            column = MEAN_GUARDRAILS[r.metric][0]
            n, mean, variance = con.execute(
                PRODUCTION_MEAN_SQL.format(column=column), [spec.config_version]
            ).fetchone()
            if n and r.critical:
                r = weigh_mean_breach(r, int(n), float(mean), float(variance), a)
        out.append(r)
    return out


def unjudged_record(
    spec: GateSpec,
    kind: str,
    metric: str,
    reason: str,
    threshold: float | None,
    n_legacy: int,
    n_production: int,
) -> MetricRecord:
    """A check the plan asks for that the data cannot judge: it must stay on the record,
    and hold the phase when its mode acts, not vanish (and let the phase promote)."""
    mode = spec.thresholds.mode_of(metric)
    return MetricRecord(
        kind,
        metric,
        Decision.INCONCLUSIVE,
        reason,
        threshold=threshold,
        n_legacy=n_legacy,
        n_production=n_production,
        metric_mode=mode.value,
        critical=mode.acts,
    )


def unscored_quality_record(spec: GateSpec, n_legacy: int) -> MetricRecord:
    """The plan sets a quality limit and no production answer has a score."""
    return unjudged_record(
        spec,
        "guardrail",
        "mean_quality",
        "no production answer has a quality score to judge min_mean_quality by (is "
        "PROD_LB_QUALITY_METRICS off on the routers?): holding",
        spec.thresholds.min_mean_quality,
        n_legacy,
        0,
    )


def unjudged_comparisons(
    spec: GateSpec, values: dict[str, float | None], legacy: ArmStats, prod: ArmStats
) -> list[MetricRecord]:
    """Records for the comparisons `values` could not compute: a cost ratio over a free
    legacy arm, a quality difference with an arm that has no scores."""
    th = spec.thresholds
    out = []
    if values["cost_ratio"] is None:
        out.append(
            unjudged_record(
                spec,
                "comparison",
                "cost_ratio",
                f"legacy's answers cost nothing, production's {_number(prod.cost_mean)} USD "
                "per request: no ratio to judge (the sequential cost test compares the paid "
                "answers)",
                th.max_cost_ratio,
                legacy.n,
                prod.n,
            )
        )
    if values["quality_diff"] is None:
        unscored = [a.arm for a in (prod, legacy) if a.quality_mean is None]
        out.append(
            unjudged_record(
                spec,
                "comparison",
                "quality_diff",
                f"no quality score on the {' and '.join(unscored)} arm: no difference to "
                "judge (is PROD_LB_QUALITY_METRICS off on the routers?)",
                th.min_quality_diff,
                legacy.n,
                prod.n,
            )
        )
    return out


#: Guardrail metric -> the legacy arm's value of it, for `excuse_shared_breach`.
SHARED_BREACH_METRICS: dict[str, Callable[[ArmStats], float | None]] = {
    "error_rate_limit": lambda arm: arm.error_rate,
    "p95_latency_ms": lambda arm: arm.p95_ms,
    "cost_per_request": lambda arm: arm.cost_mean,
    "mean_quality": lambda arm: arm.quality_mean,
}
#: Guardrails broken by a value under the limit (the others: over it).
LOWER_IS_WORSE = frozenset(m for m, (_, above) in MEAN_GUARDRAILS.items() if not above)


#: Guardrail metric -> the sequential comparison with legacy that judges the same thing.
SHARED_BREACH_COMPARISON = {
    "error_rate_limit": "error_rate",
    "p95_latency_ms": "latency_p95",
    "cost_per_request": "cost",
}


def within_margin(metric: str, production: float, legacy: float, th: Thresholds) -> bool:
    """Whether production's value is within the plan's comparison margin of legacy's:
    `max_error_rate_diff`, `max_p95_ratio`, `max_cost_ratio`, `min_quality_diff`."""
    if metric == "error_rate_limit":
        return production - legacy <= th.max_error_rate_diff
    if metric == "mean_quality":
        return production - legacy >= th.min_quality_diff
    ratio = th.max_p95_ratio if metric == "p95_latency_ms" else th.max_cost_ratio
    return legacy > 0 and production <= legacy * ratio


#: Guardrails whose record bounds are on the metric itself (`weigh_guardrail_breaches`).
BOUNDED_IN_UNITS = frozenset({"error_rate_limit", "cost_per_request", "mean_quality"})


def _best_case(record: MetricRecord, sign: float) -> float:
    """Production's value at the kind end of its confidence sequence (the record's lower
    bound where higher is worse), so that noise alone never takes it beyond the margin:
    the point estimate, compared at every evaluation, still rolled back 3 % of healthy
    balancers through a shared error burst."""
    bound = record.lower_bound if sign > 0 else record.upper_bound
    if record.metric in BOUNDED_IN_UNITS and bound is not None and math.isfinite(bound):
        return bound
    # (p95: its bounds are on the share over the limit, not in milliseconds)
    return record.estimate if record.estimate is not None else math.nan


def excuse_shared_breach(
    record: MetricRecord,
    legacy: ArmStats,
    min_samples: int,
    sequential: Sequence[MetricRecord] = (),
    thresholds: Thresholds | None = None,
) -> MetricRecord:
    """A breach legacy shares over the same window holds instead of rolling back, while
    production is no worse than legacy: the sequential comparison finds it non-inferior,
    or, while that is undecided, production's value is not beyond the plan's comparison
    margin of legacy's by more than noise. Harm found by the comparison rolls back.

    Backends down, a saturated host, a network incident: every arm breaks the absolute
    limit at once, and sending users back to legacy cannot help them. Asking whether
    legacy's point estimate is at least production's instead, at every evaluation,
    rolled back 77 % of healthy balancers through a shared 60 % error burst; waiting
    for the comparison alone held a production at 40 % errors against legacy's 6 %
    while the test had too little data. Quality has no sequential test: the margin
    decides. A production-only phase has no legacy arm, so its guardrails always act."""
    value_of = SHARED_BREACH_METRICS.get(record.metric)
    if (
        record.check_kind != "guardrail"
        or not record.critical  # warn / observe: reported as breached, never acts
        or record.decision is not Decision.FAIL
        or value_of is None
        or record.threshold is None
        or record.estimate is None
        or legacy.n < min_samples
    ):
        return record
    theirs = value_of(legacy)
    if theirs is None or not math.isfinite(theirs):  # NaN compares false to everything
        return record
    if record.metric == "mean_quality" and legacy.quality_n < min_samples:
        return record  # most of legacy's answers unscored: its mean says too little
    sign = -1.0 if record.metric in LOWER_IS_WORSE else 1.0
    if sign * theirs <= sign * record.threshold:
        return record
    shared = f"legacy breaches it too ({_number(theirs)} over {legacy.n} requests)"
    judged = [
        r.decision
        for r in sequential
        if r.check_kind == "sequential" and r.metric == SHARED_BREACH_COMPARISON.get(record.metric)
    ]
    if Decision.HARM in judged:
        why_not = "the comparison with legacy finds production worse"
    elif Decision.NON_INFERIOR in judged:
        why_not = None
        why = "the comparison with legacy finds production no worse"
    elif within_margin(record.metric, _best_case(record, sign), theirs, thresholds or Thresholds()):
        why_not = None
        why = "production is not beyond the plan's comparison margin of it"
    else:
        why_not = "production is beyond the plan's comparison margin of it, even at its bound"
    if why_not is not None:
        return replace(record, reason=f"{record.reason}; {shared}, but {why_not}")
    return replace(
        record,
        decision=Decision.INCONCLUSIVE,
        reason=f"{record.reason}; {shared} and {why}: an incident beyond the balancer, "
        "holding (a rollback would not help users)",
    )


def _dict_rows(con: Connection, sql: str, params: list[Any]) -> list[dict[str, Any]]:
    cursor = con.execute(sql, params)
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def latency_tail_counts(
    con: Connection,
    samples_sql: str,
    version: int,
    n_legacy: int,
    max_p95_ratio: float,
    alpha: float,
) -> TailCounts:
    """Legacy's observed p95 and its bounds (`tail_ranks`, at alpha/2: the other half is
    production's, in `latency_tail_test`), and production's answered requests slower
    than max_p95_ratio times each, from the same rows."""
    rank_hi, rank_lo = tail_ranks(n_legacy, alpha / 2)
    rank_mid = math.floor(n_legacy * TAIL_SHARE) + 1  # the observed p95 (inverted CDF)
    ranks = [int(rank_hi), rank_mid, int(rank_lo)]
    present = [r for r in ranks if 1 <= r <= n_legacy]
    found: dict[int, float] = {}
    if present:
        levels = [(n_legacy - r + 0.5) / n_legacy for r in present]
        row = con.execute(
            TAIL_LEGACY_SQL.format(samples=samples_sql), {"version": version, "levels": levels}
        ).fetchone()
        if row is not None and row[0] is not None:
            found = {r: float(q) for r, q in zip(present, row[0], strict=True)}
    q_hi, q_mid, q_lo = (found.get(r) for r in ranks)
    # No upper bound yet: nothing counts as slow for harm; no lower bound: all does for
    # non-inferiority. Each errs against the verdict it feeds.
    t_hi = math.inf if q_hi is None else q_hi * max_p95_ratio
    t_mid = math.inf if q_mid is None else q_mid * max_p95_ratio
    t_lo = 0.0 if q_lo is None else q_lo * max_p95_ratio
    n, over_hi, over_mid, over_lo = con.execute(
        TAIL_PRODUCTION_SQL.format(samples=samples_sql),
        {"version": version, "t_hi": t_hi, "t_mid": t_mid, "t_lo": t_lo},
    ).fetchone()
    return TailCounts(
        n_legacy, int(n), q_hi, q_mid, q_lo, int(over_hi), int(over_mid), int(over_lo)
    )


def sequential_records(con: Connection, spec: GateSpec) -> list[MetricRecord]:
    """Anytime-valid comparisons with legacy, on sufficient statistics from SQL.

    Shadow phases compare each shadow with its primary request (paired); canary and
    A/B phases compare the arms' served requests. A production-only phase has no
    concurrent legacy arm: there the absolute guardrails decide alone.
    """
    th = spec.thresholds
    version = spec.config_version
    results: list[SequentialResult]
    if spec.mode == DeploymentMode.SHADOW.value:
        rows = _dict_rows(con, SHADOW_MOMENTS_SQL, [version])
        # No pairs yet still yields inconclusive records: "nothing compared" must hold
        # the phase, not let it through.
        pairs = ShadowSummary.from_row(rows[0] if rows else {})
        results = evaluate_shadow(pairs, th)
        samples, n_legacy = SHADOW_TAIL_SAMPLES_SQL, int(pairs.log_latency.n)
    elif spec.mode in SPLIT_MODES:
        by_arm = {r["arm"]: r for r in _dict_rows(con, ARM_MOMENTS_SQL, [version])}
        production = ArmSummary.from_row(by_arm.get("production", {}))
        legacy = ArmSummary.from_row(by_arm.get("legacy", {}))
        buckets = {r["arm"]: r for r in _dict_rows(con, ARM_CLUSTER_SQL, [version])}
        effective = clustered(production, legacy, buckets)
        results = explain_clustering(
            evaluate_arms(effective.production, effective.legacy, th),
            (production, legacy),
            effective.effects,
            effective.buckets,
        )
        samples, n_legacy = ARM_TAIL_SAMPLES_SQL, int(legacy.log_latency.n)
    else:
        return [
            MetricRecord(
                "sequential",
                metric,
                Decision.SKIPPED,
                "no concurrent legacy arm in a production_only phase; guardrails decide",
                metric_mode="observe",
                critical=False,
            )
            for metric in SEQUENTIAL_METRICS
        ]
    a = phase_metric_alpha(th)
    counts = latency_tail_counts(con, samples, version, n_legacy, th.max_p95_ratio, a)
    paired = spec.mode == DeploymentMode.SHADOW.value
    results.append(latency_tail_test(counts, th.max_p95_ratio, a, paired=paired))
    return to_records(results, th)


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
    failing_docs: list[str] = []
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
            if not outcome.success:
                failing_docs.append(outcome.docs_url)
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
    # In shadow mode the legacy arm's rows are the primaries, production's the shadows.
    coverage = (
        shadow_coverage(legacy.n, prod.n, spec.shadow_sample_rate, shadows_yielded(con, version))
        if spec.mode == DeploymentMode.SHADOW.value
        else None
    )
    aggregate: dict[str, Any] = {
        "n_production": prod.n,
        "n_legacy": legacy.n,
        "staleness_s": min(staleness, 1e9),
        "srm_p_value": srm if srm is not None else 1.0,
        "invalid_numbers": prod.invalid_numbers + legacy.invalid_numbers,
        **phase_integrity(con, version),
        "shadow_coverage": coverage.coverage if coverage else 1.0,
    }
    run(
        "data_quality",
        data_quality_aggregate_checks(
            expect_legacy, srm_applies and srm is not None, coverage is not None
        ),
        pd.DataFrame([aggregate]),
        {
            "min_rows": float(spec.min_samples),
            "freshness_s": th.freshness_s,
            "srm_p_value": th.srm_p_value,
            "min_shadow_coverage": coverage.minimum if coverage else 0.0,
        },
        "data_quality",
        True,
    )
    if split is not None:
        for record in records:
            if record.metric == "sample_ratio":
                record.reason += (
                    f"; production served {split.production_share:.2%} of the requests in "
                    f"its own buckets, {split.expected_share:.2%} expected (t-test of "
                    f"requests per bucket, {split.production_buckets:,} vs "
                    f"{split.legacy_buckets:,} buckets)"
                )
    for record in records:
        if record.metric == "shadow_coverage" and coverage is not None:
            record.reason += (
                f"; {prod.n:,} shadow rows for {legacy.n:,} primaries at sample rate "
                f"{spec.shadow_sample_rate:g}"
            )
            if coverage.yielded:
                record.reason += (
                    f", and {coverage.yielded:,} not sent while every backend for their "
                    "question was rate-limited (shadows_yielded router events; counted "
                    "as covered)"
                )
            if record.failed:
                record.reason += (
                    ": shadows skipped at the router's shadow_max_concurrency leave no row, "
                    "and they are skipped when production is slow (see the shadows_skipped "
                    "router events; raise the cap or lower the sample rate)"
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
            records[:] = weigh_guardrail_breaches(con, records, spec, prod)
            if th.min_mean_quality is not None and not prod.quality_n:
                records.append(unscored_quality_record(spec, legacy.n))

    # -- production against legacy ---------------------------------------------------------
    if prod.n >= spec.min_samples and legacy.n >= spec.min_samples:
        values = {
            "p95_ratio": ratio(prod.p95_ms, legacy.p95_ms),
            "error_rate_diff": difference(prod.error_rate, legacy.error_rate),
            # both arms free: equal cost, not "no ratio"
            "cost_ratio": 1.0
            if prod.cost_mean == 0 and legacy.cost_mean == 0
            else ratio(prod.cost_mean, legacy.cost_mean),
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
        records.extend(unjudged_comparisons(spec, values, legacy, prod))

    sequential = sequential_records(con, spec)
    records[:] = [
        excuse_shared_breach(r, legacy, spec.min_samples, sequential, th) for r in records
    ]
    records.extend(sequential)

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
        # the first failing suite's page: the link is followed to see why (it showed the
        # all-green comparison suite, run last)
        data_docs_url=(failing_docs or docs[-1:] or [runner.index_url()])[0],
    )
