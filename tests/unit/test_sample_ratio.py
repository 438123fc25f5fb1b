"""Sample-ratio mismatch on per-bucket request counts: valid with heavy users, sees rows
lost from one arm, and what the SQL computes equals the formula. The simulations are
seeded; they also show why the two textbook alternatives fail here."""

from __future__ import annotations

import duckdb
import numpy as np
import pandas as pd
import pytest
from scipy import stats

from checks.sample_ratio import bucket_means_p_value, owned_buckets, sample_ratio
from checks.thresholds import Thresholds
from router.bucketing import BUCKETS

ALARM = Thresholds().srm_p_value  # 0.001


def simulate(
    rng: np.random.Generator, users: int, mean_requests: float, percent: float, lost: float = 0.0
) -> tuple[float, float, float]:
    """(ours, chi-square on requests, chi-square on distinct buckets) p-values for one
    phase of `users` with log-normal request rates; `lost` of production rows vanish."""
    buckets = rng.integers(0, BUCKETS, users)
    rates = rng.lognormal(0.0, 1.0, users)
    counts = rng.poisson(rates * mean_requests / rates.mean())
    owned = owned_buckets(percent)
    production = buckets < owned
    if lost:
        counts = np.where(production, rng.binomial(counts, 1 - lost), counts)
    per_bucket = np.bincount(buckets, weights=counts, minlength=BUCKETS)
    prod, leg = per_bucket[:owned], per_bucket[owned:]
    ours = bucket_means_p_value(
        (prod.sum(), (prod**2).sum(), owned), (leg.sum(), (leg**2).sum(), BUCKETS - owned)
    )
    share = owned / BUCKETS
    total = per_bucket.sum()
    by_request = stats.chisquare([prod.sum(), leg.sum()], [total * share, total * (1 - share)])
    seen = per_bucket > 0
    distinct = [seen[:owned].sum(), seen[owned:].sum()]
    n = sum(distinct)
    by_bucket = stats.chisquare(distinct, [n * share, n * (1 - share)])
    assert ours is not None
    return ours, float(by_request.pvalue), float(by_bucket.pvalue)


def alarm_rates(runs: int, **scenario: float) -> np.ndarray:
    rng = np.random.default_rng(2026)
    p = np.array([simulate(rng, **scenario) for _ in range(runs)])  # type: ignore[arg-type]
    return (p < ALARM).mean(axis=0)


@pytest.mark.parametrize(
    "scenario",
    [
        {"users": 2_000, "mean_requests": 3, "percent": 5},
        {"users": 2_000, "mean_requests": 20, "percent": 15},
        {"users": 100_000, "mean_requests": 5, "percent": 50},
    ],
)
def test_healthy_splits_rarely_alarm_even_with_heavy_users(scenario: dict[str, float]) -> None:
    ours, by_request, _ = alarm_rates(300, **scenario)
    assert ours <= 0.01
    assert by_request >= 0.15  # counting requests as independent alarms on healthy canaries


def test_rows_lost_from_one_arm_are_seen_where_distinct_counts_are_blind() -> None:
    ours, _, by_bucket = alarm_rates(100, users=100_000, mean_requests=5, percent=5, lost=0.1)
    assert ours >= 0.7
    assert by_bucket <= 0.05  # the saturated distinct-bucket count never notices


def test_the_test_from_sums_equals_scipy_on_the_raw_counts() -> None:
    rng = np.random.default_rng(3)
    production = rng.poisson(2.0, 500).astype(float)
    legacy = rng.poisson(2.3, 9_500).astype(float)
    expected = stats.ttest_ind(production, legacy, equal_var=True).pvalue
    got = bucket_means_p_value(
        (production.sum(), (production**2).sum(), 500),
        (legacy.sum(), (legacy**2).sum(), 9_500),
    )
    assert got == pytest.approx(expected, rel=1e-9)


def requests_table(rows: list[tuple[int, str, bool, int]]) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    con.execute(
        "CREATE TABLE requests (config_version BIGINT, arm VARCHAR, is_shadow BOOLEAN, "
        "subject_bucket INTEGER)"
    )
    frame = pd.DataFrame(rows, columns=["config_version", "arm", "is_shadow", "subject_bucket"])
    if len(frame):
        con.execute("INSERT INTO requests SELECT * FROM frame")
    return con


def test_the_sql_counts_each_arm_in_its_own_buckets_only() -> None:
    rng = np.random.default_rng(5)
    buckets = rng.integers(0, BUCKETS, 20_000)
    rows = [(7, "production" if b < 500 else "legacy", False, int(b)) for b in buckets]
    rows += [(7, "production", True, 9_000)] * 50  # shadow rows never count
    rows += [(6, "production", False, 1)] * 50  # nor rows of another config version
    split = sample_ratio(requests_table(rows), 7, 5.0)
    assert split is not None
    per_bucket = np.bincount(buckets, minlength=BUCKETS).astype(float)
    prod, leg = per_bucket[:500], per_bucket[500:]
    assert split.p_value == pytest.approx(
        stats.ttest_ind(prod, leg, equal_var=True).pvalue, rel=1e-9
    )
    assert split.production_share == pytest.approx(prod.sum() / per_bucket.sum())
    assert (split.expected_share, split.production_buckets) == (0.05, 500)

    # the router sending a third of production's users to legacy is an alarm
    misrouted = [
        (v, "legacy" if arm == "production" and b % 3 == 0 else arm, shadow, b)
        for v, arm, shadow, b in rows
    ]
    broken = sample_ratio(requests_table(misrouted), 7, 5.0)
    assert broken is not None and broken.p_value < ALARM


@pytest.mark.parametrize("percent", [0.125, 99.9])
def test_a_split_with_too_few_buckets_on_one_side_is_not_judged(percent: float) -> None:
    assert sample_ratio(requests_table([(1, "legacy", False, 9_999)]), 1, percent) is None


def test_no_requests_yet_is_not_judged() -> None:
    assert sample_ratio(requests_table([]), 1, 5.0) is None


@pytest.mark.parametrize(
    ("users", "percent"), [(50, 5), (150, 5), (500, 5), (3_000, 0.5), (300, 95)]
)
def test_a_small_phase_is_not_judged_until_its_smaller_side_has_enough_buckets(
    users: int, percent: float
) -> None:
    """Healthy 5 % canaries with 50, 150 and 500 users alarmed in 17 %, 6.5 % and 1.8 %
    of runs (a few heavy users decide the small side's sums): not judged yet. At 95 %
    the small side is legacy's."""
    rng = np.random.default_rng(11)
    buckets = rng.integers(0, BUCKETS, users)
    edge = owned_buckets(percent)
    rows = [(1, "production" if b < edge else "legacy", False, int(b)) for b in buckets]
    assert sample_ratio(requests_table(rows), 1, percent) is None


@pytest.mark.parametrize(("users", "percent"), [(1_200, 5), (1_200, 95)])
def test_healthy_splits_just_past_the_wait_rarely_alarm(users: int, percent: float) -> None:
    """Through `sample_ratio` (the SQL and the wait), heavy users included, in runs the
    test judges: at most ~1 % alarms at the 0.1 % level (Welch's test: 1.6 % at 1,000
    users and 5 %)."""
    rng = np.random.default_rng(2026)
    edge = owned_buckets(percent)
    judged = alarms = 0
    for _ in range(150):
        buckets = rng.integers(0, BUCKETS, users)
        rates = rng.lognormal(0.0, 1.0, users)
        counts = rng.poisson(rates * 3 / rates.mean())
        rows = [
            (1, "production" if b < edge else "legacy", False, int(b))
            for b, c in zip(buckets, counts, strict=True)
            for _ in range(c)
        ]
        split = sample_ratio(requests_table(rows), 1, percent)
        if split is not None:
            judged += 1
            alarms += split.p_value < ALARM
    assert judged >= 140  # the regime this test is about is the one the gate judges
    assert alarms <= 0.01 * judged


def test_a_fractional_percent_owns_the_buckets_it_routes() -> None:
    """Rounding down lost the edge bucket: its requests counted for the wrong arm."""
    assert [owned_buckets(p) for p in (0.125, 0.505, 5, 100)] == [13, 51, 500, BUCKETS]


def test_a_half_percent_canary_gets_its_sample_ratio_check() -> None:
    """0.5 % owns exactly the minimum of 50 buckets: it is checked, not skipped."""
    rng = np.random.default_rng(4)
    buckets = rng.integers(0, BUCKETS, 60_000)
    rows = [(1, "production" if b < 50 else "legacy", False, int(b)) for b in buckets]
    split = sample_ratio(requests_table(rows), 1, 0.5)
    assert split is not None and split.production_buckets == 50
