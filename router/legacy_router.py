"""`IntelligentQueryRouter`: the legacy router (weighted round robin, simple health).

Kept as the legacy arm of every rollout and as the API that
`ProductionIntelligentQueryRouter` must match method for method.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import httpx

from router.algorithms.weighted_round_robin import WeightedRoundRobin
from router.analytics import Analytics
from router.backend_client import BackendHttpClient
from router.backend_state import BackendState
from router.backends import BackendConfig
from router.balancer import Balancer, RouteOutcome
from router.classifier import Classification, KeywordClassifier, QueryClassifier, fit_to_kinds
from router.failures import BackendFailure
from router.feature_flags import ProductionFeatureFlags, load_flags
from router.health_checker import ActiveHealthChecker
from router.health_policy import ConsecutiveFailures, HealthEvent
from router.legacy_config import LoadBalancingConfig
from router.modes import Arm, DeploymentMode
from router.pool_repair import cancel_orphaned_exchanges
from router.production_config import HealthCheckSettings
from router.record import Outcome
from router.result import RoutingResult

log = logging.getLogger(__name__)


class AdaptiveWeightedRoundRobin(WeightedRoundRobin):
    """Legacy `enable_adaptive_routing`: a backend's weight is scaled by its success rate."""

    def weight_of(self, backend: BackendState) -> float:
        return super().weight_of(backend) * backend.success_rate()


class SlowCountsAsFailure(ConsecutiveFailures):
    """Legacy health: a failure, or a success slower than the threshold, counts toward rest."""

    def __init__(self, threshold: int, rest_s: float, slow_ms: float) -> None:
        super().__init__(threshold, rest_s)
        self.slow_ms = slow_ms

    def observe(
        self,
        backend: BackendState,
        pool: Sequence[BackendState],
        failure: BackendFailure | None,
        latency_ms: float,
        now: float,
    ) -> HealthEvent | None:
        if failure is None and latency_ms > self.slow_ms:
            return self._count_failure(backend, now, "slow responses")
        return super().observe(backend, pool, failure, latency_ms, now)


def default_backends(flags: ProductionFeatureFlags | None = None) -> tuple[BackendConfig, ...]:
    backends = (flags or load_flags()).backends()
    if not backends:
        raise ValueError(
            "no backends configured: set PROD_LB_LIGHTRAG_URLS and/or PROD_LB_PERPLEXITY_URL "
            "(or PROD_LB_BACKENDS_FILE), or pass backends=[...]"
        )
    return backends


def query_fingerprint(text: str) -> str:
    """Stored instead of the question: clinical questions can identify people."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def build_result(
    *,
    request_id: str,
    classification: Classification,
    outcome: RouteOutcome,
    arm: str,
    mode: str,
    algorithm: str,
    config_version: int,
    latency_ms: float,
) -> RoutingResult:
    failure = outcome.failure
    result_outcome = Outcome.OK if outcome.ok else (failure.outcome if failure else Outcome.ERROR)
    backend = outcome.backend.name if outcome.backend else None
    reasoning = [classification.reasoning]
    if outcome.choice:
        reasoning.append(f"{algorithm}: {outcome.choice.reason}")
    if len(outcome.attempts) > 1:
        reasoning.append(f"failed over after {len(outcome.attempts) - 1} failed attempt(s)")
    return RoutingResult(
        routing_decision=classification.routing_decision,
        confidence=classification.confidence,
        reasoning=reasoning,
        metadata={
            "selected_backend": backend,
            "backend_kind": outcome.backend.kind.value if outcome.backend else None,
            "query_category": classification.category,
            "arm": arm,
            # Perplexity's sources, for the caller to show with the answer
            "citations": list(outcome.answer.citations) if outcome.answer else [],
        },
        request_id=request_id,
        answer=outcome.answer.text if outcome.answer else None,
        arm=arm,
        mode=mode,
        algorithm=algorithm,
        config_version=config_version,
        backend=backend,
        attempts=len(outcome.attempts),
        outcome=result_outcome.value,
        error=str(failure) if failure and not outcome.ok else None,
        latency_ms=latency_ms,
        cost_usd=outcome.cost_usd,
        quality_score=outcome.quality,
        category=classification.category,
        explain=outcome.explain,
    )


def cancel_stale_tasks(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Cancel tasks of another loop that may run again (a closed one never will)."""
    for task in tasks:
        if not task.done() and not task.get_loop().is_closed():
            with contextlib.suppress(RuntimeError):
                task.cancel()


class IntelligentQueryRouter:
    """Routes each question to a backend with weighted round robin; one fallback attempt."""

    def __init__(
        self,
        load_balancing_config: LoadBalancingConfig | None = None,
        *,
        backends: Sequence[BackendConfig] | None = None,
        classifier: QueryClassifier | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        health_checks: bool = True,
    ) -> None:
        self.load_balancing_config = load_balancing_config or LoadBalancingConfig()
        self.backends = tuple(backends) if backends is not None else default_backends()
        self.classifier = classifier or KeywordClassifier()
        self._kinds = frozenset(backend.kind for backend in self.backends)
        self.analytics = Analytics()
        self._transport = transport
        self._client = BackendHttpClient(self.backends, transport=transport)
        cfg = self.load_balancing_config
        wrr = AdaptiveWeightedRoundRobin if cfg.enable_adaptive_routing else WeightedRoundRobin
        self.legacy = Balancer(
            Arm.LEGACY.value,
            self.backends,
            wrr(),
            self._client,
            SlowCountsAsFailure(
                cfg.circuit_breaker_threshold,
                float(cfg.circuit_breaker_timeout),
                cfg.response_time_threshold_ms,
            ),
            max_attempts=2,
            deadline_s=max(b.timeout_s for b in self.backends) * 2,
            honour_retry_after=False,
            on_event=self._on_backend_event,
        )
        self._health_checks = health_checks
        self._tasks: list[asyncio.Task[Any]] = []
        self._started = False
        self._closed = False
        self._checker: ActiveHealthChecker | None = None
        #: The event loop this router's connections and background tasks belong to.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._told_transport = False
        self._loop_pid = os.getpid()

    # -- lifecycle --------------------------------------------------------------------
    def _health_settings(self) -> HealthCheckSettings:
        return HealthCheckSettings(
            interval_s=float(self.load_balancing_config.health_check_interval)
        )

    def _balancers(self) -> list[Balancer]:
        return [self.legacy]

    def _bind_loop(self) -> None:
        """A router serves one event loop at a time: its connections and background tasks
        belong to the loop they started on. Once that loop has ended (a second
        `asyncio.run`, a sync view running one per request), they are rebuilt on the
        new one: kept-alive connections failed every first request with "Event loop is
        closed", and a production router's control loop was gone for good, so published
        documents (a rollback too) were never applied. A loop still running elsewhere
        (another thread's) is refused: the two would share connections."""
        loop = asyncio.get_running_loop()
        previous = self._loop
        if loop is previous:
            return
        if previous is not None:
            # A forked child's copy of a loop running in its parent is no one's.
            if previous.is_running() and not previous.is_closed() and self._loop_pid == os.getpid():
                raise RuntimeError(
                    "this router serves another event loop that is still running (another "
                    "thread's?): a router serves one loop at a time; create one router "
                    "per thread or event loop"
                )
            self._rebind()
        self._loop, self._loop_pid = loop, os.getpid()

    def _rebind(self) -> None:
        """Drop what belonged to the ended loop. Its tasks are cancelled (a loop that was
        only stopped would run them again: a second control loop, heartbeats after
        shutdown()); its clients' connections cannot be used (nor closed) from another
        loop. A transport the caller gave is theirs and is kept: its connections are
        tied to the old loop, so give a router used from several loops no transport."""
        cancel_stale_tasks(self._tasks)
        self._tasks.clear()
        self._started = False
        if isinstance(self._transport, httpx.AsyncHTTPTransport) and not self._told_transport:
            self._told_transport = True
            log.warning(
                "router used from a new event loop with the transport it was given: that "
                "transport's open connections belong to the old loop and will fail"
            )
        self._client = BackendHttpClient(self.backends, transport=self._transport)
        self.legacy.client = self._client

    def _start_background(self) -> None:
        self._bind_loop()
        self._started = True
        if (
            self._tasks
            or self._closed
            or not self._health_checks
            or not self._health_settings().enabled
        ):
            return
        if self._checker is None:  # one for the router's life: its verdicts carry over
            self._checker = ActiveHealthChecker(
                self._client,
                self.backends,
                lambda name: [b.by_name[name] for b in self._balancers()],
                self._health_settings(),
                self._on_health_change,
            )
        self._checker.client = self._client  # the current loop's
        self._tasks.append(asyncio.create_task(self._checker.run(), name="router-health-checks"))

    def _on_backend_event(self, event: HealthEvent) -> None:
        return None

    def _on_health_change(self, backend: str, healthy: bool, reason: str) -> None:
        return None

    async def shutdown(self) -> None:
        self._bind_loop()
        self._closed = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        await cancel_orphaned_exchanges(self._client)
        await self._client.aclose()

    async def __aenter__(self) -> IntelligentQueryRouter:
        self._start_background()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()

    # -- routing ----------------------------------------------------------------------
    def _classify(self, query_text: str) -> Classification:
        return fit_to_kinds(self.classifier.classify(query_text), self._kinds)

    async def route_query(
        self, query_text: str, context: Mapping[str, Any] | None = None
    ) -> RoutingResult:
        self._start_background()
        request_id = str((context or {}).get("request_id") or uuid.uuid4().hex)
        classification = self._classify(query_text)
        started = time.perf_counter()
        outcome = await self.legacy.route(
            query_text,
            classification,
            region=(context or {}).get("region"),
            headers={"X-Request-ID": request_id, "X-Router-Arm": Arm.LEGACY.value},
        )
        result = build_result(
            request_id=request_id,
            classification=classification,
            outcome=outcome,
            arm=Arm.LEGACY.value,
            mode=DeploymentMode.LEGACY_ONLY.value,
            algorithm=self.legacy.algorithm.name,
            config_version=0,
            latency_ms=(time.perf_counter() - started) * 1000.0,
        )
        self.analytics.add(datetime.now(UTC), result)
        return result

    # -- the legacy surface -----------------------------------------------------------
    def update_backend_weights(self, weights: dict[str, float]) -> None:
        """Set per-backend weights (by backend name) for every balancer in this router."""
        for balancer in self._balancers():
            balancer.set_weights(weights)

    def update_load_balancing_weights(self, weights: dict[str, float]) -> None:
        """Legacy alias: the weights of the legacy weighted round robin."""
        self.legacy.set_weights(weights)

    def export_analytics(
        self, start_time: datetime | None = None, end_time: datetime | None = None
    ) -> list[dict[str, Any]]:
        return self.analytics.export(start_time, end_time)

    def get_health_status(self) -> dict[str, Any]:
        return {"legacy": self.legacy.health_report()}

    def get_system_health_status(self) -> dict[str, Any]:
        report = self.legacy.health_report()
        available = sum(1 for b in report.values() if b["available"])
        total = len(report)
        status = "healthy" if available == total else "degraded" if available else "critical"
        return {
            "status": status,
            "available_backends": available,
            "total_backends": total,
            "mode": DeploymentMode.LEGACY_ONLY.value,
        }

    def get_performance_report(self) -> dict[str, Any]:
        return self.analytics.report()

    def force_rollback(self, reason: str = "manual") -> bool:
        """The legacy router has nothing to roll back to."""
        return False
