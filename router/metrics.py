"""Prometheus metrics for the host application to expose.

Counts, spend and the latency histogram are plain numbers updated per request and
turned into Prometheus families only when scraped. Everything that is state
rather than an event (breaker state, ejection, applied config version, failback) is
read from the router only when Prometheus scrapes, by a custom collector.

Expose them with your app's registry, e.g.::

    from prometheus_client import REGISTRY, make_asgi_app
    router = ProductionIntelligentQueryRouter(metrics_registry=REGISTRY)
    app.mount("/metrics", make_asgi_app())

One live router per registry: the metric names are fixed, so a second router on the same
registry is refused until the first one's `shutdown()` has unregistered its collectors.

Every series a router can produce exists from its start, at zero: Prometheus reads a
series' first value as its starting point, so the first errors of a kind that appeared
only with them would never show in `rate()` or `increase()`.

prometheus-client's multiprocess mode (gunicorn workers sharing one `/metrics`) reads
only its own mmap files and ignores custom collectors: these metrics are then per
process. Scrape each worker, or run one worker per process manager target.
"""

from __future__ import annotations

import logging
import os
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import suppress
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from router.record import ErrorKind, Outcome

log = logging.getLogger(__name__)

#: Up to the legacy arm's longest deadline (two attempts of 30 s, and more): a tail past
#: the last finite bucket is invisible to `histogram_quantile`.
LATENCY_BUCKETS_S = (
    0.025,
    0.05,
    0.1,
    0.2,
    0.35,
    0.5,
    0.75,
    1.0,
    1.5,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    45.0,
    60.0,
    90.0,
    120.0,
)
BREAKER_STATES = {"closed": 0, "half_open": 1, "open": 2}
ARMS = ("legacy", "production")
#: A backend attempt's result: answered, or how it failed.
ATTEMPT_RESULTS = ("ok", *(kind.value for kind in ErrorKind))
NO_BACKEND = "none"

Key = tuple[str, str, str, bool]  # arm, backend, outcome, shadow
LatencyKey = tuple[str, str, bool]  # arm, backend, shadow


def _shadow_label(shadow: bool) -> str:
    return "true" if shadow else "false"


class RouterMetrics:
    """Request counts, spend, backend attempts and the latency histogram, per arm and
    backend, shadow executions apart.

    The request path only bumps plain Python numbers (dict lookups, additions and a
    bisect); Prometheus families are built from them when scraped. The exposition is
    what prometheus-client's Counter and Histogram would produce.
    """

    def __init__(
        self, registry: CollectorRegistry | None = None, backends: Sequence[str] = ()
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.created = time.time()
        #: (arm, backend, outcome, shadow) -> [requests, cost_usd]
        self.series: dict[Key, list[float]] = {}
        #: (arm, backend, shadow) -> bucket counts (len(buckets) + 1, the last is +Inf), sum
        self.latency: dict[LatencyKey, tuple[list[int], list[float]]] = {}
        #: (arm, backend, result) -> attempts: failovers and retries show here, since a
        #: request is counted once, under the backend that ended it.
        self.attempts: dict[tuple[str, str, str], int] = {}
        for arm in ARMS:
            for shadow in (False, True) if arm == "production" else (False,):
                for backend in (*backends, NO_BACKEND):
                    for outcome in Outcome:
                        self.series[(arm, backend, outcome.value, shadow)] = [0, 0.0]
                    self.latency[(arm, backend, shadow)] = _empty_histogram()
            for backend in backends:
                for result in ATTEMPT_RESULTS:
                    self.attempts[(arm, backend, result)] = 0
        self._collectors: list[Collector] = []
        self._register(_RequestCollector(self))
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            log.warning(
                "PROMETHEUS_MULTIPROC_DIR is set: prometheus-client's multiprocess "
                "collector ignores the router's metrics, which stay per process; scrape "
                "each worker's own registry to see them"
            )

    def observe(
        self,
        arm: str,
        backend: str | None,
        outcome: str,
        shadow: bool,
        latency_ms: float,
        cost_usd: float,
    ) -> None:
        name = backend or NO_BACKEND
        key = (arm, name, outcome, shadow)
        series = self.series.get(key)
        if series is None:
            series = self.series[key] = [0, 0.0]
        series[0] += 1
        series[1] += cost_usd
        histogram = self.latency.get((arm, name, shadow))
        if histogram is None:
            histogram = self.latency[(arm, name, shadow)] = _empty_histogram()
        seconds = latency_ms / 1000.0
        histogram[0][bisect_left(LATENCY_BUCKETS_S, seconds)] += 1
        histogram[1][0] += seconds

    def attempt(self, arm: str, backend: str, error_kind: str | None) -> None:
        key = (arm, backend, error_kind or "ok")
        self.attempts[key] = self.attempts.get(key, 0) + 1

    def watch(self, state: Callable[[], dict[str, Any]]) -> None:
        """Register the scrape-time collector; `state` returns a health/status snapshot."""
        self._register(_StateCollector(state, self.created))

    def close(self) -> None:
        """Unregister this router's collectors (a shared registry outlives the router)."""
        while self._collectors:
            with suppress(KeyError):  # already unregistered by someone else
                self.registry.unregister(self._collectors.pop())

    def _register(self, collector: Collector) -> None:
        try:
            self.registry.register(collector)
        except ValueError as exc:  # prometheus-client's "Duplicated timeseries"
            self.close()  # leave nothing half-registered
            raise ValueError(
                "this metrics registry already holds metrics of the same names (another "
                f"router's?): shut that router down first (one live router per registry); {exc}"
            ) from None
        self._collectors.append(collector)


def _empty_histogram() -> tuple[list[int], list[float]]:
    return [0] * (len(LATENCY_BUCKETS_S) + 1), [0.0]


class _Described(Collector):
    """`describe()` names the families without reading anything: prometheus-client then
    refuses a second router on any registry, not only on `auto_describe` ones (a plain
    `CollectorRegistry()` took it, and every family was exposed twice)."""

    def families(self) -> list[Any]:
        raise NotImplementedError

    def describe(self) -> Iterable[Any]:
        return self.families()


class _RequestCollector(_Described):
    def __init__(self, metrics: RouterMetrics) -> None:
        self.metrics = metrics

    def families(self) -> list[Any]:
        created = self.metrics.created
        return [
            CounterMetricFamily(
                "router_requests",
                "Routed requests, counted once under the backend that ended them (shadow "
                "executions apart, see the shadow label).",
                labels=["arm", "backend", "outcome", "shadow"],
                created=created,
            ),
            CounterMetricFamily(
                "router_cost_usd",
                "Spend on answers, by arm and backend.",
                labels=["arm", "backend", "shadow"],
                created=created,
            ),
            HistogramMetricFamily(
                "router_request_latency_seconds",
                "End-to-end routing latency, failovers included.",
                labels=["arm", "backend", "shadow"],
            ),
            CounterMetricFamily(
                "router_backend_attempts",
                "Calls to each backend, by result (ok, or how it failed): failovers, "
                "retries and 429s that the request survived show here.",
                labels=["arm", "backend", "result"],
                created=created,
            ),
        ]

    def collect(self) -> Iterator[Any]:
        metrics = self.metrics
        requests, cost, latency, attempts = self.families()
        created = metrics.created
        spend: dict[LatencyKey, float] = {}
        for (arm, backend, outcome, shadow), (count, usd) in list(metrics.series.items()):
            requests.add_metric([arm, backend, outcome, _shadow_label(shadow)], count, created)
            spend[(arm, backend, shadow)] = spend.get((arm, backend, shadow), 0.0) + usd
        for (arm, backend, shadow), usd in spend.items():
            cost.add_metric([arm, backend, _shadow_label(shadow)], usd, created)
        for (arm, backend, shadow), (counts, total) in list(metrics.latency.items()):
            cumulative, buckets = 0, []
            for bound, count in zip((*LATENCY_BUCKETS_S, float("inf")), counts, strict=True):
                cumulative += count
                buckets.append((floatToGoString(bound), cumulative))
            latency.add_metric([arm, backend, _shadow_label(shadow)], buckets, total[0])
        for (arm, backend, result), count in list(metrics.attempts.items()):
            attempts.add_metric([arm, backend, result], count, created)
        yield from (requests, cost, latency, attempts)


SNAPSHOT_TRIES = 5


class _StateCollector(_Described):
    def __init__(self, state: Callable[[], dict[str, Any]], created: float) -> None:
        self.state = state
        self.created = created

    def _snapshot(self) -> dict[str, Any]:
        """The scrape runs in the exporter's thread while the event loop keeps updating
        the breakers' windows: iterating one as a request lands raises "deque mutated
        during iteration". The next try reads a settled window."""
        for _ in range(SNAPSHOT_TRIES - 1):
            try:
                return self.state()
            except RuntimeError:
                continue
        return self.state()  # the last try's error, if any, is the scrape's

    def families(self) -> list[Any]:
        created = self.created
        per_backend = ["arm", "backend"]
        return [
            GaugeMetricFamily(
                "router_breaker_state",
                "Circuit breaker per backend: 0 closed, 1 half-open, 2 open.",
                labels=per_backend,
            ),
            CounterMetricFamily(
                "router_breaker_opened",
                "Times each backend's breaker opened (one that opened and closed between "
                "two scrapes shows here, not in router_breaker_state).",
                labels=per_backend,
                created=created,
            ),
            GaugeMetricFamily(
                "router_backend_ejected",
                "1 while outlier detection ejects the backend.",
                labels=per_backend,
            ),
            CounterMetricFamily(
                "router_backend_ejections",
                "Times outlier detection ejected each backend.",
                labels=per_backend,
                created=created,
            ),
            GaugeMetricFamily(
                "router_backend_in_flight", "Requests in flight per backend.", labels=per_backend
            ),
            GaugeMetricFamily("router_config_version", "Applied RouterConfig version."),
            GaugeMetricFamily(
                "router_production_share",
                "Share of users the production balancer serves now (0..1).",
            ),
            CounterMetricFamily(
                "router_retries_denied",
                "Retries the retry budget refused (the user got the failure before it).",
                labels=["arm"],
                created=created,
            ),
            GaugeMetricFamily("router_failback", "1 after the local guard failed back."),
            CounterMetricFamily(
                "router_failbacks",
                "Times the local guard failed back to legacy.",
                created=created,
            ),
            CounterMetricFamily(
                "router_shadows_not_run",
                "Sampled shadow executions not run: reason concurrency_cap (production "
                "slow: the gate alarms on coverage) or rate_limited (yielded to users).",
                labels=["reason"],
                created=created,
            ),
        ]

    def collect(self) -> Iterator[Any]:
        snapshot = self._snapshot()
        families = self.families()
        family = {f.name: f for f in families}  # names as exposed, without `_total`
        created = self.created
        for arm, backends in snapshot.get("health", {}).items():
            for name, report in backends.items():
                labels = [arm, name]
                if "breaker_state" in report:
                    state = BREAKER_STATES.get(report["breaker_state"], -1)
                    family["router_breaker_state"].add_metric(labels, state)
                    opened = report.get("breaker_times_opened", 0)
                    family["router_breaker_opened"].add_metric(labels, opened, created)
                ejected = 1.0 if report.get("ejected") else 0.0
                family["router_backend_ejected"].add_metric(labels, ejected)
                ejections = float(report.get("ejections", 0))
                family["router_backend_ejections"].add_metric(labels, ejections, created)
                in_flight = float(report.get("in_flight", 0))
                family["router_backend_in_flight"].add_metric(labels, in_flight)
        version = float(snapshot.get("config_version", 0))
        family["router_config_version"].add_metric([], version)
        share = float(snapshot.get("production_share", 0.0))
        family["router_production_share"].add_metric([], share)
        for arm, count in snapshot.get("retries_denied", {}).items():
            family["router_retries_denied"].add_metric([arm], float(count), created)
        failback = 1.0 if snapshot.get("failback") else 0.0
        family["router_failback"].add_metric([], failback)
        failbacks = float(snapshot.get("failbacks", 0))
        family["router_failbacks"].add_metric([], failbacks, created)
        for reason, count in snapshot.get("shadows_not_run", {}).items():
            family["router_shadows_not_run"].add_metric([reason], float(count), created)
        yield from families
