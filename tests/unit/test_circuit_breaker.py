"""The per-backend circuit breaker's state machine, driven by explicit `now` values."""

from __future__ import annotations

from hypothesis import event, given, settings
from hypothesis import strategies as st

from router.circuit_breaker import BreakerState, CircuitBreaker
from router.failures import BackendFailure
from router.production_config import CircuitBreakerSettings
from router.record import ErrorKind

FAIL = BackendFailure(ErrorKind.SERVER_ERROR, "500", status=500)
CLIENT = BackendFailure(ErrorKind.CLIENT_ERROR, "400", status=400)
LIMITED = BackendFailure(ErrorKind.RATE_LIMITED, "429", status=429, retry_after_s=1.0)


def breaker(**kw: object) -> CircuitBreaker:
    defaults: dict[str, object] = {
        "window_size": 10,
        "minimum_calls": 5,
        "failure_rate_threshold": 0.5,
        "slow_call_rate_threshold": 0.8,
        "slow_call_ms": 2000.0,
        "open_wait_s": 30.0,
        "half_open_probes": 3,
    }
    defaults.update(kw)
    return CircuitBreaker(CircuitBreakerSettings(**defaults), "lightrag-2")  # type: ignore[arg-type]


def feed(cb: CircuitBreaker, outcomes: str, now: float = 0.0, slow_ms: float = 3000.0) -> None:
    """'o' ok, 'x' failure, 's' slow success, 'c' client error, 'r' rate limited."""
    for ch in outcomes:
        failure = {"x": FAIL, "c": CLIENT, "r": LIMITED}.get(ch)
        cb.record(failure, slow_ms if ch == "s" else 100.0, now)


def open_breaker(cb: CircuitBreaker, now: float = 0.0) -> None:
    feed(cb, "x" * cb.minimum_calls, now)
    assert cb.state is BreakerState.OPEN
    cb.drain_transitions()


def test_closed_opens_on_failure_rate_with_numbers_in_message() -> None:
    cb = breaker()
    feed(cb, "ooxx")
    assert cb.state is BreakerState.CLOSED
    feed(cb, "x")  # 3 of 5 failed: 60% >= 50%
    assert cb.state is BreakerState.OPEN
    [t] = cb.drain_transitions()
    assert t.state is BreakerState.OPEN
    assert t.message == "lightrag-2 breaker opened: failure rate 60% over the last 5 calls >= 50%"
    assert cb.snapshot(0.0)["breaker_failure_rate"] == 0.6


def test_below_failure_threshold_stays_closed() -> None:
    cb = breaker()
    feed(cb, "oxoox" * 6)  # never more than 3 of 7; ends at 4 of 10
    assert cb.state is BreakerState.CLOSED
    snap = cb.snapshot(0.0)
    assert snap["breaker_window_calls"] == 10
    assert snap["breaker_failure_rate"] == 0.4


def test_minimum_calls_respected() -> None:
    cb = breaker(minimum_calls=5)
    feed(cb, "xxxx")  # 100% but only 4 calls
    assert cb.state is BreakerState.CLOSED
    feed(cb, "x")
    assert cb.state is BreakerState.OPEN


def test_minimum_calls_is_capped_at_a_count_window() -> None:
    cb = breaker(window_size=3, minimum_calls=10)
    feed(cb, "xx")
    assert cb.state is BreakerState.CLOSED
    feed(cb, "x")
    assert cb.state is BreakerState.OPEN


def test_opens_on_slow_call_rate_even_when_calls_succeed() -> None:
    cb = breaker()
    feed(cb, "osss")
    assert cb.state is BreakerState.CLOSED
    feed(cb, "s")  # 4 of 5 slow: 80% >= 80%
    assert cb.state is BreakerState.OPEN
    [t] = cb.drain_transitions()
    assert "slow-call rate 80% (> 2000 ms) over the last 5 calls >= 80%" in t.message


def test_slow_means_strictly_slower_than_slow_call_ms() -> None:
    cb = breaker()
    feed(cb, "sssss", slow_ms=2000.0)
    assert cb.state is BreakerState.CLOSED
    assert cb.snapshot(0.0)["breaker_slow_call_rate"] == 0.0


def test_count_window_forgets_the_oldest_call() -> None:
    cb = breaker(window_size=4, minimum_calls=4)
    feed(cb, "xooo")  # 25%
    feed(cb, "o")  # the failure leaves the window
    snap = cb.snapshot(0.0)
    assert snap["breaker_window_calls"] == 4
    assert snap["breaker_failure_rate"] == 0.0
    feed(cb, "x")
    assert cb.snapshot(0.0)["breaker_failure_rate"] == 0.25
    assert cb.state is BreakerState.CLOSED


def test_open_rejects_until_open_wait_has_passed() -> None:
    cb = breaker(open_wait_s=30.0)
    open_breaker(cb, now=10.0)
    assert not cb.permits(10.0)
    assert not cb.permits(39.999)
    assert not cb.on_start(39.999)
    assert cb.snapshot(25.0)["breaker_open_for_s"] == 15.0
    assert cb.state_at(40.0) is BreakerState.HALF_OPEN  # a read-only view
    assert cb.state is BreakerState.OPEN
    assert cb.permits(40.0)
    assert cb.state is BreakerState.HALF_OPEN
    [t] = cb.drain_transitions()
    assert t.message == "lightrag-2 breaker half-open after 30s open: allowing 3 probe calls"


def test_outcomes_while_open_are_ignored() -> None:
    cb = breaker()
    open_breaker(cb)
    feed(cb, "o" * 20, now=1.0)
    assert cb.state is BreakerState.OPEN
    assert cb.snapshot(1.0)["breaker_window_calls"] == 5  # what tripped it


def test_half_open_allows_exactly_n_probes() -> None:
    cb = breaker(half_open_probes=3)
    open_breaker(cb)
    assert [cb.on_start(30.0) for _ in range(5)] == [True, True, True, False, False]
    assert not cb.permits(30.0)
    assert cb.snapshot(30.0)["breaker_probes_in_flight"] == 3


def test_concurrent_checks_before_starts_still_take_at_most_n_slots() -> None:
    cb = breaker(half_open_probes=2)
    open_breaker(cb)
    assert all(cb.permits(30.0) for _ in range(4))  # four requests look before any starts
    assert [cb.on_start(30.0) for _ in range(4)] == [True, True, False, False]
    assert len(cb.probes) == 2


def test_half_open_closes_after_good_probes_and_clears_the_window() -> None:
    cb = breaker(half_open_probes=3)
    open_breaker(cb)
    for _ in range(3):
        cb.on_start(30.0)
    feed(cb, "oo", now=31.0)
    assert cb.state is BreakerState.HALF_OPEN
    assert cb.snapshot(31.0)["breaker_probes_completed"] == 2
    feed(cb, "o", now=31.0)
    assert cb.state is BreakerState.CLOSED
    transitions = cb.drain_transitions()
    assert transitions[-1].message.startswith(
        "lightrag-2 breaker closed: 3 of 3 half-open probes succeeded"
    )
    assert cb.snapshot(31.0)["breaker_window_calls"] == 0
    feed(cb, "xxxx", now=32.0)  # a fresh window: needs minimum_calls again
    assert cb.state is BreakerState.CLOSED


def test_one_bad_probe_below_threshold_still_closes() -> None:
    cb = breaker(half_open_probes=3)
    open_breaker(cb)
    for _ in range(3):
        cb.on_start(30.0)
    feed(cb, "xoo", now=31.0)  # 33% < 50%
    assert cb.state is BreakerState.CLOSED


def test_half_open_reopens_on_bad_probes_as_soon_as_certain() -> None:
    cb = breaker(half_open_probes=3, open_wait_s=30.0)
    open_breaker(cb)
    for _ in range(3):
        cb.on_start(30.0)
    feed(cb, "x", now=31.0)  # 1 of 3 could still close
    assert cb.state is BreakerState.HALF_OPEN
    feed(cb, "x", now=32.0)  # 2 of 3 >= 50% whatever the third says
    assert cb.state is BreakerState.OPEN
    assert cb.open_until == 62.0
    assert cb.times_opened == 2
    assert cb.drain_transitions()[-1].message == (
        "lightrag-2 breaker re-opened: 2 of 3 half-open probes failed (66.7% >= 50%)"
    )
    feed(cb, "o", now=33.0)  # the third probe's late answer changes nothing
    assert cb.state is BreakerState.OPEN


def test_half_open_reopens_on_slow_probes() -> None:
    cb = breaker(half_open_probes=2, slow_call_rate_threshold=0.5)
    open_breaker(cb)
    cb.on_start(30.0)
    cb.on_start(30.0)
    feed(cb, "s", now=31.0)
    assert cb.state is BreakerState.OPEN
    assert "1 of 2 half-open probes slower than 2000 ms" in cb.drain_transitions()[-1].message


def test_time_window_forgets_old_calls() -> None:
    cb = breaker(window_type="time", window_size=10, minimum_calls=3)
    feed(cb, "x", now=0.5)
    feed(cb, "x", now=5.0)
    assert cb.snapshot(9.99)["breaker_window_calls"] == 2
    assert cb.snapshot(10.0)["breaker_window_calls"] == 1  # second 0 left the window
    feed(cb, "x", now=10.2)  # only 2 calls in the last 10 s
    assert cb.state is BreakerState.CLOSED
    feed(cb, "x", now=14.0)  # 3 failures within seconds 5..14
    assert cb.state is BreakerState.OPEN
    assert "over 3 calls in the last 10s" in cb.drain_transitions()[-1].message


def test_time_window_minimum_calls_is_not_capped_by_seconds() -> None:
    cb = breaker(window_type="time", window_size=2, minimum_calls=5)
    feed(cb, "xxxx", now=1.0)
    assert cb.state is BreakerState.CLOSED
    feed(cb, "x", now=1.5)
    assert cb.state is BreakerState.OPEN


def test_client_errors_and_rate_limits_are_ignored() -> None:
    cb = breaker()
    feed(cb, "crcrcrcrcrcr")
    assert cb.state is BreakerState.CLOSED
    assert cb.snapshot(0.0)["breaker_window_calls"] == 0
    feed(cb, "ooxxx")  # only counted calls decide: 3 of 5
    assert cb.state is BreakerState.OPEN


def test_rate_limited_probe_frees_its_slot_without_counting() -> None:
    cb = breaker(half_open_probes=1)
    open_breaker(cb)
    assert cb.on_start(30.0)
    assert not cb.permits(30.0)
    feed(cb, "r", now=31.0)
    assert cb.state is BreakerState.HALF_OPEN
    assert cb.permits(31.0)
    assert cb.on_start(31.0)
    feed(cb, "o", now=32.0)
    assert cb.state is BreakerState.CLOSED


def test_lost_probe_is_freed_when_nothing_is_running() -> None:
    cb = breaker(half_open_probes=1)
    open_breaker(cb)
    assert cb.on_start(30.0, outstanding=0)
    assert not cb.permits(31.0, outstanding=1)  # still running
    assert cb.permits(31.0, outstanding=0)  # cancelled: no outcome will come


def test_lost_probe_is_freed_after_the_lease() -> None:
    cb = CircuitBreaker(
        CircuitBreakerSettings(minimum_calls=1, half_open_probes=1, open_wait_s=1.0),
        "b",
        probe_lease_s=60.0,
    )
    feed(cb, "x")
    assert cb.on_start(1.0)
    assert not cb.permits(60.9)
    assert cb.permits(61.0)


def test_result_in_half_open_without_a_probe_in_flight_is_ignored() -> None:
    cb = breaker(half_open_probes=1)
    open_breaker(cb)
    assert cb.permits(30.0)  # half-open, no probe started
    feed(cb, "o", now=30.5)  # a call from before the breaker opened
    assert cb.state is BreakerState.HALF_OPEN
    assert cb.permits(30.5)


def test_degraded_call_is_not_counted_as_a_probe() -> None:
    cb = breaker()
    open_breaker(cb)
    assert not cb.on_start(5.0)  # router degraded to this backend while open
    assert cb.state is BreakerState.OPEN
    assert not cb.probes


# -- any interleaving ------------------------------------------------------------------

ops = st.lists(
    st.one_of(
        st.just(("check",)),  # a request looks at permits() (it may start later)
        st.just(("start",)),  # a request that looked earlier now starts
        st.just(("degraded",)),  # the router sends a call although the breaker refused
        st.tuples(st.just("finish"), st.sampled_from("oxsrc")),
        st.just(("cancel",)),  # a running call is cancelled: its outcome never comes
        st.tuples(st.just("tick"), st.floats(min_value=0.0, max_value=20.0)),
    ),
    max_size=80,
)


@settings(max_examples=300, deadline=None)
@given(probes=st.integers(min_value=1, max_value=4), script=ops)
def test_half_open_never_holds_more_than_n_probes_for_any_interleaving(
    probes: int, script: list[tuple[object, ...]]
) -> None:
    cb = breaker(half_open_probes=probes, minimum_calls=2, window_size=4, open_wait_s=10.0)
    open_breaker(cb)
    now = 10.0  # the first look turns it half-open; bad probes re-open it, ticks re-probe
    running = 0  # calls started and not yet finished or cancelled
    looked = 0  # requests that saw permits() true and have not started yet
    for op in script:
        reclaimed = False  # whether the breaker just learnt how many calls are running
        if op[0] == "check":
            looked += cb.permits(now, running)
            reclaimed = True
        elif op[0] == "start" and looked:
            looked -= 1
            cb.on_start(now, running)
            running += 1
            reclaimed = True
        elif op[0] == "degraded":
            cb.on_start(now, running)
            running += 1
            reclaimed = True
        elif op[0] == "finish" and running:
            running -= 1
            feed(cb, str(op[1]), now)
        elif op[0] == "cancel" and running:
            running -= 1
        elif op[0] == "tick":
            now += float(op[1])  # type: ignore[arg-type]
        if cb.state is BreakerState.HALF_OPEN:
            assert len(cb.probes) + cb.probe_calls <= probes
            if reclaimed:  # a cancelled call's slot is free by the next look
                assert len(cb.probes) <= running
            if len(cb.probes) == probes:
                event("all probe slots taken")
        else:
            assert not cb.probes


@settings(max_examples=300, deadline=None)
@given(
    probes=st.integers(min_value=1, max_value=4),
    script=st.lists(st.sampled_from(["check", "start", "ok"]), max_size=60),
)
def test_concurrent_requests_never_get_more_than_n_probes(probes: int, script: list[str]) -> None:
    """Requests look (permits) and start (on_start) in any order; probes that were
    granted and are still running never exceed half_open_probes."""
    cb = breaker(half_open_probes=probes)
    open_breaker(cb)
    now = 30.0
    looked = 0
    granted = 0  # granted probes running
    total = 0
    for step in script:
        if step == "check":
            looked += cb.permits(now)
        elif step == "start" and looked:
            looked -= 1
            if cb.on_start(now) and cb.state is BreakerState.HALF_OPEN:
                granted += 1
                total += 1
        elif step == "ok" and granted:
            granted -= 1
            feed(cb, "o", now)
        if cb.state is BreakerState.HALF_OPEN:
            assert granted <= probes
            assert total <= probes
    assert cb.state_at(now) in (BreakerState.HALF_OPEN, BreakerState.CLOSED)


def test_exactly_the_threshold_opens_closed_and_half_open() -> None:
    """resilience4j's rule is "at or above" the threshold, in both states."""
    cb = breaker(window_size=10, minimum_calls=10)
    feed(cb, "oxoxoxoxox")  # 5 of 10: 50 %
    assert cb.state is BreakerState.OPEN
    probing = breaker(half_open_probes=2)
    open_breaker(probing)
    for _ in range(2):
        probing.on_start(30.0)
    feed(probing, "ox", now=31.0)  # 1 of 2 probes: 50 %
    assert probing.state is BreakerState.OPEN


def test_a_health_check_that_passed_since_it_opened_ends_the_open_wait() -> None:
    cb = breaker(open_wait_s=300.0)
    open_breaker(cb, now=10.0)
    assert not cb.probe_early(now=12.0, checked_at=9.0), "that check started before it opened"
    assert cb.blocks(12.0)
    assert cb.probe_early(now=12.0, checked_at=11.0)
    assert cb.state is BreakerState.HALF_OPEN and cb.permits(12.0)
    [t] = cb.drain_transitions()
    assert "half-open early: an active health check passed" in t.message
    # its probes fail: open again, and the same check cannot end the new wait
    for _ in range(2):  # 2 of 3 probes fail
        assert cb.on_start(13.0)
        feed(cb, "x", now=13.0)
    assert cb.state is BreakerState.OPEN
    assert not cb.probe_early(now=14.0, checked_at=11.0)
    assert cb.blocks(14.0)


def test_probe_early_leaves_a_closed_or_half_open_breaker_alone() -> None:
    cb = breaker()
    assert not cb.probe_early(now=1.0, checked_at=0.0)
    assert cb.state is BreakerState.CLOSED
    open_breaker(cb, now=0.0)
    assert cb.permits(31.0)  # half-open by itself after the wait
    cb.drain_transitions()
    assert not cb.probe_early(now=31.0, checked_at=30.0)
    assert cb.drain_transitions() == []
