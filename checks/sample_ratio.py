"""Sample-ratio mismatch on the split's own randomisation units: the 10,000 buckets.

Users are hashed to buckets and the production arm owns the buckets below
`traffic_percent * 100`, so under a healthy split the mean number of requests per bucket
is the same in the buckets each arm owns. We compare those two means (Student's t-test
with the pooled variance, every owned bucket counted, empty ones as zero): under a
healthy split the buckets are exchangeable, so this is the large-sample form of the
exact permutation test over buckets. Welch's test, which trusts each side's own
variance, alarmed on 17 % of healthy 5 % canaries with 50 users (a few heavy users in
the small side make its variance look tiny) and on 1.6 % with 1,000.

The test waits until about `MIN_EXPECTED_ACTIVE` active buckets are expected on the
smaller side: before that its sums are dominated by a few users and no normal
approximation holds (an arm that lost every row is still seen: its expected active
buckets come from the total, and the minimum-rows check fails meanwhile).

Why not the usual tests (measured in `tests/unit/test_sample_ratio.py`):
- a chi-square on request counts treats requests as independent, but a user's requests
  all go to one arm: with heavy users it alarms on 30-75 % of healthy canaries;
- a chi-square on distinct buckets (or users) saturates once traffic covers the buckets
  and never sees rows lost from one arm, which is what a broken pipeline looks like.
The per-bucket comparison is valid whatever the users' request rates, and it sees 10 %
of one arm's rows missing once a few thousand users are active.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

from scipy import stats

from router.bucketing import BUCKETS
from router.record import EventKind

#: Fewer owned buckets than this on either side and the test is not applied (its
#: false-alarm rate was measured above the alarm level with 13 buckets, a 0.125 % split).
MIN_BUCKETS = 50

#: Expected non-empty buckets on the smaller side (total non-empty x its share) before
#: the test applies. Healthy splits with log-normal heavy users (2,000 seeded runs each,
#: alarms at p < 0.001) just past the wait: 0.25 % at 5 % with 1,000 users, 0.15 % at
#: 0.5 % with 15,000, 0.2 % at 95 % with 1,000, falling as users grow (0.05 % at 5 %
#: with 1,500). A wait of 50 would never judge a 0.5 % split (its 50 buckets).
MIN_EXPECTED_ACTIVE = 30

#: Per side: requests in its own buckets, their sum of squares per bucket. Requests an
#: arm served from the other arm's buckets count for neither: misrouting shows up as a
#: deficit where those requests belonged.
PER_BUCKET_SQL = """
WITH per_bucket AS (
    SELECT subject_bucket, count(*) AS n
    FROM requests
    WHERE config_version = $version AND NOT is_shadow
      AND arm = CASE WHEN subject_bucket < $edge THEN 'production' ELSE 'legacy' END
    GROUP BY subject_bucket
)
SELECT subject_bucket < $edge AS production_owned,
       sum(n)::DOUBLE AS requests, sum(n * n)::DOUBLE AS squares, count(*) AS active
FROM per_bucket GROUP BY 1
"""


class Connection(Protocol):
    def execute(self, query: str, parameters: Any = ...) -> Any: ...


@dataclass(frozen=True)
class SampleRatio:
    p_value: float
    production_share: float  # of the requests served in their own arm's buckets
    expected_share: float
    production_buckets: int
    legacy_buckets: int


def owned_buckets(traffic_percent: float) -> int:
    """How many buckets the production arm owns (`bucket < traffic_percent * 100`)."""
    return min(BUCKETS, math.ceil(traffic_percent * 100))


def bucket_means_p_value(
    production: tuple[float, float, int], legacy: tuple[float, float, int]
) -> float | None:
    """Two-sided pooled-variance t-test p-value from (sum, sum of squares, number of
    buckets) per side."""
    moments = []
    for total, squares, buckets in (production, legacy):
        if buckets < 2:
            return None
        mean = total / buckets
        variance = max(squares - buckets * mean * mean, 0.0) / (buckets - 1)
        moments.append((mean, math.sqrt(variance), buckets))
    if moments[0][1] == 0 and moments[1][1] == 0:
        return None if moments[0][0] == moments[1][0] else 0.0
    result = stats.ttest_ind_from_stats(*moments[0], *moments[1], equal_var=True)
    return float(result.pvalue)


def sample_ratio(con: Connection, version: int, traffic_percent: float) -> SampleRatio | None:
    """None when the split leaves either arm fewer than `MIN_BUCKETS` buckets, or fewer
    than `MIN_EXPECTED_ACTIVE` active buckets are expected on its smaller side yet."""
    owned = owned_buckets(traffic_percent)
    if min(owned, BUCKETS - owned) < MIN_BUCKETS:
        return None
    rows = con.execute(
        PER_BUCKET_SQL, {"version": version, "edge": traffic_percent * 100}
    ).fetchall()
    sums = {bool(flag): (requests, squares) for flag, requests, squares, _ in rows}
    active = sum(row[3] for row in rows)
    if active * min(owned, BUCKETS - owned) / BUCKETS < MIN_EXPECTED_ACTIVE:
        return None
    production = (*sums.get(True, (0.0, 0.0)), owned)
    legacy = (*sums.get(False, (0.0, 0.0)), BUCKETS - owned)
    total = production[0] + legacy[0]
    p_value = bucket_means_p_value(production, legacy)
    if total == 0 or p_value is None:
        return None
    return SampleRatio(p_value, production[0] / total, owned / BUCKETS, owned, BUCKETS - owned)


#: Shadow executions recorded under this share of those the sample rate asks for,
#: beyond sampling noise, are a data-quality alarm.
MIN_SHADOW_COVERAGE = 0.9
#: Too few expected shadows to judge coverage.
MIN_EXPECTED_SHADOWS = 100
#: How unlikely a shortfall must be under honest sampling before it counts.
SHADOW_NOISE_LEVEL = 1e-4


#: Shadows the router did not send under config version $version because every backend
#: for the question was rate-limited. The event's text starts with the count
#: (`router.record.shadows_yielded_detail`).
SHADOWS_YIELDED_SQL = f"""
SELECT coalesce(sum(TRY_CAST(regexp_extract(detail, '^([0-9]+) ', 1) AS BIGINT)), 0)
FROM router_events
WHERE kind = '{EventKind.SHADOWS_YIELDED.value}' AND config_version = $version
"""


@dataclass(frozen=True)
class ShadowCoverage:
    coverage: float  # (recorded + yielded shadows) / (primaries x sample rate)
    minimum: float  # the lowest coverage sampling noise explains, at most MIN_SHADOW_COVERAGE
    yielded: int = 0


def shadows_yielded(con: Connection, version: int) -> int:
    row = con.execute(SHADOWS_YIELDED_SQL, {"version": version}).fetchone()
    return int(row[0]) if row else 0


def shadow_coverage(
    primaries: int, shadows: int, sample_rate: float, yielded: int = 0
) -> ShadowCoverage | None:
    """Shadows the router skipped (its concurrency cap was full) leave no row, and they
    are skipped exactly when production is slow: the paired tests would then judge a
    faster subset. Coverage below `MIN_SHADOW_COVERAGE`, and below what binomial
    sampling at `sample_rate` explains at `SHADOW_NOISE_LEVEL`, is an alarm. None when
    too few shadows are expected to judge.

    Shadows `yielded` to a rate limit count as covered: the router held them back
    because every backend that could answer was telling users to wait, which says
    nothing of production's speed."""
    expected = primaries * sample_rate
    if sample_rate <= 0 or expected < MIN_EXPECTED_SHADOWS:
        return None
    noise_floor = float(stats.binom.ppf(SHADOW_NOISE_LEVEL, primaries, sample_rate)) / expected
    return ShadowCoverage(
        (shadows + yielded) / expected, min(MIN_SHADOW_COVERAGE, noise_floor), yielded
    )
