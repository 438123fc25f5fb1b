"""Prometheus metrics for the host application to expose.

Counters and the latency histogram are updated per request with pre-resolved label
children (a dict lookup, no label parsing on the hot path). Everything that is state
rather than an event (breaker state, ejection, applied config version, failback) is
read from the router only when Prometheus scrapes, by a custom collector.

Expose them with your app's registry, e.g.::

    from prometheus_client import REGISTRY, make_asgi_app
    router = ProductionIntelligentQueryRouter(metrics_registry=REGISTRY)
    app.mount("/metrics", make_asgi_app())
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS_S = (0.025, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0, 30.0)
BREAKER_STATES = {"closed": 0, "half_open": 1, "open": 2}


class RouterMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.requests = Counter(
            "router_requests",
            "Routed requests (shadow executions included, see the shadow label).",
            ["arm", "backend", "outcome", "shadow"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "router_request_latency_seconds",
            "End-to-end routing latency, failovers included.",
            ["arm", "backend"],
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.cost = Counter(
            "router_cost_usd",
            "Spend on answers, by arm and backend.",
            ["arm", "backend"],
            registry=self.registry,
        )
        self._children: dict[tuple[str, str, str, bool], tuple[Any, Any, Any]] = {}

    def observe(
        self,
        arm: str,
        backend: str | None,
        outcome: str,
        shadow: bool,
        latency_ms: float,
        cost_usd: float,
    ) -> None:
        key = (arm, backend or "none", outcome, shadow)
        children = self._children.get(key)
        if children is None:
            children = (
                self.requests.labels(arm, key[1], outcome, "true" if shadow else "false"),
                self.latency.labels(arm, key[1]),
                self.cost.labels(arm, key[1]),
            )
            self._children[key] = children
        children[0].inc()
        children[1].observe(latency_ms / 1000.0)
        if cost_usd:
            children[2].inc(cost_usd)

    def watch(self, state: Callable[[], dict[str, Any]]) -> None:
        """Register the scrape-time collector; `state` returns a health/status snapshot."""
        self.registry.register(_StateCollector(state))


class _StateCollector(Collector):
    def __init__(self, state: Callable[[], dict[str, Any]]) -> None:
        self.state = state

    def collect(self) -> Iterator[GaugeMetricFamily]:
        snapshot = self.state()
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
        yield GaugeMetricFamily(
            "router_failback",
            "1 after the local guard failed back.",
            value=1.0 if snapshot.get("failback") else 0.0,
        )
