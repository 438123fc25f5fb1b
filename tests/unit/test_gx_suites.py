"""The GX suites on good and deliberately broken frames: each failure names its metric.

Frames and parameters are built the way `checks.gate.evaluate` builds them: raw rows
(the columns of `WINDOW_ROWS_SQL`) for the row suite, and one-row aggregate frames for
the data-quality aggregates, the guardrails and the comparison with legacy.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pandas as pd
import pytest

from checks.frames import difference, ratio
from checks.gx_suites import CheckOutcome, GxRunner, SuiteOutcome
from checks.suites import (
    comparison_checks,
    data_quality_aggregate_checks,
    data_quality_row_checks,
    guardrail_checks,
)
from checks.thresholds import SEQUENTIAL_METRICS, MetricMode, Thresholds

VERSION = 7
NOW = datetime(2026, 11, 27, 12, tzinfo=UTC)
MIN_ROWS = 200
TH = Thresholds(max_cost_per_request_usd=0.01, min_mean_quality=0.7)


@pytest.fixture(scope="module")
def runner() -> GxRunner:
    """One GX context for the module: importing GX and building a context takes seconds."""
    return GxRunner()


def failed(outcome: SuiteOutcome) -> set[str]:
    return {c.metric for c in outcome.outcomes if not c.success}


def by_metric(outcome: SuiteOutcome) -> dict[str, CheckOutcome]:
    return {c.metric: c for c in outcome.outcomes}


# -- data quality: raw rows ------------------------------------------------------------

ROW_METRICS = {
    "not_null:request_id",
    "not_null:ts",
    "not_null:router_instance",
    "not_null:arm",
    "not_null:outcome",
    "not_null:config_version",
    "valid_arm",
    "valid_outcome",
    "valid_mode",
    "latency_non_negative",
    "unique_request_id",
    "current_config_version",
}


def rows(n: int = 10) -> pd.DataFrame:
    """A canary window as `window_rows` returns it: newest first, both arms, every outcome."""
    outcomes = ["ok", "ok", "ok", "error", "ok", "timeout", "ok", "rate_limited", "ok", "rejected"]
    return pd.DataFrame(
        {
            "request_id": [f"req-{i:04d}" for i in range(n)],
            "ts": pd.to_datetime([NOW - timedelta(seconds=3 * i) for i in range(n)], utc=True),
            "router_instance": [f"router-{i % 2}" for i in range(n)],
            "config_version": pd.Series([VERSION] * n, dtype="int64"),
            "mode": ["canary"] * n,
            "arm": ["production" if i % 4 == 0 else "legacy" for i in range(n)],
            "is_shadow": [False] * n,
            "outcome": [outcomes[i % len(outcomes)] for i in range(n)],
            "latency_ms": [120.0 + 15.0 * i for i in range(n)],
            "cost_usd": [0.002] * n,
            "quality_score": [0.8 if i % 3 else None for i in range(n)],
            "tokens_in": [40 + i for i in range(n)],
            "tokens_out": [200 + i for i in range(n)],
            "attempts": [1 if i % 5 else 2 for i in range(n)],
        }
    )


def run_rows(runner: GxRunner, frame: pd.DataFrame) -> SuiteOutcome:
    return runner.run(
        "data_quality_rows",
        data_quality_row_checks(),
        frame,
        {"config_version": float(VERSION)},
        "test",
    )


def test_row_suite_passes_on_a_clean_window(runner: GxRunner) -> None:
    outcome = run_rows(runner, rows())

    assert outcome.success
    assert set(by_metric(outcome)) == ROW_METRICS
    assert failed(outcome) == set()
    assert all(c.observed == 0 for c in outcome.outcomes)  # no unexpected rows anywhere


def _set(column: str, value: Any, row: int = 3) -> Callable[[pd.DataFrame], None]:
    def mutate(frame: pd.DataFrame) -> None:
        frame.loc[row, column] = value

    return mutate


def _duplicate_request_id(frame: pd.DataFrame) -> None:
    frame.loc[5, "request_id"] = frame.loc[2, "request_id"]


@pytest.mark.parametrize(
    ("mutate", "metric", "unexpected", "shown"),
    [
        pytest.param(_set("request_id", None), "not_null:request_id", 1, None, id="null-key"),
        pytest.param(_set("ts", pd.NaT), "not_null:ts", 1, None, id="null-ts"),
        pytest.param(
            _set("router_instance", None), "not_null:router_instance", 1, None, id="null-instance"
        ),
        pytest.param(_set("arm", None), "not_null:arm", 1, None, id="null-arm"),
        pytest.param(_set("outcome", None), "not_null:outcome", 1, None, id="null-outcome"),
        pytest.param(
            _set("config_version", None), "not_null:config_version", 1, None, id="null-version"
        ),
        pytest.param(_set("arm", "canary"), "valid_arm", 1, "'canary'", id="arm-canary"),
        pytest.param(_set("outcome", "weird"), "valid_outcome", 1, "'weird'", id="outcome-weird"),
        pytest.param(_set("mode", "blue_green"), "valid_mode", 1, "'blue_green'", id="bad-mode"),
        pytest.param(
            _set("latency_ms", -5.0), "latency_non_negative", 1, "-5.0", id="negative-latency"
        ),
        # Both copies of a duplicated id are unexpected.
        pytest.param(_duplicate_request_id, "unique_request_id", 2, "'req-0002'", id="dup-key"),
    ],
)
def test_row_suite_fails_on_a_broken_window_naming_the_metric(
    runner: GxRunner,
    mutate: Callable[[pd.DataFrame], None],
    metric: str,
    unexpected: int,
    shown: str | None,
) -> None:
    frame = rows()
    mutate(frame)

    outcome = run_rows(runner, frame)

    assert not outcome.success
    assert failed(outcome) == {metric}
    check = by_metric(outcome)[metric]
    assert check.observed == unexpected
    assert check.detail.startswith(f"{unexpected} of 10 rows unexpected")
    if shown is not None:
        assert shown in check.detail


def test_row_suite_tolerates_a_straggler_from_the_previous_version(runner: GxRunner) -> None:
    """A request begun before the switch may finish under the old version: one row in
    forty (2.5 %) is within the 95 % `mostly`, and is still counted."""
    frame = rows(40)
    frame.loc[39, "config_version"] = VERSION - 1

    outcome = run_rows(runner, frame)

    assert outcome.success
    check = by_metric(outcome)["current_config_version"]
    assert check.success
    # the share of rows off against the share allowed, not a count against a version
    assert (check.observed, check.threshold) == (0.025, 0.05)


def test_row_suite_fails_when_old_version_rows_are_beyond_the_tolerance(
    runner: GxRunner,
) -> None:
    """One row in ten from the previous version is beyond the 5 % straggler tolerance."""
    frame = rows()
    frame.loc[3, "config_version"] = VERSION - 1

    outcome = run_rows(runner, frame)

    assert failed(outcome) == {"current_config_version"}
    check = by_metric(outcome)["current_config_version"]
    assert (check.observed, check.threshold) == (0.1, 0.05)
    assert check.detail.startswith("1 of 10 rows unexpected") and "6" in check.detail


# -- data quality: aggregates ------------------------------------------------------------

AGGREGATE_PARAMS = {
    "min_rows": float(MIN_ROWS),
    "freshness_s": TH.freshness_s,
    "srm_p_value": TH.srm_p_value,
}


def aggregate(**overrides: Any) -> pd.DataFrame:
    """A 5 % canary with enough rows, fresh, and subjects split as configured."""
    values: dict[str, Any] = {
        "n_production": 520,
        "n_legacy": 9480,
        "staleness_s": 4.0,
        "srm_p_value": 0.36,  # a healthy split
        "invalid_numbers": 0,
        "duplicate_rows": 0,
        "invalid_labels": 0,
    }
    values.update(overrides)
    return pd.DataFrame([values])


def run_aggregate(
    runner: GxRunner, frame: pd.DataFrame, expect_legacy: bool = True, srm_applies: bool = True
) -> SuiteOutcome:
    return runner.run(
        "data_quality",
        data_quality_aggregate_checks(expect_legacy, srm_applies),
        frame,
        AGGREGATE_PARAMS,
        "test",
    )


WHOLE_PHASE = ("invalid_numbers", "duplicate_rows", "invalid_labels")


def test_aggregate_suite_passes_on_a_healthy_split(runner: GxRunner) -> None:
    outcome = run_aggregate(runner, aggregate())

    assert outcome.success
    assert set(by_metric(outcome)) == {
        "min_rows_production",
        "min_rows_legacy",
        "freshness_s",
        "sample_ratio",
        *WHOLE_PHASE,
    }
    assert failed(outcome) == set()


@pytest.mark.parametrize(
    ("overrides", "metric", "observed", "threshold"),
    [
        pytest.param({"n_production": 37}, "min_rows_production", 37, MIN_ROWS, id="few-prod"),
        pytest.param({"n_legacy": 120}, "min_rows_legacy", 120, MIN_ROWS, id="few-legacy"),
        pytest.param({"staleness_s": 900.0}, "freshness_s", 900.0, TH.freshness_s, id="stale"),
        # a NaN latency, an infinite cost or a quality of 7 in the phase's rows
        pytest.param({"invalid_numbers": 2}, "invalid_numbers", 2, 0.0, id="invalid-numbers"),
        pytest.param({"duplicate_rows": 3}, "duplicate_rows", 3, 0.0, id="dup-ids"),
        pytest.param({"invalid_labels": 1}, "invalid_labels", 1, 0.0, id="bad-labels"),
        # a split far off the configured one: p = 4e-8, far below the 0.001 alarm
        pytest.param(
            {"srm_p_value": 4e-8},
            "sample_ratio",
            pytest.approx(4e-8),
            TH.srm_p_value,
            id="srm",
        ),
    ],
)
def test_aggregate_suite_fails_naming_the_metric(
    runner: GxRunner,
    overrides: dict[str, Any],
    metric: str,
    observed: Any,
    threshold: float,
) -> None:
    outcome = run_aggregate(runner, aggregate(**overrides))

    assert not outcome.success
    assert failed(outcome) == {metric}
    check = by_metric(outcome)[metric]
    assert check.observed == observed
    assert check.threshold == threshold


def test_aggregate_suite_flags_an_empty_phase_on_rows_and_freshness(runner: GxRunner) -> None:
    """No rows at all: `evaluate` reports staleness as 1e9 s and cannot compute an SRM."""
    frame = aggregate(n_production=0, n_legacy=0, staleness_s=1e9, srm_p_value=1.0)

    outcome = run_aggregate(runner, frame, srm_applies=False)

    assert failed(outcome) == {"min_rows_production", "min_rows_legacy", "freshness_s"}
    assert "sample_ratio" not in by_metric(outcome)


def test_aggregate_suite_in_production_only_ignores_legacy_and_split(runner: GxRunner) -> None:
    """No legacy arm and no split to check: an empty legacy arm must not fail the phase."""
    frame = aggregate(n_production=5000, n_legacy=0, srm_p_value=1.0)

    outcome = run_aggregate(runner, frame, expect_legacy=False, srm_applies=False)

    assert outcome.success
    assert set(by_metric(outcome)) == {"min_rows_production", "freshness_s", *WHOLE_PHASE}


# -- guardrails on the production arm ---------------------------------------------------

GUARDRAIL_PARAMS = {
    "max_error_rate": TH.max_error_rate,
    "max_p95_latency_ms": TH.max_p95_latency_ms,
    "max_cost_per_request_usd": TH.max_cost_per_request_usd or 0.0,
    "min_mean_quality": TH.min_mean_quality or 0.0,
}
GUARD_OK = {"error_rate": 0.012, "p95_ms": 850.0, "cost_mean": 0.004, "quality_mean": 0.86}


def run_guardrails(
    runner: GxRunner,
    values: dict[str, Any],
    has_cost_limit: bool = True,
    has_quality_limit: bool = True,
) -> SuiteOutcome:
    checks = guardrail_checks(values, has_cost_limit, has_quality_limit)
    return runner.run("guardrails", checks, pd.DataFrame([values]), GUARDRAIL_PARAMS, "test")


def test_guardrails_pass_within_limits(runner: GxRunner) -> None:
    outcome = run_guardrails(runner, GUARD_OK)

    assert outcome.success
    assert set(by_metric(outcome)) == {
        "error_rate_limit",
        "p95_latency_ms",
        "cost_per_request",
        "mean_quality",
    }
    assert failed(outcome) == set()


def test_guardrails_pass_exactly_at_the_limits(runner: GxRunner) -> None:
    at_limit = {
        "error_rate": TH.max_error_rate,
        "p95_ms": TH.max_p95_latency_ms,
        "cost_mean": TH.max_cost_per_request_usd,
        "quality_mean": TH.min_mean_quality,
    }

    outcome = run_guardrails(runner, at_limit)

    assert outcome.success, failed(outcome)


@pytest.mark.parametrize(
    ("column", "value", "metric", "limit"),
    [
        pytest.param("error_rate", 0.2, "error_rate_limit", TH.max_error_rate, id="error-rate"),
        pytest.param("p95_ms", 9000.0, "p95_latency_ms", TH.max_p95_latency_ms, id="p95-latency"),
        pytest.param("cost_mean", 0.05, "cost_per_request", TH.max_cost_per_request_usd, id="cost"),
        pytest.param("quality_mean", 0.31, "mean_quality", TH.min_mean_quality, id="quality"),
    ],
)
def test_guardrails_fail_on_a_breach_naming_the_metric(
    runner: GxRunner, column: str, value: float, metric: str, limit: float
) -> None:
    outcome = run_guardrails(runner, {**GUARD_OK, column: value})

    assert not outcome.success
    assert failed(outcome) == {metric}
    check = by_metric(outcome)[metric]
    assert check.observed == pytest.approx(value)
    assert check.threshold == pytest.approx(limit)


def test_guardrails_without_cost_or_quality_limits_skip_those_metrics(runner: GxRunner) -> None:
    expensive = {**GUARD_OK, "cost_mean": 5.0, "quality_mean": 0.0}

    outcome = run_guardrails(runner, expensive, has_cost_limit=False, has_quality_limit=False)

    assert outcome.success
    assert set(by_metric(outcome)) == {"error_rate_limit", "p95_latency_ms"}


def test_guardrail_names_are_metric_modes_keys_apart_from_the_comparisons(
    runner: GxRunner,
) -> None:
    """The error-rate guardrail was named `error_rate` like the sequential comparison,
    so one `metric_modes` key set both."""
    names = set(by_metric(run_guardrails(runner, GUARD_OK)))
    assert names.isdisjoint(SEQUENTIAL_METRICS)
    quiet = Thresholds(metric_modes=dict.fromkeys(names, MetricMode.WARN))
    assert {quiet.mode_of(m) for m in SEQUENTIAL_METRICS} == {MetricMode.ABORT}


def test_guardrails_skip_mean_quality_when_nothing_was_scored(runner: GxRunner) -> None:
    """A quality limit with no scored request has nothing to judge: not a failure."""
    outcome = run_guardrails(runner, {**GUARD_OK, "quality_mean": None})

    assert outcome.success
    assert "mean_quality" not in by_metric(outcome)
    assert "cost_per_request" in by_metric(outcome)


# -- production against legacy ---------------------------------------------------------

COMPARISON_PARAMS = {
    "max_p95_ratio": TH.max_p95_ratio,
    "max_error_rate_diff": TH.max_error_rate_diff,
    "max_cost_ratio": TH.max_cost_ratio,
    "min_quality_diff": TH.min_quality_diff,
}
COMPARISON_OK = {
    "p95_ratio": 1.1,
    "error_rate_diff": 0.005,
    "cost_ratio": 1.05,
    "quality_diff": -0.02,
}


def run_comparison(runner: GxRunner, values: dict[str, float | None]) -> SuiteOutcome:
    present = {k: v for k, v in values.items() if v is not None}
    return runner.run(
        "comparison",
        comparison_checks(present),
        pd.DataFrame([present]),
        COMPARISON_PARAMS,
        "test",
    )


@pytest.mark.parametrize(
    "values",
    [
        pytest.param(COMPARISON_OK, id="within-margins"),
        pytest.param(
            {"p95_ratio": 0.6, "error_rate_diff": -0.03, "cost_ratio": 0.5, "quality_diff": 0.2},
            id="production-better",
        ),
    ],
)
def test_comparison_passes_within_margins(runner: GxRunner, values: dict[str, float]) -> None:
    outcome = run_comparison(runner, values)

    assert outcome.success
    assert set(by_metric(outcome)) == set(COMPARISON_OK)


@pytest.mark.parametrize(
    ("column", "value", "margin"),
    [
        pytest.param("p95_ratio", 1.6, TH.max_p95_ratio, id="p95-ratio"),
        pytest.param("error_rate_diff", 0.05, TH.max_error_rate_diff, id="error-rate-diff"),
        pytest.param("cost_ratio", 2.0, TH.max_cost_ratio, id="cost-ratio"),
        pytest.param("quality_diff", -0.3, TH.min_quality_diff, id="quality-diff"),
    ],
)
def test_comparison_fails_beyond_a_margin_naming_the_metric(
    runner: GxRunner, column: str, value: float, margin: float
) -> None:
    outcome = run_comparison(runner, {**COMPARISON_OK, column: value})

    assert not outcome.success
    assert failed(outcome) == {column}
    check = by_metric(outcome)[column]
    assert check.observed == pytest.approx(value)
    assert check.threshold == pytest.approx(margin)


def test_comparison_skips_a_ratio_against_a_free_legacy_arm(runner: GxRunner) -> None:
    """Legacy cost 0 has no ratio; the other comparisons still judge production."""
    values = {
        "p95_ratio": ratio(2400.0, 1000.0),
        "error_rate_diff": difference(0.02, 0.01),
        "cost_ratio": ratio(0.004, 0.0),
        "quality_diff": difference(0.8, 0.82),
    }

    outcome = run_comparison(runner, values)

    assert "cost_ratio" not in by_metric(outcome)
    assert failed(outcome) == {"p95_ratio"}
    assert by_metric(outcome)["p95_ratio"].observed == pytest.approx(2.4)


# -- Data Docs across processes --------------------------------------------------------


def test_data_docs_pages_of_earlier_runners_stay_until_they_age_out(tmp_path, caplog) -> None:
    """Each scheduled tick is a new process with a new (in-memory) GX context, and GX's
    index build deleted every page its own store did not know: each evaluation deleted
    the ones before it, and the Data Docs links in their decision records were dead."""
    import os
    import time
    from pathlib import Path

    from checks.gx_suites import DOCS_KEEP_DAYS

    docs = tmp_path / "docs"

    second_process = GxRunner(docs_dir=docs)

    def evaluation(run_name: str, runner: GxRunner | None = None) -> Path:
        outcome = (runner or GxRunner(docs_dir=docs)).run(
            "data_quality_rows",
            data_quality_row_checks(),
            rows(),
            {"config_version": float(VERSION)},
            run_name,
        )
        assert outcome.docs_url is not None
        return Path(outcome.docs_url.removeprefix("file://"))

    first = evaluation("first-tick")
    second = evaluation("second-tick", second_process)
    assert first.exists() and second.exists()
    assert "second-tick" in (docs / "index.html").read_text()
    assert "not found" not in caplog.text  # the other process's pages are not looked up
    aged = time.time() - (DOCS_KEEP_DAYS + 1) * 86_400
    os.utime(first, (aged, aged))
    third = evaluation("third-tick", second_process)
    assert not first.exists() and second.exists() and third.exists()
