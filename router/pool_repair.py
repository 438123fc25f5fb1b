"""Keep httpcore's connection pools whole when requests are cancelled.

httpcore 1.0.9 (the latest release) loses pool slots for good to cancellation. Measured
on the router: about one slot per 40 caller cancels, until every call to the backend
failed and only a restart helped. Two ways, each handled here:

- A queued request is assigned a new connection and cancelled before it starts
  connecting: the connection stays, never connected, so neither idle, closed nor
  expired, and owned by nobody (encode/httpcore#1093; the fixes, #1094 and #1099, are
  not released). The pool's own timeouts do this too. Likewise a connection that did
  connect but whose request was cancelled before it was sent (h11 state NEW).
  `reclaim_orphaned_connections` drops such connections each time the pool re-assigns
  requests. It patches one pool instance, never the library, and leaves a pool it does
  not recognise as it is.
- A cancel that lands while a response is being closed: httpcore shields that close
  with an anyio cancel scope, which does not hold against asyncio's `Task.cancel`, so
  the close stops half-way and the connection stays ACTIVE with its request in the pool.
  `run_uncancelled` keeps a caller's cancel out of an exchange whose request went out:
  the caller stops waiting, the exchange finishes by itself, or stops at its next body
  chunk when given up on, by raising rather than by a cancel. One whose request has not
  gone out yet is cancelled at once (the first point makes that safe).
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import httpcore
import httpx

_PROXY_CONNECTIONS = tuple(
    c
    for c in (
        getattr(httpcore._async.http_proxy, "AsyncForwardHTTPConnection", None),
        getattr(httpcore._async.http_proxy, "AsyncTunnelHTTPConnection", None),
    )
    if isinstance(c, type)
)


def _orphan_kind(connection: object) -> str | None:
    """What an unowned `connection` left behind is: "unstarted", never connected (no
    socket); "unused", connected but the request it was made for never started on it
    (h11 state NEW: an open socket nobody will use, neither idle nor available); None,
    anything else, left to the pool."""
    if isinstance(connection, _PROXY_CONNECTIONS):
        # Through a proxy: the connection to the proxy inside, or (a tunnel that is
        # through) the HTTP/1.1 connection to the backend.
        inner = getattr(connection, "_connection", None)
        if isinstance(inner, httpcore.AsyncHTTPConnection):
            kind = _orphan_kind(inner)
            if kind is None and getattr(connection, "_connected", True) is False:
                # A tunnel whose CONNECT went through but whose TLS to the backend did
                # not: its connection to the proxy stays ACTIVE, and nobody will use it.
                return None if inner.is_closed() else "unused"
            return kind
        return "unused" if _never_sent_on(inner) else None
    if not isinstance(connection, httpcore.AsyncHTTPConnection):
        return None
    inner = getattr(connection, "_connection", False)
    if inner is None:
        return None if getattr(connection, "_connect_failed", True) else "unstarted"
    return "unused" if _never_sent_on(inner) else None


def _never_sent_on(connection: object) -> bool:
    return (
        isinstance(connection, httpcore.AsyncHTTP11Connection)
        and getattr(connection, "_state", None) is httpcore._async.http11.HTTPConnectionState.NEW
    )


def reclaim_orphaned_connections(transport: httpx.AsyncBaseTransport) -> bool:
    """Patch `transport`'s pool; False when it is not an httpcore pool we know."""
    pool = getattr(transport, "_pool", None)
    assign: Callable[[], list[Any]] | None = getattr(pool, "_assign_requests_to_connections", None)
    if (
        not isinstance(pool, httpcore.AsyncConnectionPool)
        or assign is None
        or not isinstance(getattr(pool, "_connections", None), list)
        or not isinstance(getattr(pool, "_requests", None), list)
    ):
        return False

    def assign_without_orphans() -> list[Any]:
        owned = {id(r.connection) for r in pool._requests if r.connection is not None}
        kept, closing = [], []
        for connection in pool._connections:
            kind = None if id(connection) in owned else _orphan_kind(connection)
            if kind is None:
                kept.append(connection)
            elif kind == "unused":
                closing.append(connection)  # the pool closes what this returns
        pool._connections[:] = kept
        return closing + assign()

    pool._assign_requests_to_connections = assign_without_orphans  # type: ignore[method-assign]
    return True


T = TypeVar("T")

#: Per client, the exchanges whose caller stopped waiting, still running (strong
#: references: a task referenced only weakly can be collected mid-flight).
_ORPHANS: weakref.WeakKeyDictionary[object, set[asyncio.Task[Any]]] = weakref.WeakKeyDictionary()


class SendTracker:
    """Whether a request's headers have started going out, told by httpcore's `trace`
    request extension: pass it as `extensions={"trace": tracker}`. A tunnel's CONNECT
    to a proxy carries the same extensions and is not the request going out.
    `abandoned`: set when the exchange is given up on; its body reader stops at the next
    chunk (a cancel there could land in httpx's own close)."""

    def __init__(self) -> None:
        self.sent = False
        self.abandoned = False

    async def __call__(self, name: str, info: dict[str, Any]) -> None:
        if name.endswith("send_request_headers.started"):
            request = info.get("request")
            if getattr(request, "method", b"") != b"CONNECT":
                self.sent = True

    def give_up(self) -> None:
        self.abandoned = True


async def run_uncancelled(
    client: object,
    exchange: Coroutine[Any, Any, T],
    give_up_s: float,
    tracker: SendTracker | None = None,
) -> T:
    """Await `exchange` (one whole HTTP exchange on `client`, closing included) in its
    own task, which a cancel of the caller never reaches.

    If the caller is cancelled (it gave up, or its own timeout fired) before the request
    went out (`tracker`), the exchange is cancelled at once: nobody wants it, it must not
    take a pool slot from callers still waiting, and a cancel there costs nothing now
    that the pool drops the connections it leaves. A request already sent goes on (its
    answer is on its way; a cancel mid-response is the one that loses slots). If it
    still runs `give_up_s` later (well past its own per-operation timeouts, which end
    every exchange but a trickling one) it is told to stop (`SendTracker.abandoned`);
    without a tracker, it is cancelled then."""
    task = asyncio.ensure_future(exchange)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        if tracker is not None and not tracker.sent:
            task.cancel()
        orphans = _ORPHANS.setdefault(client, set())
        orphans.add(task)
        deadline = asyncio.get_running_loop().call_later(
            give_up_s, task.cancel if tracker is None else tracker.give_up
        )

        def finished(done: asyncio.Task[Any]) -> None:
            orphans.discard(done)
            deadline.cancel()
            if not done.cancelled():
                done.exception()  # retrieved: nobody waits for it any more

        task.add_done_callback(finished)
        raise


def orphaned_exchanges(client: object) -> int:
    """Exchanges on `client` that their callers gave up on and that still run."""
    return len(_ORPHANS.get(client, ()))


async def wait_for_orphaned_exchanges(client: object, timeout_s: float) -> int:
    """Wait up to `timeout_s` for them to end by themselves; returns how many still run."""
    orphans = set(_ORPHANS.get(client, ()))
    if orphans:
        await asyncio.wait(orphans, timeout=timeout_s)
    return orphaned_exchanges(client)


async def cancel_orphaned_exchanges(client: object) -> None:
    """Before `client` closes (its pools go with it, so a cancel no longer matters)."""
    orphans = list(_ORPHANS.pop(client, ()))
    for task in orphans:
        task.cancel()
    await asyncio.gather(*orphans, return_exceptions=True)
