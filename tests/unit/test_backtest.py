"""The backtest: its rank test against scipy, the shape of its report, and the command."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from scipy import stats
from typer.testing import CliRunner

from checks.backtest import GATES, SCENARIOS, mann_whitney_z, run_backtest
from flows.cli.app import app


@pytest.mark.parametrize("bins", [2, 7, 40])
def test_histogram_mann_whitney_matches_scipy(bins: int) -> None:
    rng = np.random.default_rng(bins)
    for _ in range(5):
        prod = rng.integers(0, 30, bins).astype(float)
        legacy = rng.integers(0, 300, bins).astype(float)
        z = mann_whitney_z(prod, legacy)
        x = np.repeat(np.arange(bins), prod.astype(int))
        y = np.repeat(np.arange(bins), legacy.astype(int))
        expected = stats.mannwhitneyu(x, y, alternative="greater", method="asymptotic")
        assert stats.norm.sf(z) == pytest.approx(expected.pvalue, rel=1e-9)


@pytest.fixture(scope="module")
def report() -> dict[str, Any]:
    return run_backtest(runs=200, seed=3)


def test_report_shape(report: dict[str, Any]) -> None:
    report = json.loads(json.dumps(report))  # plain JSON all the way down
    assert [g["gate"] for g in report["gates"]] == list(GATES)
    for g in report["gates"]:
        assert set(g) == {
            "gate",
            "aa_runs",
            "false_rollback_rate",
            "power",
            "median_requests_to_detect",
        }
        assert g["aa_runs"] == 200
        assert 0 <= g["false_rollback_rate"] <= 1
        assert set(g["power"]) == set(SCENARIOS) == set(g["median_requests_to_detect"])
        for n in g["median_requests_to_detect"].values():
            assert n is None or (isinstance(n, int) and n % 100 == 0)  # median of looks
    s = report["settings"]
    assert s["budget_requests"] == 100_000 and s["batch_requests"] == 200
    assert s["production_share"] == 0.05 and s["looks"] == 500
    assert set(report["targets"]) == {
        "aa_false_rollback_at_most_alpha",
        "power_at_least_0.95_everywhere",
        "error_x3_median_not_above_mann_whitney",
    }


def test_sequential_gate_rarely_rolls_back_a_good_balancer(report: dict[str, Any]) -> None:
    by = {g["gate"]: g for g in report["gates"]}
    ours, mw = by["sequential"], by["mann_whitney"]
    assert ours["false_rollback_rate"] <= 0.02
    assert mw["false_rollback_rate"] > 0.15 > ours["false_rollback_rate"]
    for name in ("error_x3", "p95_plus20", "p95_plus50", "cost_plus30"):
        assert ours["power"][name] >= 0.95
    assert ours["power"]["error_x2"] >= 0.9


def test_same_seed_same_numbers() -> None:
    a = run_backtest(runs=30, seed=5, budget_requests=4000)
    b = run_backtest(runs=30, seed=5, budget_requests=4000)
    assert a["gates"] == b["gates"]


def test_command_prints_one_json_object_or_a_table() -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["backtest", "--runs", "20", "--budget", "4000", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [g["gate"] for g in data["gates"]] == list(GATES)
    table = runner.invoke(app, ["backtest", "--runs", "20", "--budget", "4000"])
    assert table.exit_code == 0, table.output
    assert "mann_whitney" in table.stdout and "A/A false" in table.stdout
