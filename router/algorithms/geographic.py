"""`geographic`: the request's own region first, then the nearest healthy one."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

from router.algorithms.base import Choice, RequestContext, StatelessAlgorithm
from router.backend_state import BackendState

#: Typical round-trip times in ms between cloud regions (Frankfurt, Ireland, Stockholm,
#: N. Virginia, Oregon, Singapore, Tokyo), rounded. They only need to rank regions, so
#: rough public figures do. Symmetric; a region to itself is 0.
DEFAULT_REGION_DISTANCES_MS: dict[tuple[str, str], float] = {
    ("eu-central", "eu-west"): 25,
    ("eu-central", "eu-north"): 25,
    ("eu-west", "eu-north"): 40,
    ("eu-central", "us-east"): 90,
    ("eu-west", "us-east"): 70,
    ("eu-north", "us-east"): 105,
    ("eu-central", "us-west"): 150,
    ("eu-west", "us-west"): 130,
    ("eu-north", "us-west"): 165,
    ("us-east", "us-west"): 65,
    ("eu-central", "ap-southeast"): 160,
    ("eu-west", "ap-southeast"): 175,
    ("eu-north", "ap-southeast"): 185,
    ("us-east", "ap-southeast"): 220,
    ("us-west", "ap-southeast"): 165,
    ("eu-central", "ap-northeast"): 230,
    ("eu-west", "ap-northeast"): 210,
    ("eu-north", "ap-northeast"): 250,
    ("us-east", "ap-northeast"): 150,
    ("us-west", "ap-northeast"): 100,
    ("ap-southeast", "ap-northeast"): 70,
}

#: Distance of a pair the table does not know: farther than any known pair.
UNKNOWN_DISTANCE_MS = 1_000.0


def symmetric(table: Mapping[tuple[str, str], float]) -> dict[tuple[str, str], float]:
    """Both orders of every pair, so a lookup is one dict access."""
    out: dict[tuple[str, str], float] = {}
    for (a, b), distance in table.items():
        if distance < 0:
            raise ValueError(f"distance {a}<->{b} must be >= 0, got {distance}")
        out[(a, b)] = out[(b, a)] = float(distance)
    return out


class Geographic(StatelessAlgorithm):
    """Rule: the region is `ctx.region`, or the router's own `home_region` if the request
    names none. Among candidates that are healthy (`BackendState.available(ctx.now)`;
    all of them if none is), keep those at the smallest distance from that region: the
    same region (0) first, else the nearest by `distances` (default
    `DEFAULT_REGION_DISTANCES_MS`; unknown pairs count as `UNKNOWN_DISTANCE_MS`). Within
    that region pick the fewest in-flight requests per unit of weight; ties (for example
    an idle region) go at random in proportion to weight, so weights hold at low load.

    Scores are each candidate's distance in ms from the request's region.
    """

    name = "geographic"

    def __init__(
        self,
        home_region: str = "eu-central",
        weights: dict[str, float] | None = None,
        seed: int | None = None,
        distances: Mapping[tuple[str, str], float] | None = None,
    ) -> None:
        self.home_region = home_region
        self.weights = dict(weights or {})
        self.distances = symmetric(DEFAULT_REGION_DISTANCES_MS if distances is None else distances)
        self._random = random.Random(seed)

    def distance(self, a: str, b: str) -> float:
        if a == b:
            return 0.0
        return self.distances.get((a, b), UNKNOWN_DISTANCE_MS)

    def choose(self, candidates: Sequence[BackendState], ctx: RequestContext) -> Choice:
        region = ctx.region or self.home_region
        now = ctx.now
        any_healthy = any(b.available(now) for b in candidates)
        scores: dict[str, float] = {}
        nearest = float("inf")
        for b in candidates:
            d = self.distance(region, b.config.region)
            scores[b.name] = d
            if d < nearest and (not any_healthy or b.available(now)):
                nearest = d
        weights = self.weights
        picked: BackendState | None = None
        best_load = float("inf")
        tied_weight = 0.0
        for b in candidates:
            if scores[b.name] != nearest or (any_healthy and not b.available(now)):
                continue
            weight = weights.get(b.name, b.weight)
            load = b.in_flight / weight if weight > 0 else float("inf")
            share = weight if weight > 0 else 1e-9
            if picked is None or load < best_load:
                picked, best_load, tied_weight = b, load, share
            elif load == best_load:
                # One-pass weighted pick among ties: keep b with probability w / sum(w).
                tied_weight += share
                if self._random.random() * tied_weight < share:
                    picked = b
        assert picked is not None
        where = (
            f"same region {region}"
            if nearest == 0
            else f"nearest region {picked.config.region} ({nearest:g} ms from {region})"
        )
        suffix = "" if any_healthy else " (degraded: no candidate is healthy)"
        return Choice(picked, f"{where}, in-flight per weight {best_load:g}{suffix}", scores)
