"""The local failback guard's rules, on a fake clock (router/failback_guard.py).

Each test pins a rule that a plausible one-token bug broke without any other test
noticing (a mutation audit): the stretch of legacy history a breach is compared with,
the evidence legacy needs, the noise bound on latency, and the split time limit.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from router.failback_guard import FailbackGuard
from router.router_config import GuardLimits


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_shared_outage_after_a_long_healthy_spell_does_not_fail_back() -> None:
    """Legacy is judged over the time production's window covers: over the whole hour
    of healthy history, an outage both arms share looked like production's fault."""
    clock = Clock()
    guard = FailbackGuard(GuardLimits(min_requests=20, window=40, error_rate=0.2), clock)
    for second in range(1800):  # half an hour, both arms healthy
        clock.now = float(second)
        guard.observe_legacy(True, 100.0)
        assert guard.observe(True, 100.0) is None
    for step in range(120):  # then legacy fails 2 in 3, production 1 in 2
        clock.now = 1800.0 + step
        for k in range(3):
            guard.observe_legacy(k == 0, 100.0)
        assert guard.observe(step % 2 == 0, 100.0) is None, guard.reason
    assert not guard.tripped


def _outage(production_fails: int, legacy_fails: int, of: int = 20) -> FailbackGuard:
    """Both arms fail from one outage, production `production_fails` in `of` requests,
    legacy `legacy_fails` in `of` (with 4 times production's traffic), for 5 minutes."""
    clock = Clock()
    guard = FailbackGuard(GuardLimits(), clock)
    for step in range(300 * of):
        clock.now = step / of
        for _ in range(4):
            guard.observe_legacy(step % of >= legacy_fails, 100.0)
        if guard.observe(step % of >= production_fails, 100.0) is not None:
            break
    return guard


def test_an_outage_both_arms_share_holds_though_production_reads_a_little_worse() -> None:
    """Legacy failing 6 in 20 and production 7 in 20: failing back cannot help users.
    Legacy's rate had to be at least production's, a coin flip re-tested on every
    request, so nearly every shared outage tripped the guard (200 of 200 runs at a 50 %
    split in a fault review)."""
    assert not _outage(production_fails=7, legacy_fails=6).tripped


def test_production_clearly_worse_than_an_also_failing_legacy_trips() -> None:
    guard = _outage(production_fails=14, legacy_fails=6)
    assert guard.tripped and "production error rate" in (guard.reason or "")


def test_one_failing_legacy_request_does_not_excuse_a_broken_production() -> None:
    """Legacy needs as many requests as production to count as "as bad": one failed
    legacy request in the window held back a production failing every request."""
    clock = Clock()
    guard = FailbackGuard(GuardLimits(min_requests=20, error_rate=0.2), clock)
    guard.observe_legacy(False, 100.0)
    for _ in range(20):
        guard.observe(False, 100.0)
    assert guard.tripped and "error rate 100.0%" in (guard.reason or "")


def test_slow_answers_trip_on_their_own_noise_bound_whatever_the_error_limit() -> None:
    """The latency rule's noise bound is against 5 % (the p95's tail), not the error
    limit: with a 50 % error limit, 30 % of answers over the p95 limit never tripped."""
    guard = FailbackGuard(GuardLimits(min_requests=20, error_rate=0.5, p95_latency_ms=300))
    for i in range(200):
        guard.observe(True, 900.0 if i % 10 < 3 else 100.0)
    assert guard.tripped and "p95 latency" in (guard.reason or "")


def test_the_time_limit_ends_only_a_split_and_only_past_its_hours() -> None:
    limits = GuardLimits(canary_max_hours=1)
    now = datetime.now(UTC)
    assert FailbackGuard(limits).check_staleness(now - timedelta(hours=5), False) is None
    assert FailbackGuard(limits).check_staleness(now - timedelta(minutes=50), True) is None
    late = FailbackGuard(limits).check_staleness(now - timedelta(hours=1.5), True)
    assert late is not None and "1.5 h old" in late
