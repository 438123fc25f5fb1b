"""The dashboard's HTTP side: starlette routes over a snapshot shared by every viewer.

However many browsers are open, the database is read at most once per `refresh_s`:
the cache serialises readers, so ten viewers cost the writing flows what one costs.
When a read fails (the writer holds the lock past the short wait), the last good
snapshot is served with the problem shown above it.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import replace

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from flows.dashboard.page import fragment, page
from flows.dashboard.view import DashboardView, read_view
from flows.paths import DataPaths


class SnapshotCache:
    def __init__(self, paths: DataPaths, rollout_id: str | None, refresh_s: float) -> None:
        self.paths = paths
        self.rollout_id = rollout_id
        self.refresh_s = refresh_s
        self._lock = threading.Lock()
        self._view: DashboardView | None = None
        self._good: DashboardView | None = None
        self._read_at = 0.0
        self.reads = 0

    def get(self) -> DashboardView:
        with self._lock:
            if self._view is None or time.monotonic() - self._read_at >= self.refresh_s:
                fresh = read_view(self.paths, self.rollout_id, wait_s=min(2.0, self.refresh_s))
                self.reads += 1
                self._read_at = time.monotonic()
                if fresh.problem and self._good is not None and fresh.rollout is None:
                    # keep showing what we knew, with the reason it is not newer
                    fresh = replace(
                        self._good,
                        read_at=fresh.read_at,
                        routers=fresh.routers,
                        problem=f"showing the snapshot of {self._good.read_at:%H:%M:%S}: "
                        f"{fresh.problem}",
                    )
                elif not fresh.problem:
                    self._good = fresh
                self._view = fresh
            return self._view


def make_app(
    paths: DataPaths, *, rollout_id: str | None = None, refresh_s: float = 2.0
) -> Starlette:
    cache = SnapshotCache(paths, rollout_id, refresh_s)

    async def index(request: Request) -> Response:
        return HTMLResponse(page(await run_in_threadpool(cache.get), refresh_s))

    async def live(request: Request) -> Response:
        return HTMLResponse(fragment(await run_in_threadpool(cache.get)))

    async def status(request: Request) -> Response:
        view = await run_in_threadpool(cache.get)
        body = json.dumps(view.as_json(), default=str)
        return Response(body, media_type="application/json")

    async def healthz(request: Request) -> Response:
        return Response("ok", media_type="text/plain")

    app = Starlette(
        routes=[
            Route("/", index),
            Route("/fragment", live),
            Route("/api/status", status),
            Route("/healthz", healthz),
        ]
    )
    app.state.cache = cache
    return app
