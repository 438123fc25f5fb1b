"""The sticky-user A/A simulation behind `rollout backtest-users`, seeded."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from checks.user_backtest import run_user_backtest
from flows.cli.app import app


def test_users_who_differ_roll_back_healthy_canaries_only_when_judged_per_request() -> None:
    result = run_user_backtest(runs=10, users=500, seed=41, budget_requests=40_000)
    rates = result["false_rollback_rate"]
    assert rates["per_request"] >= 0.3, result  # a few users' luck reads as harm
    assert rates["clustered"] == 0.0, result
    assert sum(result["by_metric"]["per_request"].values()) == round(10 * rates["per_request"])


def test_users_who_do_not_differ_are_fine_either_way() -> None:
    same = {"latency_sigma": 0.0, "error_sigma": 0.0, "cost_sigma": 0.0, "activity_sigma": 0.0}
    result = run_user_backtest(runs=10, users=2000, seed=5, budget_requests=40_000, **same)
    assert result["false_rollback_rate"] == {"per_request": 0.0, "clustered": 0.0}


def test_the_command_prints_one_json_object_and_refuses_too_many_users() -> None:
    runner = CliRunner()
    ok = runner.invoke(
        app, ["backtest-users", "--runs", "10", "--users", "100", "--budget", "20000", "--json"]
    )
    assert ok.exit_code == 0, ok.output
    assert set(json.loads(ok.stdout)["false_rollback_rate"]) == {"per_request", "clustered"}
    refused = runner.invoke(app, ["backtest-users", "--users", "20000"])
    assert refused.exit_code == 2 and "--users" in refused.output
