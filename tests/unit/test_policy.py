"""The verdict policy, rule by rule, in precedence order (checks/policy.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from checks.policy import decide
from checks.thresholds import GateSpec, MaxDurationPolicy, Thresholds
from checks.verdict import Decision, MetricRecord, Verdict

NOW = datetime(2026, 11, 27, 12, tzinfo=UTC)


def spec(
    elapsed_s: float = 100.0,
    *,
    approval: bool = False,
    at_max: MaxDurationPolicy = MaxDurationPolicy.ASK,
) -> GateSpec:
    return GateSpec(
        config_version=3,
        mode="canary",
        traffic_percent=5.0,
        shadow_sample_rate=1.0,
        thresholds=Thresholds(),
        min_samples=100,
        min_duration_s=60.0,
        max_duration_s=600.0,
        phase_started_at=NOW - timedelta(seconds=elapsed_s),
        now=NOW,
        requires_approval=approval,
        on_max_duration=at_max,
    )


def rec(kind: str, metric: str, decision: Decision, mode: str = "abort") -> MetricRecord:
    return MetricRecord(
        kind,
        metric,
        decision,
        f"{metric} {decision.value}",
        metric_mode=mode,
        critical=mode in ("abort", "pause") and kind != "data_quality",
    )


GOOD = [rec("sequential", m, Decision.NON_INFERIOR) for m in ("error_rate", "latency", "cost")]


@pytest.mark.parametrize(
    ("records", "n", "failbacks", "the_spec", "verdict", "words"),
    [
        # 1. the router's own guard failed back: roll back, whatever else says
        (GOOD, 500, ["error rate 30%"], spec(), Verdict.ROLLBACK, "router guard"),
        # 2. harm in an abort metric: roll back, even with too few samples
        (
            [rec("sequential", "error_rate", Decision.HARM)],
            10,
            [],
            spec(),
            Verdict.ROLLBACK,
            "harm in error_rate",
        ),
        # an observe or warn metric never acts
        (
            [*GOOD, rec("comparison", "p95_ratio", Decision.FAIL, "warn")],
            500,
            [],
            spec(),
            Verdict.PROMOTE,
            "checks pass",
        ),
        (
            [*GOOD, rec("sequential", "cost", Decision.HARM, "observe")],
            500,
            [],
            spec(),
            Verdict.PROMOTE,
            "checks pass",
        ),
        # 3. a pause metric failed: a human decides, even with too few samples (its
        # test is valid at any n; "50 of 100 samples" hid detected harm)
        (
            [*GOOD, rec("guardrail", "mean_quality", Decision.FAIL, "pause")],
            500,
            [],
            spec(),
            Verdict.NEEDS_APPROVAL,
            "paused",
        ),
        (
            [rec("sequential", "latency", Decision.HARM, "pause")],
            50,
            [],
            spec(),
            Verdict.NEEDS_APPROVAL,
            "paused for a human by latency",
        ),
        # 4. a data-quality alarm: insufficient data, never a pass
        (
            [*GOOD, rec("data_quality", "sample_ratio", Decision.FAIL, "data_quality")],
            500,
            [],
            spec(),
            Verdict.INSUFFICIENT_DATA,
            "data quality alarm: sample_ratio",
        ),
        # 5. too few production samples
        (GOOD, 99, [], spec(), Verdict.INSUFFICIENT_DATA, "99 of 100 production samples"),
        (
            [*GOOD, rec("data_quality", "min_rows_legacy", Decision.FAIL, "data_quality")],
            500,
            [],
            spec(),
            Verdict.INSUFFICIENT_DATA,
            "too few rows: min_rows_legacy",
        ),
        # 6. a critical metric still inconclusive: hold
        (
            [rec("sequential", "latency", Decision.INCONCLUSIVE)],
            500,
            [],
            spec(),
            Verdict.HOLD,
            "not yet conclusive: latency",
        ),
        # ... a pause metric too: promotion needs it concluded, a human acts if it fails
        (
            [*GOOD, rec("sequential", "latency", Decision.INCONCLUSIVE, "pause")],
            500,
            [],
            spec(),
            Verdict.HOLD,
            "not yet conclusive: latency",
        ),
        # 7. minimum duration not reached
        (GOOD, 500, [], spec(elapsed_s=30), Verdict.HOLD, "of the minimum 60s"),
        # 8. the phase asks a human
        (GOOD, 500, [], spec(approval=True), Verdict.NEEDS_APPROVAL, "asks a human"),
        # 9. otherwise promote
        (GOOD, 500, [], spec(), Verdict.PROMOTE, "checks pass with 500"),
    ],
)
def test_policy_rules_in_order(records, n, failbacks, the_spec, verdict, words) -> None:
    got, reason = decide(the_spec, records, n, failbacks)
    assert got is verdict, reason
    assert words in reason


@pytest.mark.parametrize(
    ("at_max", "hold_becomes", "no_data_becomes"),
    [
        (MaxDurationPolicy.PROMOTE, Verdict.PROMOTE, Verdict.NEEDS_APPROVAL),
        (MaxDurationPolicy.ROLLBACK, Verdict.ROLLBACK, Verdict.ROLLBACK),
        (MaxDurationPolicy.ASK, Verdict.NEEDS_APPROVAL, Verdict.NEEDS_APPROVAL),
        (MaxDurationPolicy.HOLD, Verdict.HOLD, Verdict.HOLD),
    ],
)
def test_maximum_duration_never_promotes_without_data(
    at_max, hold_becomes, no_data_becomes
) -> None:
    late = spec(elapsed_s=700, at_max=at_max)
    held = [rec("sequential", "latency", Decision.INCONCLUSIVE)]
    assert decide(late, held, 500)[0] is hold_becomes
    alarm = [rec("data_quality", "freshness_s", Decision.FAIL, "data_quality")]
    verdict, reason = decide(late, alarm, 0)
    assert verdict is no_data_becomes
    assert "maximum duration" in reason


def test_a_promotion_names_the_checks_that_fail_in_warn_or_observe_mode() -> None:
    """A p95 twice legacy's (comparison in mode warn) was promoted as "checks pass"."""
    warned = rec("comparison", "p95_ratio", Decision.FAIL, "warn")
    observed = rec("sequential", "cost", Decision.HARM, "observe")
    verdict, reason = decide(spec(), [*GOOD, warned, observed], 500)
    assert verdict is Verdict.PROMOTE
    assert reason.startswith("critical checks pass with 500 production samples")
    assert "failing in mode warn or observe: p95_ratio (p95_ratio fail), cost" in reason
    held, why = decide(spec(elapsed_s=30), [*GOOD, warned], 500)
    assert held is Verdict.HOLD and "p95_ratio" in why
    assert decide(spec(), GOOD, 500)[1].startswith("checks pass with 500")


def test_rollback_beats_everything_even_past_the_maximum() -> None:
    late = spec(elapsed_s=700, at_max=MaxDurationPolicy.PROMOTE)
    verdict, _ = decide(late, [rec("sequential", "error_rate", Decision.HARM)], 500)
    assert verdict is Verdict.ROLLBACK


def test_a_guardrail_held_over_its_limit_is_never_promoted_unattended() -> None:
    """A guardrail over its limit but held (legacy shared the breach, or it is within
    noise) asks a human at the maximum duration, even where the plan says promote."""
    late = spec(elapsed_s=700, at_max=MaxDurationPolicy.PROMOTE)
    held = [*GOOD, rec("guardrail", "p95_latency_ms", Decision.INCONCLUSIVE)]
    verdict, reason = decide(late, held, 500)
    assert verdict is Verdict.NEEDS_APPROVAL and "maximum duration" in reason


def test_a_phase_that_asks_a_human_is_never_promoted_at_its_maximum_duration() -> None:
    """With on_max_duration=promote, a held phase was promoted unattended while the
    same phase with every check passing asked a human: weaker evidence skipped him."""
    late = spec(elapsed_s=700, approval=True, at_max=MaxDurationPolicy.PROMOTE)
    assert decide(late, GOOD, 500)[0] is Verdict.NEEDS_APPROVAL
    held = [*GOOD[:1], rec("sequential", "latency", Decision.INCONCLUSIVE)]
    verdict, reason = decide(late, held, 500)
    assert verdict is Verdict.NEEDS_APPROVAL and "maximum duration" in reason
    unattended = spec(elapsed_s=700, at_max=MaxDurationPolicy.PROMOTE)
    assert decide(unattended, held, 500)[0] is Verdict.PROMOTE  # as the plan says


def test_exactly_the_minimum_sample_is_enough() -> None:
    assert decide(spec(), GOOD, 100)[0] is Verdict.PROMOTE  # min_samples is 100
    assert decide(spec(), GOOD, 99)[0] is Verdict.INSUFFICIENT_DATA
