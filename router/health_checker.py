"""Active health checks: LightRAG `GET /health`, Perplexity `GET /models`.

A backend becomes unhealthy after `unhealthy_after` failed checks in a row and healthy
again after `healthy_after` passes. A 429 on a check says "busy", not "sick": it
changes nothing. A pass on a healthy backend also ends the open wait of a breaker that
opened before the check started (`CircuitBreaker.probe_early`). One checker per router updates every balancer's view of a backend.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence

import httpx

from router.backend_client import EXCHANGE_GIVE_UP_FACTOR, authorization
from router.backend_state import BackendState
from router.backends import BackendConfig, BackendKind
from router.pool_repair import SendTracker, run_uncancelled
from router.production_config import HealthCheckSettings

log = logging.getLogger(__name__)


def health_url(backend: BackendConfig) -> str:
    return (
        f"{backend.url}/health" if backend.kind is BackendKind.LIGHTRAG else f"{backend.url}/models"
    )


class ActiveHealthChecker:
    def __init__(
        self,
        client: httpx.AsyncClient,
        backends: Sequence[BackendConfig],
        views: Callable[[str], Sequence[BackendState]],
        settings: HealthCheckSettings,
        on_change: Callable[[str, bool, str], None] | None = None,
    ) -> None:
        self.client = client
        self.backends = list(backends)
        self.views = views
        self.settings = settings
        self.on_change = on_change
        self.passes: dict[str, int] = {b.name: 0 for b in backends}
        self.fails: dict[str, int] = {b.name: 0 for b in backends}
        self.healthy: dict[str, bool] = {b.name: True for b in backends}
        #: When the last round started (monotonic), to keep the cadence across restarts.
        self.last_round: float | None = None

    async def probe(self, backend: BackendConfig) -> bool | None:
        """True healthy, False unhealthy, None "busy" (no verdict).

        `timeout_s` bounds the whole probe (httpx's timeouts are per network step, so a
        body trickled a byte at a time would pass). Anything else that goes wrong while
        probing one backend (a key that cannot be sent as a header, say) is a failed
        check for that backend only, never a lost round for all of them."""
        try:
            async with asyncio.timeout(self.settings.timeout_s):
                headers = authorization(backend)
                tracker = SendTracker()
                response = await run_uncancelled(  # see router.pool_repair
                    self.client,
                    self.client.get(
                        health_url(backend),
                        headers=headers,
                        timeout=self.settings.timeout_s,
                        extensions={"trace": tracker},
                    ),
                    give_up_s=EXCHANGE_GIVE_UP_FACTOR * self.settings.timeout_s,
                    tracker=tracker,
                )
        except (httpx.HTTPError, TimeoutError):
            return False
        except Exception as exc:  # one backend must not blind the checker to the others
            log.warning("health check of %s failed: %s", backend.name, type(exc).__name__)
            return False
        if response.status_code == 429:
            return None
        return response.status_code < 400

    async def check_once(self) -> None:
        started = time.monotonic()
        results = await asyncio.gather(*(self.probe(b) for b in self.backends))
        for backend, verdict in zip(self.backends, results, strict=True):
            self._apply(backend.name, verdict)
            if verdict and self.healthy[backend.name]:
                self._end_open_waits(backend.name, started)

    def _end_open_waits(self, name: str, checked_at: float) -> None:
        """A passing check that started after a breaker opened lets its probes go now."""
        now = time.monotonic()
        for state in self.views(name):
            breaker = state.breaker
            if breaker is not None:
                breaker.probe_early(now, checked_at)

    def _apply(self, name: str, verdict: bool | None) -> None:
        if verdict is None:
            return
        if verdict:
            self.passes[name] += 1
            self.fails[name] = 0
            flip = not self.healthy[name] and self.passes[name] >= self.settings.healthy_after
        else:
            self.fails[name] += 1
            self.passes[name] = 0
            flip = self.healthy[name] and self.fails[name] >= self.settings.unhealthy_after
        if not flip:
            return
        self.healthy[name] = verdict
        for state in self.views(name):
            state.healthy = verdict
        reason = (
            f"{self.settings.healthy_after} check(s) passed"
            if verdict
            else f"{self.settings.unhealthy_after} check(s) failed"
        )
        if self.on_change:
            self.on_change(name, verdict, reason)

    async def run(self) -> None:
        if self.last_round is not None:
            # Restarted on a new event loop: keep the interval (one loop per request
            # probed every backend on every request).
            wait = self.last_round + self.settings.interval_s - time.monotonic()
            await asyncio.sleep(max(0.0, wait))
        while True:
            self.last_round = time.monotonic()
            try:
                await self.check_once()
            except Exception:  # a checker must never die and leave stale verdicts
                log.exception("health check round failed")
            await asyncio.sleep(self.settings.interval_s)
