"""The gate's sequential step on real DuckDB rows: what it compares in each mode."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from checks.gate import sequential_records
from checks.thresholds import GateSpec, Thresholds
from checks.verdict import Decision
from flows.store.database import connect

NOW = datetime(2026, 11, 27, 12, tzinfo=UTC)


def spec(mode: str) -> GateSpec:
    return GateSpec(
        config_version=1,
        mode=mode,
        traffic_percent=0.0 if mode == "shadow" else 50.0,
        shadow_sample_rate=1.0,
        thresholds=Thresholds(),
        min_samples=10,
        min_duration_s=0,
        max_duration_s=600,
        phase_started_at=NOW,
        now=NOW,
    )


def insert(
    con,
    request_id: str,
    arm: str,
    shadow: bool,
    primary: str | None,
    latency: float,
    outcome: str = "ok",
    cost: float = 0.001,
) -> None:
    con.execute(
        "INSERT INTO requests (request_id, ts, router_instance, config_version, mode, arm, "
        "is_shadow, primary_request_id, subject_bucket, query_category, algorithm, backend, "
        "attempts, fallback_used, outcome, latency_ms, tokens_in, tokens_out, cost_usd, "
        "query_hash, query_length) VALUES (?, ?, 'i', 1, 'shadow', ?, ?, ?, 1, 'general', 'x', "
        "'b', 1, false, ?, ?, 1, 1, ?, 'h', 10)",
        [request_id, NOW, arm, shadow, primary, outcome, latency, cost],
    )


def test_shadow_without_pairs_holds_instead_of_passing(tmp_path: Path) -> None:
    with connect(tmp_path / "m.duckdb") as con:
        for i in range(50):  # shadows whose primaries never landed: nothing to compare
            insert(con, f"s{i}", "production", True, f"missing-{i}", 100.0)
        records = sequential_records(con, spec("shadow"))
    assert {r.metric for r in records} == {"error_rate", "latency", "cost"}
    assert {r.decision for r in records} == {Decision.INCONCLUSIVE}
    assert all(r.critical for r in records)


def test_shadow_pairs_detect_a_slower_production(tmp_path: Path) -> None:
    with connect(tmp_path / "m.duckdb") as con:
        for i in range(400):
            insert(con, f"p{i}", "legacy", False, None, 100.0 + i % 7)
            insert(con, f"s{i}", "production", True, f"p{i}", 300.0 + i % 11)
        records = {r.metric: r for r in sequential_records(con, spec("shadow"))}
    assert records["latency"].decision is Decision.HARM
    assert records["error_rate"].decision is not Decision.HARM


def test_legacy_refusals_do_not_make_production_look_costlier(tmp_path: Path) -> None:
    """A clean-clone demo rolled back for "harm in cost": legacy's 429s cost nothing, so
    the same answers looked dearer on production. Cost is compared on answered pairs."""
    with connect(tmp_path / "m.duckdb") as con:
        for i in range(600):
            refused = i % 8 == 0  # legacy rate-limited on one request in eight
            insert(
                con,
                f"p{i}",
                "legacy",
                False,
                None,
                3.0 if refused else 150.0,
                "rate_limited" if refused else "ok",
                0.0 if refused else 0.005,
            )
            insert(con, f"s{i}", "production", True, f"p{i}", 150.0, cost=0.005)
        records = {r.metric: r for r in sequential_records(con, spec("shadow"))}
    assert records["cost"].decision is not Decision.HARM, records["cost"].reason
    assert records["cost"].estimate == pytest.approx(1.0)


def test_production_only_has_no_concurrent_comparison(tmp_path: Path) -> None:
    with connect(tmp_path / "m.duckdb") as con:
        records = sequential_records(con, spec("production_only"))
    assert {r.decision for r in records} == {Decision.SKIPPED}
    assert not any(r.critical for r in records)


def production_only(thresholds: Thresholds) -> GateSpec:
    """A production_only phase: no legacy arm, so the guardrails decide alone."""
    return GateSpec(
        config_version=1,
        mode="production_only",
        traffic_percent=100.0,
        shadow_sample_rate=1.0,
        thresholds=thresholds,
        min_samples=100,
        min_duration_s=0,
        max_duration_s=600,
        phase_started_at=NOW,
        now=NOW,
    )


def _production_rows(
    con, n: int, failures: int, arm: str = "production", first_bucket: int = 0
) -> None:
    for i in range(n):
        failed = i < failures
        con.execute(
            "INSERT INTO requests (request_id, ts, router_instance, config_version, mode, arm, "
            "is_shadow, subject_bucket, query_category, algorithm, backend, attempts, "
            "fallback_used, outcome, http_status, error_kind, latency_ms, tokens_in, tokens_out, "
            "cost_usd, query_hash, query_length) VALUES (?, ?, 'i', 1, 'production_only', "
            "?, false, ?, 'general', 'response_time', 'b', 1, false, ?, ?, ?, 120.0, "
            "10, 50, 0.001, 'h', 40)",
            [
                f"{arm}-{i}",
                NOW,
                arm,
                (first_bucket + i) % 10_000,
                "error" if failed else "ok",
                500 if failed else 200,
                "server_error" if failed else None,
            ],
        )


def test_an_error_rate_a_hair_over_the_guardrail_holds_a_clear_breach_rolls_back(
    tmp_path: Path,
) -> None:
    """Checked at every evaluation, a point estimate just over the limit would roll back
    healthy balancers by chance; the breach must be beyond noise (Wilson, 1 - alpha)."""
    from checks.gate import evaluate
    from checks.gx_suites import GxRunner
    from checks.verdict import Verdict

    gate = production_only(Thresholds(max_error_rate=0.05))
    runner = GxRunner()
    outcomes = {}
    for failures in (24, 45):  # 5.2 % and 9.7 % of 466
        with connect(tmp_path / f"m{failures}.duckdb") as con:
            _production_rows(con, 466, failures)
            result = evaluate(con, gate, runner, f"run-{failures}")
        (record,) = [
            r for r in result.records if (r.check_kind, r.metric) == ("guardrail", "error_rate")
        ]
        outcomes[failures] = (result.verdict, record)
    verdict, record = outcomes[24]
    assert verdict is Verdict.HOLD, record
    assert record.decision is Decision.INCONCLUSIVE
    assert record.lower_bound is not None and record.lower_bound < 0.05 < record.estimate
    assert "within noise" in record.reason and "np.float64" not in record.reason
    verdict, record = outcomes[45]
    assert verdict is Verdict.ROLLBACK, record
    assert record.decision is Decision.FAIL and record.lower_bound > 0.05


def test_a_cost_limit_the_plan_sets_is_a_hard_limit(tmp_path: Path) -> None:
    """A breached cost-per-request guardrail rolls back by default (it used to warn)."""
    from checks.gate import evaluate
    from checks.gx_suites import GxRunner
    from checks.verdict import Verdict

    def gate(limit: float) -> GateSpec:
        return production_only(Thresholds(max_cost_per_request_usd=limit))

    runner = GxRunner()
    with connect(tmp_path / "m.duckdb") as con:
        _production_rows(con, 200, 0)  # every request costs 0.001 USD
        over = evaluate(con, gate(0.0005), runner, "over")
        within = evaluate(con, gate(0.002), runner, "within")
    assert over.verdict is Verdict.ROLLBACK and "cost_per_request" in over.reason
    assert within.verdict is Verdict.PROMOTE, within.reason


def test_a_breach_legacy_shares_holds_instead_of_rolling_back(tmp_path: Path) -> None:
    """An incident beyond the balancer (both arms over the 5 % error limit, legacy
    worse) holds: sending users back to legacy would not help them. The same breach
    with a healthy legacy rolls back."""
    from checks.gate import evaluate
    from checks.gx_suites import GxRunner
    from checks.verdict import Verdict

    gate = GateSpec(
        config_version=1,
        mode="ab_test",
        traffic_percent=50.0,
        shadow_sample_rate=1.0,
        thresholds=Thresholds(max_error_rate=0.05),
        min_samples=100,
        min_duration_s=0,
        max_duration_s=600,
        phase_started_at=NOW,
        now=NOW,
    )
    runner = GxRunner()
    results = {}
    for legacy_failures in (60, 4):  # 15 % and 1 % of 400
        with connect(tmp_path / f"m{legacy_failures}.duckdb") as con:
            _production_rows(con, 400, 40)  # production: 10 %, clearly over 5 %
            _production_rows(con, 400, legacy_failures, arm="legacy", first_bucket=5_000)
            result = evaluate(con, gate, runner, f"run-{legacy_failures}")
        (guard,) = [
            r for r in result.records if (r.check_kind, r.metric) == ("guardrail", "error_rate")
        ]
        results[legacy_failures] = (result, guard)

    shared, guard = results[60]
    assert guard.decision is Decision.INCONCLUSIVE, guard
    assert "legacy breaches it too (0.15 over 400 requests)" in guard.reason
    assert shared.verdict is not Verdict.ROLLBACK, shared.reason

    alone, guard = results[4]
    assert guard.decision is Decision.FAIL, guard
    assert alone.verdict is Verdict.ROLLBACK and "error_rate" in alone.reason


def test_a_legacy_value_that_is_not_a_number_never_excuses_a_breach() -> None:
    """NaN compares false to everything, so "legacy not below the limit" would hold; a
    breach is excused only by a legacy value that is a real number as bad or worse."""
    from checks.frames import ArmStats
    from checks.gate import excuse_shared_breach
    from checks.verdict import MetricRecord

    breach = MetricRecord(
        "guardrail",
        "p95_latency_ms",
        Decision.FAIL,
        "p95 9000 breaks 5000",
        estimate=9_000.0,
        threshold=5_000.0,
    )
    for legacy_p95, held in ((float("nan"), False), (4_000.0, False), (9_500.0, True)):
        legacy = ArmStats("legacy", n=500, p95_ms=legacy_p95)
        decided = excuse_shared_breach(breach, legacy, min_samples=100).decision
        assert (decided is Decision.INCONCLUSIVE) is held, (legacy_p95, decided)
