"""Backtest of the rollout gate: simulated canaries judged after every batch of requests.

Why: a gate that looks often must not pay for it in false rollbacks, and must still catch
real regressions within the phase's sample budget. This simulates A/A runs (identical
arms) and A/B runs with injected regressions, and judges the *same* simulated data with
three gates side by side:

* `sequential` (ours): the anytime-valid tests of `checks.sequential` (the real code),
  harm on any of error rate, latency, latency_p95 (on the histograms: legacy's p95
  bound from its order statistics, production's share above 1.25 x it), cost rolls
  back, as the gate's policy does with its default metric modes (all are critical,
  `abort`); the phase's alpha split as the gate splits it (`sq.ROLLBACK_CHECKS`, the
  guardrails' shares unused here: their limits are far from these arms), so the
  false-rollback rate is <= alpha however often it looks.
* `threshold` (Argo Rollouts / Flagger style; the same margins the gate's comparison
  suite reports as warnings): roll back as soon as the observed error-rate difference > max_error_rate_diff,
  observed p95 ratio > max_p95_ratio or observed mean-cost ratio > max_cost_ratio, once
  production has `min_production` requests.
* `mann_whitney` (Kayenta style): a Mann-Whitney U test per metric at every look, no
  correction for looks or metrics. Kayenta's classifier defaults to a 95 % two-sided
  interval and flags "High" when the interval lies above zero, i.e. a two-sided 5 % test
  in the harmful direction (one-sided p < 0.025); that is what runs here. Kayenta's extra
  tolerance on the Hodges-Lehmann estimate is dropped: on per-request failure
  indicators that estimate is 0 and the classifier could never flag an error rate.
  Same `min_production` as the threshold gate. U is computed from the cumulative
  histograms at every look, identical to scipy.stats.mannwhitneyu(method="asymptotic")
  on the recorded values (tie and continuity corrections; checked in the tests).

Data model (per request; legacy and production drawn from the same generator with
common random numbers, so scenarios differ only by the injected regression):
legacy failure rate 1 %, log-normal latency (median 150 ms, sigma 0.5), log-normal cost
(mean 0.002 USD, sigma 0.4) independent of latency; each request goes to production with
probability 5 %. Latency and cost are recorded at a 2.5 % resolution (log-spaced bins, as
a histogram-based metrics pipeline would), which lets the rank test and the p95 run on
histograms at every look; all gates see the same recorded values. The gates evaluate
after every batch of 200 requests, up to the phase's sample budget: 100,000 requests,
i.e. about 5,000 production requests (500 looks). Regressions act on production only:
`error_x2`/`error_x3` multiply its failure rate; `p95_plus20`/`p95_plus50` shift its
log latency by ln 1.2 / ln 1.5 (every quantile, p95 included, grows by 20 % / 50 %);
`cost_plus30` multiplies its cost by 1.3.

A run counts as detected at the first look where the gate rolls back; the median number
of requests to detect is over all runs of a scenario (undetected runs count as never),
so it is null when fewer than half are detected within the budget.

What to expect (defaults, seed 7): our gate keeps A/A false rollbacks below alpha and
detects every scenario with power >= 0.95 within the budget (error_x2, the hardest, at
about 0.97 since the alpha is split six ways; 0.98 when it was split three ways), but it
needs more requests than the repeated Mann-Whitney gate to detect error_x3 (median about
12,200 against 2,400). No valid test can match that: even the oracle SPRT that knows
RR = 3 exactly needs a median of about 9,000 requests at alpha 0.01/3 (7,200 at 0.01;
more at the 0.01/6 each check gets), because a 1 % -> 3 %
change at a 5 % split shows up only through about a hundred failures. The Mann-Whitney
gate is quick because it is a 5 % test that ignores repeated looks and metrics (about
half of its A/A runs roll back).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy.stats import norm

from checks import sequential as sq
from checks.thresholds import Thresholds

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

GATES = ("sequential", "threshold", "mann_whitney")


@dataclass(frozen=True)
class Regression:
    """Multipliers applied to the production arm."""

    error: float = 1.0
    latency: float = 1.0
    cost: float = 1.0


SCENARIOS: dict[str, Regression] = {
    "error_x2": Regression(error=2.0),
    "error_x3": Regression(error=3.0),
    "p95_plus20": Regression(latency=1.2),
    "p95_plus50": Regression(latency=1.5),
    "cost_plus30": Regression(cost=1.3),
}


@dataclass(frozen=True)
class BacktestSettings:
    runs: int = 1000
    seed: int = 7
    batch_requests: int = 200
    production_share: float = 0.05
    budget_requests: int = 100_000
    alpha: float = 0.01
    mann_whitney_alpha: float = 0.05
    min_production: int = 100
    legacy_error_rate: float = 0.01
    latency_median_ms: float = 150.0
    latency_sigma: float = 0.5
    cost_mean_usd: float = 0.002
    cost_sigma: float = 0.4
    resolution: float = 0.025
    thresholds: Thresholds = field(default_factory=Thresholds)

    @property
    def looks(self) -> int:
        return self.budget_requests // self.batch_requests


def mann_whitney_z(production: FloatArray, legacy: FloatArray) -> FloatArray:
    """z of the Mann-Whitney U test that production is stochastically greater, from
    histograms over ordered bins (last axis): U = sum_b P_b (L_below_b + L_b / 2), normal
    approximation with tie correction and continuity correction, exactly as
    scipy.stats.mannwhitneyu(..., alternative="greater", method="asymptotic")."""
    p = np.asarray(production, dtype=float)
    q = np.asarray(legacy, dtype=float)
    n1, n2 = p.sum(-1), q.sum(-1)
    below = np.cumsum(q, axis=-1) - q
    u = (p * (below + 0.5 * q)).sum(-1)
    c = p + q
    n = n1 + n2
    ties = (c * c * c - c).sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.sqrt(n1 * n2 / 12.0 * ((n + 1) - ties / (n * (n - 1))))
        z = (u - n1 * n2 / 2.0 - 0.5) / s
    return np.where(np.isfinite(z), z, -np.inf)


def _first(mask: npt.NDArray[np.bool_]) -> IntArray:
    """Index of the first True along the last axis, -1 if none."""
    hit = mask.any(-1)
    return np.where(hit, mask.argmax(-1), -1).astype(np.int64)


def _quantile_from_cdf(cdf: FloatArray, centers: FloatArray, q: float) -> FloatArray:
    """Inverted-CDF quantile of recorded (binned) values, per row of cumulative counts."""
    return centers[(cdf >= q * cdf[..., -1:]).argmax(-1)]


@dataclass(eq=False)
class _Arm:
    """One arm (or one production variant) of one metric: the cumulative histogram of the
    runs being simulated and, per run and look, the cumulative sums of recorded values."""

    total: FloatArray
    total_sq: FloatArray
    hist: FloatArray = field(default_factory=lambda: np.zeros((0, 0)))

    @classmethod
    def empty(cls, runs: int, looks: int) -> _Arm:
        return cls(np.zeros((runs, looks)), np.zeros((runs, looks)))


#: Runs simulated together: small enough for the per-look histograms to stay in cache.
CHUNK = 250
#: Histogram range in standard deviations either side of legacy's log-median (values
#: beyond, about 6 in 10 million, are recorded in the edge bins).
SPAN = 5.0


class _Simulation:
    """Simulates all looks of all runs once and keeps, per look, what each gate needs:
    cumulative sufficient statistics (sequential), observed rates, p95 and means
    (threshold) and Mann-Whitney z (mann_whitney), per production variant."""

    def __init__(self, s: BacktestSettings, progress: Callable[[float], None] | None) -> None:
        self.s = s
        r, k = s.runs, s.looks
        self.errs = sorted({1.0} | {g.error for g in SCENARIOS.values()})
        self.lats = sorted({1.0} | {g.latency for g in SCENARIOS.values()})
        self.costs = sorted({1.0} | {g.cost for g in SCENARIOS.values()})
        w = s.resolution
        mu_lat = math.log(s.latency_median_ms)
        mu_cost = math.log(s.cost_mean_usd) - 0.5 * s.cost_sigma**2
        self.lat_bins = math.ceil((2 * SPAN * s.latency_sigma + math.log(max(self.lats))) / w)
        self.cost_bins = math.ceil((2 * SPAN * s.cost_sigma + math.log(max(self.costs))) / w)
        self.lat_centers = mu_lat - SPAN * s.latency_sigma + (np.arange(self.lat_bins) + 0.5) * w
        self.cost_centers = np.exp(
            mu_cost - SPAN * s.cost_sigma + (np.arange(self.cost_bins) + 0.5) * w
        )

        def grid() -> FloatArray:
            return np.zeros((r, k))

        self.n_p, self.n_l, self.fail_l, self.p95_l = grid(), grid(), grid(), grid()
        self.fail_p = {e: grid() for e in self.errs}
        self.lat_l = _Arm.empty(r, k)
        self.lat_p = {f: _Arm.empty(r, k) for f in self.lats}
        self.cost_l = _Arm.empty(r, k)
        self.cost_p = {f: _Arm.empty(r, k) for f in self.costs}
        self.p95_p = {f: grid() for f in self.lats}
        # latency_p95: production requests slower than max_p95_ratio x the upper bound on
        # legacy's p95 (the order statistic of rank `rank_hi`, by legacy's n)
        self.slow_p = {f: grid() for f in self.lats}
        self.rank_hi = np.asarray(
            sq.tail_ranks(np.arange(s.budget_requests + 1), sq.metric_alpha(s.alpha) / 2)[0]
        )
        self.log_ratio_bins = math.log(s.thresholds.max_p95_ratio) / w
        self.mw_lat = {f: grid() for f in self.lats}
        self.mw_cost = {f: grid() for f in self.costs}

        started = time.monotonic()
        chunks = range(0, r, CHUNK)
        seeds = np.random.SeedSequence(s.seed).spawn(len(chunks))
        for i, (lo, seed) in enumerate(zip(chunks, seeds, strict=True)):
            self._simulate(slice(lo, min(lo + CHUNK, r)), np.random.default_rng(seed))
            if progress is not None:
                progress((i + 1) / len(chunks))
        self.elapsed_s = time.monotonic() - started

    def _simulate(self, sl: slice, rng: np.random.Generator) -> None:
        s = self.s
        w = s.resolution
        r = sl.stop - sl.start
        size = r * s.batch_requests
        rows = np.repeat(np.arange(r), s.batch_requests)
        for arm in (self.lat_l, *self.lat_p.values()):
            arm.hist = np.zeros((r, self.lat_bins))
        for arm in (self.cost_l, *self.cost_p.values()):
            arm.hist = np.zeros((r, self.cost_bins))
        n_p, n_l, f_l = np.zeros(r), np.zeros(r), np.zeros(r)
        f_p = {e: np.zeros(r) for e in self.errs}
        for look in range(s.looks):
            prod = rng.random(size, dtype=np.float32) < s.production_share
            leg = ~prod
            u_err = rng.random(size, dtype=np.float32)
            z_lat = rng.standard_normal(size, dtype=np.float32)
            z_cost = rng.standard_normal(size, dtype=np.float32)
            rows_p, rows_l = rows[prod], rows[leg]
            n_p += np.bincount(rows_p, minlength=r)
            n_l += np.bincount(rows_l, minlength=r)
            self.n_p[sl, look], self.n_l[sl, look] = n_p, n_l
            f_l += np.bincount(rows_l[u_err[leg] < s.legacy_error_rate], minlength=r)
            self.fail_l[sl, look] = f_l
            u_p = u_err[prod]
            for e in self.errs:
                f_p[e] += np.bincount(rows_p[u_p < s.legacy_error_rate * e], minlength=r)
                self.fail_p[e][sl, look] = f_p[e]

            lat_pos = (z_lat + SPAN) * (s.latency_sigma / w)
            cost_pos = (z_cost + SPAN) * (s.cost_sigma / w)
            self._record(self.lat_l, sl, rows_l, lat_pos[leg], self.lat_centers, look)
            self._record(self.cost_l, sl, rows_l, cost_pos[leg], self.cost_centers, look)
            lat_cdf = np.cumsum(self.lat_l.hist, axis=-1)
            cost_cdf = np.cumsum(self.cost_l.hist, axis=-1)
            lat_mid = lat_cdf - 0.5 * self.lat_l.hist
            cost_mid = cost_cdf - 0.5 * self.cost_l.hist
            self.p95_l[sl, look] = _quantile_from_cdf(lat_cdf, self.lat_centers, 0.95)
            # first production bin above max_p95_ratio x legacy's upper p95 bound (none
            # while that bound does not exist: rank 0)
            rank = self.rank_hi[n_l.astype(np.int64)]
            above = (lat_cdf[:, -1:] - lat_cdf) < rank[:, None]  # fewer than rank above bin
            slow_from = np.where(
                rank >= 1,
                np.floor(above.argmax(-1) + self.log_ratio_bins).astype(np.int64) + 1,
                self.lat_bins,
            )
            lat_p, cost_p = lat_pos[prod], cost_pos[prod]
            for f, arm in self.lat_p.items():
                self._record(arm, sl, rows_p, lat_p + math.log(f) / w, self.lat_centers, look)
                cdf = np.cumsum(arm.hist, axis=-1)
                self.p95_p[f][sl, look] = _quantile_from_cdf(cdf, self.lat_centers, 0.95)
                below = np.take_along_axis(
                    cdf, np.clip(slow_from - 1, 0, self.lat_bins - 1)[:, None], -1
                )[:, 0]
                self.slow_p[f][sl, look] = np.where(
                    slow_from >= self.lat_bins, 0.0, cdf[:, -1] - np.where(slow_from > 0, below, 0)
                )
                self.mw_lat[f][sl, look] = self._mw(arm.hist, self.lat_l.hist, lat_mid)
            for f, arm in self.cost_p.items():
                self._record(arm, sl, rows_p, cost_p + math.log(f) / w, self.cost_centers, look)
                self.mw_cost[f][sl, look] = self._mw(arm.hist, self.cost_l.hist, cost_mid)

    @staticmethod
    def _record(
        arm: _Arm, sl: slice, rows: IntArray, pos: FloatArray, centers: FloatArray, look: int
    ) -> None:
        """Bin the new values (pos in bin units) into the arm's cumulative histogram; its
        sums of recorded values (ln latency, or cost in USD) follow from the histogram."""
        runs, bins = arm.hist.shape
        b = np.clip(pos.astype(np.int64), 0, bins - 1)
        arm.hist += np.bincount(rows * bins + b, minlength=runs * bins).reshape(runs, bins)
        arm.total[sl, look] = arm.hist @ centers
        arm.total_sq[sl, look] = arm.hist @ (centers * centers)

    @staticmethod
    def _mw(prod: FloatArray, legacy: FloatArray, legacy_mid: FloatArray) -> FloatArray:
        """`mann_whitney_z` with the legacy cumulative counts shared across variants."""
        n1, n2 = prod.sum(-1), legacy.sum(-1)
        u = (prod * legacy_mid).sum(-1)
        c = prod + legacy
        n = n1 + n2
        ties = (c * c * c - c).sum(-1)
        with np.errstate(divide="ignore", invalid="ignore"):
            sd = np.sqrt(n1 * n2 / 12.0 * ((n + 1) - ties / (n * (n - 1))))
            z = (u - n1 * n2 / 2.0 - 0.5) / sd
        return np.where(np.isfinite(z), z, -np.inf)


def _chunked(fn: Callable[[slice], FloatArray], runs: int, size: int = 100) -> FloatArray:
    return np.concatenate([fn(slice(i, i + size)) for i in range(0, runs, size)])


Masks = dict[tuple[str, str, float], npt.NDArray[np.bool_]]


def _metric_rejections(sim: _Simulation) -> Masks:
    """(runs, looks) masks of the looks at which each gate flags each metric, keyed by
    (gate, metric, production variant); a scenario combines one variant per metric."""
    s = sim.s
    th = s.thresholds
    bar = math.log(1.0 / sq.metric_alpha(s.alpha))
    cost_bar = math.log(2.0 / sq.metric_alpha(s.alpha))  # cost_test's mSPRT gets alpha/2
    z_crit = float(norm.isf(s.mann_whitney_alpha / 2))  # two-sided level, harmful direction
    enough = sim.n_p >= s.min_production
    out: Masks = {}
    legacy_err = sq.Moments(sim.n_l, sim.fail_l, sim.fail_l)
    err_hist_l = np.stack([sim.n_l - sim.fail_l, sim.fail_l], axis=-1)
    for e, fail_p in sim.fail_p.items():

        def err(sl: slice, fail_p: FloatArray = fail_p) -> FloatArray:
            return np.asarray(
                sq.error_rate_harm_log_e(
                    sq.Moments(sim.n_p[sl], fail_p[sl], fail_p[sl]),
                    sq.Moments(legacy_err.n[sl], legacy_err.total[sl], legacy_err.total[sl]),
                )
            )

        out["sequential", "error", e] = _chunked(err, s.runs) >= bar
        with np.errstate(divide="ignore", invalid="ignore"):
            diff = fail_p / sim.n_p - sim.fail_l / sim.n_l
        out["threshold", "error", e] = enough & (diff > th.max_error_rate_diff)
        z = mann_whitney_z(np.stack([sim.n_p - fail_p, fail_p], axis=-1), err_hist_l)
        out["mann_whitney", "error", e] = enough & (z > z_crit)
    legacy_lat = sq.Moments(sim.n_l, sim.lat_l.total, sim.lat_l.total_sq)
    for f, arm in sim.lat_p.items():
        log_e = sq.latency_harm_log_e(
            sq.Moments(sim.n_p, arm.total, arm.total_sq),
            legacy_lat,
            tau=math.log(th.max_p95_ratio),
        )
        out["sequential", "latency", f] = np.asarray(log_e) >= bar
        ratio = np.exp(sim.p95_p[f] - sim.p95_l)
        out["threshold", "latency", f] = enough & (ratio > th.max_p95_ratio)
        out["mann_whitney", "latency", f] = enough & (sim.mw_lat[f] > z_crit)
        # latency_p95: production's alpha/2 of the check (legacy's went into rank_hi)
        slow_lower = sq.binomial_cs(sim.slow_p[f], sim.n_p, sq.metric_alpha(s.alpha) / 2)[0]
        out["sequential", "latency_p95", f] = np.asarray(slow_lower) > sq.TAIL_SHARE
    legacy_cost = sq.Moments(sim.n_l, sim.cost_l.total, sim.cost_l.total_sq)
    for f, arm in sim.cost_p.items():
        log_e = sq.cost_harm_log_e(
            sq.Moments(sim.n_p, arm.total, arm.total_sq),
            legacy_cost,
            tau=math.log(th.max_cost_ratio),
        )
        out["sequential", "cost", f] = np.asarray(log_e) >= cost_bar
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = (arm.total / sim.n_p) / (sim.cost_l.total / sim.n_l)
        out["threshold", "cost", f] = enough & (ratio > th.max_cost_ratio)
        out["mann_whitney", "cost", f] = enough & (sim.mw_cost[f] > z_crit)
    return out


def _first_rollback(masks: Masks, gate: str, reg: Regression) -> IntArray:
    """First look at which `gate` rolls back under regression `reg` (-1: never)."""
    rolled = (
        masks[gate, "error", reg.error]
        | masks[gate, "latency", reg.latency]
        | masks[gate, "cost", reg.cost]
    )
    tail = masks.get((gate, "latency_p95", reg.latency))  # the sequential gate's only
    return _first(rolled if tail is None else rolled | tail)


def _median_requests(first: IntArray, batch: int) -> int | None:
    """Median over all runs of the requests seen at detection; undetected = never."""
    t = np.where(first >= 0, (first + 1.0) * batch, np.inf)
    m = float(np.median(t))
    return int(m) if math.isfinite(m) else None


def _targets(gates: list[dict[str, Any]], alpha: float) -> dict[str, bool]:
    """The issue's targets for our gate, checked on this run's numbers."""
    by = {g["gate"]: g for g in gates}
    ours, mw = by["sequential"], by["mann_whitney"]
    ours_x3 = ours["median_requests_to_detect"]["error_x3"]
    mw_x3 = mw["median_requests_to_detect"]["error_x3"]
    return {
        "aa_false_rollback_at_most_alpha": ours["false_rollback_rate"] <= alpha,
        "power_at_least_0.95_everywhere": min(ours["power"].values()) >= 0.95,
        "error_x3_median_not_above_mann_whitney": ours_x3 is not None
        and (mw_x3 is None or ours_x3 <= mw_x3),
    }


def run_backtest(
    runs: int = 1000,
    seed: int = 7,
    progress: Callable[[float], None] | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Simulate and judge; returns {"gates": [...], "settings": {...}, ...} (see module)."""
    s = BacktestSettings(runs=runs, seed=seed, **overrides)
    started = time.monotonic()
    sim = _Simulation(s, progress)
    masks = _metric_rejections(sim)
    gates = []
    for gate in GATES:
        aa = _first_rollback(masks, gate, Regression())
        firsts = {name: _first_rollback(masks, gate, reg) for name, reg in SCENARIOS.items()}
        gates.append(
            {
                "gate": gate,
                "aa_runs": s.runs,
                "false_rollback_rate": float((aa >= 0).mean()),
                "power": {name: float((f >= 0).mean()) for name, f in firsts.items()},
                "median_requests_to_detect": {
                    name: _median_requests(f, s.batch_requests) for name, f in firsts.items()
                },
            }
        )
    settings = {k: v for k, v in asdict(s).items() if k != "thresholds"}
    th = s.thresholds
    settings.update(
        looks=s.looks,
        expected_production_budget=round(s.budget_requests * s.production_share),
        alpha_per_metric=sq.metric_alpha(s.alpha),
        margins={
            "max_error_rate_diff": th.max_error_rate_diff,
            "max_p95_ratio": th.max_p95_ratio,
            "max_cost_ratio": th.max_cost_ratio,
        },
        scenarios={name: asdict(reg) for name, reg in SCENARIOS.items()},
    )
    return {
        "gates": gates,
        "targets": _targets(gates, s.alpha),
        "settings": settings,
        "elapsed_s": round(time.monotonic() - started, 2),
    }
