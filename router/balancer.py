"""A balancer: eligible backends -> available candidates -> algorithm's pick -> call,
then failover to untried backends within the retry budget and the request deadline.

The legacy router and the production balancer are both `Balancer`s; they differ in the
algorithm, the health policy, the attempt count and the retry budget.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import httpx

from router.algorithms.base import Algorithm, Choice, Observation, RequestContext
from router.backend_client import BackendAnswer, call_backend
from router.backend_state import BackendState
from router.backends import BackendConfig
from router.circuit_breaker import BreakerState
from router.classifier import Classification
from router.failures import BackendFailure
from router.health_policy import HealthEvent, HealthPolicy
from router.quality import quality_score
from router.record import ErrorKind
from router.retry_budget import RetryBudget

EventSink = Callable[[HealthEvent], None]


@dataclass(slots=True)
class Attempt:
    backend: str
    latency_ms: float
    error_kind: ErrorKind | None = None
    status: int | None = None


@dataclass(slots=True)
class RouteOutcome:
    answer: BackendAnswer | None
    backend: BackendState | None
    failure: BackendFailure | None
    attempts: list[Attempt] = field(default_factory=list)
    choice: Choice | None = None
    degraded: bool = False
    cost_usd: float = 0.0
    quality: float | None = None
    #: Failed attempts whose latency sample waits for the request's end: (backend, start).
    charged: list[tuple[BackendState, float]] = field(default_factory=list)
    #: Why the balancer stopped: answered, or why it did not try another backend.
    stop_reason: str = ""

    @property
    def ok(self) -> bool:
        return self.answer is not None

    def explain(self) -> dict[str, object]:
        return {
            "reason": self.choice.reason if self.choice else "no candidate",
            "candidate_scores": dict(self.choice.scores) if self.choice else {},
            "degraded": self.degraded,
            "stopped": self.stop_reason,
            "attempts": [
                {
                    "backend": a.backend,
                    "latency_ms": round(a.latency_ms, 2),
                    "error": a.error_kind.value if a.error_kind else None,
                }
                for a in self.attempts
            ],
        }


class Balancer:
    def __init__(
        self,
        arm: str,
        backends: Sequence[BackendConfig],
        algorithm: Algorithm,
        client: httpx.AsyncClient,
        health: HealthPolicy,
        *,
        max_attempts: int,
        deadline_s: float,
        max_bytes: int = 2_000_000,
        retry_budget: RetryBudget | None = None,
        score_quality: bool = True,
        honour_retry_after: bool = True,
        max_retry_after_wait_s: float = 5.0,
        max_retry_after_s: float = 300.0,
        on_event: EventSink | None = None,
        candidate_filter: Callable[[list[BackendState]], list[BackendState]] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.arm = arm
        self.states = [BackendState(cfg) for cfg in backends]
        self.by_name = {s.name: s for s in self.states}
        self.algorithm = algorithm
        self.client = client
        self.health = health
        self.max_attempts = max_attempts
        self.deadline_s = deadline_s
        self.max_bytes = max_bytes
        self.retry_budget = retry_budget or RetryBudget(1.0, max_attempts)
        self.score_quality = score_quality
        self.honour_retry_after = honour_retry_after
        self.max_retry_after_wait_s = max_retry_after_wait_s
        #: A Retry-After longer than this is cut to it: a backend asking for a year off
        #: (or a buggy proxy) must not be out until the process restarts.
        self.max_retry_after_s = max_retry_after_s
        self.on_event = on_event
        self.candidate_filter = candidate_filter
        self.clock = clock
        #: The network call; a seam so benchmarks can time the router without a network.
        self.call = call_backend
        #: Balancers sending to the same backends with the same keys (the other arm): a
        #: Retry-After belongs to the API key or the backend, not to one arm's traffic.
        self.wait_peers: list[Balancer] = []

    def share_waits_with(self, peer: Balancer) -> None:
        """Tell `peer` of every Retry-After this balancer is given from now on."""
        self.wait_peers.append(peer)

    def note_wait(self, config: BackendConfig, wait_s: float, status: int) -> None:
        """Another arm was told to wait `wait_s` by this backend. In seconds from now, so
        balancers on different clocks agree; a longer wait already known is kept."""
        state = self.by_name.get(config.name)
        if state is None or state.config != config:
            return  # another URL or key under the same name: its limit is not ours
        until = self.clock() + wait_s
        if until > state.unavailable_until:
            state.unavailable_until, state.unavailable_status = until, status

    def rate_limited(self, classification: Classification) -> bool:
        """Every backend this question may go to is inside a 429's Retry-After window:
        anything sent now would spend the quota users are waiting on."""
        if not self.honour_retry_after:
            return False
        now = self.clock()
        allowed = [s for s in self.states if s.kind in classification.allowed]
        return bool(allowed) and all(
            s.unavailable_until > now and s.unavailable_status == 429 for s in allowed
        )

    # -- candidate selection ----------------------------------------------------------
    def eligible(
        self, classification: Classification, tried: set[str] | frozenset[str] = frozenset()
    ) -> list[BackendState]:
        """Usable untried weighted backends of the preferred kind if there are any, else every
        allowed backend: failover leaves the preferred kind only once it is exhausted."""
        allowed = [s for s in self.states if s.kind in classification.allowed]
        if classification.preferred is not None:
            now = self.clock()
            preferred = [
                s
                for s in allowed
                if s.kind is classification.preferred
                and s.name not in tried
                and s.weight > 0  # drained: the other allowed kind serves instead
                and self._usable(s, now)
            ]
            if preferred:
                return preferred
        return allowed

    def _usable(self, state: BackendState, now: float) -> bool:
        if not self.honour_retry_after:
            return state.healthy and self.health.allows(state, now)
        return state.available(now) and self.health.allows(state, now)

    def candidates(
        self, eligible: Sequence[BackendState], tried: set[str], now: float, *, degrade: bool = True
    ) -> tuple[list[BackendState], bool]:
        """Usable untried backends; if none and `degrade` (a request's first attempt),
        degrade to untried ones that are merely ejected (panic routing): never to a
        breaker that is not closed (that would defeat its open wait and probe limit), nor
        to ones that asked us to wait with Retry-After. Retries never degrade. When not
        even those exist, open breakers that have waited `LAST_RESORT_AFTER_S` go
        half-open: the request fails otherwise, so it may as well be one of their probes.

        `candidate_filter` (the spent daily budget) chooses among these, so a cheap
        backend that is down does not leave the request with nothing."""
        # A weight of 0 drains a backend for every algorithm, not only the weighted ones;
        # it still serves when no weighted candidate can (all drained, or all down).
        untried = [s for s in eligible if s.name not in tried]
        usable = [s for s in untried if self._usable(s, now)]
        if usable:
            return self._filtered([s for s in usable if s.weight > 0] or usable), False
        if not degrade:
            return [], False
        not_waiting = [
            s
            for s in untried
            if s.healthy
            and (now >= s.unavailable_until or not self.honour_retry_after)
            and (s.breaker is None or s.breaker.state_at(now) is BreakerState.CLOSED)
        ]
        if not not_waiting:
            probing = [
                s
                for s in untried
                if s.healthy
                and (now >= s.unavailable_until or not self.honour_retry_after)
                and now >= s.ejected_until
                and s.breaker is not None
                and s.breaker.probe_as_last_resort(now)
                and self.health.allows(s, now)
            ]
            return self._filtered(probing), False
        return self._filtered([s for s in not_waiting if s.weight > 0] or not_waiting), True

    def _filtered(self, states: list[BackendState]) -> list[BackendState]:
        if self.candidate_filter is None or not states:
            return states
        return self.candidate_filter(states)

    def retry_after_wait(
        self, eligible: Sequence[BackendState], tried: set[str], now: float, deadline: float
    ) -> float | None:
        """Seconds until the first rate-limited backend takes requests again, if that is
        soon enough to wait for (within the deadline and `max_retry_after_wait_s`)."""
        waiting = [
            s.unavailable_until
            for s in eligible
            if s.name not in tried and s.healthy and s.unavailable_until > now
        ]
        if not waiting:
            return None
        wait = min(waiting) - now
        if wait > self.max_retry_after_wait_s or now + wait >= deadline:
            return None
        return wait

    # -- routing ----------------------------------------------------------------------
    async def route(
        self,
        query: str,
        classification: Classification,
        *,
        region: str | None = None,
        headers: dict[str, str] | None = None,
        outcome: RouteOutcome | None = None,
    ) -> RouteOutcome:
        """`outcome`: filled in as the request goes, so a caller whose request is
        cancelled still knows the attempts it made."""
        start = self.clock()
        deadline = start + self.deadline_s
        outcome = outcome if outcome is not None else RouteOutcome(None, None, None)
        tried: set[str] = set()
        budget = self.retry_budget
        budget.requests_in_flight += 1
        try:
            # One algorithm for the whole request, retries and learning included, even
            # if a new config swaps it meanwhile.
            return await self._route(
                query, classification, outcome, tried, deadline, region, headers, self.algorithm
            )
        finally:
            budget.requests_in_flight -= 1
            if outcome.charged:
                end = self.clock()
                for state, attempt_started in outcome.charged:
                    state.latency.observe_failure((end - attempt_started) * 1000.0, end)

    async def _route(
        self,
        query: str,
        classification: Classification,
        outcome: RouteOutcome,
        tried: set[str],
        deadline: float,
        region: str | None,
        headers: dict[str, str] | None,
        algorithm: Algorithm,
    ) -> RouteOutcome:
        budget = self.retry_budget
        while True:
            if len(outcome.attempts) >= self.max_attempts:
                outcome.stop_reason = f"max attempts ({self.max_attempts}) reached"
                break
            now = self.clock()
            eligible = self.eligible(classification, tried)
            cands, degraded = self.candidates(eligible, tried, now, degrade=not outcome.attempts)
            if not cands and self.honour_retry_after:
                wait = self.retry_after_wait(eligible, tried, now, deadline)
                if wait is not None:
                    await asyncio.sleep(wait)  # Retry-After: wait, do not hammer
                    continue
            if not cands:
                outcome.stop_reason = "no untried backend available"
                waiting = [s for s in eligible if s.unavailable_until > now]
                if waiting and outcome.failure is None:
                    # Only 429s make this the caller's rate limit; a backend that answered
                    # 503 is down, and the request fails as an outage (the guard sees it).
                    limited = all(s.unavailable_status == 429 for s in waiting)
                    outcome.failure = BackendFailure(
                        ErrorKind.RATE_LIMITED if limited else ErrorKind.NO_BACKEND,
                        "every eligible backend asked to retry later (Retry-After"
                        f"{'' if limited else ' on a 503'})",
                    )
                if outcome.failure is None:
                    outcome.failure = BackendFailure(
                        ErrorKind.NO_BACKEND,
                        f"no backend of {sorted(k.value for k in classification.allowed)} "
                        "is available",
                    )
                break
            remaining = deadline - now
            if remaining <= 0:
                outcome.stop_reason = "request deadline passed"
                outcome.failure = BackendFailure(ErrorKind.TIMEOUT, "request deadline passed")
                break
            is_retry = bool(outcome.attempts)
            if is_retry and not budget.try_acquire():
                outcome.stop_reason = (
                    f"retry budget exhausted ({budget.retries_in_flight} retries in flight)"
                )
                break
            try:
                choice = algorithm.choose(
                    cands, RequestContext(classification.category, region, now)
                )
                if outcome.choice is None:
                    outcome.choice, outcome.degraded = choice, degraded
                state = choice.backend
                tried.add(state.name)
                try:
                    answer, failure, latency_ms = await self._attempt(
                        state, query, remaining, headers
                    )
                except asyncio.CancelledError:  # the caller's: the attempt still counts
                    cut_ms = (self.clock() - now) * 1000.0
                    outcome.attempts.append(Attempt(state.name, cut_ms, ErrorKind.CANCELLED, None))
                    raise
            finally:
                if is_retry:
                    budget.release()
            outcome.attempts.append(
                Attempt(
                    state.name,
                    latency_ms,
                    failure.kind if failure else None,
                    failure.status if failure else (answer.status if answer else None),
                )
            )
            outcome.backend = state
            if answer is not None:
                outcome.answer, outcome.failure = answer, None
                outcome.stop_reason = "answered"
                outcome.cost_usd = state.config.cost_model.cost(answer.tokens_in, answer.tokens_out)
                if self.score_quality:
                    outcome.quality = quality_score(answer.text, answer.citations)
                self._learn(state, None, latency_ms, outcome, algorithm)
                return outcome
            assert failure is not None
            outcome.failure = failure
            self._learn(state, failure, latency_ms, outcome, algorithm)
            if not failure.retryable:
                outcome.stop_reason = f"not retryable: {failure.kind.value}"
                break
        return outcome

    async def _attempt(
        self, state: BackendState, query: str, remaining_s: float, headers: dict[str, str] | None
    ) -> tuple[BackendAnswer | None, BackendFailure | None, float]:
        state.in_flight += 1
        self.health.on_start(state, self.clock())
        started = self.clock()
        timeout_s = min(state.config.timeout_s, remaining_s)
        try:
            answer = await self.call(
                self.client,
                state.config,
                query,
                timeout_s=timeout_s,
                max_bytes=self.max_bytes,
                headers=headers,
            )
            return answer, None, (self.clock() - started) * 1000.0
        except BackendFailure as failure:
            # Less than half the time a first attempt gets (its own timeout, or the whole
            # deadline if shorter), left by the request's deadline: a timeout then is the
            # deadline's doing, not a sign of ill health. (Against the backend's timeout
            # alone, a timeout over twice the deadline made every timeout "cut".)
            full_s = min(state.config.timeout_s, self.deadline_s)
            if failure.kind is ErrorKind.TIMEOUT and timeout_s < 0.5 * full_s:
                failure.cut_by_deadline = True
            return None, failure, (self.clock() - started) * 1000.0
        except asyncio.CancelledError:
            # The caller gave up: no failure of the backend's (no health penalty), but it
            # had not answered in that time. Peak-EWMA charges dropped requests too, or a
            # backend that hangs while callers time out first stays "fastest" for good.
            now = self.clock()
            elapsed_ms = (now - started) * 1000.0
            state.latency.observe_failure(elapsed_ms, now)
            self.health.on_cancelled(state, elapsed_ms, now)
            raise
        finally:
            state.in_flight -= 1

    def _learn(
        self,
        state: BackendState,
        failure: BackendFailure | None,
        latency_ms: float,
        outcome: RouteOutcome,
        algorithm: Algorithm,
    ) -> None:
        now = self.clock()
        state.calls += 1
        if failure is not None and failure.retry_after_s is not None:
            wait_s = min(failure.retry_after_s, self.max_retry_after_s)
            state.unavailable_until = now + wait_s
            state.unavailable_status = failure.status or 429
            for peer in self.wait_peers:
                peer.note_wait(state.config, wait_s, state.unavailable_status)
        penalised = failure is not None and failure.health_penalty
        if failure is None or penalised:
            state.outcomes.append(failure is None)
        if failure is None:
            state.latency.observe(latency_ms, now)
        elif penalised:
            # A fast failure must not make a backend look fast: its latency sample is the
            # time from its attempt to the request's end, the detour included (`route`
            # charges it once the request is over).
            outcome.charged.append((state, now - latency_ms / 1000.0))
        if failure is None:
            answer = outcome.answer
            assert answer is not None
            state.tokens_in_avg = (
                0.9 * state.tokens_in_avg + 0.1 * answer.tokens_in
                if state.tokens_in_avg
                else float(answer.tokens_in)
            )
            state.tokens_out_avg = (
                0.9 * state.tokens_out_avg + 0.1 * answer.tokens_out
                if state.tokens_out_avg
                else float(answer.tokens_out)
            )
            if outcome.quality is not None:
                state.quality = (
                    outcome.quality
                    if state.quality is None
                    else 0.9 * state.quality + 0.1 * outcome.quality
                )
        event = self.health.observe(state, self.states, failure, latency_ms, now)
        if event is not None and self.on_event is not None:
            self.on_event(event)
        algorithm.observe(
            state,
            Observation(
                ok=failure is None,
                latency_ms=latency_ms,
                cost_usd=outcome.cost_usd if failure is None else 0.0,
                quality=outcome.quality if failure is None else None,
                health_penalty=penalised or failure is None,
            ),
        )

    # -- control ----------------------------------------------------------------------
    def set_weights(self, weights: dict[str, float], *, reset: bool = False) -> None:
        """Set backend weights by name; with `reset`, unnamed backends get their
        configured weight back. Nothing changes if any name or value is invalid."""
        unknown = sorted(set(weights) - set(self.by_name))
        if unknown:
            raise ValueError(f"unknown backend(s) {unknown}; known: {sorted(self.by_name)}")
        bad = {name: w for name, w in weights.items() if not (math.isfinite(w) and w >= 0)}
        if bad:
            raise ValueError(f"weights must be finite numbers >= 0, got {bad}")
        for state in self.states:
            if state.name in weights:
                state.weight = weights[state.name]
            elif reset:
                state.weight = state.config.weight

    def health_report(self) -> dict[str, dict[str, object]]:
        now = self.clock()
        return {
            s.name: {
                "kind": s.kind.value,
                # Retry-After counts only for an arm that honours it: the legacy arm
                # keeps routing to a backend that sent a 429, so it is not unavailable.
                "available": s.healthy
                and (now >= s.unavailable_until or not self.honour_retry_after)
                and self.health.would_allow(s, now),
                "active_check_healthy": s.healthy,
                "in_flight": s.in_flight,
                "weight": s.weight,
                "success_rate": round(s.success_rate(), 4),
                "latency_ewma_ms": round(s.latency.value(now), 2),
                **_retry_after_waits(s, now),
                **self.health.describe(s, now),
            }
            for s in self.states
        }


def _retry_after_waits(state: BackendState, now: float) -> dict[str, float]:
    """Seconds the backend stays out, under the key of the status that asked for it."""
    wait = round(max(0.0, state.unavailable_until - now), 3)
    limited = state.unavailable_status == 429
    return {
        "rate_limited_for_s": wait if limited else 0.0,
        "retry_after_503_for_s": 0.0 if limited else wait,
    }
