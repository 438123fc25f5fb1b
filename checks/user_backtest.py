"""A/A canaries whose users differ, judged request by request and by the gate's real
path (`sequential.clustered` then `evaluate_arms`), on the same data.

`checks.backtest` draws every request's arm on its own; real splits are sticky by user,
and users differ (some ask harder questions, some meet more errors, a few ask most of
the questions). Both arms here are identical: any rollback is a false one. Users hash to
their own bucket, as `subject_bucket` does for up to 10,000 users.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from checks import sequential as sq
from checks.thresholds import Thresholds
from checks.verdict import Decision


@dataclass(frozen=True)
class UserBacktestSettings:
    runs: int = 100
    seed: int = 41
    users: int = 5000
    #: log-normal spread of how many questions each user asks
    activity_sigma: float = 1.0
    #: spread of each user's own log-latency offset
    latency_sigma: float = 0.2
    #: log-normal spread of each user's error-rate multiplier
    error_sigma: float = 1.0
    #: spread of each user's own log-cost offset
    cost_sigma: float = 0.3
    production_share: float = 0.05
    budget_requests: int = 100_000
    batch_requests: int = 200
    #: judge every this many batches (the per-look cost is the gate's, not numpy's)
    look_every: int = 5
    legacy_error_rate: float = 0.01
    thresholds: Thresholds = field(default_factory=Thresholds)


def _bucket_rows(n: Any, f: Any, no: Any, lat: Any, cost: Any) -> dict[str, float]:
    """`ARM_CLUSTER_SQL`'s row for one arm, from per-user sums."""
    row: dict[str, float] = {}
    for metric, y, m in (("failures", f, n), ("latency", lat, no), ("cost", cost, no)):
        row[f"{metric}_g"] = float((m > 0).sum())
        row[f"{metric}_yy"] = float((y * y).sum())
        row[f"{metric}_yn"] = float((y * m).sum())
        row[f"{metric}_nn"] = float((m * m).sum())
    return row


def _one_run(s: UserBacktestSettings, rng: np.random.Generator) -> tuple[str | None, str | None]:
    """The first metric each way of judging flags as harm, if any."""
    users, total = s.users, s.budget_requests
    looks = total // s.batch_requests
    production = rng.random(users) < s.production_share
    activity = np.exp(s.activity_sigma * rng.standard_normal(users))
    user = rng.choice(users, size=total, p=activity / activity.sum())
    error_p = s.legacy_error_rate * np.exp(
        s.error_sigma * rng.standard_normal(users) - 0.5 * s.error_sigma**2
    )
    failed = rng.random(total) < np.minimum(error_p[user], 1.0)
    ok = ~failed
    log_latency = (
        math.log(150.0)
        + 0.5 * rng.standard_normal(total)
        + (s.latency_sigma * rng.standard_normal(users))[user]
    )
    cost = np.exp(
        math.log(0.002)
        - 0.08
        + 0.4 * rng.standard_normal(total)
        + (s.cost_sigma * rng.standard_normal(users))[user]
    )
    look_of = np.arange(total) // s.batch_requests

    def per_user(weights: Any) -> Any:  # (looks, users) cumulative sums
        flat = np.bincount(look_of * users + user, weights=weights, minlength=looks * users)
        return np.cumsum(flat.reshape(looks, users), axis=0)

    n, f = per_user(np.ones(total)), per_user(failed.astype(float))
    no = per_user(ok.astype(float))
    lat, lat2 = (
        per_user(np.where(ok, log_latency, 0.0)),
        per_user(np.where(ok, log_latency**2, 0.0)),
    )
    cst, cst2 = per_user(np.where(ok, cost, 0.0)), per_user(np.where(ok, cost**2, 0.0))
    naive: str | None = None
    clustered: str | None = None
    for k in range(s.look_every - 1, looks, s.look_every):
        arms: dict[str, sq.ArmSummary] = {}
        rows: dict[str, dict[str, float]] = {}
        for name, members in (("production", production), ("legacy", ~production)):
            a = [m[k, members] for m in (n, f, no, lat, lat2, cst, cst2)]
            arms[name] = sq.ArmSummary(
                sq.Moments(a[0].sum(), a[1].sum(), a[1].sum()),
                sq.Moments(a[2].sum(), a[3].sum(), a[4].sum()),
                sq.Moments(a[2].sum(), a[5].sum(), a[6].sum()),
                float(a[2].sum()),
            )
            rows[name] = _bucket_rows(a[0], a[1], a[2], a[3], a[5])
        if naive is None:
            naive = _harm(sq.evaluate_arms(arms["production"], arms["legacy"], s.thresholds))
        if clustered is None:
            effective = sq.clustered(arms["production"], arms["legacy"], rows)
            clustered = _harm(
                sq.evaluate_arms(effective.production, effective.legacy, s.thresholds)
            )
        if naive is not None and clustered is not None:
            break
    return naive, clustered


def _harm(results: list[sq.SequentialResult]) -> str | None:
    return next((r.metric for r in results if r.decision is Decision.HARM), None)


def run_user_backtest(
    progress: Callable[[float], None] | None = None, **overrides: Any
) -> dict[str, Any]:
    """False-rollback rates of the per-request and the clustered tests, and which metric
    rolled back, over `runs` seeded A/A phases."""
    s = UserBacktestSettings(**overrides)
    started = time.monotonic()
    seeds = np.random.SeedSequence(s.seed).spawn(s.runs)
    flagged: dict[str, dict[str, int]] = {"per_request": {}, "clustered": {}}
    for i, seed in enumerate(seeds):
        for way, metric in zip(flagged, _one_run(s, np.random.default_rng(seed)), strict=True):
            if metric is not None:
                flagged[way][metric] = flagged[way].get(metric, 0) + 1
        if progress is not None:
            progress((i + 1) / s.runs)
    settings = asdict(s)
    settings.pop("thresholds")
    return {
        "settings": settings,
        "false_rollback_rate": {way: sum(m.values()) / s.runs for way, m in flagged.items()},
        "by_metric": flagged,
        "elapsed_s": round(time.monotonic() - started, 1),
    }
