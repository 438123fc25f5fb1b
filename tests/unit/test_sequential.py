"""Known-answer tests of the anytime-valid sequential tests, and A/A / A/B simulations
with fixed seeds under repeated looks."""

from __future__ import annotations

import math

import duckdb
import numpy as np
import pytest
from pydantic import ValidationError
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
    # six checks share the phase's alpha; cost splits its share between two tests
    assert [r.alpha for r in results] == pytest.approx([th.alpha / 6] * 2 + [th.alpha / 12])
    records = sq.to_records(results, th)
    err, lat, cost = records
    assert {r.check_kind for r in records} == {"sequential"}
    assert err.decision is Decision.HARM and err.failed and err.critical
    assert err.metric_mode == "abort" and err.threshold == th.max_error_rate_diff
    assert err.e_value is not None and err.e_value >= 6 / th.alpha
    assert err.n_production == 2000 and err.n_legacy == 38000
    assert "alpha" in err.reason and "e-value" in err.reason
    assert lat.critical and lat.lower_bound is not None and lat.upper_bound is not None
    assert cost.metric_mode == "pause" and cost.critical  # holds while open; a human acts
    default_cost = sq.to_record(results[2])
    assert default_cost.metric_mode == "abort" and default_cost.critical  # cost is critical


def test_latency_and_cost_bounds_are_labelled_one_sided() -> None:
    """The latency and cost bounds are two one-sided (1 - alpha) bounds, together only
    (1 - 2 alpha): the reason must not call them a (1 - alpha) confidence sequence."""
    rng = np.random.default_rng(3)
    legacy = sq.Moments.of(rng.normal(5.0, 0.5, 4000))
    prod = sq.Moments.of(rng.normal(5.0, 0.5, 1000))
    reason = sq.latency_test(prod, legacy, 1.25, 0.01).reason
    assert "one-sided 99.00% confidence-sequence bounds [" in reason
    assert "both at once 98.00%" in reason
    err = sq.error_rate_test(_bern(1000, 10), _bern(4000, 40), 0.02, 0.01).reason
    assert "99.00% confidence sequence [" in err and "one-sided" not in err


# -- metric modes -----------------------------------------------------------------------------


def test_the_error_rate_guardrail_and_comparison_have_separate_modes() -> None:
    """One key used to set both; a plan quieting the absolute limit silenced the
    comparison with legacy. `error_rate` is the comparison (as before),
    `error_rate_limit` the guardrail."""
    quiet_limit = Thresholds(metric_modes={"error_rate_limit": MetricMode.WARN})
    quiet_comparison = Thresholds(metric_modes={"error_rate": MetricMode.WARN})
    harm = sq.error_rate_test(_bern(5000, 150), _bern(95000, 950), 0.02, 0.01 / 6)
    assert harm.decision is Decision.HARM
    record = sq.to_record(harm, quiet_limit)
    assert record.metric_mode == "abort" and record.critical
    assert quiet_limit.mode_of("error_rate_limit") is MetricMode.WARN
    assert sq.to_record(harm, quiet_comparison).metric_mode == "warn"
    assert quiet_comparison.mode_of("error_rate_limit") is MetricMode.ABORT


def test_an_unknown_metric_modes_key_is_refused_naming_the_allowed_ones() -> None:
    with pytest.raises(ValidationError) as raised:
        Thresholds(metric_modes={"error_rate_guardrail": MetricMode.WARN})
    text = str(raised.value)
    assert "unknown metric_modes key(s) error_rate_guardrail" in text
    for key in ("error_rate", "error_rate_limit", "latency_p95", "p95_ratio"):
        assert key in text
    assert Thresholds(metric_modes={"latency_p95": MetricMode.PAUSE}).mode_of("latency_p95") is (
        MetricMode.PAUSE
    )


# -- cost with free or flat-priced arms ------------------------------------------------------


def _flat(n: int, price: float) -> sq.Moments:
    return sq.Moments(n, n * price, n * price * price)


@pytest.mark.parametrize(
    ("production", "legacy", "decision", "words"),
    [
        pytest.param(0.004, 0.0004, Decision.HARM, "ratio is exact", id="flat-10x-dearer"),
        pytest.param(0.0033, 0.003, Decision.HARM, "ratio is exact", id="flat-1.1x-dearer"),
        pytest.param(0.003, 0.003, Decision.NON_INFERIOR, "ratio is exact", id="flat-same"),
        pytest.param(0.0, 0.0, Decision.NON_INFERIOR, "neither arm paid", id="both-free"),
        pytest.param(0.004, 0.0, Decision.HARM, "legacy answered for free", id="legacy-free"),
        pytest.param(
            0.0, 0.004, Decision.NON_INFERIOR, "production answered for free", id="prod-free"
        ),
    ],
)
def test_free_or_flat_priced_arms_are_decided_not_left_open(
    production: float, legacy: float, decision: Decision, words: str
) -> None:
    """Zero variance or zero mean left the mSPRT inconclusive forever (and a 10x dearer
    production was promoted at the maximum duration)."""
    n = 20000
    result = sq.cost_test(_flat(n, production), _flat(n, legacy), 1.3, 0.01 / 6)
    assert result.decision is decision, result.reason
    assert words in result.reason
    paired = sq.paired_cost_test(
        sq.PairedMoments.of(np.full(n, production), np.full(n, legacy)), 1.3, 0.01 / 6
    )
    assert paired.decision is decision, paired.reason


def test_a_free_legacy_against_a_sometimes_paid_production_uses_a_count_test() -> None:
    rng = np.random.default_rng(12)
    legacy = np.zeros(19000)
    for paid_share, decision in ((0.2, Decision.HARM), (0.0005, Decision.INCONCLUSIVE)):
        prod = np.where(rng.random(1000) < paid_share, 0.004, 0.0)
        paid = (float((prod > 0).sum()), 0.0)
        result = sq.cost_test(sq.Moments.of(prod), sq.Moments.of(legacy), 1.3, 0.01 / 6, paid=paid)
        assert result.decision is decision, result.reason
        assert result.e_process and "count test of paid answers" in result.reason
        pairs = sq.PairedMoments.of(prod, legacy[:1000])
        shadow = sq.paired_cost_test(pairs, 1.3, 0.01 / 6, paid_only=paid)
        assert shadow.decision is decision, shadow.reason
    # exact, proportional prices over pairs: the ratio is known without noise
    c_l = rng.lognormal(-6.3, 0.4, 2000)
    dearer = sq.paired_cost_test(sq.PairedMoments.of(1.5 * c_l, c_l), 1.3, 0.01 / 6)
    assert dearer.decision is Decision.HARM and dearer.estimate == pytest.approx(1.5)


def test_a_flat_priced_production_ten_times_dearer_is_not_promoted_at_max_duration() -> None:
    from datetime import UTC, datetime, timedelta

    from checks.policy import decide
    from checks.thresholds import GateSpec, MaxDurationPolicy
    from checks.verdict import Verdict

    th = Thresholds()
    n = 20000
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    spec = GateSpec(
        1,
        "ab_test",
        50,
        0,
        th,
        2000,
        7 * 86400,
        14 * 86400,
        t0,
        t0 + timedelta(days=14),
        on_max_duration=MaxDurationPolicy.PROMOTE,
    )

    def arm(price: float) -> sq.ArmSummary:
        latency = sq.Moments(n, n * 5.0, n * 25.0 + n * 0.25 * 0.999)
        return sq.ArmSummary(_bern(n, 100), latency, _flat(n, price), float(n))

    records = sq.to_records(sq.evaluate_arms(arm(0.004), arm(0.0004), th), th)
    verdict, reason = decide(spec, records, n)
    assert verdict is Verdict.ROLLBACK and "harm in cost" in reason, reason


# -- the tail: latency_p95 -------------------------------------------------------------------


def _tail_counts(
    production: np.ndarray, legacy: np.ndarray, ratio: float, alpha: float
) -> sq.TailCounts:
    """What the gate's SQL computes (`checks.gate.latency_tail_counts`), in numpy."""
    n_l = legacy.size
    top = np.sort(legacy)[::-1]
    rank_hi, rank_lo = sq.tail_ranks(n_l, alpha / 2)
    rank_mid = math.floor(n_l * sq.TAIL_SHARE) + 1

    def at(rank: int) -> float | None:
        return float(top[rank - 1]) if 1 <= rank <= n_l else None

    q_hi, q_mid, q_lo = at(rank_hi), at(rank_mid), at(rank_lo)

    def over(q: float | None, none: float) -> int:
        return int((production > (none if q is None else q * ratio)).sum())

    return sq.TailCounts(
        n_l,
        production.size,
        q_hi,
        q_mid,
        q_lo,
        over(q_hi, math.inf),
        over(q_mid, math.inf),
        over(q_lo, 0.0),
    )


def test_tail_ranks_invert_the_binomial_confidence_sequence() -> None:
    for n in (0, 1, 50, 1000, 4000, 100_000):
        hi, lo = sq.tail_ranks(n, 0.001)
        k = np.arange(n + 1)
        low, up = sq.binomial_cs(k, np.full(n + 1, n), 0.001)
        assert hi == (k[up < 0.05].max() + 1 if (up < 0.05).any() else 0)
        assert lo == (k[low > 0.05].min() if (low > 0.05).any() else n + 1)
    assert sq.tail_ranks(np.array([1000, 4000]), 0.001)[0].tolist() == [
        sq.tail_ranks(1000, 0.001)[0],
        sq.tail_ranks(4000, 0.001)[0],
    ]


def test_tail_ranks_bracket_the_true_p95_at_every_look() -> None:
    rng = np.random.default_rng(21)
    runs, alpha = 400, 0.05
    x = rng.lognormal(5.0, 0.5, (runs, 3000))
    q = math.exp(5.0 + 0.5 * stats.norm.ppf(0.95))
    missed = np.zeros(runs, dtype=bool)
    for n in range(100, 3001, 100):
        top = -np.sort(-x[:, :n], axis=1)
        hi, lo = sq.tail_ranks(n, alpha)
        if hi >= 1:
            missed |= top[:, hi - 1] < q
        if lo <= n:
            missed |= top[:, lo - 1] > q
    assert missed.mean() <= alpha


def test_the_tail_check_sees_a_p95_the_mean_log_latency_misses() -> None:
    """Most requests a bit faster, one in ten much slower: the mean log latency is no
    higher (the latency test says non-inferior), the p95 about doubles."""
    rng = np.random.default_rng(1)
    n, a = 4000, 0.01 / 6
    legacy = rng.lognormal(math.log(150), 0.5, n)
    slow = rng.random(n) < 0.10
    tail = np.where(
        slow, rng.lognormal(math.log(700), 0.3, n), rng.lognormal(math.log(120), 0.45, n)
    )
    same = rng.lognormal(math.log(150), 0.5, n)
    mean_test = sq.latency_test(sq.Moments.of(np.log(tail)), sq.Moments.of(np.log(legacy)), 1.25, a)
    assert mean_test.decision is Decision.NON_INFERIOR
    harm = sq.latency_tail_test(_tail_counts(tail, legacy, 1.25, a), 1.25, a)
    assert harm.decision is Decision.HARM, harm.reason
    assert harm.lower is not None and harm.lower > 0.05
    assert "legacy's p95" in harm.reason and "e-value" not in harm.reason
    fine = sq.latency_tail_test(_tail_counts(same, legacy, 1.25, a), 1.25, a)
    assert fine.decision is Decision.NON_INFERIOR, fine.reason
    early = sq.latency_tail_test(_tail_counts(tail[:50], legacy[:50], 1.25, a), 1.25, a)
    assert early.decision is Decision.INCONCLUSIVE, early.reason
    record = sq.to_record(harm)
    assert record.metric_mode == "abort" and record.critical and record.e_value is None


def test_an_open_tail_check_holds_only_while_the_observed_p95_ratio_breaks_the_margin() -> None:
    """Non-inferiority of the tail takes ~10x the data of the mean test; until then the
    phase holds only if the observed share slower than 1.25 x legacy's p95 is over 5 %."""
    rng = np.random.default_rng(8)
    a = 0.01 / 6
    legacy = rng.lognormal(5.0, 0.5, 2000)
    same = sq.latency_tail_test(
        _tail_counts(rng.lognormal(5.0, 0.5, 400), legacy, 1.25, a), 1.25, a
    )
    worse = sq.latency_tail_test(
        _tail_counts(rng.lognormal(5.0 + math.log(1.5), 0.5, 60), legacy, 1.25, a), 1.25, a
    )
    assert same.decision is worse.decision is Decision.INCONCLUSIVE
    assert same.estimate is not None and same.estimate <= 0.05 < worse.estimate
    assert not sq.to_record(same).critical and "not holding" in same.reason
    assert sq.to_record(worse).critical and "holding: the observed" in worse.reason


def test_the_tail_check_keeps_alpha_at_the_margin_under_repeated_looks() -> None:
    """The worst case of its null: production's p95 exactly max_p95_ratio x legacy's
    (5 % of production slower than 1.25 x legacy's true p95), twenty looks, vectorised
    over runs as `latency_tail_test` decides harm."""
    rng = np.random.default_rng(5)
    runs, alpha = 1000, 0.05
    prod = rng.lognormal(5.0 + math.log(1.25), 0.5, (runs, 2000))
    legacy = rng.lognormal(5.0, 0.5, (runs, 8000))
    harm = np.zeros(runs, dtype=bool)
    for k in range(1, 21):
        n_p, n_l = 100 * k, 400 * k
        rank_hi, _ = sq.tail_ranks(n_l, alpha / 2)
        if rank_hi < 1:
            continue
        q_hi = -np.partition(-legacy[:, :n_l], rank_hi - 1, axis=1)[:, rank_hi - 1]
        over = (prod[:, :n_p] > 1.25 * q_hi[:, None]).sum(axis=1)
        lower, _ = sq.binomial_cs(over, np.full(runs, n_p), alpha / 2)
        harm |= lower > sq.TAIL_SHARE
    assert harm.mean() <= alpha


def test_the_mean_guardrail_bounds_keep_alpha_where_a_point_estimate_does_not() -> None:
    """Cost per request exactly at the limit (log-normal, skewed like real prices), looked
    at every 50 requests up to 3,000: the lower bound of `mean_cs` crosses the limit in
    at most alpha of the runs, where "the running mean is over the limit" does in most."""
    rng = np.random.default_rng(11)
    runs, alpha, sigma = 1000, 0.05, 0.8
    limit = 0.002  # the true mean
    cost = rng.lognormal(math.log(limit) - sigma**2 / 2, sigma, (runs, 3000))
    n = np.arange(1, 3001)
    means = cost.cumsum(axis=1) / n
    variances = ((cost**2).cumsum(axis=1) - n * means**2) / np.maximum(n - 1, 1)
    bound_breach = np.zeros(runs, dtype=bool)
    point_breach = np.zeros(runs, dtype=bool)
    for look in range(99, 3000, 50):  # from 100 requests on: the gate's burn-in
        low, _ = sq.mean_cs(look + 1, means[:, look], variances[:, look], alpha, 0.1 * limit)
        bound_breach |= low > limit
        point_breach |= means[:, look] > limit
    assert bound_breach.mean() <= alpha, bound_breach.mean()
    assert point_breach.mean() > 0.5, point_breach.mean()


def test_coarse_scores_do_not_fool_the_mean_guardrail_bounds() -> None:
    """Quality scores take few values (0.8 nine times in ten, else 1.0: mean 0.82, over
    a 0.815 limit). Early runs of equal scores have sample variance 0, and bounds on
    that plug-in variance crossed the limit in ~4 % of phases at the gate's alpha share;
    the variance floor the gate passes (tau squared) keeps them at or under alpha."""
    rng = np.random.default_rng(2)
    runs, n_max, alpha, limit = 2000, 400, 0.01 / 7, 0.815
    tau = 0.1 * limit
    scores = np.where(rng.random((runs, n_max)) < 0.9, 0.8, 1.0)
    n = np.arange(1, n_max + 1)
    means = scores.cumsum(axis=1) / n
    variances = np.maximum(((scores**2).cumsum(axis=1) - n * means**2) / np.maximum(n - 1, 1), 0)
    breached = {0.0: np.zeros(runs, dtype=bool), tau * tau: np.zeros(runs, dtype=bool)}
    for look in range(29, n_max, 10):  # from the gate's 30 values on
        for floor, hit in breached.items():
            _, high = sq.mean_cs(
                look + 1, means[:, look], variances[:, look], alpha, tau, min_variance=floor
            )
            hit |= high < limit
    assert breached[tau * tau].mean() <= alpha
    assert breached[0.0].mean() > 10 * alpha  # what the floor prevents


def test_mean_bounds_tighten_with_data_and_collapse_on_a_constant() -> None:
    wide = sq.mean_cs(100, 0.5, 0.04, 0.01, 0.05)
    narrow = sq.mean_cs(10_000, 0.5, 0.04, 0.01, 0.05)
    assert wide[0] < narrow[0] < 0.5 < narrow[1] < wide[1]
    assert sq.mean_cs(500, 0.001, 0.0, 0.01, 1e-4) == (0.001, 0.001)  # flat price: exact


def test_optional_guardrails_take_their_share_of_alpha() -> None:
    """Setting a cost or quality limit adds a check that can roll back, so every check's
    share shrinks: the phase's chance of any false rollback stays <= alpha."""
    plain = Thresholds(alpha=0.012)
    both = Thresholds(alpha=0.012, max_cost_per_request_usd=0.01, min_mean_quality=0.5)
    assert sq.rollback_checks(plain) == sq.ROLLBACK_CHECKS
    assert sq.rollback_checks(both)[-2:] == ("cost_per_request", "mean_quality")
    assert sq.phase_metric_alpha(plain) == pytest.approx(0.002)
    assert sq.phase_metric_alpha(both) == pytest.approx(0.0015)
    assert sq.phase_metric_alpha(Thresholds(alpha=0.012, min_mean_quality=0.0)) == pytest.approx(
        0.012 / 7
    )


# -- the SQL that feeds them ----------------------------------------------------------------


def test_sufficient_statistics_sql() -> None:
    rng = np.random.default_rng(8)
    con = duckdb.connect()
    con.execute(
        "CREATE TABLE requests (request_id VARCHAR, primary_request_id VARCHAR, "
        "config_version BIGINT, arm VARCHAR, is_shadow BOOLEAN, outcome VARCHAR, "
        "latency_ms DOUBLE, cost_usd DOUBLE, router_instance VARCHAR DEFAULT 'i', "
        "ts TIMESTAMPTZ DEFAULT now())"
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
    con.executemany(
        "INSERT INTO requests (request_id, primary_request_id, config_version, arm, is_shadow, "
        "outcome, latency_ms, cost_usd) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        rows,
    )

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
    assert legacy.cost_paid == ok_l.sum()  # every answer here costs something

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
    assert shadow.cost_paid_only == (0.0, 0.0)  # both sides of every pair paid
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


def test_a_tiny_ratio_margin_is_inconclusive_instead_of_overflowing() -> None:
    """max_p95_ratio 1.0001 is a valid plan value; its mixture scale is so small that an
    early bound's exponent overflowed math.exp and stopped the gate."""
    rng = np.random.default_rng(3)
    prod = sq.Moments.of(np.log(rng.lognormal(5, 1.5, 40)))
    legacy = sq.Moments.of(np.log(rng.lognormal(5, 1.5, 400)))
    latency = sq.latency_test(prod, legacy, 1.0001, 0.01)
    assert latency.decision is Decision.INCONCLUSIVE and math.isfinite(latency.upper)
    # the bound's exponent is past what math.exp can take (> 709): it saturates
    assert latency.upper == pytest.approx(math.exp(700.0))


# -- pinned by a mutation audit: each test fails on a plausible one-token bug -------------
def test_error_rate_bounds_are_the_per_arm_sequences_at_half_alpha() -> None:
    """`up - ul` for `up - ll` made the upper bound 0 for equal arms at any n: the
    error rate was "non-inferior" with no evidence, and the phase could promote."""
    a = 0.01
    result = sq.error_rate_test(_bern(2000, 40), _bern(20000, 400), 0.02, a)
    lp, up = sq.binomial_cs(40, 2000, a / 2)
    ll, ul = sq.binomial_cs(400, 20000, a / 2)
    assert (result.lower, result.upper) == pytest.approx((lp - ul, up - ll))
    same = sq.error_rate_test(_bern(200, 4), _bern(200, 4), 0.02, a)
    assert same.decision is Decision.INCONCLUSIVE
    assert same.upper is not None and same.upper > 0.02


def test_the_gate_counts_paid_answers_when_legacy_is_free() -> None:
    """Only `cost_test` used the count of paid answers: through `evaluate_arms` a free
    legacy against a dearer production stayed inconclusive, and promoted at max duration."""
    rng = np.random.default_rng(3)
    prod_cost = np.where(rng.random(1000) < 0.2, 0.004, 0.0)
    latency = sq.Moments.of(rng.normal(5.0, 0.5, 1000))

    def arm(cost: np.ndarray, n: int) -> sq.ArmSummary:
        return sq.ArmSummary(_bern(n, 0), latency, sq.Moments.of(cost), float((cost > 0).sum()))

    results = sq.evaluate_arms(arm(prod_cost, 1000), arm(np.zeros(19000), 19000), Thresholds())
    cost = next(r for r in results if r.metric == "cost")
    assert cost.decision is Decision.HARM, cost.reason


def test_the_p95_harm_bound_counts_above_legacys_upper_p95_bound() -> None:
    """Harm from requests slower than ratio x legacy's *lower* p95 bound rolled back a
    production whose p95 may well be within the margin."""
    counts = sq.TailCounts(20000, 2000, 410.0, 400.0, 390.0, over_hi=0, over_mid=0, over_lo=2000)
    assert sq.latency_tail_test(counts, 1.2, 0.01).decision is not Decision.HARM


def test_the_latency_variance_floor_lifts_the_smaller_arm_only() -> None:
    """The floor on the larger arm made a small canary's tight variance overconfident."""
    small = sq.Moments.of(np.r_[np.full(25, 4.9), np.full(25, 5.1)])  # variance ~0.0102
    large = sq.Moments.of(np.r_[np.full(500, 4.0), np.full(500, 6.0)])  # variance ~1.001
    _, variance = sq.log_mean_difference(small, large)
    assert variance == pytest.approx(large.variance / 50 + large.variance / 1000)


def test_only_answered_requests_enter_the_p95_tail_test() -> None:
    """Timeouts (30 s of waiting) counted as latencies: a production arm timing out more
    looked slower at the p95 although its answers were not."""
    con = duckdb.connect()
    con.execute(
        "CREATE TABLE requests AS SELECT * FROM (VALUES "
        "(1, 'production', false, 'ok', 120.0), (1, 'production', false, 'timeout', 30000.0), "
        "(1, 'legacy', false, 'ok', 110.0), (1, 'legacy', true, 'ok', 90.0)) "
        "t(config_version, arm, is_shadow, outcome, latency_ms)"
    )
    rows = con.execute(sq.ARM_TAIL_SAMPLES_SQL, {"version": 1}).fetchall()
    assert sorted(rows) == [("legacy", 110.0), ("production", 120.0)]
