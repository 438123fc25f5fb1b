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
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator
from contextlib import suppress
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

LATENCY_BUCKETS_S = (0.025, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0, 30.0)
BREAKER_STATES = {"closed": 0, "half_open": 1, "open": 2}


class RouterMetrics:
    """Request counts, spend and the latency histogram, per arm and backend.

    The request path only bumps plain Python numbers (a dict lookup, two additions and
    a bisect); Prometheus families are built from them when scraped. The exposition is
    what prometheus-client's Counter and Histogram would produce.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        #: (arm, backend, outcome, shadow) -> [requests, cost_usd]
        self.series: dict[tuple[str, str, str, bool], list[float]] = {}
        #: (arm, backend) -> bucket counts (len(buckets) + 1, the last is +Inf) and the sum
        self.latency: dict[tuple[str, str], tuple[list[int], list[float]]] = {}
        self._collectors: list[Collector] = []
        self._register(_RequestCollector(self))

    def observe(
        self,
        arm: str,
        backend: str | None,
        outcome: str,
        shadow: bool,
        latency_ms: float,
        cost_usd: float,
    ) -> None:
        name = backend or "none"
        key = (arm, name, outcome, shadow)
        series = self.series.get(key)
        if series is None:
            series = self.series[key] = [0, 0.0]
        series[0] += 1
        series[1] += cost_usd
        histogram = self.latency.get((arm, name))
        if histogram is None:
            histogram = self.latency[(arm, name)] = ([0] * (len(LATENCY_BUCKETS_S) + 1), [0.0])
        seconds = latency_ms / 1000.0
        histogram[0][bisect_left(LATENCY_BUCKETS_S, seconds)] += 1
        histogram[1][0] += seconds

    def watch(self, state: Callable[[], dict[str, Any]]) -> None:
        """Register the scrape-time collector; `state` returns a health/status snapshot."""
        self._register(_StateCollector(state))

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
                "this metrics registry already holds a router's metrics: shut that router "
                f"down first (one live router per registry); {exc}"
            ) from None
        self._collectors.append(collector)


class _RequestCollector(Collector):
    def __init__(self, metrics: RouterMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[CounterMetricFamily | HistogramMetricFamily]:
        requests = CounterMetricFamily(
            "router_requests",
            "Routed requests (shadow executions included, see the shadow label).",
            labels=["arm", "backend", "outcome", "shadow"],
        )
        cost = CounterMetricFamily(
            "router_cost_usd", "Spend on answers, by arm and backend.", labels=["arm", "backend"]
        )
        spend: dict[tuple[str, str], float] = {}
        for (arm, backend, outcome, shadow), (count, usd) in list(self.metrics.series.items()):
            requests.add_metric([arm, backend, outcome, "true" if shadow else "false"], count)
            spend[(arm, backend)] = spend.get((arm, backend), 0.0) + usd
        for (arm, backend), usd in spend.items():
            cost.add_metric([arm, backend], usd)
        latency = HistogramMetricFamily(
            "router_request_latency_seconds",
            "End-to-end routing latency, failovers included.",
            labels=["arm", "backend"],
        )
        for (arm, backend), (counts, total) in list(self.metrics.latency.items()):
            cumulative, buckets = 0, []
            for bound, count in zip((*LATENCY_BUCKETS_S, float("inf")), counts, strict=True):
                cumulative += count
                buckets.append((floatToGoString(bound), cumulative))
            latency.add_metric([arm, backend], buckets, total[0])
        yield requests
        yield cost
        yield latency


SNAPSHOT_TRIES = 5


class _StateCollector(Collector):
    def __init__(self, state: Callable[[], dict[str, Any]]) -> None:
        self.state = state

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

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        snapshot = self._snapshot()
        breaker = GaugeMetricFamily(
            "router_breaker_state",
            "Circuit breaker per backend: 0 closed, 1 half-open, 2 open.",
            labels=["arm", "backend"],
        )
        ejected = GaugeMetricFamily(
            "router_backend_ejected",
            "1 while outlier detection ejects the backend.",
            labels=["arm", "backend"],
        )
        in_flight = GaugeMetricFamily(
            "router_backend_in_flight", "Requests in flight per backend.", labels=["arm", "backend"]
        )
        for arm, backends in snapshot.get("health", {}).items():
            for name, report in backends.items():
                if "breaker_state" in report:
                    breaker.add_metric([arm, name], BREAKER_STATES.get(report["breaker_state"], -1))
                ejected.add_metric([arm, name], 1.0 if report.get("ejected") else 0.0)
                in_flight.add_metric([arm, name], float(report.get("in_flight", 0)))
        yield breaker
        yield ejected
        yield in_flight
        yield GaugeMetricFamily(
            "router_config_version",
            "Applied RouterConfig version.",
            value=float(snapshot.get("config_version", 0)),
        )
        yield GaugeMetricFamily(
            "router_production_share",
            "Share of users the production balancer serves now (0..1).",
            value=float(snapshot.get("production_share", 0.0)),
        )
        denied = CounterMetricFamily(
            "router_retries_denied",
            "Retries the retry budget refused (the user got the failure before it).",
            labels=["arm"],
        )
        for arm, count in snapshot.get("retries_denied", {}).items():
            denied.add_metric([arm], float(count))
        yield denied
        yield GaugeMetricFamily(
            "router_failback",
            "1 after the local guard failed back.",
            value=1.0 if snapshot.get("failback") else 0.0,
        )
