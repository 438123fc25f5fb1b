"""`ProductionIntelligentQueryRouter`: the legacy surface with the production balancer inside.

Per request: read the applied `RouterConfig` once (so a config change never splits a
request), bucket the subject, pick the arm from the mode, route, record one row.
In shadow mode the production balancer also answers a sample of the same questions in
the background; that answer is discarded and can never delay, fail or change the
user's answer.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import json
import logging
import math
import os
import random
import socket
import tempfile
import threading
import time
import traceback
import uuid
import weakref
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, NamedTuple

import httpx
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from router.algorithms.base import Algorithm
from router.algorithms.custom import load_class
from router.algorithms.names import ADVANCED_ALGORITHMS
from router.algorithms.registry import build_algorithm
from router.backend_client import BackendHttpClient, redact_keys
from router.backend_state import BackendState
from router.backends import BackendConfig
from router.balancer import Balancer, RouteOutcome
from router.bucketing import bucket_of, in_production, subject_key
from router.budget import DailyBudget
from router.classifier import Classification, QueryClassifier
from router.control_store import (
    Acknowledgement,
    ControlStore,
    FileControlStore,
    default_instance_id,
)
from router.failback_guard import FailbackGuard
from router.failures import BackendFailure
from router.feature_flags import ProductionFeatureFlags, load_flags
from router.health_policy import HealthEvent, ProductionHealth
from router.legacy_config import LoadBalancingConfig
from router.legacy_router import (
    IntelligentQueryRouter,
    build_result,
    cancel_stale_tasks,
    default_backends,
    query_fingerprint,
)
from router.metrics import RouterMetrics
from router.migration import ConfigurationMigrator
from router.modes import Arm, DeploymentMode
from router.pool_repair import cancel_orphaned_exchanges
from router.production_config import HealthCheckSettings, ProductionLoadBalancingConfig
from router.record import ErrorKind, EventKind, Outcome, RequestRecord, shadows_yielded_detail
from router.recorder import NullRecorder, SegmentRecorder
from router.result import RoutingResult
from router.retry_budget import RetryBudget
from router.router_config import RouterConfig
from router.settings_errors import SettingsError

log = logging.getLogger(__name__)

PRODUCTION = Arm.PRODUCTION.value
NOT_PRODUCTIONS_FAULT = frozenset({Outcome.REJECTED.value, Outcome.RATE_LIMITED.value})
FACTS_CACHE_SIZE = 4096
#: Longer questions are not cached: the cache is bounded by count, and 4,096 prompts of
#: 50 KB held 236 MB (a long prompt rarely repeats word for word anyway).
FACTS_CACHE_MAX_CHARS = 2048
INT32_MAX = 2**31 - 1  # the row schema's token columns
BUCKET_CACHE_SIZE = 65_536
SHUTDOWN_DRAIN_S = 10.0  # how long shutdown() lets requests in flight finish
CONTROL_CALL_S = 5.0  # how long start() and shutdown() wait for the control store
#: How often a router looks for another process under its id (above STALE_AFTER_S, so
#: the first look never sees the heartbeat of a process this one replaced).
SHARED_ID_CHECK_S = 30.0


class QueryFacts(NamedTuple):
    classification: Classification
    fingerprint: str
    length: int


SPLIT_MODES = (DeploymentMode.CANARY, DeploymentMode.AB_TEST)


class ProductionIntelligentQueryRouter(IntelligentQueryRouter):
    def __init__(
        self,
        load_balancing_config: LoadBalancingConfig | None = None,
        *,
        backends: Sequence[BackendConfig] | None = None,
        classifier: QueryClassifier | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        health_checks: bool = True,
        flags: ProductionFeatureFlags | None = None,
        production_config: ProductionLoadBalancingConfig | None = None,
        control_store: ControlStore | Literal["env"] | None = "env",
        recorder: SegmentRecorder | None = None,
        instance_id: str | None = None,
        seed: int | None = None,
        metrics_registry: CollectorRegistry | None = None,
    ) -> None:
        self.flags = flags if flags is not None else load_flags()
        if backends is None:
            backends = (
                production_config.backends
                if production_config and production_config.backends
                else None
            )
        super().__init__(
            load_balancing_config,
            backends=backends if backends is not None else default_backends(self.flags),
            classifier=classifier,
            transport=transport,
            health_checks=health_checks,
        )
        if production_config is None:
            # PROD_LB_* decide algorithm, budget, region and custom class; the legacy
            # config's health, breaker and ejection settings carry over through the migrator.
            # The caller's legacy strategy maps to the production algorithm unless
            # PROD_LB_PRIMARY_ALGORITHM names one (or no legacy config was given).
            explicit = (
                load_balancing_config is None or "primary_algorithm" in self.flags.model_fields_set
            )
            migrated = ConfigurationMigrator().migrate_config(
                self.load_balancing_config,
                backends=self.backends,
                algorithm=self.flags.primary_algorithm if explicit else None,
                custom_algorithm=self.flags.custom_algorithm,
            )
            production_config = self.flags.production_config().model_copy(
                update={
                    "algorithm": migrated.algorithm,
                    "backends": tuple(self.backends),
                    "health_check": migrated.health_check,
                    "circuit_breaker": migrated.circuit_breaker,
                    "outlier": migrated.outlier,
                }
            )
        self.production_config = production_config
        if production_config.custom_algorithm:
            # Checked at start-up even when `custom` is not the first algorithm: a typo
            # must stop the application now, not refuse the rollout that switches to it.
            load_class(production_config.custom_algorithm)
        #: No id given: `host-pid`, unique among this process's live routers and chosen
        #: again in a forked child (see `_claim_default_id`).
        self._default_id = not (instance_id or self.flags.instance_id)
        self.instance_id = instance_id or self.flags.instance_id or _claim_default_id()
        self._seed = seed
        self._random = random.Random(seed)
        #: "env": the folder store under PROD_LB_DATA_DIR; None: no rollout control at all.
        self.control_store: ControlStore | None = (
            _store_from_flags(self.flags) if control_store == "env" else control_store  # type: ignore[assignment]
        )
        #: A store built here from PROD_LB_* is ours to close (an HTTP one holds a client).
        self._owns_store = control_store == "env"
        ours = []  # folders this router writes under PROD_LB_DATA_DIR, checked below
        if self._owns_store and isinstance(self.control_store, FileControlStore):
            ours.append(self.control_store.acks_dir)
        self._owns_recorder = recorder is None
        if recorder is None:
            segments = self.flags.data_dir / "segments"
            recorder_cls = SegmentRecorder if self.flags.perf_comparison else NullRecorder
            recorder = recorder_cls(segments, self.instance_id)
            ours.append(recorder.directory)
        _check_writable(ours, self.flags.data_dir)
        self.recorder = recorder  # started at the end, once nothing else can fail
        self.config = self.flags.initial_router_config().model_copy(
            update={"algorithm": production_config.algorithm}
        )
        #: One spend counter per instance, kept across config changes (a weight change
        #: must not reset today's spend). None when cost optimisation is off.
        self.budget = (
            DailyBudget(production_config.cost.daily_budget_usd)
            if production_config.cost.daily_budget_usd is not None
            else None
        )
        # The production arm has connection pools of its own (`max_connections` per
        # backend and arm): shadows, or a slow canary, holding every connection a backend
        # allows must never make the legacy arm's users wait for one.
        self._production_client = BackendHttpClient(self.backends, transport=transport)
        self.production = Balancer(
            Arm.PRODUCTION.value,
            self.backends,
            self._build_algorithm(self.config),
            self._production_client,
            ProductionHealth(production_config.circuit_breaker, production_config.outlier),
            max_attempts=production_config.retry.max_attempts,
            deadline_s=production_config.retry.deadline_s,
            max_bytes=production_config.max_response_bytes,
            retry_budget=RetryBudget(
                production_config.retry.budget_ratio, production_config.retry.min_retries_in_flight
            ),
            score_quality=self.flags.quality_metrics,
            on_event=self._on_backend_event,
            candidate_filter=self._within_budget if self.budget is not None else None,
        )
        self.legacy.score_quality = self.flags.quality_metrics
        # Both arms call the same backends with the same keys, so a 429 legacy is given
        # is production's limit too (legacy keeps its own behaviour: it never waits).
        self.legacy.share_waits_with(self.production)
        self.guard = FailbackGuard(self.config.guard)
        self.failbacks = 0  # times the guard tripped, forced trips included
        #: Backends an operator drained (weight 0, `update_backend_weights`).
        self._operator_drained: set[str] = set()
        self.started_at = datetime.now(UTC)
        self.routed = 0
        self.refused: tuple[int | None, str] | None = None
        self._last_token: object = None
        #: Reads of the control document started so far: a read that finishes after a
        #: newer one was considered is stale and dropped (it re-refused an invalid
        #: document, or undid nothing but said so, after a newer one was applied).
        self._document_reads = 0
        self._shadow_tasks: set[asyncio.Task[None]] = set()
        #: Set by shutdown(): no new shadow starts. `_in_flight` counts route_query calls;
        #: `_drained` is set when the last one ends while shutdown() waits for them.
        self._closing = False
        self._in_flight = 0
        #: production requests in a row that the caller cancelled before any answer
        self._cancels_in_a_row = 0
        self._last_production_answer = -math.inf  # perf_counter of the last answer
        self._told_closed = False  # route_query after shutdown() is logged once
        self._next_shared_check: float | None = None  # None: not before the first write
        self._shared_told: set[tuple[str, int]] = set()
        self._drained: asyncio.Event | None = None
        self._id_prefix = uuid.uuid4().hex[:12]
        self._id_counter = itertools.count(1)
        self._facts_cache: dict[str, QueryFacts] = {}
        self._facts_classifier: QueryClassifier | None = None
        self._bucket_cache: dict[tuple[str, str], int] = {}
        self.shadow_skipped = 0
        self._skipped_reported = 0
        #: Shadows not sent because every backend for the question was rate-limited, in
        #: all and per config version until reported (the gate counts them by version).
        self.shadows_yielded = 0
        self._yields_unreported: Counter[int] = Counter()
        #: Prometheus metrics; pass `metrics_registry=prometheus_client.REGISTRY` to expose
        #: them with the host application's other metrics (one live router per registry:
        #: shutdown() unregisters them).
        self.metrics = RouterMetrics(metrics_registry, [b.name for b in self.backends])
        self.metrics.watch(self._metrics_state)
        self._ack_lock = threading.Lock()
        _routers.add(self)
        self._ack_seq = 0
        self._ack_written = 0
        self._background_acks: set[asyncio.Task[None]] = set()
        self.recorder.start()

    # -- configuration ----------------------------------------------------------------
    def _build_algorithm(self, config: RouterConfig) -> Algorithm:
        # Weights live on the balancer's backend states (see apply_config), so every
        # weight-aware algorithm sees them and a weight change keeps learned state.
        return build_algorithm(
            config.algorithm, self.production_config, None, self._seed, budget=self.budget
        )

    def _within_budget(self, candidates: list[BackendState]) -> list[BackendState]:
        """PROD_LB_COST_OPTIMIZATION: once today's budget is spent, only the cheapest
        backends stay eligible (free self-hosted ones first)."""
        if self.budget is None or not self.budget.exhausted or not candidates:
            return candidates
        cheapest = min(b.expected_cost() for b in candidates)
        return [b for b in candidates if b.expected_cost() <= cheapest * 1.05]

    @property
    def effective_mode(self) -> DeploymentMode:
        return DeploymentMode.LEGACY_ONLY if self.guard.tripped else self.config.mode

    def apply_config(self, config: RouterConfig) -> None:
        """Swap the policy between requests; requests already running keep theirs.

        Everything that can fail is checked before anything changes, so a document that
        cannot be applied leaves the instance exactly on its last good config.
        """
        if config.mode is not DeploymentMode.LEGACY_ONLY and not self.flags.enabled:
            raise ValueError(
                f"mode {config.mode.value} routes to the production balancer and this "
                "instance runs with PROD_LB_ENABLED=false (the host's switch: it stays "
                "legacy_only); set PROD_LB_ENABLED=true to let rollouts use it"
            )
        if config.algorithm in ADVANCED_ALGORITHMS and not self.flags.advanced_algorithms:
            raise ValueError(
                f"algorithm {config.algorithm.value} is advanced and this instance runs "
                "with PROD_LB_ADVANCED_ALGORITHMS=false"
            )
        known = set(self.production.by_name)
        for field in ("legacy_weights", "production_weights"):
            unknown = sorted(set(getattr(config, field)) - known)
            if unknown:
                raise ValueError(
                    f"{field} names unknown backend(s) {unknown}; known: {sorted(known)}"
                )
        algorithm = (
            self.production.algorithm
            if config.algorithm == self.config.algorithm
            else self._build_algorithm(config)
        )
        # A document's weights are absolute: a backend it does not name gets its
        # configured weight back, so every instance converges on the same state.
        if config.legacy_weights:  # else operators' update_load_balancing_weights stand
            self.legacy.set_weights(config.legacy_weights, reset=True)
        self.production.set_weights(config.production_weights, reset=True)
        if self._operator_drained:  # outlives documents (update_backend_weights)
            drained = dict.fromkeys(self._operator_drained, 0.0)
            self.legacy.set_weights(drained)
            self.production.set_weights(drained)
        self.production.algorithm = algorithm
        if isinstance(self.production.health, ProductionHealth):
            self.production.health.reconfigure_breakers(
                config.breaker or self.production_config.circuit_breaker
            )
        # Another rollout's document re-arms too: an instance that missed a new rollout's
        # first document (down, or its store unreachable, through a short first phase)
        # stayed failed back for the whole rollout on the previous rollout's failback.
        new_rollout = config.rollout_id is not None and config.rollout_id != self.config.rollout_id
        self.config = config
        self.guard.reconfigure(
            self.flags.bound_guard(config.guard), rearm=config.rearm_guard or new_rollout
        )
        self.refused = None
        self.recorder.event(
            EventKind.CONFIG_APPLIED,
            f"applied v{config.version}: {config.mode.value} {config.traffic_percent:g}% "
            f"{config.algorithm.value}",
            config_version=config.version,
        )

    def poll_control_store(self) -> None:
        """Read the control document if it changed; apply it or refuse it."""
        self._document_reads += 1
        self._consider(self._read_document())

    async def _read_and_consider(self, read: Callable[[], Awaitable[Any]]) -> None:
        self._document_reads += 1
        mine = self._document_reads
        found = await read()
        if mine == self._document_reads:  # else a newer read was considered meanwhile
            self._consider(found)

    def _read_document(self) -> tuple[object, str] | None:
        if self.control_store is None:
            return None
        try:
            return self.control_store.read_document()
        except OSError as exc:
            log.warning("control store unreadable: %s", exc)
            return None
        except Exception:  # a pluggable store's bug must not stop the app or its heartbeats
            log.exception("control store read failed")
            return None

    def _consider(self, found: tuple[object, str] | None) -> None:
        if found is None or found[0] == self._last_token:
            return
        token, text = found
        self._last_token = token
        try:
            config = RouterConfig.model_validate_json(text)
        except ValidationError as exc:
            self._refuse(_version_hint(text), _one_line(exc))
            return
        if config.version > self.config.version:
            try:
                self.apply_config(config)
            except Exception as exc:  # valid JSON that cannot be applied is refused too
                self._refuse(config.version, f"cannot apply: {exc}")
        elif config.version < self.config.version:
            self._refuse(config.version, f"older than applied v{self.config.version}")
        elif config != self.config:
            # Two publishers chose the same number: running either one would split the
            # fleet under one version, so keep the applied one and say so.
            self._refuse(config.version, "a different document under the applied version")

    def _refuse(self, version: int | None, reason: str) -> None:
        self.refused = (version, reason)
        log.warning("refused control document v%s: %s", version, reason)
        self.recorder.event(
            EventKind.CONFIG_REFUSED,
            f"refused v{version}: {reason}; keeping v{self.config.version}",
            config_version=version,
        )

    def acknowledgement(self) -> Acknowledgement:
        return Acknowledgement(
            instance=self.instance_id,
            applied_version=self.config.version,
            effective_mode=self.effective_mode,
            configured_mode=self.config.mode,
            traffic_percent=self.config.traffic_percent,
            failback_reason=self.guard.reason,
            refused_version=self.refused[0] if self.refused else None,
            refused_reason=self.refused[1] if self.refused else None,
            heartbeat_at=datetime.now(UTC),
            started_at=self.started_at,
            host=socket.gethostname(),
            pid=os.getpid(),
            routed=self.routed,
            poll_s=self.flags.control_poll_s,
        )

    def heartbeat(self) -> None:
        self._check_staleness()
        if self.control_store is not None:
            self._write_ack(*self._next_ack())

    def _next_ack(self) -> tuple[Acknowledgement, int]:
        self._ack_seq += 1
        return self.acknowledgement(), self._ack_seq

    def _write_ack(self, ack: Acknowledgement, seq: int) -> None:
        """Write `ack` unless a newer one is already written (writers race across threads)."""
        assert self.control_store is not None
        with self._ack_lock:
            if seq <= self._ack_written:
                return
            try:
                self._check_shared_id(ack)
            except Exception as exc:  # an endpoint that only serves config and heartbeats
                log.debug("looking for another process under this instance id: %s", exc)
            self.control_store.write_ack(ack)
            self._ack_written = seq

    def _check_shared_id(self, mine: Acknowledgement) -> None:
        """Every SHARED_ID_CHECK_S, before writing: is another live process heartbeating
        under this instance id (`gunicorn -w 4` with one PROD_LB_INSTANCE_ID)? The two
        overwrite each other's heartbeat, and the fleet's view of which version runs
        flips between them; say so once per other process, in the log and as an event."""
        assert self.control_store is not None
        now = time.monotonic()
        if self._next_shared_check is None:
            # Not at the first heartbeat: a restarted process would find the last
            # heartbeat of the one it replaced (fresh for STALE_AFTER_S) and cry twin.
            self._next_shared_check = now + SHARED_ID_CHECK_S
            return
        if now < self._next_shared_check:
            return
        self._next_shared_check = now + SHARED_ID_CHECK_S
        for other in self.control_store.read_acks():
            if (
                other.instance != mine.instance
                or other.same_process(mine)
                or other.is_stale()
                or (other.host, other.pid) in self._shared_told
            ):
                continue
            self._shared_told.add((other.host, other.pid))
            message = (
                f"instance id {mine.instance!r} is also used by {other.host} pid {other.pid} "
                f"(this is {mine.host} pid {mine.pid}): each process needs its own "
                "PROD_LB_INSTANCE_ID, or their heartbeats overwrite each other"
            )
            log.error(message)
            self.recorder.event(
                EventKind.INSTANCE_SHARED, message, config_version=self.config.version
            )

    def _check_staleness(self) -> None:
        reason = self.guard.check_staleness(
            self.config.published_at, self.config.mode in SPLIT_MODES
        )
        if reason:
            self._record_failback(reason)

    async def _control_loop(self) -> None:
        interval = self.flags.control_poll_s
        while True:
            # Store I/O (a shared folder, an fsync per heartbeat) runs in a thread so a
            # slow disk never stalls requests; applying a document stays on the loop,
            # between requests. Separate tries: whatever goes wrong with a document or the
            # checks, the heartbeat is still written, so the fleet never loses this instance.
            try:
                await self._read_and_consider(lambda: asyncio.to_thread(self._read_document))
            except Exception:
                log.exception("control document could not be read or applied")
            try:
                self._check_staleness()
                self._report_skipped_shadows()
            except Exception:
                log.exception("time-limit check failed")
            try:
                if self.control_store is not None:
                    await asyncio.to_thread(self._write_ack, *self._next_ack())
            except Exception:
                log.exception("heartbeat failed")
            await asyncio.sleep(interval)

    def _report_skipped_shadows(self) -> None:
        """Shadows skipped at the concurrency cap, or yielded to a rate limit, leave no
        row: say how many, once per control tick, so a low shadow coverage in the gate has
        its cause on record (and yields, per config version, count as covered)."""
        for version, yielded in sorted(self._yields_unreported.items()):
            self.recorder.event(
                EventKind.SHADOWS_YIELDED,
                shadows_yielded_detail(yielded),
                config_version=version,
            )
        self._yields_unreported.clear()
        skipped = self.shadow_skipped - self._skipped_reported
        if skipped <= 0:
            return
        self._skipped_reported = self.shadow_skipped
        self.recorder.event(
            EventKind.SHADOWS_SKIPPED,
            f"{skipped} shadow execution(s) skipped: {len(self._shadow_tasks)} running, "
            f"shadow_max_concurrency {self.config.shadow_max_concurrency}",
            config_version=self.config.version,
        )

    # -- lifecycle --------------------------------------------------------------------
    def _balancers(self) -> list[Balancer]:
        return [self.legacy, self.production]

    def _health_settings(self) -> HealthCheckSettings:
        return self.production_config.health_check

    def _after_fork(self) -> None:
        """In a forked child (gunicorn `--preload` builds the app before forking its
        workers): every worker kept the parent's `host-pid` id, so they wrote one
        heartbeat and one segment folder between them. A default id is chosen again,
        and the recorder (restarted by its own fork hook) writes under it."""
        self._ack_lock = threading.Lock()
        # Workers would hand out the same request ids (the gate's unique-id check then
        # never passes) and report the parent's counts as their own.
        self._id_prefix = uuid.uuid4().hex[:12]
        self._id_counter = itertools.count(1)
        self._random = random.Random()
        self._yields_unreported.clear()
        self.shadow_skipped = self._skipped_reported = self.shadows_yielded = 0
        if self._default_id and not self._closed:
            self.instance_id = _claim_default_id()
            if self._owns_recorder:
                self.recorder.instance = self.instance_id
                self.recorder.directory = self.recorder.directory.parent / self.instance_id

    def _rebind(self) -> None:
        super()._rebind()
        cancel_stale_tasks(self._shadow_tasks)
        cancel_stale_tasks(self._background_acks)
        self._shadow_tasks.clear()
        self._background_acks.clear()
        self._drained = None
        if self._loop is not None and self._loop.is_closed():
            self._in_flight = 0  # requests of a closed loop will never finish
        self._production_client = BackendHttpClient(self.backends, transport=self._transport)
        self.production.client = self._production_client

    def _start_background(self) -> None:
        self._bind_loop()
        if self._tasks or self._closed:
            self._started = True
            return
        super()._start_background()
        if self.control_store is not None:
            if isinstance(self.control_store, FileControlStore):
                # A local read: the first request already runs under the published
                # config. A remote store is read by the control loop at once, off the
                # event loop, so an unreachable endpoint never holds up a request.
                self.poll_control_store()
            self._tasks.append(asyncio.create_task(self._control_loop(), name="router-control"))

    async def start(self) -> ProductionIntelligentQueryRouter:
        """Start background work; the published config is applied before this returns
        (unless the control store takes over `CONTROL_CALL_S` to answer: the control loop
        applies it then)."""
        self._bind_loop()
        if self.control_store is not None and not self._tasks and not self._closed:
            await self._read_and_consider(
                lambda: self._bounded(self._read_document, "reading the control store")
            )
        self._start_background()
        return self

    async def __aenter__(self) -> ProductionIntelligentQueryRouter:
        """`async with router:` starts as `start()` does: an HTTP control store's document
        is applied before the first request, not by the control loop some time after."""
        return await self.start()

    async def _bounded(self, call: Callable[..., Any], what: str, *args: Any) -> Any:
        """`call` in a thread, given up on after CONTROL_CALL_S: an endpoint trickling its
        answer a byte at a time (each read within the client's timeout) held start()
        and shutdown() for as long as it liked. The control loop tries again later."""
        try:
            return await asyncio.wait_for(asyncio.to_thread(call, *args), CONTROL_CALL_S)
        except TimeoutError:
            log.warning("%s took over %.0f s: given up on", what, CONTROL_CALL_S)
            return None

    async def shutdown(self, drain_timeout_s: float = SHUTDOWN_DRAIN_S) -> None:
        """Stop background work, write the last heartbeat and flush the buffered rows.

        No shadow starts once this begins and running ones are cancelled (their answers
        are discarded anyway). Requests in flight get up to `drain_timeout_s` to finish
        so their rows are written; a row that arrives after the recorder closed is
        counted as dropped. The Prometheus collectors leave the registry, so a new router
        can register on it.
        """
        self._bind_loop()
        self._closing = True
        try:
            self._report_skipped_shadows()
            await self._cancel_shadows()
            await self._drain(drain_timeout_s)
            if self._background_acks:
                await asyncio.gather(*self._background_acks, return_exceptions=True)
            if self.control_store is not None and not self._closed:
                self._check_staleness()
                await self._bounded(self._write_ack_logged, "the last heartbeat", *self._next_ack())
        finally:
            # Even when this shutdown is itself cancelled (a host's own timeout around
            # it): the control loop must not go on writing heartbeats for a stopped
            # instance, nor health checks go on hitting backends.
            # Each step on its own: one failing must not skip the others, nor cost the
            # buffered rows flushed below.
            close = getattr(self.control_store, "close", None)
            steps: list[tuple[str, Callable[[], Any]]] = [
                ("stopping background work and the legacy client", super().shutdown),
                ("closing the production client", self._close_production_client),
            ]
            if self._owns_store and callable(close):
                steps.append(("closing the control store", close))
            for what, step in steps:
                try:
                    done = step()
                    if inspect.isawaitable(done):
                        await done
                except Exception:
                    log.exception("%s failed", what)
            self.metrics.close()
            # Whatever happened above, the buffered rows are flushed: in a thread, since a
            # stuck disk can hold close() for its whole timeout.
            await asyncio.to_thread(self.recorder.close)
            if self._default_id:
                _release_default_id(self.instance_id)

    async def _close_production_client(self) -> None:
        await cancel_orphaned_exchanges(self._production_client)
        await self._production_client.aclose()

    async def _cancel_shadows(self) -> None:
        """Cancel shadows until none is left (one started while we waited is caught too)."""
        while self._shadow_tasks:
            tasks = list(self._shadow_tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._shadow_tasks.difference_update(tasks)

    async def _drain(self, timeout_s: float) -> None:
        """Wait, at most `timeout_s`, for the route_query calls in flight to finish."""
        if not self._in_flight:
            return
        if self._drained is None or self._drained.is_set():
            self._drained = asyncio.Event()  # a concurrent shutdown() waits on the same one
        try:
            await asyncio.wait_for(self._drained.wait(), timeout_s)
        except TimeoutError:
            log.warning(
                "shutdown: %d request(s) still in flight after %.1f s; their rows will be "
                "counted as dropped",
                self._in_flight,
                timeout_s,
            )

    def _on_health_change(self, backend: str, healthy: bool, reason: str) -> None:
        kind = EventKind.BACKEND_HEALTHY if healthy else EventKind.BACKEND_UNHEALTHY
        self.recorder.event(
            kind,
            f"{backend}: active health check: {reason}",
            config_version=self.config.version,
            backend=backend,
        )

    def _on_backend_event(self, event: HealthEvent) -> None:
        self.recorder.event(
            event.kind, event.message, config_version=self.config.version, backend=event.backend
        )

    # -- routing ----------------------------------------------------------------------
    def arm_for(self, bucket: int, config: RouterConfig, mode: DeploymentMode) -> Arm:
        if mode is DeploymentMode.PRODUCTION_ONLY:
            return Arm.PRODUCTION
        if mode in SPLIT_MODES and in_production(bucket, config.traffic_percent):
            return Arm.PRODUCTION
        return Arm.LEGACY

    def _new_request_id(self) -> str:
        """Unique across instances: a random per-process prefix and a counter (uuid4
        would cost a system call per request)."""
        return f"{self._id_prefix}{next(self._id_counter):010x}"

    def _bucket(self, key: str, salt: str) -> int:
        """A subject's bucket (SHA-256), cached: the same users come back all day."""
        cache = self._bucket_cache
        found = cache.get((salt, key))
        if found is None:
            if len(cache) >= BUCKET_CACHE_SIZE:
                cache.clear()
            found = cache[(salt, key)] = bucket_of(key, salt)
        return found

    def _facts(self, query_text: str) -> QueryFacts:
        """Classification, fingerprint and length of a question; pure functions of the
        text, cached (bounded) because popular questions repeat."""
        if self.classifier is not self._facts_classifier:  # a new classifier: new rules
            self._facts_cache.clear()
            self._facts_classifier = self.classifier
        facts = self._facts_cache.get(query_text)
        if facts is None:
            if len(self._facts_cache) >= FACTS_CACHE_SIZE:
                self._facts_cache.clear()
            facts = QueryFacts(
                self._classify(query_text),
                query_fingerprint(query_text),
                len(query_text),
            )
            if len(query_text) <= FACTS_CACHE_MAX_CHARS:
                self._facts_cache[query_text] = facts
        return facts

    async def route_query(
        self, query_text: str, context: Mapping[str, Any] | None = None
    ) -> RoutingResult:
        # Counted so that shutdown() can let requests in flight finish and record their rows.
        self._in_flight += 1
        try:
            return await self._route_query(query_text, context)
        finally:
            self._in_flight -= 1
            if not self._in_flight and self._drained is not None:
                self._drained.set()

    async def _route_query(
        self, query_text: str, context: Mapping[str, Any] | None
    ) -> RoutingResult:
        if not self._started or asyncio.get_running_loop() is not self._loop:
            self._start_background()
        config = self.config
        mode = self.effective_mode
        context = context or {}
        request_id = str(context.get("request_id") or self._new_request_id())
        bucket = self._bucket(subject_key(context, request_id), config.salt)
        arm = self.arm_for(bucket, config, mode)
        facts = self._facts(query_text)
        classification = facts.classification
        region = context.get("region")
        if (
            mode is DeploymentMode.SHADOW
            and config.shadow_sample_rate > 0
            and self._random.random() < config.shadow_sample_rate
        ):
            self._start_shadow(query_text, classification, request_id, bucket, config, region)
        arm_name = arm.value
        balancer = self.production if arm is Arm.PRODUCTION else self.legacy
        algorithm = balancer.algorithm.name  # the one this request starts with
        started = time.perf_counter()
        headers = {"X-Request-ID": request_id, "X-Router-Arm": arm_name}
        cancelled = False
        partial = RouteOutcome(None, None, None)
        try:
            outcome = await self._route_arm(
                balancer, query_text, classification, region, headers, partial
            )
        except asyncio.CancelledError:
            # The caller gave up (disconnect, its own timeout): still one row, so an arm
            # whose users give up is not flattered by their absence. Re-raised below. Its
            # attempts are kept; no backend is named (per-backend figures must not count
            # the caller's cancels).
            cancelled = True
            outcome = RouteOutcome(
                None,
                None,
                BackendFailure(
                    ErrorKind.CANCELLED, "the caller cancelled the request before an answer"
                ),
                attempts=partial.attempts,
            )
        latency_ms = (time.perf_counter() - started) * 1000.0
        result = build_result(
            request_id=request_id,
            classification=classification,
            outcome=outcome,
            arm=arm_name,
            mode=mode.value,
            algorithm=algorithm,
            config_version=config.version,
            latency_ms=latency_ms,
        )
        now = datetime.now(UTC)
        self._record(result, outcome, bucket, facts, now, is_shadow=False, primary=None)
        self.analytics.add(now, result)
        self.routed += 1
        # A caller's cancel is no error of the arm (a host hedging 30 % of its calls
        # tripped the guard in production_only), only a latency sample: unless production
        # answered none of the last `min_requests` requests, a hung arm whose callers give
        # up before it fails (it would never trip the guard otherwise).
        if arm is Arm.PRODUCTION and not self._closed:  # after shutdown: nothing to guard
            self._cancels_in_a_row = self._cancels_in_a_row + 1 if cancelled else 0
            if result.ok:
                self._last_production_answer = time.perf_counter()
            hung = (  # not a burst of cancels (one client going away) while answers flow
                self._cancels_in_a_row >= self.guard.limits.min_requests
                and self._last_production_answer < started
            )
            self._guard_observe(result, result.ok or (cancelled and not hung))
        elif (
            arm is not Arm.PRODUCTION
            and result.outcome not in NOT_PRODUCTIONS_FAULT
            and result.config_version == self.config.version  # as in _guard_observe
        ):
            self.guard.observe_legacy(result.ok or cancelled, result.latency_ms)
        if cancelled:
            raise asyncio.CancelledError
        return result

    def _start_shadow(
        self,
        query_text: str,
        classification: Classification,
        primary_id: str,
        bucket: int,
        config: RouterConfig,
        region: Any,
    ) -> None:
        if self._closing:
            return  # shutdown() is cancelling shadows: a new one would outlive it
        if self.production.rate_limited(classification):
            # A rate limit is the API key's, shared with the users' arm: a shadow sent
            # into it takes an answer a user needs. Not a skip for slowness: the gate
            # counts it as covered (`shadows_yielded` events).
            self.shadows_yielded += 1
            self._yields_unreported[config.version] += 1
            return
        if len(self._shadow_tasks) >= config.shadow_max_concurrency:
            self.shadow_skipped += 1
            return
        task = asyncio.create_task(
            self._shadow(query_text, classification, primary_id, bucket, config, region)
        )
        self._shadow_tasks.add(task)
        task.add_done_callback(self._shadow_tasks.discard)

    async def _shadow(
        self,
        query_text: str,
        classification: Classification,
        primary_id: str,
        bucket: int,
        config: RouterConfig,
        region: Any,
    ) -> None:
        request_id = self._new_request_id()
        algorithm = self.production.algorithm.name
        try:
            started = time.perf_counter()
            outcome = await self._route_arm(
                self.production,
                query_text,
                classification,
                region,
                {
                    "X-Request-ID": request_id,
                    "X-Router-Arm": Arm.PRODUCTION.value,
                    "X-Shadow-Of": primary_id,
                },
            )
            result = build_result(
                request_id=request_id,
                classification=classification,
                outcome=outcome,
                arm=Arm.PRODUCTION.value,
                mode=DeploymentMode.SHADOW.value,
                algorithm=algorithm,
                config_version=config.version,
                latency_ms=(time.perf_counter() - started) * 1000.0,
            )
            self._record(
                result,
                outcome,
                bucket,
                self._facts(query_text),
                datetime.now(UTC),
                is_shadow=True,
                primary=primary_id,
            )
            self._guard_observe(result, result.ok)
        except asyncio.CancelledError:
            raise
        except Exception:  # a shadow must never surface anywhere but the log
            log.exception("shadow execution failed")

    async def _route_arm(
        self,
        balancer: Balancer,
        query_text: str,
        classification: Classification,
        region: Any,
        headers: dict[str, str],
        partial: RouteOutcome | None = None,
    ) -> RouteOutcome:
        """`balancer.route`, with its unexpected exceptions turned into a failed outcome:
        the caller gets a result (as for any other failure), not a traceback, the request
        still leaves its row, and on the production arm the failback guard counts it, so
        a bug in the new path fails back to legacy."""
        if self._closed:
            # Its HTTP clients are closed: each call logged a RuntimeError traceback.
            if not self._told_closed:
                self._told_closed = True
                log.warning("route_query after shutdown(): answered with an error")
            return RouteOutcome(
                None, None, BackendFailure(ErrorKind.NO_BACKEND, "the router is shut down")
            )
        try:
            return await balancer.route(
                query_text, classification, region=region, headers=headers, outcome=partial
            )
        except Exception as exc:  # CancelledError is a BaseException: it still propagates
            # A custom transport's or algorithm's error may quote a request header: the
            # traceback is logged with every key masked.
            log.error(
                "%s balancer failed unexpectedly\n%s",
                balancer.arm,
                redact_keys(traceback.format_exc(), self.backends).rstrip(),
            )
            return RouteOutcome(
                None,
                None,
                BackendFailure(
                    ErrorKind.SERVER_ERROR, f"{balancer.arm} balancer failed: {type(exc).__name__}"
                ),
            )

    def _guard_observe(self, result: RoutingResult, ok: bool) -> None:
        if result.outcome in NOT_PRODUCTIONS_FAULT:
            return  # the caller's 4xx, or a quota both arms share (429): not ill health
        if result.config_version != self.config.version:
            return  # started under an earlier config: the guard was reset since
        reason = self.guard.observe(ok, result.latency_ms)
        if reason:
            self._record_failback(reason)

    def _record_failback(self, reason: str) -> None:
        self.failbacks += 1
        log.error("auto-failback to legacy: %s", reason)
        self.recorder.event(EventKind.FAILBACK, reason, config_version=self.config.version)
        self._announce()

    def _announce(self) -> None:
        """Tell the control store now (the flows watch acks), without touching the store
        on the caller's request path: the write runs in a thread, errors go to the log."""
        if self.control_store is None:
            return
        ack = self._next_ack()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a synchronous caller): write here, never raise
            self._write_ack_logged(*ack)
            return
        task = loop.create_task(asyncio.to_thread(self._write_ack_logged, *ack))
        self._background_acks.add(task)
        task.add_done_callback(self._background_acks.discard)

    def _write_ack_logged(self, ack: Acknowledgement, seq: int) -> None:
        try:
            self._write_ack(ack, seq)
        except Exception:
            log.exception("could not write the acknowledgement to the control store")

    def _record(
        self,
        result: RoutingResult,
        outcome: RouteOutcome,
        bucket: int,
        facts: QueryFacts,
        now: datetime,
        *,
        is_shadow: bool,
        primary: str | None,
    ) -> None:
        failure = outcome.failure if not outcome.ok else None
        # The status of what failed the user: NULL for a deadline that passed between
        # attempts, not the status of the attempt before it.
        if failure is not None:
            status = failure.status
        else:
            status = outcome.attempts[-1].status if outcome.attempts else None
        answer = outcome.answer
        if self.budget is not None and result.arm == PRODUCTION:
            self.budget.add(result.cost_usd)  # shadow answers cost real money too
        self.metrics.observe(
            result.arm,
            result.backend,
            result.outcome,
            is_shadow,
            result.latency_ms,
            result.cost_usd,
        )
        for attempt in outcome.attempts:
            self.metrics.attempt(
                result.arm,
                attempt.backend,
                attempt.error_kind.value if attempt.error_kind else None,
            )
        self.recorder.record(
            RequestRecord(
                request_id=result.request_id,
                ts=now,
                router_instance=self.instance_id,
                config_version=result.config_version,
                mode=result.mode,
                arm=result.arm,
                is_shadow=is_shadow,
                primary_request_id=primary,
                subject_bucket=bucket,
                query_category=result.category,
                algorithm=result.algorithm,
                backend=result.backend,
                attempts=result.attempts,
                fallback_used=result.attempts > 1,
                outcome=result.outcome,
                http_status=status,
                error_kind=failure.kind.value if failure else None,
                latency_ms=result.latency_ms,
                tokens_in=_token_count(answer.tokens_in) if answer else 0,
                tokens_out=_token_count(answer.tokens_out) if answer else 0,
                cost_usd=result.cost_usd,
                quality_score=result.quality_score,
                query_hash=facts.fingerprint,
                query_length=facts.length,
            )
        )

    def _metrics_state(self) -> dict[str, Any]:
        return {
            "health": self.get_health_status(),
            "config_version": self.config.version,
            "production_share": 0.0 if self.guard.tripped else self.config.production_share,
            "failback": self.guard.tripped,
            "failbacks": self.failbacks,
            "shadows_not_run": {
                "concurrency_cap": self.shadow_skipped,
                "rate_limited": self.shadows_yielded,
            },
            "retries_denied": {
                Arm.LEGACY.value: self.legacy.retry_budget.denied,
                PRODUCTION: self.production.retry_budget.denied,
            },
        }

    # -- the legacy surface, production flavour ----------------------------------------
    def update_backend_weights(self, weights: dict[str, float]) -> None:
        """Set per-backend weights on both arms, as the legacy router did on its own.

        A weight of 0 drains the backend, and the drain holds across published
        documents until this method gives it a weight again: a document's weights are
        absolute, and put a backend taken out for maintenance back into service at the
        next phase. Other weights hold until the next document sets that arm's weights."""
        super().update_backend_weights(weights)  # validates every name and value first
        for name, weight in weights.items():
            if weight == 0:
                self._operator_drained.add(name)
            else:
                self._operator_drained.discard(name)

    def update_production_weights(self, weights: dict[str, float]) -> None:
        """Weights of the production balancer, until the next RouterConfig sets them
        (documents own the production arm's weights during a rollout)."""
        self.production.set_weights(weights)

    def get_health_status(self) -> dict[str, Any]:
        return {
            "legacy": self.legacy.health_report(),
            "production": self.production.health_report(),
        }

    def get_system_health_status(self) -> dict[str, Any]:
        """Overall status of the arm(s) serving users now (both while they share traffic)."""
        mode = self.effective_mode
        serving = {
            DeploymentMode.LEGACY_ONLY: [self.legacy],
            DeploymentMode.SHADOW: [self.legacy],
            DeploymentMode.PRODUCTION_ONLY: [self.production],
        }.get(mode, [self.legacy, self.production])
        reports = [balancer.health_report() for balancer in serving]
        available = min(sum(1 for b in r.values() if b["available"]) for r in reports)
        total = len(self.backends)
        status = "healthy" if available == total else "degraded" if available else "critical"
        production = self.production.health_report()
        return {
            "status": status,
            "available_backends": available,
            "total_backends": total,
            "mode": mode.value,
            "configured_mode": self.config.mode.value,
            "traffic_percent": self.config.traffic_percent,
            "config_version": self.config.version,
            "algorithm": self.config.algorithm.value,
            "failback_reason": self.guard.reason,
            "production_available_backends": sum(1 for b in production.values() if b["available"]),
            "instance": self.instance_id,
        }

    def force_rollback(self, reason: str = "manual rollback") -> bool:
        """Fail back to legacy on this instance now. It stays failed back under new
        documents until one with `rearm_guard` (a new rollout's first phase) or one of
        another rollout arrives."""
        if self.guard.tripped:
            return False
        self.guard.trip(f"forced: {reason}")
        self._record_failback(f"forced: {reason}")
        return True


#: Default instance ids of this process's live routers: a second router on the same data
#: dir must not write the first one's heartbeat and segments.
_default_ids: set[str] = set()
_default_ids_lock = threading.Lock()
_routers: weakref.WeakSet[ProductionIntelligentQueryRouter] = weakref.WeakSet()


def _claim_default_id() -> str:
    """`host-pid` for the first live router of the process, then `host-pid-2`, ..."""
    base = default_instance_id()
    with _default_ids_lock:
        candidate, n = base, 1
        while candidate in _default_ids:
            n += 1
            candidate = f"{base}-{n}"
        _default_ids.add(candidate)
    return candidate


def _release_default_id(instance_id: str) -> None:
    with _default_ids_lock:
        _default_ids.discard(instance_id)


def _after_fork_in_child() -> None:
    global _default_ids_lock
    _default_ids_lock = threading.Lock()  # a parent thread may have held it at the fork
    _default_ids.clear()  # the parent's routers' ids
    for router in list(_routers):
        router._after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _check_writable(folders: list[Path], data_dir: Path) -> None:
    """The folders under PROD_LB_DATA_DIR this router writes: an unwritable one (a
    read-only root filesystem under the default `./data`) let the router start, then
    logged every poll and flush while no row or heartbeat was ever written."""
    for folder in folders:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
                pass
        except OSError as exc:
            raise SettingsError(
                [
                    f"PROD_LB_DATA_DIR={str(data_dir)!r}: cannot write {str(folder)!r} "
                    f"({exc.strerror or exc}): the router writes its request rows and "
                    "heartbeats there; give a folder it can write"
                ]
            ) from None


def _store_from_flags(flags: ProductionFeatureFlags) -> ControlStore:
    if flags.control_url is not None:
        from router.http_control_store import HttpControlStore

        return HttpControlStore(str(flags.control_url))
    return FileControlStore(flags.data_dir / "control")


def _token_count(tokens: int) -> int:
    """A backend's token count as the row's int32 column can hold it: a count out of
    range (negative, or absurdly large) is clamped so the row is kept, not dropped."""
    return min(max(tokens, 0), INT32_MAX)


def _version_hint(text: str) -> int | None:
    try:
        value = json.loads(text).get("version")
        return int(value) if value is not None else None
    except (ValueError, TypeError, AttributeError, RecursionError):  # [[[...]]] too
        return None


def _one_line(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors()[:3]:
        loc = ".".join(str(p) for p in error.get("loc", ())) or "document"
        parts.append(f"{loc}: {error.get('msg')}")
    return "; ".join(parts)
