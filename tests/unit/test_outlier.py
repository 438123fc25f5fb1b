"""Envoy-style passive outlier ejection over a pool, driven by explicit `now` values."""

from __future__ import annotations

from collections.abc import Sequence

from router.backend_state import BackendState
from router.backends import BackendConfig, BackendKind
from router.failures import BackendFailure
from router.outlier import OutlierDetector, OutlierEvent
from router.production_config import OutlierSettings
from router.record import ErrorKind, EventKind

FAIL = BackendFailure(ErrorKind.CONNECT, "refused")
CLIENT = BackendFailure(ErrorKind.CLIENT_ERROR, "400", status=400)
LIMITED = BackendFailure(ErrorKind.RATE_LIMITED, "429", status=429)


def backend(name: str, kind: BackendKind = BackendKind.LIGHTRAG) -> BackendState:
    return BackendState(BackendConfig(name=name, kind=kind, base_url="http://127.0.0.1:9000"))


def pool(n: int) -> list[BackendState]:
    return [backend(f"lightrag-{i}") for i in range(1, n + 1)]


def detector(**kw: object) -> OutlierDetector:
    defaults: dict[str, object] = {
        "consecutive_failures": 5,
        "failure_rate": 0.5,
        "window": 10,
        "minimum_calls": 10,
        "base_ejection_s": 10.0,
        "max_ejection_s": 300.0,
        "max_ejection_percent": 50.0,
    }
    defaults.update(kw)
    return OutlierDetector(OutlierSettings(**defaults))  # type: ignore[arg-type]


def feed(
    det: OutlierDetector,
    b: BackendState,
    members: Sequence[BackendState],
    outcomes: str,
    now: float = 0.0,
) -> list[OutlierEvent]:
    """'o' ok, 'x' failure, 'c' client error, 'r' rate limited; returns all events."""
    events: list[OutlierEvent] = []
    for ch in outcomes:
        failure = {"x": FAIL, "c": CLIENT, "r": LIMITED}.get(ch)
        events += det.observe(b, members, failure, now)
    return events


def test_consecutive_failures_eject() -> None:
    det, members = detector(), pool(3)
    b = members[0]
    assert feed(det, b, members, "xxxx", now=100.0) == []
    [event] = feed(det, b, members, "x", now=100.0)
    assert event.kind is EventKind.BACKEND_EJECTED
    assert event.message == "lightrag-1 ejected for 10s: 5 failures in a row (ejection #1)"
    assert b.ejected_until == 110.0
    assert b.ejections == 1
    assert b.consecutive_failures == 0
    assert not b.available(109.9)


def test_a_success_resets_the_streak() -> None:
    det, members = detector(minimum_calls=10, window=10), pool(3)
    b = members[0]
    assert feed(det, b, members, "xxxxoxxxx") == []
    assert b.consecutive_failures == 4
    assert b.ejections == 0


def test_failure_rate_over_the_window_ejects() -> None:
    det, members = detector(consecutive_failures=100, window=10, minimum_calls=10), pool(3)
    b = members[0]
    assert feed(det, b, members, "oxoxoxoxo") == []  # 4 of 9: too few calls anyway
    [event] = feed(det, b, members, "x")  # 5 of 10
    assert event.kind is EventKind.BACKEND_EJECTED
    assert "failure rate 50% over the last 10 calls >= 50%" in event.message


def test_failure_rate_window_slides() -> None:
    det, members = detector(consecutive_failures=100, window=4, minimum_calls=4), pool(3)
    b = members[0]
    assert feed(det, b, members, "xooo" + "o" + "oxo") == []  # at most 1 of 4 at any time
    assert det.describe(b, 0.0)["outlier_failure_rate"] == 0.25


def test_minimum_calls_is_capped_at_the_window() -> None:
    det, members = detector(consecutive_failures=100, window=4, minimum_calls=50), pool(3)
    b = members[0]
    [event] = feed(det, b, members, "oxox")
    assert event.kind is EventKind.BACKEND_EJECTED


def test_client_errors_and_rate_limits_are_ignored() -> None:
    det, members = detector(), pool(3)
    b = members[0]
    assert feed(det, b, members, "xxxx" + "crcrcr") == []
    assert b.consecutive_failures == 4  # neither counted nor reset
    assert det.describe(b, 0.0)["outlier_window_calls"] == 4
    assert feed(det, b, members, "x")[0].kind is EventKind.BACKEND_EJECTED


def test_ejection_time_doubles_and_caps() -> None:
    det, members = detector(base_ejection_s=10.0, max_ejection_s=35.0), pool(3)
    b = members[0]
    now, durations = 0.0, []
    for _ in range(4):
        feed(det, b, members, "xxxxx", now)
        durations.append(b.ejected_until - now)
        now = b.ejected_until + 1.0  # back in the pool, fails again at once
    assert durations == [10.0, 20.0, 35.0, 35.0]
    assert b.ejections == 4
    assert det.ejection_time(1000) == 35.0  # no overflow for a very long streak


def test_ejection_time_starts_over_after_a_quiet_period() -> None:
    det, members = detector(base_ejection_s=10.0, max_ejection_s=100.0), pool(3)
    b = members[0]
    feed(det, b, members, "xxxxx", now=0.0)
    feed(det, b, members, "xxxxx", now=11.0)
    assert b.ejected_until == 31.0  # 20 s: second in a row
    feed(det, b, members, "xxxxx", now=31.0 + 100.0)  # served max_ejection_s since return
    assert b.ejected_until == 141.0  # 10 s again
    assert b.ejections == 3


def test_returns_after_the_ejection_time_once() -> None:
    det, members = detector(), pool(3)
    b = members[0]
    feed(det, b, members, "xxxxx", now=0.0)
    assert det.check_return(b, 9.99) is None
    returned = det.check_return(b, 10.0)
    assert returned is not None
    assert returned.kind is EventKind.BACKEND_RETURNED
    assert returned.message == (
        "lightrag-1 returned to the pool after ejection #1 (ejected for 10s: 5 failures in a row)"
    )
    assert det.check_return(b, 11.0) is None
    assert b.available(10.0)


def test_return_is_reported_by_observe_too() -> None:
    det, members = detector(), pool(3)
    b = members[0]
    feed(det, b, members, "xxxxx", now=0.0)
    [event] = feed(det, b, members, "o", now=12.0)
    assert event.kind is EventKind.BACKEND_RETURNED


def test_outcomes_while_ejected_are_ignored() -> None:
    det, members = detector(), pool(3)
    b = members[0]
    feed(det, b, members, "xxxxx", now=0.0)
    assert feed(det, b, members, "xxxxxxxxxx", now=5.0) == []  # degraded calls
    assert b.ejections == 1
    assert b.ejected_until == 10.0
    assert det.describe(b, 5.0)["outlier_window_calls"] == 0


def test_max_ejection_percent_limits_the_pool() -> None:
    det, members = detector(max_ejection_percent=50.0), pool(4)
    a, b, c, _ = members
    assert feed(det, a, members, "xxxxx")[0].kind is EventKind.BACKEND_EJECTED
    assert feed(det, b, members, "xxxxx")[0].kind is EventKind.BACKEND_EJECTED  # 2 of 4
    [skipped] = feed(det, c, members, "xxxxx")
    assert skipped.kind is EventKind.BACKEND_UNHEALTHY
    assert skipped.message == (
        "lightrag-3 ejection skipped (5 failures in a row): 2 of 4 backends already ejected "
        "and max_ejection_percent is 50%; routing degrades to it"
    )
    assert c.ejected_until == 0.0
    assert feed(det, c, members, "xxx") == []  # reported once per streak
    assert det.describe(c, 0.0)["ejection_skipped"] is not None
    # Once the others are back, the next failure ejects it.
    [*_, ejected] = feed(det, c, members, "x", now=10.0)
    assert ejected.kind is EventKind.BACKEND_EJECTED
    assert det.describe(c, 10.0)["ejection_skipped"] is None


def test_one_backend_may_always_be_ejected_like_envoy() -> None:
    det, members = detector(max_ejection_percent=10.0), pool(3)
    assert feed(det, members[0], members, "xxxxx")[0].kind is EventKind.BACKEND_EJECTED
    assert feed(det, members[1], members, "xxxxx")[0].kind is EventKind.BACKEND_UNHEALTHY


def test_last_backend_is_never_ejected() -> None:
    det, members = detector(max_ejection_percent=100.0), pool(1)
    b = members[0]
    [skipped] = feed(det, b, members, "xxxxxxxxxx")
    assert skipped.kind is EventKind.BACKEND_UNHEALTHY
    assert "it is the last available lightrag backend" in skipped.message
    assert b.ejected_until == 0.0
    assert b.ejections == 0
    assert feed(det, b, members, "o") == []  # a success ends the streak...
    assert feed(det, b, members, "xxxxx")[0].kind is EventKind.BACKEND_UNHEALTHY  # ...re-reported


def test_last_available_ignores_unhealthy_ejected_and_rate_limited_peers() -> None:
    det, members = detector(max_ejection_percent=100.0), pool(4)
    a, b, c, d = members
    b.healthy = False
    c.unavailable_until = 50.0
    feed(det, d, members, "xxxxx")  # d ejected
    [skipped] = feed(det, a, members, "xxxxx")
    assert skipped.kind is EventKind.BACKEND_UNHEALTHY
    assert a.ejected_until == 0.0


def test_last_backend_of_a_kind_is_never_ejected() -> None:
    det = detector(max_ejection_percent=100.0)
    members = [*pool(2), backend("perplexity-1", BackendKind.PERPLEXITY)]
    [skipped] = feed(det, members[2], members, "xxxxx")
    assert "last available perplexity backend" in skipped.message
    assert feed(det, members[0], members, "xxxxx")[0].kind is EventKind.BACKEND_EJECTED


def test_owner_can_make_availability_stricter() -> None:
    members = pool(2)
    det = OutlierDetector(
        OutlierSettings(), is_available=lambda s, now: s.available(now) and s.name != "lightrag-2"
    )
    [skipped] = feed(det, members[0], members, "xxxxx")
    assert skipped.kind is EventKind.BACKEND_UNHEALTHY


def test_describe_keys_are_stable_and_json_friendly() -> None:
    det, members = detector(), pool(3)
    b = members[0]
    fresh = det.describe(b, 0.0)
    feed(det, b, members, "xxxxx", now=0.0)
    after = det.describe(b, 4.0)
    assert (
        list(fresh)
        == list(after)
        == [
            "ejected",
            "ejected_for_s",
            "ejections",
            "consecutive_failures",
            "outlier_window_calls",
            "outlier_failure_rate",
            "ejection_reason",
            "ejection_skipped",
        ]
    )
    assert after["ejected"] is True
    assert after["ejected_for_s"] == 6.0
    assert after["ejections"] == 1
    assert after["ejection_reason"] == "ejected for 10s: 5 failures in a row"


def test_a_backend_failing_again_soon_after_its_return_is_ejected_for_longer() -> None:
    """The streak starts over only after `max_ejection_s` back in the pool, not after
    `base_ejection_s`: a flapping backend got the base time on every ejection."""
    det, members = detector(base_ejection_s=10.0, max_ejection_s=300.0), pool(3)
    b = members[0]
    feed(det, b, members, "xxxxx", now=0.0)
    assert det.check_return(b, 10.0) is not None
    feed(det, b, members, "xxxxx", now=70.0)  # 60 s after its return: still flapping
    assert b.ejected_until == 90.0  # 2 x base
