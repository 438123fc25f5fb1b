"""The traffic split: deterministic, sticky, monotonic, proportional."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from router.bucketing import BUCKETS, TEST_VECTORS, bucket_of, in_production, subject_key


def test_published_test_vectors() -> None:
    for salt, key, bucket in TEST_VECTORS:
        assert bucket_of(key, salt) == bucket


def test_subject_key_prefers_user_then_session_then_request() -> None:
    assert subject_key({"user_id": "u1", "session_id": "s1"}, "r1") == "u1"
    assert subject_key({"session_id": "s1"}, "r1") == "s1"
    assert subject_key({"user_id": ""}, "r1") == "r1"
    assert subject_key(None, "r1") == "r1"


@given(key=st.text(min_size=1, max_size=40), salt=st.text(min_size=1, max_size=20))
def test_bucket_is_stable_and_in_range(key: str, salt: str) -> None:
    first = bucket_of(key, salt)
    assert 0 <= first < BUCKETS
    assert bucket_of(key, salt) == first


@given(
    key=st.text(min_size=1, max_size=40),
    low=st.floats(min_value=0, max_value=100),
    high=st.floats(min_value=0, max_value=100),
)
def test_raising_the_percent_never_moves_a_subject_out(key: str, low: float, high: float) -> None:
    low, high = sorted((low, high))
    bucket = bucket_of(key, "rollout-v1")
    if in_production(bucket, low):
        assert in_production(bucket, high)


def test_edges_zero_and_hundred() -> None:
    assert not any(in_production(bucket_of(f"u{i}", "s"), 0) for i in range(1000))
    assert all(in_production(bucket_of(f"u{i}", "s"), 100) for i in range(1000))


@settings(max_examples=25, deadline=None)
@given(percent=st.sampled_from([1, 5, 15, 50, 90]), salt=st.text(min_size=1, max_size=8))
def test_share_of_subjects_matches_percent(percent: int, salt: str) -> None:
    n = 20_000
    share = sum(in_production(bucket_of(f"user-{i}", salt), percent) for i in range(n)) / n
    # binomial standard error at n=20,000 is at most 0.35 points: allow 5 of them
    assert abs(share - percent / 100) < 0.0175


def test_the_edge_bucket_belongs_to_legacy() -> None:
    """Production owns buckets strictly below percent x 100."""
    assert in_production(499, 5) and not in_production(500, 5)
    assert in_production(12, 0.125) and not in_production(13, 0.125)
    assert not in_production(0, 0)
