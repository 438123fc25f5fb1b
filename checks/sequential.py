"""Anytime-valid sequential tests: production against legacy, valid at every look.

A fixed-sample test re-run at every evaluation inflates false alarms (Kayenta's judge:
Netflix measured 66 false rejections in 100 no-change simulations). Every test here is
an e-process: a nonnegative (super)martingale under its null, so by Ville's inequality
P(it ever reaches 1/alpha) <= alpha however often, and whenever, the gate looks
(Johari et al. 2017/2022 "Always valid inference"; Howard et al. 2021 "Time-uniform,
nonparametric, nonasymptotic confidence sequences"; Lindon & Malek 2022 "Anytime-valid
inference for multinomial count data"; Lindon et al. KDD 2022 "Rapid regression
detection in software deployments through sequential testing").

Every metric is judged by two one-sided tests:

* **harm detected**: production is worse than legacy *at all* (the null "production is
  not worse", effect <= 0, is rejected). The bar is zero, not the margin, so a
  regression smaller than the margin (error rate 1 % -> 2 % against a 2-point margin)
  still rolls back: the gate never promotes a balancer it has seen to be worse.
* **non-inferior**: production is not worse by the margin or more (the null "effect >=
  margin" is rejected, i.e. the upper confidence-sequence bound is below the margin).

Harm wins when both hold (worse, though by less than the margin). Neither: inconclusive.
Each bound holds with probability >= 1 - alpha at all times simultaneously (for latency
and cost the lower and the upper bound each on its own: both at once, 1 - 2 alpha).
latency_p95 is the exception to "the bar is zero": it bounds the tail against the margin
itself (harm: production's p95 above max_p95_ratio x legacy's).

Sufficient statistics (computed in SQL, `ARM_MOMENTS_SQL` and `SHADOW_MOMENTS_SQL`; every
test is O(1) in them):

* error_rate: per arm n and failures (outcome error, timeout or rate_limited). Shadow:
  n pairs, sum and sum of squares of d = f_prod - f_legacy (they give the discordant
  counts: (sum d^2 + sum d)/2 production-only and (sum d^2 - sum d)/2 legacy-only failures).
* latency: per arm n, sum and sum of squares of ln(latency_ms), answered requests only.
  Shadow: n, sum and sum of squares of d = ln(latency_prod) - ln(latency_legacy), over
  pairs where both answered.
* cost: per arm n, sum and sum of squares of cost_usd, answered requests only (a refusal
  costs nothing and buys nothing). Shadow, over pairs where both answered: n, sums and sums of
  squares of c_prod and c_legacy and the sum of c_prod * c_legacy (the ratio margin
  needs the arms' means, not only their difference). Plus the answered requests that
  cost anything (shadow: pairs where only one side paid), for free legacy arms.
* latency_p95: order statistics of legacy's answered latencies and counts of production's
  above a threshold (`TAIL_LEGACY_SQL`, `TAIL_PRODUCTION_SQL`), same rows as latency.

Methods:

* error_rate, harm: the count test of Lindon & Malek (condition on the failures and ask
  which arm each came from), with a half-normal mixture on log RR in place of their
  Dirichlet. With requests assigned to
  production with probability rho, each failure comes from production with probability
  theta = rho*RR / (rho*RR + 1 - rho), RR = p_prod / p_legacy, independently of the
  others and of the legacy rate (which may drift). H0: RR <= 1 <=> theta <= rho. The
  e-process is a mixture of likelihood ratios over log RR ~ half-normal(scale),
  discretised on a grid (any probability weights keep it a test supermartingale):
  E = sum_j w_j (theta_j/rho)^X ((1-theta_j)/(1-rho))^(F-X), X production failures of F.
  It is exact (no asymptotics) for a known rho; by default rho is the realised share
  n_prod / (n_prod + n_legacy), a plug-in that follows the split users actually got
  (bucketing is per user, so the request share drifts from the configured percent): not
  exact, but its error, O(1/sqrt(n)), is small against the test's resolution,
  O(1/sqrt(F)); the backtest's A/A runs use it this way.
  Shadow: the same test on discordant pairs (McNemar's idea), rho = 1/2 exactly.
* error_rate, interval and non-inferiority: per-arm beta-binomial mixture confidence
  sequences (Robbins 1970; Howard et al. 2021), Jeffreys prior, alpha/2 each:
  {p : B(S+1/2, n-S+1/2)/B(1/2,1/2) / (p^S (1-p)^(n-S)) < 2/alpha}; the difference's
  upper bound is U_prod - L_legacy. Shadow: the same on P(d=+1) and P(d=-1).
* latency and cost: one-sided mSPRT with a half-normal mixing distribution (Johari et
  al.) on an asymptotically normal estimate x with plug-in variance V:
  log E = log 2 - log(1 + tau^2/V)/2 + u^2/2 + log Phi(u), u = x tau / sqrt(V (V + tau^2)).
  Inverting it gives the bounds x -/+ u* sqrt(V (V + tau^2))/tau with
  u*^2/2 + log Phi(u*) = log(1/(2 alpha)) + log(1 + tau^2/V)/2.
  latency: x = mean ln(latency) difference; the p95 ratio margin maps to ln(max_p95_ratio)
  exactly when production's log-latency distribution is legacy's shifted (same shape:
  every quantile, p95 included, moves by the same factor); a change of spread alone is
  left to latency_p95. cost: x = ln(mean_prod / mean_legacy)
  (delta method), margin ln(max_cost_ratio), at alpha/2; free or flat-priced arms (mean
  or variance 0, where the mSPRT cannot decide) are decided exactly, or for a free legacy
  by the count test on paid requests at the other alpha/2 (`_degenerate_cost`). The
  plug-in variance makes these
  asymptotic; a burn-in of `min_n` per arm and a variance floor (the small arm's
  variance never below the large arm's) keep early looks honest (checked by A/A
  simulation in the tests and the backtest).
* latency_p95: the share s of production requests slower than max_p95_ratio x legacy's
  p95 is above 5 % exactly when the p95 ratio breaks the margin. Legacy's p95 is
  bracketed by two order statistics (`tail_ranks`, a confidence sequence for a quantile
  from `binomial_cs`), and s is bounded by `binomial_cs` on production's counts above
  each end, the conservative end for each verdict (`latency_tail_test`). Harm is
  anytime-valid; until non-inferiority is shown (it takes ~10x the mean test's data),
  the check holds the phase only while the observed p95 ratio breaks the margin.

Requests of one user are not independent (same questions, same backends, a heavy user's
many requests), and the split is sticky by user: per-request variances understate the
noise by the design effect 1 + (m - 1) ICC. A statistics review measured A/A false
rollbacks of 3-25 % (up to 55 % with few or heavy users) against the 1 % promised. So
canary and A/B phases are judged on effective sample sizes (`clustered`): each arm's
cluster-robust variance over its buckets (`subject_bucket` holds whole users) against
the per-request one gives a design effect d >= 1, and the arm's counts are divided by d
(one common d for the error count test, which compares the arms' shares). Below
`MIN_BUCKETS` buckets in an arm, d is the worst case, the request-weighted bucket size.
Shadow pairs (the same request on both balancers) cancel the user's own effect and stay
per request.
The phase's alpha is split evenly (Bonferroni) over the checks that can roll back
(`rollback_checks`: these four, the error-rate and p95 guardrails, and the cost and
quality guardrails when the plan sets them), so the chance of *any* false rollback over
the whole phase stays <= alpha.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import special

from checks.thresholds import CRITICAL_METRICS, SEQUENTIAL_METRICS, MetricMode, Thresholds
from checks.verdict import Decision, MetricRecord
from router.record import SHADOW_PAIRS_SQL

Num = float | npt.NDArray[np.float64]

#: Metrics whose detected harm rolls back by default (one list for the whole gate).
CRITICAL = tuple(m for m in CRITICAL_METRICS if m in SEQUENTIAL_METRICS)
#: Defaults, chosen by the backtest (`checks.backtest`): scale of the half-normal mixing
#: distribution on log RR for error rates; latency and cost mix at the scale of their
#: margin (tau = ln ratio margin), where effects start to matter.
ERROR_LOG_RR_SCALE = 1.0
#: Burn-in of the plug-in-variance tests: no decision before this many rows per arm.
MIN_N = 30
_GRID = 64

# Failures as in `checks.frames.FAILURE_SQL` (a 4xx "rejected" is the caller's fault).
ARM_MOMENTS_SQL = """
SELECT arm,
       count(*)                                                   AS n,
       count(*) FILTER (WHERE outcome IN ('error', 'timeout', 'rate_limited')) AS failures,
       count(*) FILTER (WHERE outcome = 'ok' AND latency_ms > 0)  AS n_latency,
       sum(ln(latency_ms)) FILTER (WHERE outcome = 'ok' AND latency_ms > 0) AS sum_log_latency,
       sum(ln(latency_ms) ^ 2) FILTER (WHERE outcome = 'ok' AND latency_ms > 0)
                                                                  AS sum_log_latency_sq,
       count(*) FILTER (WHERE outcome = 'ok')                     AS n_cost,
       sum(cost_usd) FILTER (WHERE outcome = 'ok')                AS sum_cost,
       sum(cost_usd ^ 2) FILTER (WHERE outcome = 'ok')            AS sum_cost_sq,
       count(*) FILTER (WHERE outcome = 'ok' AND cost_usd > 0)    AS n_cost_paid
FROM requests
WHERE config_version = ? AND NOT is_shadow
GROUP BY arm
"""
"""Per-arm sufficient statistics of the served (non-shadow) rows of one config version.

Latency and cost are over answered requests only: a 429 refused in 3 ms for free is
neither fast nor cheap service (failures are the error metric's business). Counting
them let an arm that was rate-limited more look faster and cheaper, and the other roll
back for "harm" in latency or cost."""

SHADOW_MOMENTS_SQL = (
    """
WITH pairs AS (
"""
    + SHADOW_PAIRS_SQL.format(
        table="requests",
        columns="""
           CASE WHEN s.outcome IN ('error', 'timeout', 'rate_limited') THEN 1.0 ELSE 0.0 END
               AS f_p,
           CASE WHEN p.outcome IN ('error', 'timeout', 'rate_limited') THEN 1.0 ELSE 0.0 END
               AS f_l,
           CASE WHEN s.outcome = 'ok' AND p.outcome = 'ok'
                THEN ln(greatest(s.latency_ms, 1e-3)) - ln(greatest(p.latency_ms, 1e-3))
           END AS d_log_latency,
           CASE WHEN s.outcome = 'ok' AND p.outcome = 'ok' THEN s.cost_usd END AS c_p,
           CASE WHEN s.outcome = 'ok' AND p.outcome = 'ok' THEN p.cost_usd END AS c_l""",
        where="AND s.config_version = ?",
    )
    + """
)
SELECT count(*) AS n, count(d_log_latency) AS n_latency, count(c_p) AS n_cost,
       sum(f_p - f_l) AS sum_d_fail, sum((f_p - f_l) ^ 2) AS sum_d_fail_sq,
       sum(d_log_latency) AS sum_d_log_latency, sum(d_log_latency ^ 2) AS sum_d_log_latency_sq,
       sum(c_p) AS sum_cost_p, sum(c_l) AS sum_cost_l,
       sum(c_p ^ 2) AS sum_cost_pp, sum(c_l ^ 2) AS sum_cost_ll, sum(c_p * c_l) AS sum_cost_pl,
       count(*) FILTER (WHERE c_p > 0 AND c_l = 0) AS n_cost_paid_production_only,
       count(*) FILTER (WHERE c_l > 0 AND c_p = 0) AS n_cost_paid_legacy_only
FROM pairs
"""
)
"""Paired sufficient statistics of shadow executions (production shadow minus legacy
primary of the same request) of one config version."""


#: Buckets with data an arm needs before its design effect is estimated: with fewer,
#: the cluster-robust variance is itself too noisy (a review's 500-user canary had ~25),
#: and the worst case (each bucket counts as one request) is used instead.
MIN_BUCKETS = 20

# Per-arm sums over buckets (`clustered`), with the filters of ARM_MOMENTS_SQL.
ARM_CLUSTER_SQL = """
WITH b AS (
    SELECT arm, subject_bucket,
           count(*)::DOUBLE AS n,
           (count(*) FILTER (WHERE outcome IN ('error', 'timeout', 'rate_limited')))::DOUBLE
               AS f,
           (count(*) FILTER (WHERE outcome = 'ok' AND latency_ms > 0))::DOUBLE AS n_lat,
           sum(ln(latency_ms)) FILTER (WHERE outcome = 'ok' AND latency_ms > 0) AS y_lat,
           (count(*) FILTER (WHERE outcome = 'ok'))::DOUBLE AS n_cost,
           sum(cost_usd) FILTER (WHERE outcome = 'ok') AS y_cost
    FROM requests
    WHERE config_version = ? AND NOT is_shadow
    GROUP BY arm, subject_bucket
)
SELECT arm,
       count(*) AS failures_g, sum(f * f) AS failures_yy, sum(f * n) AS failures_yn,
       sum(n * n) AS failures_nn,
       count(*) FILTER (WHERE n_lat > 0) AS latency_g, sum(y_lat * y_lat) AS latency_yy,
       sum(y_lat * n_lat) AS latency_yn, sum(n_lat * n_lat) AS latency_nn,
       count(*) FILTER (WHERE n_cost > 0) AS cost_g, sum(y_cost * y_cost) AS cost_yy,
       sum(y_cost * n_cost) AS cost_yn, sum(n_cost * n_cost) AS cost_nn
FROM b
GROUP BY arm
"""


# -- sufficient statistics ---------------------------------------------------------------


@dataclass(frozen=True)
class Moments:
    """n, sum and sum of squares of one sample (fields may be numpy arrays: one entry per
    simulated run or look, which is how the backtest evaluates thousands at once)."""

    n: Num
    total: Num
    total_sq: Num

    @classmethod
    def of(cls, values: npt.ArrayLike) -> Moments:
        x = np.asarray(values, dtype=float)
        return cls(float(x.size), float(x.sum()), float((x * x).sum()))

    @property
    def mean(self) -> Num:
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.divide(self.total, self.n)

    @property
    def variance(self) -> Num:
        """Unbiased sample variance (nan below two rows), clipped at zero against rounding."""
        n = np.asarray(self.n, dtype=float)
        with np.errstate(divide="ignore", invalid="ignore"):
            ss = np.asarray(self.total_sq) - np.asarray(self.total) ** 2 / n
            out = np.where(n >= 2, np.maximum(ss, 0.0) / (n - 1), np.nan)
        return out if out.ndim else float(out)


@dataclass(frozen=True)
class PairedMoments:
    """Second moments of pairs (production x_p, legacy x_l) for the same request: n,
    sums, sums of squares and the cross-product. The differences' n, sum and sum of
    squares follow; only the cost ratio needs the arms' own means."""

    n: Num
    sum_p: Num
    sum_l: Num
    sum_pp: Num
    sum_ll: Num
    sum_pl: Num

    @classmethod
    def of(cls, production: npt.ArrayLike, legacy: npt.ArrayLike) -> PairedMoments:
        p = np.asarray(production, dtype=float)
        q = np.asarray(legacy, dtype=float)
        return cls(
            float(p.size),
            float(p.sum()),
            float(q.sum()),
            float((p * p).sum()),
            float((q * q).sum()),
            float((p * q).sum()),
        )

    @classmethod
    def from_differences(cls, n: Num, sum_d: Num, sum_d_sq: Num) -> PairedMoments:
        """Pairs known only through d = x_p - x_l (enough for error rate and latency)."""
        zero = np.zeros_like(np.asarray(n, dtype=float))
        return cls(n, sum_d, zero, sum_d_sq, zero, zero)

    @property
    def differences(self) -> Moments:
        return Moments(
            self.n,
            np.asarray(self.sum_p) - np.asarray(self.sum_l),
            np.asarray(self.sum_pp) - 2 * np.asarray(self.sum_pl) + np.asarray(self.sum_ll),
        )


# -- the e-processes -----------------------------------------------------------------------


def normal_mixture_log_e(x: Num, variance: Num, tau: float) -> Num:
    """log e-value of the one-sided mSPRT of H0: effect <= 0 given an (asymptotically)
    normal estimate x with variance V: the N(0, tau^2) mixture restricted to positive
    effects (twice the half-normal), in closed form (Johari et al.). Because the mixture
    only puts mass on effects > 0, it is a supermartingale for every effect <= 0."""
    x = np.asarray(x, dtype=float)
    v = np.asarray(variance, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = tau * tau / v
        u = x / np.sqrt(v) * np.sqrt(r / (1.0 + r))
        out = math.log(2.0) - 0.5 * np.log1p(r) + 0.5 * u * u + special.log_ndtr(u)
    out = np.where(np.isfinite(out), out, 0.0)
    return out if out.ndim else float(out)


def normal_mixture_radius(variance: Num, tau: float, alpha: float) -> Num:
    """Half-width of the one-sided (1 - alpha) bound got by inverting
    `normal_mixture_log_e`: x - radius is a lower confidence sequence for the effect."""
    v = np.asarray(variance, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = tau * tau / v
        c = math.log(1.0 / (2.0 * alpha)) + 0.5 * np.log1p(r)
        lo, hi = np.sqrt(2.0 * c), np.sqrt(2.0 * (c + math.log(2.0)))
        for _ in range(60):  # h(u) = u^2/2 + log Phi(u) is increasing: bisection
            mid = 0.5 * (lo + hi)
            above = 0.5 * mid * mid + special.log_ndtr(mid) >= c
            hi = np.where(above, mid, hi)
            lo = np.where(above, lo, mid)
        out = hi * np.sqrt(v) * np.sqrt((1.0 + r) / r)
    return out if out.ndim else float(out)


def _rr_grid(scale: float) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Midpoint grid on log RR in (0, 5 scale] with half-normal(scale) probability weights."""
    step = 5.0 * scale / _GRID
    lam = (np.arange(_GRID) + 0.5) * step
    w = np.exp(-0.5 * (lam / scale) ** 2)
    return lam, np.log(w / w.sum())


def count_log_e(x: Num, f: Num, theta0: Num, scale: float = ERROR_LOG_RR_SCALE) -> Num:
    """log e-value of the count test (Lindon & Malek) of H0: RR <= 1 from X events of F
    falling in production, where under RR = 1 each event falls there with probability
    theta0: a discretised half-normal mixture over log RR of Bernoulli likelihood ratios,
    each a supermartingale for every RR <= 1, so the mixture is one too."""
    lam, logw = _rr_grid(scale)
    xa = np.asarray(x, dtype=float)[..., None]
    fa = np.asarray(f, dtype=float)[..., None]
    t0 = np.clip(np.asarray(theta0, dtype=float), 1e-12, 1 - 1e-12)[..., None]
    # log theta_j/theta0 and log (1-theta_j)/(1-theta0), theta_j = t0 e^lam/(t0 e^lam + 1 - t0)
    log_norm = np.logaddexp(np.log(t0) + lam, np.log1p(-t0))
    terms = logw + xa * (lam - log_norm) + (fa - xa) * (-log_norm)
    top = terms.max(axis=-1)
    out = top + np.log(np.exp(terms - top[..., None]).sum(axis=-1))
    return out if np.ndim(out) else float(out)


def binomial_log_ratio(successes: Num, n: Num, p: Num) -> npt.NDArray[np.float64]:
    """log of the beta-binomial (Jeffreys) mixture likelihood ratio against the Bernoulli
    mean p: an e-process for H0 "the mean is p", and the statistic `binomial_cs` inverts.
    Convex in p and in the count, so its level sets are intervals."""
    s = np.asarray(successes, dtype=float)
    m = np.asarray(n, dtype=float)
    log_marg = special.betaln(s + 0.5, m - s + 0.5) - special.betaln(0.5, 0.5)
    return np.asarray(log_marg - special.xlogy(s, p) - special.xlog1py(m - s, -np.asarray(p)))


def binomial_cs(successes: Num, n: Num, alpha: float) -> tuple[Num, Num]:
    """(lower, upper) of the beta-binomial mixture confidence sequence for a Bernoulli
    mean with a Jeffreys prior (Robbins 1970; Howard et al. 2021): the set of p whose
    mixture likelihood ratio stays below 1/alpha, valid at every n simultaneously."""
    s = np.asarray(successes, dtype=float)
    m = np.asarray(n, dtype=float)
    target = math.log(1.0 / alpha)

    def log_ratio(p: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        return binomial_log_ratio(s, m, p)

    with np.errstate(divide="ignore", invalid="ignore"):
        phat = np.where(m > 0, s / np.where(m > 0, m, 1.0), 0.5)
    bounds = []
    for edge in (0.0, 1.0):
        inside, outside = phat.copy(), np.full_like(phat, edge)
        for _ in range(60):
            mid = 0.5 * (inside + outside)
            out_mid = log_ratio(mid) >= target
            outside = np.where(out_mid, mid, outside)
            inside = np.where(out_mid, inside, mid)
        bounds.append(np.where(m > 0, outside, edge))
    lower, upper = bounds
    return (lower if lower.ndim else float(lower)), (upper if upper.ndim else float(upper))


#: The tail the latency_p95 check and the p95 guardrail bound: a p95 has 5 % above it.
TAIL_SHARE = 0.05


def tail_ranks(n: Num, alpha: float, share: float = TAIL_SHARE) -> tuple[Num, Num]:
    """Ranks from the top, (hi, lo), of the order statistics that bound a sample's upper
    `share` quantile q (its p95) at every n: with probability >= 1 - alpha, for all n at
    once, the hi-th largest value >= q >= the lo-th largest.

    Why: with K the count above q, K ~ Binomial(n, share) and `binomial_cs` covers share at
    every n. hi - 1 is the largest count whose upper bound is below `share`: if q were
    above the hi-th largest, K <= hi - 1 and the sequence would have missed. lo is the
    smallest count whose lower bound is above `share`, symmetrically. hi = 0 means no
    finite upper bound yet (+inf), lo = n + 1 no lower bound yet (0). Vectorised on n."""
    m = np.asarray(n, dtype=np.int64)
    target = math.log(1.0 / alpha)

    def outside(k: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
        return binomial_log_ratio(k, m, share) >= target

    # The log ratio is convex in the count with its minimum near n * share: the counts
    # outside the sequence are a prefix of [0, n share] and a suffix of [n share, n].
    # Bisect each; the invariants: `outside` holds at the prefix's lo (or lo = -1) and at
    # the suffix's hi (or hi = n + 1), and fails at the other end.
    lo, hi = np.full_like(m, -1), np.floor(m * share).astype(np.int64) + 1
    while np.any(hi - lo > 1):
        mid = (lo + hi) // 2
        step, out = hi - lo > 1, outside(mid)
        lo, hi = np.where(step & out, mid, lo), np.where(step & ~out, mid, hi)
    k_hi = lo
    lo, hi = np.ceil(m * share).astype(np.int64) - 1, m + 1
    while np.any(hi - lo > 1):
        mid = (lo + hi) // 2
        step, out = hi - lo > 1, outside(mid)
        lo, hi = np.where(step & ~out, mid, lo), np.where(step & out, mid, hi)
    k_lo = hi
    rank_hi, rank_lo = k_hi + 1, k_lo
    return (rank_hi if rank_hi.ndim else int(rank_hi)), (rank_lo if rank_lo.ndim else int(rank_lo))


# -- per-metric statistics (vectorised: the backtest calls exactly these) ------------------


def error_rate_harm_log_e(
    production: Moments,
    legacy: Moments,
    production_share: Num | None = None,
    scale: float = ERROR_LOG_RR_SCALE,
) -> Num:
    """Harm e-value for failure proportions (x = failure indicator, so total = failures).
    The share defaults to the realised n_prod / (n_prod + n_legacy): robust to a split that
    differs from the configured percent (users are bucketed, not requests)."""
    n_p, n_l = np.asarray(production.n, float), np.asarray(legacy.n, float)
    share = production_share
    if share is None:
        with np.errstate(divide="ignore", invalid="ignore"):
            share = np.where(n_p + n_l > 0, n_p / (n_p + n_l), 0.5)
    x = np.asarray(production.total, float)
    return count_log_e(x, x + np.asarray(legacy.total, float), share, scale)


def paired_error_harm_log_e(pairs: PairedMoments, scale: float = ERROR_LOG_RR_SCALE) -> Num:
    """Harm e-value for shadow failures: the count test on discordant pairs, theta0 = 1/2."""
    plus, minus = _discordant(pairs)
    return count_log_e(plus, plus + minus, 0.5, scale)


def _discordant(pairs: PairedMoments) -> tuple[Num, Num]:
    d = pairs.differences  # d in {-1, 0, 1}: sum d^2 = discordant, sum d = plus - minus
    s, q = np.asarray(d.total, float), np.asarray(d.total_sq, float)
    return np.rint((q + s) / 2), np.rint((q - s) / 2)


def log_mean_difference(production: Moments, legacy: Moments) -> tuple[Num, Num]:
    """(estimate, variance) of mean(x_prod) - mean(x_legacy), x = ln latency. The variance
    floor keeps the smaller arm's plug-in variance at or above the larger arm's."""
    v_p, v_l = np.asarray(production.variance), np.asarray(legacy.variance)
    n_p, n_l = np.asarray(production.n, float), np.asarray(legacy.n, float)
    small_p = n_p <= n_l
    v_p2 = np.where(small_p, np.fmax(v_p, v_l), v_p)
    v_l2 = np.where(small_p, v_l, np.fmax(v_l, v_p))
    est = np.asarray(production.mean) - np.asarray(legacy.mean)
    with np.errstate(divide="ignore", invalid="ignore"):
        var = v_p2 / n_p + v_l2 / n_l
    return est, var


def log_ratio_of_means(production: Moments, legacy: Moments) -> tuple[Num, Num]:
    """(estimate, variance) of ln(mean_prod / mean_legacy) by the delta method, with the
    same floor on the smaller arm's squared coefficient of variation."""
    m_p, m_l = np.asarray(production.mean), np.asarray(legacy.mean)
    n_p, n_l = np.asarray(production.n, float), np.asarray(legacy.n, float)
    with np.errstate(divide="ignore", invalid="ignore"):
        cv_p = np.asarray(production.variance) / (m_p * m_p)
        cv_l = np.asarray(legacy.variance) / (m_l * m_l)
        small_p = n_p <= n_l
        cv_p2 = np.where(small_p, np.fmax(cv_p, cv_l), cv_p)
        cv_l2 = np.where(small_p, cv_l, np.fmax(cv_l, cv_p))
        est = np.log(m_p / m_l)
        var = cv_p2 / n_p + cv_l2 / n_l
    return est, var


def paired_mean_difference(pairs: PairedMoments) -> tuple[Num, Num]:
    """(estimate, variance) of the mean paired difference (shadow latency on log scale)."""
    d = pairs.differences
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.asarray(d.mean), np.asarray(d.variance) / np.asarray(d.n, float)


def paired_log_ratio_of_means(pairs: PairedMoments) -> tuple[Num, Num]:
    """(estimate, variance) of ln(mean_prod / mean_legacy) over pairs (delta method with the
    pairs' covariance)."""
    n = np.asarray(pairs.n, float)
    with np.errstate(divide="ignore", invalid="ignore"):
        m_p, m_l = np.asarray(pairs.sum_p) / n, np.asarray(pairs.sum_l) / n
        s_pp = (np.asarray(pairs.sum_pp) - n * m_p * m_p) / (n - 1)
        s_ll = (np.asarray(pairs.sum_ll) - n * m_l * m_l) / (n - 1)
        s_pl = (np.asarray(pairs.sum_pl) - n * m_p * m_l) / (n - 1)
        var = (s_pp / m_p**2 + s_ll / m_l**2 - 2 * s_pl / (m_p * m_l)) / n
        return np.log(m_p / m_l), np.maximum(var, 0.0)


def normal_harm_log_e(est: Num, var: Num, tau: float, n_min: Num, min_n: int = MIN_N) -> Num:
    """Harm e-value of an asymptotically normal estimate, 1 (log 0) before the burn-in or
    while the variance is undefined: not looking never costs validity."""
    ok = (np.asarray(n_min) >= min_n) & np.isfinite(est) & np.isfinite(var) & (var > 0)
    safe_var = np.where(ok, var, 1.0)
    out = np.where(ok, normal_mixture_log_e(np.where(ok, est, 0.0), safe_var, tau), 0.0)
    return out if out.ndim else float(out)


def latency_harm_log_e(production: Moments, legacy: Moments, tau: float, min_n: int = MIN_N) -> Num:
    est, var = log_mean_difference(production, legacy)
    return normal_harm_log_e(est, var, tau, np.fmin(production.n, legacy.n), min_n)


def cost_harm_log_e(production: Moments, legacy: Moments, tau: float, min_n: int = MIN_N) -> Num:
    est, var = log_ratio_of_means(production, legacy)
    return normal_harm_log_e(est, var, tau, np.fmin(production.n, legacy.n), min_n)


# -- results --------------------------------------------------------------------------------


@dataclass(frozen=True)
class SequentialResult:
    """What one sequential test says, in the metric's own units (error: difference of
    rates; latency and cost: production / legacy ratio; latency_p95: share of slow
    requests). `log_e_value` is the harm e-process (H0: production not worse), if the
    test has one (`e_process`). The interval is a (1 - alpha) confidence sequence, or,
    with `one_sided_bounds`, a lower and an upper bound each valid at 1 - alpha on its
    own (both at once: 1 - 2 alpha)."""

    metric: str
    method: str
    decision: Decision
    log_e_value: float
    estimate: float | None
    lower: float | None
    upper: float | None
    n_legacy: int
    n_production: int
    alpha: float
    margin: float
    paired: bool = False
    note: str = ""
    details: dict[str, Any] = field(default_factory=dict)
    one_sided_bounds: bool = False
    e_process: bool = True
    #: Whether an inconclusive result holds the phase (in mode abort or pause).
    holds_while_open: bool = True

    @property
    def e_value(self) -> float:
        return math.exp(min(self.log_e_value, 700.0))

    @property
    def reason(self) -> str:
        cs = (
            f"[{self.lower:.4g}, {self.upper:.4g}]"
            if self.lower is not None and self.upper is not None
            else "n/a"
        )
        if self.one_sided_bounds:
            bounds = (
                f"one-sided {100 * (1 - self.alpha):.2f}% confidence-sequence bounds {cs} "
                f"(both at once {100 * (1 - 2 * self.alpha):.2f}%)"
            )
        else:
            bounds = f"{100 * (1 - self.alpha):.2f}% confidence sequence {cs}"
        est = "n/a" if self.estimate is None else f"{self.estimate:.4g}"
        pairs = "paired " if self.paired else ""
        evidence = (
            f"harm e-value {self.e_value:.3g} vs 1/alpha {1 / self.alpha:.3g}; "
            if self.e_process
            else ""
        )
        text = (
            f"{self.decision.value}: {pairs}{self.method}; estimate {est}, "
            f"{bounds}, margin {self.margin:g}; {evidence}"
            f"n legacy {self.n_legacy}, n production {self.n_production}, alpha {self.alpha:.3g}"
        )
        return f"{text}; {self.note}" if self.note else text


def _decide(log_e: float, upper_ok: bool, alpha: float) -> Decision:
    if log_e >= math.log(1.0 / alpha):
        return Decision.HARM
    return Decision.NON_INFERIOR if upper_ok else Decision.INCONCLUSIVE


def _f(x: Num) -> float | None:
    v = float(x)
    return v if math.isfinite(v) else None


def error_rate_test(
    production: Moments,
    legacy: Moments,
    margin: float,
    alpha: float,
    production_share: float | None = None,
    scale: float = ERROR_LOG_RR_SCALE,
) -> SequentialResult:
    """Failure proportions of two independent arms (x = failure indicator). Harm: count
    test; interval and non-inferiority: per-arm beta-binomial confidence sequences at
    alpha/2 each, difference bounds L_p - U_l and U_p - L_l."""
    log_e = float(error_rate_harm_log_e(production, legacy, production_share, scale))
    lp, up = binomial_cs(production.total, production.n, alpha / 2)
    ll, ul = binomial_cs(legacy.total, legacy.n, alpha / 2)
    lower, upper = float(lp) - float(ul), float(up) - float(ll)
    n_p, n_l = int(production.n), int(legacy.n)
    est = _f(production.mean - legacy.mean) if n_p and n_l else None
    return SequentialResult(
        "error_rate",
        "count test (Lindon & Malek) on failures; beta-binomial confidence sequences",
        _decide(log_e, upper < margin, alpha),
        log_e,
        est,
        lower,
        upper,
        n_l,
        n_p,
        alpha,
        margin,
        details={
            "failures_production": int(production.total),
            "failures_legacy": int(legacy.total),
        },
    )


def paired_error_rate_test(
    pairs: PairedMoments, margin: float, alpha: float, scale: float = ERROR_LOG_RR_SCALE
) -> SequentialResult:
    """Shadow failures: d = f_prod - f_legacy per request. Harm: count test on discordant
    pairs (theta0 = 1/2); bounds on E[d] = P(d=1) - P(d=-1) from their confidence
    sequences at alpha/2 each."""
    plus, minus = _discordant(pairs)
    log_e = float(paired_error_harm_log_e(pairs, scale))
    n = int(pairs.n)
    l_plus, u_plus = binomial_cs(plus, n, alpha / 2)
    l_minus, u_minus = binomial_cs(minus, n, alpha / 2)
    lower, upper = float(l_plus) - float(u_minus), float(u_plus) - float(l_minus)
    est = (float(plus) - float(minus)) / n if n else None
    return SequentialResult(
        "error_rate",
        "count test on discordant pairs; beta-binomial confidence sequences",
        _decide(log_e, upper < margin, alpha),
        log_e,
        est,
        lower,
        upper,
        n,
        n,
        alpha,
        margin,
        paired=True,
        details={"production_only_failures": int(plus), "legacy_only_failures": int(minus)},
    )


def _normal_result(
    metric: str,
    method: str,
    est: Num,
    var: Num,
    tau: float,
    log_margin: float,
    margin: float,
    alpha: float,
    n_legacy: int,
    n_production: int,
    min_n: int,
    paired: bool,
) -> SequentialResult:
    """Shared by latency and cost: decide on the log scale, report ratios."""
    e, v = float(est), float(var)
    ready = min(n_legacy, n_production) >= min_n and math.isfinite(e) and math.isfinite(v) and v > 0
    if not ready:
        return SequentialResult(
            metric,
            method,
            Decision.INCONCLUSIVE,
            0.0,
            _f(_exp(e)) if math.isfinite(e) else None,
            None,
            None,
            n_legacy,
            n_production,
            alpha,
            margin,
            paired,
            note=f"needs at least {min_n} rows per arm with a positive variance",
            one_sided_bounds=True,
        )
    log_e = float(normal_mixture_log_e(e, v, tau))
    radius = float(normal_mixture_radius(v, tau, alpha))
    return SequentialResult(
        metric,
        method,
        _decide(log_e, e + radius < log_margin, alpha),
        log_e,
        _exp(e),
        _exp(e - radius),
        _exp(e + radius),
        n_legacy,
        n_production,
        alpha,
        margin,
        paired,
        details={"log_estimate": e, "variance": v, "tau": tau},
        one_sided_bounds=True,
    )


def _exp(x: float) -> float:
    """exp that saturates instead of overflowing: a small margin makes the mixture's
    scale tiny and an early bound's log huge (a ratio margin of 1.0001 raised
    OverflowError and stopped the gate)."""
    return math.exp(min(x, 700.0))


def _ratio_test(
    metric: str,
    method: str,
    estimate: tuple[float, float],
    max_ratio: float,
    alpha: float,
    tau: float | None,
    n_legacy: int,
    n_production: int,
    min_n: int,
    paired: bool,
) -> SequentialResult:
    """mSPRT on a log ratio (estimate, variance) against the margin ln(max_ratio); the
    mixture's scale defaults to the margin, where the test must have its power."""
    log_margin = math.log(max_ratio)
    est, var = estimate
    return _normal_result(
        metric,
        method,
        est,
        var,
        tau or abs(log_margin),
        log_margin,
        max_ratio,
        alpha,
        n_legacy,
        n_production,
        min_n,
        paired,
    )


def latency_test(
    production: Moments,
    legacy: Moments,
    max_p95_ratio: float,
    alpha: float,
    tau: float | None = None,
    min_n: int = MIN_N,
) -> SequentialResult:
    """mSPRT on the difference of mean ln(latency_ms); reported as the ratio exp(diff),
    which is the p95 ratio when the log-latency distributions differ by a shift."""
    return _ratio_test(
        "latency",
        "mSPRT on mean log latency (ratio = p95 ratio under a shift)",
        log_mean_difference(production, legacy),
        max_p95_ratio,
        alpha,
        tau,
        int(legacy.n),
        int(production.n),
        min_n,
        paired=False,
    )


def paired_latency_test(
    pairs: PairedMoments,
    max_p95_ratio: float,
    alpha: float,
    tau: float | None = None,
    min_n: int = MIN_N,
) -> SequentialResult:
    """Shadow latency: mSPRT on the mean paired difference of ln(latency_ms)."""
    n = int(pairs.n)
    return _ratio_test(
        "latency",
        "mSPRT on mean paired log-latency difference",
        paired_mean_difference(pairs),
        max_p95_ratio,
        alpha,
        tau,
        n,
        n,
        min_n,
        paired=True,
    )


#: Below this squared coefficient of variation (a standard deviation under a millionth of
#: the mean) an arm's cost is constant per request: flat prices, where the mSPRT's plug-in
#: variance is 0 and it could never decide.
EXACT_CV2 = 1e-12


def _cv2(mean: float, variance: float) -> float:
    return variance / (mean * mean) if mean > 0 and math.isfinite(variance) else math.nan


def _degenerate_cost(
    method: str,
    mean_p: float,
    mean_l: float,
    constant_p: bool,
    exact_ratio: bool,
    paid_log_e: float | None,
    max_ratio: float,
    alpha: float,
    n_legacy: int,
    n_production: int,
    min_n: int,
    paired: bool,
) -> SequentialResult | None:
    """Costs the mSPRT cannot judge, decided exactly (None: not degenerate, use the mSPRT).

    Why: free backends (mean 0) or flat prices (variance 0) are legal cost data, and the
    plug-in variance of ln(mean ratio) is then 0 or undefined: the mSPRT stayed
    inconclusive forever, and at the maximum duration `on_max_duration: promote` promoted
    a production 10x dearer. After the burn-in (`min_n` rows per arm):

    * neither arm paid for an answered request: non-inferior;
    * production paid nothing, legacy did: non-inferior;
    * legacy paid nothing, production did: harm when production's price is flat (it is
      certainly dearer), else a count test (as for errors) of production paying for a
      larger share of its requests than legacy, harm at e >= 1/alpha;
    * both prices exact (constant per request, or for pairs a constant ratio): the
      ratio has no sampling noise; harm above 1 (the bar is zero, as in every test here),
      else non-inferior.
    """
    if min(n_legacy, n_production) < min_n or not (math.isfinite(mean_p) and math.isfinite(mean_l)):
        return None

    def result(
        decision: Decision, note: str, ratio: float | None, log_e: float | None = None
    ) -> SequentialResult:
        how = (
            "count test of paid answers (legacy free so far)"
            if log_e is not None
            else "mean cost per request decided exactly (free or flat-priced arms)"
        )
        return SequentialResult(
            "cost",
            f"{how}, in place of the {method}",
            decision,
            0.0 if log_e is None else log_e,
            ratio,
            ratio,
            ratio,
            n_legacy,
            n_production,
            alpha,
            max_ratio,
            paired,
            note=note,
            details={"mean_cost_production": mean_p, "mean_cost_legacy": mean_l},
            e_process=log_e is not None,
        )

    prices = f"mean cost per answered request {mean_p:.4g} USD vs legacy {mean_l:.4g} USD"
    if mean_p <= 0 and mean_l <= 0:
        return result(Decision.NON_INFERIOR, f"neither arm paid for any answer: {prices}", 1.0)
    if mean_p <= 0:
        return result(Decision.NON_INFERIOR, f"production answered for free: {prices}", 0.0)
    if mean_l <= 0:
        if constant_p:
            return result(
                Decision.HARM,
                f"legacy answered for free and production at a flat price: {prices}",
                None,
            )
        if paid_log_e is None:
            return result(
                Decision.INCONCLUSIVE,
                f"legacy answered for free so far; no paid-request counts to test: {prices}",
                None,
            )
        harm = paid_log_e >= math.log(1.0 / alpha)
        return result(
            Decision.HARM if harm else Decision.INCONCLUSIVE,
            f"harm when production pays for a larger share of its answers than legacy; {prices}",
            None,
            paid_log_e,
        )
    if exact_ratio:
        ratio = mean_p / mean_l
        return result(
            Decision.HARM if ratio > 1 + 1e-9 else Decision.NON_INFERIOR,
            f"flat prices (no variance): the ratio is exact, harm above 1; {prices}",
            ratio,
        )
    return None


def cost_test(
    production: Moments,
    legacy: Moments,
    max_cost_ratio: float,
    alpha: float,
    tau: float | None = None,
    min_n: int = MIN_N,
    paid: tuple[float, float] | None = None,
) -> SequentialResult:
    """mSPRT on ln(mean cost ratio) (delta method), margin ln(max_cost_ratio); free or
    flat-priced arms by `_degenerate_cost`, whose count test of `paid` (answered requests
    with a positive cost: production, legacy) runs while legacy has paid nothing. Each of
    the two tests gets alpha/2, so the metric keeps alpha whichever decides."""
    a = alpha / 2
    method = "mSPRT on log ratio of mean cost per request"
    m_p, m_l = float(production.mean), float(legacy.mean)
    cv_p, cv_l = _cv2(m_p, float(production.variance)), _cv2(m_l, float(legacy.variance))
    paid_log_e = None
    if paid is not None:
        paid_log_e = float(
            error_rate_harm_log_e(
                Moments(production.n, paid[0], paid[0]), Moments(legacy.n, paid[1], paid[1])
            )
        )
    degenerate = _degenerate_cost(
        method,
        m_p,
        m_l,
        cv_p <= EXACT_CV2,
        cv_p <= EXACT_CV2 and cv_l <= EXACT_CV2,
        paid_log_e,
        max_cost_ratio,
        a,
        int(legacy.n),
        int(production.n),
        min_n,
        paired=False,
    )
    if degenerate is not None:
        return degenerate
    return _ratio_test(
        "cost",
        method,
        log_ratio_of_means(production, legacy),
        max_cost_ratio,
        a,
        tau,
        int(legacy.n),
        int(production.n),
        min_n,
        paired=False,
    )


def paired_cost_test(
    pairs: PairedMoments,
    max_cost_ratio: float,
    alpha: float,
    tau: float | None = None,
    min_n: int = MIN_N,
    paid_only: tuple[float, float] | None = None,
) -> SequentialResult:
    """Shadow cost: mSPRT on ln(mean cost ratio) over pairs; degenerate costs as in
    `cost_test`, the count test on the pairs where only one side paid (`paid_only`:
    production only, legacy only; theta0 = 1/2). alpha/2 each."""
    a = alpha / 2
    method = "mSPRT on paired log ratio of mean cost per request"
    n = int(pairs.n)
    est, var = paired_log_ratio_of_means(pairs)
    with np.errstate(divide="ignore", invalid="ignore"):
        m_p, m_l = (
            float(pairs.sum_p) / n if n else math.nan,
            float(pairs.sum_l) / n if n else math.nan,
        )
        var_p = (float(pairs.sum_pp) - n * m_p * m_p) / (n - 1) if n > 1 else math.nan
    paid_log_e = None
    if paid_only is not None:
        plus, minus = paid_only
        paid_log_e = float(count_log_e(plus, plus + minus, 0.5))
    degenerate = _degenerate_cost(
        method,
        m_p,
        m_l,
        _cv2(m_p, max(var_p, 0.0)) <= EXACT_CV2,
        math.isfinite(float(var)) and n * float(var) <= EXACT_CV2,
        paid_log_e,
        max_cost_ratio,
        a,
        n,
        n,
        min_n,
        paired=True,
    )
    if degenerate is not None:
        return degenerate
    return _ratio_test(
        "cost",
        method,
        (est, var),
        max_cost_ratio,
        a,
        tau,
        n,
        n,
        min_n,
        paired=True,
    )


# -- the gate's entry points ----------------------------------------------------------------


@dataclass(frozen=True)
class ArmSummary:
    """One arm's sufficient statistics, as one row of `ARM_MOMENTS_SQL` gives them;
    `cost_paid`: answered requests with a positive cost (None: not counted)."""

    failures: Moments
    log_latency: Moments
    cost: Moments
    cost_paid: float | None = None

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> ArmSummary:
        n = float(row.get("n") or 0)
        fails = float(row.get("failures") or 0)
        return cls(
            Moments(n, fails, fails),
            Moments(
                float(row.get("n_latency") or 0),
                float(row.get("sum_log_latency") or 0.0),
                float(row.get("sum_log_latency_sq") or 0.0),
            ),
            Moments(
                float(row.get("n_cost") or 0),
                float(row.get("sum_cost") or 0.0),
                float(row.get("sum_cost_sq") or 0.0),
            ),
            float(row.get("n_cost_paid") or 0),
        )


def design_effect(m: Moments, buckets: float, yy: float, yn: float, nn: float) -> float:
    """Cluster-robust variance of the mean over `buckets` clusters (sums y_b over n_b
    rows each: sum y_b^2, sum y_b n_b, sum n_b^2) divided by the per-request variance
    of the mean; at least 1. Below `MIN_BUCKETS` that ratio is too noisy: the worst case
    instead, as if every bucket's requests were one (intra-bucket correlation 1), which
    is sum n_b^2 / n, the request-weighted bucket size (about 1 when users ask once)."""
    n = float(m.n)
    if buckets < MIN_BUCKETS:
        return max(1.0, nn / n) if n > 0 else 1.0
    per_request = float(m.variance)
    if not (n >= 2 and math.isfinite(per_request) and per_request > 0):
        return 1.0
    mean = float(m.total) / n
    residual = max(yy - 2 * mean * yn + mean * mean * nn, 0.0)
    robust = buckets / (buckets - 1) * residual / (n * n)
    return max(1.0, robust / (per_request / n))


def deflated(m: Moments, d: float) -> Moments:
    """`m` as `m.n / d` independent rows would give it: the same mean, `d` times the
    variance of the mean."""
    return Moments(float(m.n) / d, float(m.total) / d, float(m.total_sq) / d)


@dataclass(frozen=True)
class Clustered:
    """Both arms on effective sample sizes, and each metric's design effects
    (production, legacy)."""

    production: ArmSummary
    legacy: ArmSummary
    effects: dict[str, tuple[float, float]]
    #: metric -> buckets with rows for it (production, legacy): latency and cost count
    #: only answered requests, so they may have fewer than the errors
    buckets: dict[str, tuple[int, int]] = field(default_factory=dict)


def clustered(
    production: ArmSummary, legacy: ArmSummary, rows: dict[str, dict[str, Any]]
) -> Clustered:
    """The arms as their buckets' spread says they count (`ARM_CLUSTER_SQL` rows by arm).
    Latency: each arm by its own design effect. Errors and cost: both arms by the larger
    one, since their count tests (failures; paid answers when legacy is free) compare
    production's share with its traffic share, which must not move."""

    arms_by_name = {"production": production, "legacy": legacy}

    def effect(name: str, metric: str) -> float:
        row = rows.get(name, {})
        return design_effect(
            _MOMENTS_OF[metric](arms_by_name[name]),
            float(row.get(f"{_SQL_PREFIX[metric]}_g") or 0),
            float(row.get(f"{_SQL_PREFIX[metric]}_yy") or 0.0),
            float(row.get(f"{_SQL_PREFIX[metric]}_yn") or 0.0),
            float(row.get(f"{_SQL_PREFIX[metric]}_nn") or 0.0),
        )

    fail = max(effect("production", "error_rate"), effect("legacy", "error_rate"))
    cost = max(effect("production", "cost"), effect("legacy", "cost"))
    latency = (effect("production", "latency"), effect("legacy", "latency"))
    arms = [
        ArmSummary(
            deflated(arm.failures, fail),
            deflated(arm.log_latency, d_latency),
            deflated(arm.cost, cost),
            None if arm.cost_paid is None else arm.cost_paid / cost,
        )
        for arm, d_latency in zip((production, legacy), latency, strict=True)
    ]
    effects = {"error_rate": (fail, fail), "cost": (cost, cost), "latency": latency}
    buckets = {
        metric: (
            int(rows.get("production", {}).get(f"{prefix}_g") or 0),
            int(rows.get("legacy", {}).get(f"{prefix}_g") or 0),
        )
        for metric, prefix in _SQL_PREFIX.items()
    }
    return Clustered(arms[0], arms[1], effects, buckets)


#: The moments each clustered metric is judged on, and its columns in `ARM_CLUSTER_SQL`.
_MOMENTS_OF = {
    "error_rate": lambda arm: arm.failures,
    "latency": lambda arm: arm.log_latency,
    "cost": lambda arm: arm.cost,
}
_SQL_PREFIX = {"error_rate": "failures", "latency": "latency", "cost": "cost"}


def few_buckets_note(buckets: tuple[int, int]) -> str:
    """Why a phase with few users cannot decide: an operator sees it at every evaluation
    instead of only a hold at the maximum duration."""
    few = [
        f"{name} {g}"
        for name, g in zip(("production", "legacy"), buckets, strict=True)
        if 0 < g < MIN_BUCKETS
    ]
    if not few:
        return ""
    return (
        f"user buckets with requests: {', '.join(few)}, under the {MIN_BUCKETS} needed to "
        "measure how much a user's requests move together, so each bucket counts as one "
        "request (more users, or a larger traffic share, let this decide)"
    )


def explain_clustering(
    results: list[SequentialResult],
    raw: tuple[ArmSummary, ArmSummary],
    effects: dict[str, tuple[float, float]],
    buckets: dict[str, tuple[int, int]] | None = None,
) -> list[SequentialResult]:
    """Each result with the arms' real request counts, and a note on how much the
    clustering of requests by user weighed."""
    out = []
    for r in results:
        if r.metric not in effects:
            out.append(r)
            continue
        d_p, d_l = effects[r.metric]
        n_p, n_l = (_MOMENTS_OF[r.metric](arm).n for arm in raw)
        which = f"{d_p:.3g}" if d_p == d_l else f"{d_p:.3g} production, {d_l:.3g} legacy"
        note = (
            f"variance x {which} for requests of the same users (design effect)"
            if max(d_p, d_l) > 1.05
            else ""
        )
        few = few_buckets_note((buckets or {}).get(r.metric, (0, 0)))
        joined = "; ".join(x for x in (r.note, note, few) if x)
        out.append(replace(r, n_production=int(n_p), n_legacy=int(n_l), note=joined))
    return out


@dataclass(frozen=True)
class ShadowSummary:
    """Paired sufficient statistics, as the row of `SHADOW_MOMENTS_SQL` gives them;
    `cost_paid_only`: answered pairs where only production, or only legacy, paid (None:
    not counted)."""

    failures: PairedMoments
    log_latency: PairedMoments
    cost: PairedMoments
    cost_paid_only: tuple[float, float] | None = None

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> ShadowSummary:
        n = float(row.get("n") or 0)

        def g(key: str) -> float:
            return float(row.get(key) or 0.0)

        return cls(
            PairedMoments.from_differences(n, g("sum_d_fail"), g("sum_d_fail_sq")),
            PairedMoments.from_differences(
                g("n_latency"), g("sum_d_log_latency"), g("sum_d_log_latency_sq")
            ),
            PairedMoments(
                g("n_cost"),
                g("sum_cost_p"),
                g("sum_cost_l"),
                g("sum_cost_pp"),
                g("sum_cost_ll"),
                g("sum_cost_pl"),
            ),
            (g("n_cost_paid_production_only"), g("n_cost_paid_legacy_only")),
        )


#: The checks that can roll back a good balancer by chance, and so share the phase's
#: alpha (the chance of *any* false rollback over the whole phase): the four sequential
#: comparisons with legacy and the two guardrails judged by confidence sequences
#: (`checks.gate`), plus the optional guardrails of `OPTIONAL_ROLLBACK_CHECKS` a plan
#: sets. Split evenly (Bonferroni), each gets alpha / 6 (alpha / 8 with both optional
#: limits set). Within a check the share is split again where it combines two bounds or
#: tests (latency_p95: legacy's p95 and production's share, alpha/2 each; cost: mSPRT and
#: paid-request count test).
ROLLBACK_CHECKS = (
    "error_rate",
    "latency",
    "latency_p95",
    "cost",
    "error_rate_limit",
    "p95_latency_ms",
)
#: Guardrails that exist only when the plan sets their limit (metric -> Thresholds field).
OPTIONAL_ROLLBACK_CHECKS = {
    "cost_per_request": "max_cost_per_request_usd",
    "mean_quality": "min_mean_quality",
}


def metric_alpha(alpha: float, n_checks: int = len(ROLLBACK_CHECKS)) -> float:
    """The phase's alpha split evenly over the checks that can roll back (Bonferroni):
    the chance that *any* of them ever flags harm on a good balancer stays <= alpha."""
    return alpha / n_checks


def rollback_checks(thresholds: Thresholds) -> tuple[str, ...]:
    """The checks of a phase with these thresholds that can roll back by chance."""
    optional = (
        m for m, field in OPTIONAL_ROLLBACK_CHECKS.items() if getattr(thresholds, field) is not None
    )
    return ROLLBACK_CHECKS + tuple(optional)


def phase_metric_alpha(thresholds: Thresholds) -> float:
    """Each rollback check's share of the phase's alpha (`metric_alpha`)."""
    return metric_alpha(thresholds.alpha, len(rollback_checks(thresholds)))


def mean_cs(
    n: Num, mean: Num, variance: Num, alpha: float, tau: float, min_variance: float = 0.0
) -> tuple[Num, Num]:
    """(lower, upper) bounds on a mean from n observations with sample `variance`, each
    one-sided at `alpha` and valid at every look: the inverted normal-mixture mSPRT
    (`normal_mixture_radius`) with mixing scale `tau`, on the plug-in variance of the
    mean (asymptotic, like the latency and cost tests; callers keep a burn-in).

    The plug-in variance is never taken below `min_variance`: a run of equal values
    (one flat price, one coarse quality score) has sample variance 0 and would make the
    bounds collapse onto the mean, so a guardrail rolled back on 30 equal scores that
    said nothing yet about the rest. With `min_variance` 0, a zero variance leaves the
    mean itself. Below two values, or with no finite variance, nothing is known:
    (-inf, inf)."""
    m = np.asarray(n, dtype=float)
    v = np.maximum(np.asarray(variance, dtype=float), min_variance)
    x = np.asarray(mean, dtype=float)
    known = (m >= 2) & np.isfinite(v) & np.isfinite(x)
    spread = known & (v > 0)
    radius = np.where(
        spread,
        normal_mixture_radius(np.where(spread, v, 1.0) / np.maximum(m, 1), tau, alpha),
        np.where(known, 0.0, np.inf),
    )
    low, high = x - radius, x + radius
    if low.ndim:
        return low, high
    return float(low), float(high)


def evaluate_arms(
    production: ArmSummary,
    legacy: ArmSummary,
    thresholds: Thresholds,
    production_share: float | None = None,
) -> list[SequentialResult]:
    """The moment-based sequential tests of a canary / A/B phase (latency_p95 needs
    order statistics: `latency_tail_test`)."""
    a = phase_metric_alpha(thresholds)
    paid = None
    if production.cost_paid is not None and legacy.cost_paid is not None:
        paid = (production.cost_paid, legacy.cost_paid)
    return [
        error_rate_test(
            production.failures,
            legacy.failures,
            thresholds.max_error_rate_diff,
            a,
            production_share,
        ),
        latency_test(production.log_latency, legacy.log_latency, thresholds.max_p95_ratio, a),
        cost_test(production.cost, legacy.cost, thresholds.max_cost_ratio, a, paid=paid),
    ]


def evaluate_shadow(pairs: ShadowSummary, thresholds: Thresholds) -> list[SequentialResult]:
    """The moment-based sequential tests of a shadow phase, on paired differences."""
    a = phase_metric_alpha(thresholds)
    return [
        paired_error_rate_test(pairs.failures, thresholds.max_error_rate_diff, a),
        paired_latency_test(pairs.log_latency, thresholds.max_p95_ratio, a),
        paired_cost_test(pairs.cost, thresholds.max_cost_ratio, a, paid_only=pairs.cost_paid_only),
    ]


# -- the tail: latency_p95 -------------------------------------------------------------------

#: Answered latencies per arm of the phase, the rows `latency_tail_test` counts: served
#: (non-shadow) rows in canary / A/B phases, both sides of answered shadow pairs in shadow
#: phases (the same rows as the latency test's).
ARM_TAIL_SAMPLES_SQL = """
SELECT arm, latency_ms FROM requests
WHERE config_version = $version AND NOT is_shadow AND outcome = 'ok' AND latency_ms > 0
"""
SHADOW_TAIL_SAMPLES_SQL = (
    """
WITH pairs AS (
    SELECT production_ms, legacy_ms FROM (
"""
    + SHADOW_PAIRS_SQL.format(
        table="requests",
        columns="s.latency_ms AS production_ms, p.latency_ms AS legacy_ms, "
        "s.outcome AS s_outcome, p.outcome AS p_outcome",
        where="AND s.config_version = $version",
    )
    + """
    ) WHERE s_outcome = 'ok' AND p_outcome = 'ok'
)
SELECT 'production' AS arm, production_ms AS latency_ms FROM pairs
UNION ALL
SELECT 'legacy' AS arm, legacy_ms AS latency_ms FROM pairs
"""
)
#: Legacy order statistics by quantile level: DuckDB's quantile_disc(x, q) is the value at
#: ascending 0-based index ceil(q n) - 1, so q = (n - rank + 0.5) / n is the rank-th largest.
TAIL_LEGACY_SQL = """
WITH samples AS ({samples})
SELECT quantile_disc(latency_ms, $levels) AS q FROM samples WHERE arm = 'legacy'
"""
TAIL_PRODUCTION_SQL = """
WITH samples AS ({samples})
SELECT count(*) AS n,
       count(*) FILTER (WHERE latency_ms > $t_hi) AS over_hi,
       count(*) FILTER (WHERE latency_ms > $t_mid) AS over_mid,
       count(*) FILTER (WHERE latency_ms > $t_lo) AS over_lo
FROM samples WHERE arm = 'production'
"""


@dataclass(frozen=True)
class TailCounts:
    """What `latency_tail_test` needs: legacy's p95 bounds (`tail_ranks`: hi, lo) and its
    observed p95 (ms; None where the rank does not exist yet), and how many production
    requests were slower than max_p95_ratio times each."""

    n_legacy: int
    n_production: int
    legacy_hi_ms: float | None
    legacy_mid_ms: float | None
    legacy_lo_ms: float | None
    over_hi: int
    over_mid: int
    over_lo: int


def latency_tail_test(
    counts: TailCounts, max_p95_ratio: float, alpha: float, paired: bool = False
) -> SequentialResult:
    """Is production's p95 within max_p95_ratio x legacy's? The mean-log-latency test
    cannot tell: a balancer that makes most requests faster and one in ten much slower
    keeps the mean and doubles the p95.

    s = P(production latency > max_p95_ratio x legacy's true p95) is above 5 % exactly
    when the p95 ratio breaks the margin. Legacy's p95 is itself estimated, so the
    conservative end is used on each side: harm when the lower confidence-sequence bound
    of the share slower than ratio x legacy's *upper* p95 bound is above 5 %;
    non-inferior when the upper bound of the share slower than ratio x legacy's *lower*
    p95 bound is below 5 %. Counting above a threshold that only errs outwards can only
    move each bound away from the verdict, so each holds at 1 - alpha (legacy's order
    statistics at alpha/2, production's share at alpha/2) at every look, for continuous
    latencies; harm and non-inferiority exclude each other.

    Non-inferiority this way needs about ten times the data of the mean test (some
    1,000 production requests at a 5 % canary, 2,000 per arm at 50 %, for identical
    log-normal arms of spread 0.5), more than short phases get. So an inconclusive
    result holds the phase only while the observed share (slower than ratio x legacy's
    observed p95) is above 5 %, i.e. while the observed p95 ratio breaks the margin:
    promotion needs no detected harm and the observed p95 within the margin, and the
    rollback side stays anytime-valid."""
    n = counts.n_production
    a = alpha / 2
    lower = float(binomial_cs(counts.over_hi, n, a)[0]) if n else 0.0
    upper = float(binomial_cs(counts.over_lo, n, a)[1]) if n else 1.0
    if lower > TAIL_SHARE:
        decision = Decision.HARM
    elif upper < TAIL_SHARE:
        decision = Decision.NON_INFERIOR
    else:
        decision = Decision.INCONCLUSIVE

    def ms(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.4g}"

    estimate = counts.over_mid / n if n and counts.legacy_mid_ms is not None else None
    holds = estimate is None or estimate > TAIL_SHARE
    if decision is Decision.INCONCLUSIVE:
        hold = "holding: the observed" if holds else "not holding: the observed"
        within = "breaks" if holds else "is within"
        verdict_note = f"{hold} p95 ratio {within} the margin; "
    else:
        verdict_note = ""
    return SequentialResult(
        "latency_p95",
        f"share of production requests slower than {max_p95_ratio:g} x legacy's p95 "
        "(order statistics and beta-binomial confidence sequences)",
        decision,
        0.0,
        estimate,
        lower,
        upper,
        counts.n_legacy,
        n,
        alpha,
        TAIL_SHARE,
        paired,
        note=(
            f"{verdict_note}"
            f"harm when even the lower bound is above {TAIL_SHARE:.0%} (production's p95 "
            f"beyond {max_p95_ratio:g} x legacy's), non-inferior when the upper bound is "
            f"below; legacy's p95 {ms(counts.legacy_mid_ms)} ms, bounded by "
            f"[{ms(counts.legacy_lo_ms)}, {ms(counts.legacy_hi_ms)}] ms"
        ),
        details={
            "over_hi": counts.over_hi,
            "over_mid": counts.over_mid,
            "over_lo": counts.over_lo,
            "legacy_p95_bounds_ms": [counts.legacy_lo_ms, counts.legacy_hi_ms],
        },
        e_process=False,
        holds_while_open=holds,
    )


def to_record(
    result: SequentialResult,
    thresholds: Thresholds | None = None,
    mode: MetricMode | None = None,
) -> MetricRecord:
    """One decision-record line. Mode: explicit, else the plan's `metric_modes`, else
    abort for the critical metrics (every sequential one) and warn for others."""
    critical = result.metric in CRITICAL
    if mode is None and thresholds is not None and result.metric in thresholds.metric_modes:
        mode = thresholds.metric_modes[result.metric]
    if mode is None:
        mode = MetricMode.ABORT if critical else MetricMode.WARN
    return MetricRecord(
        check_kind="sequential",
        metric=result.metric,
        decision=result.decision,
        reason=result.reason,
        estimate=result.estimate,
        lower_bound=result.lower,
        upper_bound=result.upper,
        e_value=result.e_value if result.e_process else None,
        n_legacy=result.n_legacy,
        n_production=result.n_production,
        threshold=result.margin,
        metric_mode=mode.value,
        # pause acts too (a human decides), so an open pause metric holds like an abort one
        critical=critical
        and mode.acts
        and (result.decision is not Decision.INCONCLUSIVE or result.holds_while_open),
    )


def to_records(
    results: Sequence[SequentialResult], thresholds: Thresholds | None = None
) -> list[MetricRecord]:
    return [to_record(r, thresholds) for r in results]
