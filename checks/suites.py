"""The three suites: data quality (raw rows), guardrails and comparison (one-row frames)."""

from __future__ import annotations

from typing import Any

from checks.gx_suites import Check, gxe
from router.modes import Arm, DeploymentMode
from router.record import Outcome


def _p(name: str) -> dict[str, str]:
    return {"$PARAMETER": name}


def data_quality_row_checks() -> list[Check]:
    x = gxe()
    checks = [
        Check(
            f"not_null:{column}",
            x.ExpectColumnValuesToNotBeNull(column=column, meta={"metric": f"not_null:{column}"}),
        )
        for column in ("request_id", "ts", "router_instance", "arm", "outcome", "config_version")
    ]
    checks += [
        Check(
            "valid_arm",
            x.ExpectColumnValuesToBeInSet(
                column="arm", value_set=[a.value for a in Arm], meta={"metric": "valid_arm"}
            ),
        ),
        Check(
            "valid_outcome",
            x.ExpectColumnValuesToBeInSet(
                column="outcome",
                value_set=[o.value for o in Outcome],
                meta={"metric": "valid_outcome"},
            ),
        ),
        Check(
            "valid_mode",
            x.ExpectColumnValuesToBeInSet(
                column="mode",
                value_set=[m.value for m in DeploymentMode],
                meta={"metric": "valid_mode"},
            ),
        ),
        Check(
            "latency_non_negative",
            x.ExpectColumnValuesToBeBetween(
                column="latency_ms", min_value=0, meta={"metric": "latency_non_negative"}
            ),
        ),
        Check(
            "unique_request_id",
            x.ExpectColumnValuesToBeUnique(
                column="request_id", meta={"metric": "unique_request_id"}
            ),
        ),
        # Rows since the phase began must carry its version: if not, an instance has not
        # applied the config and the split is not what the plan says.
        Check(
            "current_config_version",
            x.ExpectColumnValuesToBeBetween(
                column="config_version",
                min_value=_p("config_version"),
                max_value=_p("config_version"),
                mostly=0.95,
                meta={"metric": "current_config_version"},
            ),
            "config_version",
        ),
    ]
    return checks


def data_quality_aggregate_checks(
    expect_legacy: bool, srm_applies: bool, shadow_coverage_applies: bool = False
) -> list[Check]:
    x = gxe()
    checks = [
        Check(
            "min_rows_production",
            x.ExpectColumnMinToBeBetween(
                column="n_production",
                min_value=_p("min_rows"),
                meta={"metric": "min_rows_production"},
            ),
            "min_rows",
        ),
        Check(
            "freshness_s",
            x.ExpectColumnMaxToBeBetween(
                column="staleness_s", max_value=_p("freshness_s"), meta={"metric": "freshness_s"}
            ),
            "freshness_s",
        ),
    ]
    # Over every row of the phase (`checks.frames.INVALID_NUMBERS_SQL` and
    # `PHASE_INTEGRITY_SQL`), not the newest rows the row checks see.
    checks += [
        Check(
            metric,
            x.ExpectColumnMaxToBeBetween(column=metric, max_value=0, meta={"metric": metric}),
        )
        for metric in ("invalid_numbers", "duplicate_rows", "invalid_labels")
    ]
    if expect_legacy:
        checks.append(
            Check(
                "min_rows_legacy",
                x.ExpectColumnMinToBeBetween(
                    column="n_legacy", min_value=_p("min_rows"), meta={"metric": "min_rows_legacy"}
                ),
                "min_rows",
            )
        )
    if shadow_coverage_applies:
        checks.append(
            Check(
                "shadow_coverage",
                x.ExpectColumnMinToBeBetween(
                    column="shadow_coverage",
                    min_value=_p("min_shadow_coverage"),
                    meta={"metric": "shadow_coverage"},
                ),
                "min_shadow_coverage",
            )
        )
    if srm_applies:
        checks.append(
            Check(
                "sample_ratio",
                x.ExpectColumnMinToBeBetween(
                    column="srm_p_value",
                    min_value=_p("srm_p_value"),
                    meta={"metric": "sample_ratio"},
                ),
                "srm_p_value",
            )
        )
    return checks


def guardrail_checks(
    frame_columns: dict[str, Any], has_cost_limit: bool, has_quality_limit: bool
) -> list[Check]:
    x = gxe()
    checks = [
        # `error_rate_limit`, not `error_rate`: that is the sequential comparison's name,
        # and each has its own key in a plan's metric_modes.
        Check(
            "error_rate_limit",
            x.ExpectColumnMaxToBeBetween(
                column="error_rate",
                max_value=_p("max_error_rate"),
                meta={"metric": "error_rate_limit"},
            ),
            "max_error_rate",
        ),
        Check(
            "p95_latency_ms",
            x.ExpectColumnMaxToBeBetween(
                column="p95_ms",
                max_value=_p("max_p95_latency_ms"),
                meta={"metric": "p95_latency_ms"},
            ),
            "max_p95_latency_ms",
        ),
    ]
    if has_cost_limit:
        checks.append(
            Check(
                "cost_per_request",
                x.ExpectColumnMaxToBeBetween(
                    column="cost_mean",
                    max_value=_p("max_cost_per_request_usd"),
                    meta={"metric": "cost_per_request"},
                ),
                "max_cost_per_request_usd",
            )
        )
    if has_quality_limit and frame_columns.get("quality_mean") is not None:
        checks.append(
            Check(
                "mean_quality",
                x.ExpectColumnMinToBeBetween(
                    column="quality_mean",
                    min_value=_p("min_mean_quality"),
                    meta={"metric": "mean_quality"},
                ),
                "min_mean_quality",
            )
        )
    return checks


COMPARISONS = {
    # metric: (column, parameter, upper bound?)
    "p95_ratio": ("p95_ratio", "max_p95_ratio", True),
    "error_rate_diff": ("error_rate_diff", "max_error_rate_diff", True),
    "cost_ratio": ("cost_ratio", "max_cost_ratio", True),
    "quality_diff": ("quality_diff", "min_quality_diff", False),
}


def comparison_checks(values: dict[str, float | None]) -> list[Check]:
    x = gxe()
    checks = []
    for metric, (column, parameter, upper) in COMPARISONS.items():
        if values.get(column) is None:
            continue
        expectation = (
            x.ExpectColumnMaxToBeBetween(
                column=column, max_value=_p(parameter), meta={"metric": metric}
            )
            if upper
            else x.ExpectColumnMinToBeBetween(
                column=column, min_value=_p(parameter), meta={"metric": metric}
            )
        )
        checks.append(Check(metric, expectation, parameter))
    return checks
