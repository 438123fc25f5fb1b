"""Known-answer tests of the anytime-valid sequential tests, and A/A / A/B simulations
with fixed seeds under repeated looks."""

from __future__ import annotations

import math

import duckdb
import numpy as np
import pytest
from scipy import integrate, stats

from checks import sequential as sq
from checks.frames import FAILURE_SQL
from checks.thresholds import MetricMode, Thresholds
from checks.verdict import Decision

# -- known answers --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("x", "v", "tau"), [(0.05, 4e-4, 0.2), (-0.03, 1e-3, 0.1), (0.2, 0.01, 0.5), (0.0, 1e-2, 1.0)]
)
def test_normal_mixture_matches_the_integral_it_stands_for(x: float, v: float, tau: float) -> None:
    """log of int_0^inf 2 N(theta; 0, tau^2) N(x; theta, V) / N(x; 0, V) dtheta."""

    def integrand(t: float) -> float:
        return 2 * stats.norm.pdf(t, 0, tau) * math.exp((t * x - t * t / 2) / v)

    expected = math.log(integrate.quad(integrand, 0, np.inf, epsabs=0, epsrel=1e-10)[0])
    assert sq.normal_mixture_log_e(x, v, tau) == pytest.approx(expected, rel=1e-8, abs=1e-10)


def test_normal_mixture_has_expectation_one_at_the_null_and_below_under_it() -> None:
    v, tau = 0.01, 0.3

    def mean_e(mu: float) -> float:
        def f(x: float) -> float:
            return math.exp(sq.normal_mixture_log_e(x, v, tau)) * stats.norm.pdf(
                x, mu, math.sqrt(v)
            )

        # e(x) grows like exp(x^2 r / (2 V (1 + r))): integrate over the spread it leaves
        width = 12 * math.sqrt(v * (1 + tau * tau / v))
        return integrate.quad(f, mu - width, mu + width, epsabs=0, epsrel=1e-10, limit=200)[0]

    assert mean_e(0.0) == pytest.approx(1.0, rel=1e-7)
    assert mean_e(-0.05) < 0.9


def test_normal_mixture_is_a_martingale_on_simulated_null_paths() -> None:
    """Known variance, a random walk under H0: the average e-value stays <= 1 (up to
    Monte-Carlo error; its rare large values make the sample mean fall short of 1 later
    on) at every look, and the share of paths ever crossing 1/alpha stays below alpha."""
    rng = np.random.default_rng(11)
    runs, looks, tau, alpha = 20_000, 50, 0.2, 0.05
    sums = rng.standard_normal((runs, looks)).cumsum(axis=1)
    n = np.arange(1, looks + 1)
    log_e = sq.normal_mixture_log_e(sums / n, 1.0 / n, tau)
    means = np.exp(log_e).mean(axis=0)
    assert np.all(means <= 1.03)
    assert np.all(np.abs(means[:10] - 1) < 0.03)
    assert (log_e >= math.log(1 / alpha)).any(axis=1).mean() <= alpha


def test_radius_inverts_the_one_sided_test() -> None:
    v, tau, alpha = np.array([1e-4, 1e-2, 1.0]), 0.2, 0.01
    r = sq.normal_mixture_radius(v, tau, alpha)
    np.testing.assert_allclose(sq.normal_mixture_log_e(r, v, tau), math.log(1 / alpha), rtol=1e-9)


def test_count_test_is_the_mixture_of_per_failure_likelihood_ratios() -> None:
    """Direct computation: product of per-failure Bernoulli likelihood ratios, mixed over
    the grid, and (to 1 %) over the continuous half-normal on log RR."""
    rng = np.random.default_rng(3)
    arms = rng.random(40) < 0.15  # True: the failure came from production
    theta0, scale = 0.05, 1.0
    lam, logw = sq._rr_grid(scale)
    direct = 0.0
    for lj, wj in zip(lam, np.exp(logw), strict=True):
        theta = theta0 * math.exp(lj) / (theta0 * math.exp(lj) + 1 - theta0)
        ratios = np.where(arms, theta / theta0, (1 - theta) / (1 - theta0))
        direct += wj * float(np.prod(ratios))
    got = sq.count_log_e(int(arms.sum()), arms.size, theta0, scale)
    assert got == pytest.approx(math.log(direct), rel=1e-10)

    def continuous(lj: float) -> float:
        theta = theta0 * math.exp(lj) / (theta0 * math.exp(lj) + 1 - theta0)
        x, f = int(arms.sum()), arms.size
        lr = (theta / theta0) ** x * ((1 - theta) / (1 - theta0)) ** (f - x)
        return 2 * stats.norm.pdf(lj, 0, scale) * lr

    assert math.exp(got) == pytest.approx(integrate.quad(continuous, 0, 10)[0], rel=0.01)


@pytest.mark.parametrize("failures", [1, 5, 50])
def test_count_test_has_expectation_one_at_the_null_and_below_under_it(failures: int) -> None:
    x = np.arange(failures + 1)
    e = np.exp(sq.count_log_e(x, np.full(x.shape, failures), 0.05))
    assert float((stats.binom.pmf(x, failures, 0.05) * e).sum()) == pytest.approx(1.0, rel=1e-9)
    assert float((stats.binom.pmf(x, failures, 0.03) * e).sum()) < 1.0


def test_binomial_confidence_sequence_bounds_solve_the_mixture_equation() -> None:
    s, n, alpha = 12, 1000, 0.01
    lower, upper = sq.binomial_cs(s, n, alpha)
    assert lower < s / n < upper

    def mixture_ratio(p0: float) -> float:
        def f(p: float) -> float:
            return stats.beta.pdf(p, 0.5, 0.5) * math.exp(
                s * math.log(p / p0) + (n - s) * math.log((1 - p) / (1 - p0))
            )

        return integrate.quad(f, 0, 1, points=[s / n], limit=200)[0]

    assert mixture_ratio(lower) == pytest.approx(1 / alpha, rel=1e-4)
    assert mixture_ratio(upper) == pytest.approx(1 / alpha, rel=1e-4)
    assert sq.binomial_cs(0, 100, alpha)[0] == 0.0


def test_binomial_confidence_sequence_covers_at_all_times() -> None:
    rng = np.random.default_rng(5)
    p, alpha = 0.02, 0.05
    s = (rng.random((400, 3000)) < p).cumsum(axis=1)[:, ::5]  # every 5th n: a dense subset
    n = np.arange(1, 3001)[::5]
    lower, upper = sq.binomial_cs(s, np.broadcast_to(n, s.shape), alpha)
    missed = ((lower > p) | (upper < p)).any(axis=1).mean()
    assert missed <= alpha


# -- decisions on clear-cut data --------------------------------------------------------------


def _bern(n: int, k: int) -> sq.Moments:
    return sq.Moments(n, k, k)


def test_error_rate_decisions() -> None:
    a = 0.01
    harm = sq.error_rate_test(_bern(2000, 60), _bern(38000, 380), 0.02, a)
    assert harm.decision is Decision.HARM
    assert harm.estimate == pytest.approx(0.02)
    assert harm.e_value >= 1 / a
    fine = sq.error_rate_test(_bern(20000, 200), _bern(380000, 3800), 0.02, a)
    assert fine.decision is Decision.NON_INFERIOR
    assert fine.upper is not None and fine.upper < 0.02
    early = sq.error_rate_test(_bern(50, 1), _bern(1000, 10), 0.02, a)
    assert early.decision is Decision.INCONCLUSIVE
    # Worse, though by less than the margin: still harm (the bar is zero).
    small = sq.error_rate_test(_bern(40000, 800), _bern(760000, 7600), 0.02, a)
    assert small.decision is Decision.HARM
    assert small.upper is not None and small.upper < 0.02


def test_latency_and_cost_decisions() -> None:
    rng = np.random.default_rng(1)
    legacy = sq.Moments.of(rng.normal(5.0, 0.5, 40000))
    slow = sq.Moments.of(rng.normal(5.0 + math.log(1.5), 0.5, 2000))
    same = sq.Moments.of(rng.normal(5.0, 0.5, 2000))
    assert sq.latency_test(slow, legacy, 1.25, 0.01).decision is Decision.HARM
    ok = sq.latency_test(same, legacy, 1.25, 0.01)
    assert ok.decision is Decision.NON_INFERIOR
    assert ok.lower is not None and ok.upper is not None and ok.lower < 1 < ok.upper < 1.25
    few = sq.latency_test(sq.Moments.of(rng.normal(5, 0.5, 10)), legacy, 1.25, 0.01)
    assert few.decision is Decision.INCONCLUSIVE and "at least" in few.reason

    cost_l = sq.Moments.of(0.002 * rng.lognormal(-0.08, 0.4, 40000))
    dear = sq.Moments.of(0.0026 * rng.lognormal(-0.08, 0.4, 2000))
    cheap = sq.Moments.of(0.002 * rng.lognormal(-0.08, 0.4, 2000))
    assert sq.cost_test(dear, cost_l, 1.3, 0.01).decision is Decision.HARM
    assert sq.cost_test(cheap, cost_l, 1.3, 0.01).decision is Decision.NON_INFERIOR


def test_paired_decisions() -> None:
    rng = np.random.default_rng(2)
    n = 5000
    base = rng.normal(5.0, 0.5, n)
    noise = rng.normal(0, 0.2, n)
    same = sq.PairedMoments.of(base + noise, base)
    slower = sq.PairedMoments.of(base + noise + math.log(1.2), base)
    assert sq.paired_latency_test(slower, 1.25, 0.01).decision is Decision.HARM
    assert sq.paired_latency_test(same, 1.25, 0.01).decision is Decision.NON_INFERIOR

    f_l = (rng.random(n) < 0.01).astype(float)
    f_same = (rng.random(n) < 0.01).astype(float)
    f_worse = np.maximum(f_l, (rng.random(n) < 0.03).astype(float))
    assert sq.paired_error_rate_test(sq.PairedMoments.of(f_worse, f_l), 0.02, 0.01).decision is (
        Decision.HARM
    )
    fine = sq.paired_error_rate_test(sq.PairedMoments.of(f_same, f_l), 0.02, 0.01)
    assert fine.decision is Decision.NON_INFERIOR and fine.paired

    c_l = 0.002 * rng.lognormal(-0.08, 0.4, n)
    assert sq.paired_cost_test(sq.PairedMoments.of(c_l * 1.3, c_l), 1.3, 0.01).decision is (
        Decision.HARM
    )
    c_p = c_l * rng.lognormal(-0.005, 0.1, n)
    assert sq.paired_cost_test(sq.PairedMoments.of(c_p, c_l), 1.3, 0.01).decision is (
        Decision.NON_INFERIOR
    )


def test_records_explain_themselves_and_follow_the_policy_modes() -> None:
    th = Thresholds(metric_modes={"cost": MetricMode.PAUSE})
    rng = np.random.default_rng(4)
    prod = sq.ArmSummary(
        _bern(2000, 60),
        sq.Moments.of(rng.normal(5.0, 0.5, 2000)),
        sq.Moments.of(rng.lognormal(-6.3, 0.4, 2000)),
    )
    legacy = sq.ArmSummary(
        _bern(38000, 380),
        sq.Moments.of(rng.normal(5.0, 0.5, 38000)),
        sq.Moments.of(rng.lognormal(-6.3, 0.4, 38000)),
    )
    results = sq.evaluate_arms(prod, legacy, th)
    assert [r.metric for r in results] == ["error_rate", "latency", "cost"]
    assert all(r.alpha == pytest.approx(th.alpha / 3) for r in results)
    records = sq.to_records(results, th)
    err, lat, cost = records
    assert {r.check_kind for r in records} == {"sequential"}
    assert err.decision is Decision.HARM and err.failed and err.critical
    assert err.metric_mode == "abort" and err.threshold == th.max_error_rate_diff
    assert err.e_value is not None and err.e_value >= 3 / th.alpha
    assert err.n_production == 2000 and err.n_legacy == 38000
    assert "alpha" in err.reason and "e-value" in err.reason
    assert lat.critical and lat.lower_bound is not None and lat.upper_bound is not None
    assert cost.metric_mode == "pause" and cost.critical  # holds while open; a human acts
    default_cost = sq.to_record(results[2])
    assert default_cost.metric_mode == "abort" and default_cost.critical  # cost is critical


# -- the SQL that feeds them ----------------------------------------------------------------


def test_sufficient_statistics_sql() -> None:
    rng = np.random.default_rng(8)
    con = duckdb.connect()
    con.execute(
        "CREATE TABLE requests (request_id VARCHAR, primary_request_id VARCHAR, "
        "config_version BIGINT, arm VARCHAR, is_shadow BOOLEAN, outcome VARCHAR, "
        "latency_ms DOUBLE, cost_usd DOUBLE)"
    )
    n = 400
    outcomes = np.where(rng.random(2 * n) < 0.05, "timeout", "ok")
    lat = rng.lognormal(5, 0.5, 2 * n)
    cost = rng.lognormal(-6.3, 0.4, 2 * n)
    rows = []
    for i in range(n):  # primary (legacy) rows and their production shadows
        rows.append((f"p{i}", None, 3, "legacy", False, outcomes[i], lat[i], cost[i]))
        rows.append(
            (f"s{i}", f"p{i}", 3, "production", True, outcomes[n + i], lat[n + i], cost[n + i])
        )
    con.executemany("INSERT INTO requests VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)

    cur = con.execute(sq.ARM_MOMENTS_SQL, [3])
    names = [d[0] for d in cur.description]
    arms = {r[0]: sq.ArmSummary.from_row(dict(zip(names, r, strict=True))) for r in cur.fetchall()}
    assert set(arms) == {"legacy"}  # shadow rows are not served traffic
    legacy = arms["legacy"]
    assert legacy.failures.total == (outcomes[:n] == "timeout").sum()
    ok_l = outcomes[:n] == "ok"  # latency over answered requests only
    assert legacy.log_latency.n == ok_l.sum()
    assert legacy.log_latency.total == pytest.approx(np.log(lat[:n][ok_l]).sum())
    # cost too: a refusal costs nothing and buys nothing
    assert legacy.cost.n == ok_l.sum()
    assert legacy.cost.total_sq == pytest.approx((cost[:n][ok_l] ** 2).sum())

    cur = con.execute(sq.SHADOW_MOMENTS_SQL, [3])
    names = [d[0] for d in cur.description]
    shadow = sq.ShadowSummary.from_row(dict(zip(names, cur.fetchone(), strict=True)))
    f_p = (outcomes[n:] == "timeout").astype(float)
    f_l = (outcomes[:n] == "timeout").astype(float)
    d = shadow.failures.differences
    assert d.total == pytest.approx((f_p - f_l).sum())
    assert d.total_sq == pytest.approx(((f_p - f_l) ** 2).sum())
    dl = shadow.log_latency.differences
    both_ok = (outcomes[n:] == "ok") & ok_l
    assert dl.n == both_ok.sum()
    assert dl.total == pytest.approx((np.log(lat[n:]) - np.log(lat[:n]))[both_ok].sum())
    assert shadow.cost.n == both_ok.sum()
    assert shadow.cost.sum_pl == pytest.approx((cost[n:] * cost[:n])[both_ok].sum())
    assert len(sq.evaluate_shadow(shadow, Thresholds())) == 3
    assert FAILURE_SQL in sq.ARM_MOMENTS_SQL


# -- repeated looks: A/A and A/B simulations ----------------------------------------------------


def _looks(rng: np.random.Generator, runs: int, looks: int, m: int, shift: float = 0.0):
    """Cumulative (production, legacy) samples of log latency: m production and 9 m legacy
    per look (a 10 % canary)."""
    prod = rng.normal(5.0 + shift, 0.5, (runs, looks * m))
    legacy = rng.normal(5.0, 0.5, (runs, looks * 9 * m))
    return prod, legacy


def test_latency_aa_type_one_error_under_repeated_looks_beats_repeated_mann_whitney() -> None:
    """Same alpha for both: the mSPRT's false alarms stay <= alpha over 30 looks; a Mann-
    Whitney test re-run at every look (Kayenta) exceeds it."""
    rng = np.random.default_rng(2024)
    runs, looks, m, alpha = 300, 30, 10, 0.05
    prod, legacy = _looks(rng, runs, looks, m)
    ours = np.zeros(runs, dtype=bool)
    mw = np.zeros(runs, dtype=bool)
    for k in range(1, looks + 1):
        p, q = prod[:, : k * m], legacy[:, : k * 9 * m]
        log_e = sq.latency_harm_log_e(
            sq.Moments(np.full(runs, p.shape[1]), p.sum(1), (p * p).sum(1)),
            sq.Moments(np.full(runs, q.shape[1]), q.sum(1), (q * q).sum(1)),
            tau=math.log(1.25),
        )
        ours |= log_e >= math.log(1 / alpha)
        mw |= stats.mannwhitneyu(p, q, axis=1, alternative="greater").pvalue < alpha
    tolerance = 2 * math.sqrt(alpha * (1 - alpha) / runs)
    assert ours.mean() <= alpha + tolerance
    assert mw.mean() > alpha + tolerance
    assert mw.mean() > 2 * ours.mean()


def test_latency_ab_detects_a_p95_regression() -> None:
    rng = np.random.default_rng(7)
    runs, looks, m = 200, 30, 10
    prod, legacy = _looks(rng, runs, looks, m, shift=math.log(1.5))
    p, q = prod, legacy
    log_e = sq.latency_harm_log_e(
        sq.Moments(np.full(runs, p.shape[1]), p.sum(1), (p * p).sum(1)),
        sq.Moments(np.full(runs, q.shape[1]), q.sum(1), (q * q).sum(1)),
        tau=math.log(1.25),
    )
    assert (log_e >= math.log(100)).mean() >= 0.99


def test_error_rate_aa_and_ab_under_repeated_looks() -> None:
    """5 % canary, 1 % failures, a look every 200 requests: the count test's false alarms
    stay below alpha over 200 looks; a tripled failure rate is found."""
    rng = np.random.default_rng(99)
    runs, looks, batch, alpha = 1000, 200, 200, 0.01
    n_p = rng.binomial(batch, 0.05, (runs, looks))
    n_l = batch - n_p
    f_l = rng.binomial(n_l, 0.01).cumsum(1)
    n_p_c, n_l_c = n_p.cumsum(1), n_l.cumsum(1)
    for factor, check in ((1, "aa"), (3, "ab")):
        f_p = rng.binomial(n_p, 0.01 * factor).cumsum(1)
        log_e = sq.error_rate_harm_log_e(sq.Moments(n_p_c, f_p, f_p), sq.Moments(n_l_c, f_l, f_l))
        rejected = (log_e >= math.log(1 / alpha)).any(axis=1).mean()
        if check == "aa":
            assert rejected <= alpha + 2 * math.sqrt(alpha * (1 - alpha) / runs)
        else:
            assert rejected >= 0.95


def test_shadow_latency_aa_under_repeated_looks() -> None:
    rng = np.random.default_rng(17)
    runs, looks, m, alpha = 1000, 40, 10, 0.05
    base = rng.normal(5.0, 0.5, (runs, looks * m))
    d = rng.normal(0.0, 0.3, (runs, looks * m))  # production - legacy, same request
    crossed = np.zeros(runs, dtype=bool)
    for k in range(1, looks + 1):
        dd = d[:, : k * m]
        pairs = sq.PairedMoments.from_differences(
            np.full(runs, dd.shape[1]), dd.sum(1), (dd * dd).sum(1)
        )
        est, var = sq.paired_mean_difference(pairs)
        log_e = sq.normal_harm_log_e(est, var, math.log(1.25), pairs.n)
        crossed |= log_e >= math.log(1 / alpha)
    del base
    assert crossed.mean() <= alpha + 2 * math.sqrt(alpha * (1 - alpha) / runs)
