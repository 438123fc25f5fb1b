"""HTTP calls to LightRAG (`POST /query`) and Perplexity (`POST /chat/completions`).

Every way a call can go wrong ends as a `BackendFailure` with a kind, so the balancer
decides failover and health from types, never from exception text.
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

from router.backends import DEFAULT_POOL_SIZE, BackendConfig, BackendKind
from router.failures import BackendFailure
from router.pool_repair import SendTracker, reclaim_orphaned_connections, run_uncancelled
from router.record import ErrorKind


@dataclass(frozen=True, slots=True)
class BackendAnswer:
    text: str
    tokens_in: int
    tokens_out: int
    citations: tuple[str, ...] = field(default_factory=tuple)
    status: int = 200


def estimate_tokens(text: str) -> int:
    """LightRAG reports no usage; four characters per token is the usual English estimate."""
    return max(1, len(text) // 4)


def parse_retry_after(value: str | None, default_s: float = 1.0) -> float:
    """Seconds to wait from delay-seconds or an HTTP-date; garbage means `default_s`."""
    if not value:
        return default_s
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        # "inf" would make a backend unavailable forever; "nan" compares false to everything.
        return max(0.0, seconds) if math.isfinite(seconds) else default_s
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return default_s
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


class _NoCookies(httpx.Cookies):
    """A cookie jar that keeps nothing."""

    def extract_cookies(self, response: httpx.Response) -> None:
        return None

    def set_cookie_header(self, request: httpx.Request) -> None:
        return None


#: Idle connections each backend's pool keeps. httpcore 1.0.9 scans every pooled
#: connection, and for idle ones every connection again, on each request and each
#: response (encode/httpcore#1035): one 512-connection pool shared by all backends
#: spent 60 % of a demo app's CPU there once a slow host let connections pile up, which
#: slowed it further. A pool per backend keeps each scan to that backend's concurrency.
KEEPALIVE_PER_BACKEND = 32


def pool_limits(size: int) -> httpx.Limits:
    return httpx.Limits(
        max_connections=size, max_keepalive_connections=min(KEEPALIVE_PER_BACKEND, size)
    )


def pool_key(url: str) -> str:
    """The httpx mount pattern for this backend's scheme, host and port (no port for a
    default port: such a pattern matches the host on any port)."""
    parsed = httpx.URL(url)
    return f"{parsed.scheme}://{parsed.netloc.decode('ascii')}"


def env_proxy(url: str) -> str | None:
    """The proxy the environment (HTTP(S)_PROXY, ALL_PROXY, NO_PROXY) sets for `url`, read
    as httpx reads it (a proxy without a scheme is http://): a backend's own pool must not
    bypass a proxy. NO_PROXY follows urllib (curl-like: `.corp` also exempts `corp`)."""
    parsed = httpx.URL(url)
    proxies = urllib.request.getproxies_environment()
    if urllib.request.proxy_bypass_environment(parsed.host, proxies):
        return None
    proxy = proxies.get(parsed.scheme) or proxies.get("all")
    if not proxy:
        return None
    return proxy if "://" in proxy else f"http://{proxy}"


def backend_pools(
    backends: Sequence[BackendConfig], limits: httpx.Limits | None = None
) -> dict[str, httpx.AsyncBaseTransport | None]:
    """One transport per origin. Backends on the same origin (two Perplexity models, say)
    share its pool, sized by the largest `max_connections` among them."""
    sizes: dict[str, int] = {}
    proxies: dict[str, str | None] = {}
    for b in backends:
        key = pool_key(b.url)
        sizes[key] = max(sizes.get(key, 0), b.max_connections)
        proxies[key] = env_proxy(b.url)
    pools: dict[str, httpx.AsyncBaseTransport | None] = {}
    for key, size in sizes.items():
        transport = httpx.AsyncHTTPTransport(limits=limits or pool_limits(size), proxy=proxies[key])
        reclaim_orphaned_connections(transport)  # a caller's cancel must not cost a slot
        pools[key] = transport
    return pools


class BackendHttpClient(httpx.AsyncClient):
    """The router's HTTP client: one for every user, so it keeps no cookies. A cookie a
    backend sets while answering one user must not be stored for everyone (nor grow a
    jar without bound); skipping httpx's cookie parsing also saves ~8 % per request.

    Each of `backends` gets its own pool (`backend_pools`) unless a `transport` is given
    (tests, or a caller with its own transport), which then serves them all. The default
    transport, for any other URL, is explicit too: left to httpx, its environment proxy
    mounts (NO_PROXY entries become exact-host mounts) would outrank a backend's own."""

    _no_cookies = _NoCookies()

    def __init__(
        self,
        backends: Sequence[BackendConfig] = (),
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        limits: httpx.Limits | None = None,
        timeout: httpx.Timeout | float = 30.0,
    ) -> None:
        mounts = None
        if transport is None:
            mounts = backend_pools(backends, limits)
            transport = httpx.AsyncHTTPTransport(limits=limits or pool_limits(DEFAULT_POOL_SIZE))
        reclaim_orphaned_connections(transport)  # a given one too (any other is left alone)
        super().__init__(transport=transport, mounts=mounts, timeout=timeout)

    @property  # type: ignore[override]
    def cookies(self) -> httpx.Cookies:
        return self._no_cookies


@functools.lru_cache(maxsize=1024)
def _endpoint(base_url: str, path: str) -> httpx.URL:
    """Parsed once per backend: parsing the URL was a fifth of a mocked request's cost."""
    return httpx.URL(f"{base_url}{path}")


def authorization(backend: BackendConfig) -> dict[str, str]:
    """The backend's Authorization header: its API key as a bearer token, else the user
    info of its URL as HTTP Basic, else none.

    A key no header can carry is refused before it is sent, naming the variable only. A
    pasted non-breaking space or curly quote made httpx's UnicodeEncodeError escape the
    balancer (no failover, no penalty); a line break inside the key (a two-line secret
    file) was logged in full by httpcore at DEBUG, on every request and health probe."""
    key = backend.api_key()
    if key is None:
        basic = backend.basic_auth()
        return {} if basic is None else {"Authorization": basic}
    value = key.get_secret_value()
    if not (value.isascii() and value.isprintable()):
        raise BackendFailure(
            ErrorKind.CONNECT,
            f"{backend.name}: the API key in ${backend.api_key_env} has a character no HTTP "
            "header can carry (a line break, a control or non-ASCII character): check the "
            "variable's value",
        )
    return {"Authorization": f"Bearer {value}"}


def request_for(backend: BackendConfig, query: str, headers: dict[str, str]) -> httpx.Request:
    if backend.kind is BackendKind.LIGHTRAG:
        basic = backend.basic_auth()
        return httpx.Request(
            "POST",
            _endpoint(backend.url, "/query"),
            json={"query": query, "mode": "hybrid"},
            headers=headers if basic is None else {**headers, "Authorization": basic},
        )
    auth = authorization(backend)
    body = {"model": backend.model, "messages": [{"role": "user", "content": query}]}
    return httpx.Request(
        "POST", _endpoint(backend.url, "/chat/completions"), json=body, headers={**headers, **auth}
    )


def _usage_tokens(usage: Any, field: str, default: int) -> int:
    """usage[field] as an int. Its value never reaches the message: int()'s own error
    quotes 200 characters of it, and redaction, which looks for the whole key, missed a
    key cut short there."""
    value = usage.get(field, default)
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        raise TypeError(f"usage.{field} is not a whole number") from None


def parse_answer(backend: BackendConfig, query: str, payload: Any, status: int) -> BackendAnswer:
    try:
        if backend.kind is BackendKind.LIGHTRAG:
            text = payload["response"]
            if not isinstance(text, str):
                raise TypeError("response is not a string")
            return BackendAnswer(text, estimate_tokens(query), estimate_tokens(text), (), status)
        text = payload["choices"][0]["message"]["content"]
        usage = payload.get("usage") or {}
        citations = tuple(str(c) for c in payload.get("citations") or ())
        if not isinstance(text, str):
            raise TypeError("content is not a string")
        prompt = _usage_tokens(usage, "prompt_tokens", estimate_tokens(query))
        completion = _usage_tokens(usage, "completion_tokens", estimate_tokens(text))
        return BackendAnswer(text, prompt, completion, citations, status)
    # OverflowError: a JSON number like 1e400 in `usage` is a float infinity to int()
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, OverflowError) as exc:
        raise BackendFailure(
            ErrorKind.MALFORMED, f"{backend.name}: unexpected body shape: {exc}", status=status
        ) from None


#: An exchange its caller gave up on is cancelled this many of its timeouts later (see
#: `run_uncancelled`): past a pool wait, a connect and a read of `timeout_s` each.
EXCHANGE_GIVE_UP_FACTOR = 4


async def call_backend(
    client: httpx.AsyncClient,
    backend: BackendConfig,
    query: str,
    *,
    timeout_s: float,
    max_bytes: int,
    headers: dict[str, str] | None = None,
) -> BackendAnswer:
    """One attempt, bounded by `timeout_s` as a whole.

    httpx timeouts apply per network operation, so a backend that trickles a byte every
    second would never time out; the overall bound keeps the request's deadline real.
    A failure message never carries the API key, whatever an intermediary echoed.
    """
    try:
        async with asyncio.timeout(timeout_s):
            # In a task of its own: a cancel (the caller's, or this timeout's) inside
            # httpcore costs a pool slot for good (router.pool_repair).
            tracker = SendTracker()
            return await run_uncancelled(
                client,
                _call(client, backend, query, timeout_s, max_bytes, headers or {}, tracker),
                give_up_s=EXCHANGE_GIVE_UP_FACTOR * timeout_s,
                tracker=tracker,
            )
    except TimeoutError:
        raise BackendFailure(
            ErrorKind.TIMEOUT, f"{backend.name}: no complete answer within {timeout_s:g} s"
        ) from None
    except BackendFailure as failure:
        text = redact_keys(str(failure), [backend])
        if text != str(failure):
            raise BackendFailure(
                failure.kind, text, status=failure.status, retry_after_s=failure.retry_after_s
            ) from None
        raise


def redact_keys(text: str, backends: Sequence[BackendConfig]) -> str:
    """`text` with every form of these backends' API keys and Basic credentials masked."""
    for backend in backends:
        key = backend.api_key()
        basic = backend.basic_auth()
        secrets = (
            key.get_secret_value() if key else "",
            basic.removeprefix("Basic ") if basic else "",
        )
        for secret in secrets:
            for form in _quoted_forms(secret):
                text = text.replace(form, "**********")
    return text


def _quoted_forms(secret: str) -> list[str]:
    """The secret as written and as reprs quote it, once or twice escaped (str and bytes
    forms): transport errors quote header values with !r, and our messages quote those
    errors with !r again. Longest first, so a form is never half-replaced."""
    if not secret:
        return []
    forms = {secret}
    for form in (secret, repr(secret.encode())[2:-1]):
        once = repr(form)[1:-1] if form is secret else form
        forms |= {once, repr(once)[1:-1]}
    return sorted(forms, key=len, reverse=True)


@functools.lru_cache(maxsize=256)
def _timeout_dict(timeout_s: float) -> tuple[tuple[str, float | None], ...]:
    return tuple(httpx.Timeout(timeout_s).as_dict().items())


def _timeouts(timeout_s: float) -> dict[str, float | None]:
    """httpx per-operation timeouts; rounded to the millisecond so the cache stays small
    when deadlines shrink request by request."""
    return dict(_timeout_dict(round(timeout_s, 3)))


async def _call(
    client: httpx.AsyncClient,
    backend: BackendConfig,
    query: str,
    timeout_s: float,
    max_bytes: int,
    headers: dict[str, str],
    tracker: SendTracker | None = None,
) -> BackendAnswer:
    request = request_for(backend, query, headers)
    request.extensions["timeout"] = _timeouts(timeout_s)
    if tracker is not None:
        request.extensions["trace"] = tracker
    try:
        response = await client.send(request, stream=True)
    except httpx.TimeoutException as exc:
        raise BackendFailure(ErrorKind.TIMEOUT, f"{backend.name}: timed out: {exc!r}") from None
    except httpx.TransportError as exc:
        raise BackendFailure(ErrorKind.CONNECT, f"{backend.name}: {exc!r}") from None
    except httpx.DecodingError as exc:  # a transport that reads the body eagerly
        raise BackendFailure(
            ErrorKind.MALFORMED, f"{backend.name}: body cannot be decoded: {exc!r}"
        ) from None
    try:
        status = response.status_code
        if status == 429:
            raise BackendFailure(
                ErrorKind.RATE_LIMITED,
                f"{backend.name}: 429 rate limited",
                status=status,
                retry_after_s=parse_retry_after(response.headers.get("retry-after")),
            )
        if status >= 500:
            # A 503 with Retry-After says when to come back (maintenance, overload): the
            # backend is left alone until then, and it still counts as a server error.
            retry_after = response.headers.get("retry-after") if status == 503 else None
            raise BackendFailure(
                ErrorKind.SERVER_ERROR,
                f"{backend.name}: {status}",
                status=status,
                retry_after_s=parse_retry_after(retry_after) if retry_after else None,
            )
        if status >= 400:
            raise BackendFailure(ErrorKind.CLIENT_ERROR, f"{backend.name}: {status}", status=status)
        declared = response.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > max_bytes:
            raise BackendFailure(
                ErrorKind.OVERSIZED, f"{backend.name}: body of {declared} bytes", status=status
            )
        body = bytearray()
        try:
            # Chunk by chunk (a declared length is held to by the HTTP layer, a compressed
            # body is counted as it expands), so that an exchange given up on stops at
            # its next chunk by raising, not by a cancel: a cancel landing in httpx's own
            # close at the end of the body lost the pool slot (router.pool_repair).
            async for chunk in response.aiter_bytes():
                if tracker is not None and tracker.abandoned:
                    raise BackendFailure(
                        ErrorKind.TIMEOUT,
                        f"{backend.name}: still answering {EXCHANGE_GIVE_UP_FACTOR} timeouts "
                        "after its caller gave up",
                        status=status,
                    )
                body += chunk
                if len(body) > max_bytes:
                    raise BackendFailure(
                        ErrorKind.OVERSIZED,
                        f"{backend.name}: body over {max_bytes} bytes",
                        status=status,
                    )
        except httpx.TimeoutException as exc:
            raise BackendFailure(
                ErrorKind.TIMEOUT, f"{backend.name}: body timed out: {exc!r}"
            ) from None
        except httpx.TransportError as exc:
            raise BackendFailure(ErrorKind.CONNECT, f"{backend.name}: body cut: {exc!r}") from None
        except httpx.DecodingError as exc:
            # A corrupt gzip/deflate body: the backend's fault, like any malformed body
            # (retryable elsewhere), never an exception that escapes the router.
            raise BackendFailure(
                ErrorKind.MALFORMED,
                f"{backend.name}: body cannot be decoded: {exc!r}",
                status=status,
            ) from None
        try:
            payload = json.loads(bytes(body))
        except (ValueError, RecursionError):  # "[" * 100_000 nests past the parser's stack
            raise BackendFailure(
                ErrorKind.MALFORMED, f"{backend.name}: body is not JSON", status=status
            ) from None
        return parse_answer(backend, query, payload, status)
    finally:
        await response.aclose()
