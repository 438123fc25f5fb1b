"""Every way one backend call can end, as the balancer sees it (respx-mocked HTTP).

The balancer decides failover and health from `BackendFailure.kind` alone, so each
failure shape must land on the right kind, outcome, retryability and health penalty.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import pytest
import respx
from pydantic import ValidationError

from router.backend_client import (
    BackendHttpClient,
    backend_pools,
    call_backend,
    env_proxy,
    parse_retry_after,
)
from router.backends import BackendConfig, BackendKind
from router.failures import BackendFailure
from router.record import ErrorKind, Outcome

LIGHTRAG = BackendConfig(name="lr", kind=BackendKind.LIGHTRAG, base_url="http://lr.test")
PPLX = BackendConfig(
    name="px",
    kind=BackendKind.PERPLEXITY,
    base_url="http://px.test",
    api_key_env="TEST_PPLX_KEY",
)
SECRET = "pplx-very-secret-key-123"
QUERY = "Which acylcarnitines rise in MCAD deficiency?"


async def call(backend: BackendConfig = LIGHTRAG, max_bytes: int = 10_000, timeout_s: float = 5):
    async with httpx.AsyncClient() as client:
        return await call_backend(client, backend, QUERY, timeout_s=timeout_s, max_bytes=max_bytes)


async def failure_of(backend: BackendConfig = LIGHTRAG, **kwargs: float) -> BackendFailure:
    with pytest.raises(BackendFailure) as info:
        await call(backend, **kwargs)  # type: ignore[arg-type]
    return info.value


# -- failure shapes -------------------------------------------------------------------
# (kind, outcome, retryable, health_penalty): what the balancer does with each shape.
SHAPES = {
    "connect": (ErrorKind.CONNECT, Outcome.ERROR, True, True),
    "timeout": (ErrorKind.TIMEOUT, Outcome.TIMEOUT, True, True),
    "server": (ErrorKind.SERVER_ERROR, Outcome.ERROR, True, True),
    "rate_limited": (ErrorKind.RATE_LIMITED, Outcome.RATE_LIMITED, True, False),
    "client": (ErrorKind.CLIENT_ERROR, Outcome.REJECTED, False, False),
    "malformed": (ErrorKind.MALFORMED, Outcome.ERROR, True, True),
    "oversized": (ErrorKind.OVERSIZED, Outcome.ERROR, True, True),
}


def assert_shape(failure: BackendFailure, shape: str) -> None:
    kind, outcome, retryable, penalty = SHAPES[shape]
    assert (failure.kind, failure.outcome, failure.retryable, failure.health_penalty) == (
        kind,
        outcome,
        retryable,
        penalty,
    )


@respx.mock
async def test_connect_error_is_a_retryable_health_failure() -> None:
    respx.post("http://lr.test/query").mock(side_effect=httpx.ConnectError("refused"))
    assert_shape(await failure_of(), "connect")


@pytest.mark.parametrize(
    "exc", [httpx.ReadTimeout("slow"), httpx.ConnectTimeout("slow"), httpx.PoolTimeout("busy")]
)
@respx.mock
async def test_timeouts_are_timeouts(exc: Exception) -> None:
    respx.post("http://lr.test/query").mock(side_effect=exc)
    assert_shape(await failure_of(), "timeout")


async def test_a_backend_that_trickles_its_body_is_cut_at_the_attempt_timeout() -> None:
    """Per-read timeouts never fire if bytes keep coming; the attempt as a whole must end."""

    async def trickle() -> AsyncIterator[bytes]:
        yield b'{"response": "'
        for _ in range(100):
            await asyncio.sleep(0.05)
            yield b"x"

    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=trickle())

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        with pytest.raises(BackendFailure) as info:
            await call_backend(client, LIGHTRAG, QUERY, timeout_s=0.3, max_bytes=10_000)
    assert_shape(info.value, "timeout")


@pytest.mark.parametrize("status", [500, 502, 503, 504])
@respx.mock
async def test_5xx_is_a_server_error(status: int) -> None:
    respx.post("http://lr.test/query").mock(return_value=httpx.Response(status))
    failure = await failure_of()
    assert_shape(failure, "server")
    assert failure.status == status


@respx.mock
async def test_429_with_retry_after_seconds_is_unavailable_not_unhealthy() -> None:
    respx.post("http://lr.test/query").mock(
        return_value=httpx.Response(429, headers={"Retry-After": "7"})
    )
    failure = await failure_of()
    assert_shape(failure, "rate_limited")
    assert failure.retry_after_s == 7.0
    assert failure.status == 429


@respx.mock
async def test_429_with_retry_after_http_date() -> None:
    when = datetime.now(UTC) + timedelta(seconds=30)
    respx.post("http://lr.test/query").mock(
        return_value=httpx.Response(429, headers={"Retry-After": format_datetime(when, True)})
    )
    failure = await failure_of()
    assert_shape(failure, "rate_limited")
    assert failure.retry_after_s is not None
    assert 25 <= failure.retry_after_s <= 30


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, 1.0),  # no header: a short default pause
        ("", 1.0),
        ("garbage", 1.0),
        ("-5", 0.0),  # never negative
        ("0", 0.0),
        ("1.5", 1.5),
        ("inf", 1.0),  # never "forever": a non-finite value is no value
        ("nan", 1.0),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),  # a date in the past means now
    ],
)
def test_parse_retry_after(header: str | None, expected: float) -> None:
    assert parse_retry_after(header) == expected


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
@respx.mock
async def test_other_4xx_is_the_callers_fault(status: int) -> None:
    respx.post("http://lr.test/query").mock(return_value=httpx.Response(status))
    failure = await failure_of()
    assert_shape(failure, "client")
    assert failure.status == status


@pytest.mark.parametrize(
    "body",
    [b"<html>502 Bad Gateway</html>", b'{"response": "cut off', b"", b"[" * 5_000],
    ids=["html", "truncated", "empty", "nested past the parser's stack"],
)
@respx.mock
async def test_malformed_json(body: bytes) -> None:
    respx.post("http://lr.test/query").mock(return_value=httpx.Response(200, content=body))
    assert_shape(await failure_of(), "malformed")


@pytest.mark.parametrize(
    ("backend", "payload"),
    [
        (LIGHTRAG, {"answer": "wrong key"}),
        (LIGHTRAG, {"response": 42}),
        (LIGHTRAG, ["a", "list"]),
        (LIGHTRAG, None),
        (PPLX, {"choices": []}),
        (PPLX, {"choices": [{"message": {"content": None}}]}),
        (PPLX, {"choices": [{"message": {"content": "ok"}}], "usage": "lots"}),
        (PPLX, {"choices": [{"message": {"content": "ok"}}], "usage": {"prompt_tokens": "x"}}),
        (PPLX, "just a string"),
    ],
)
@respx.mock
async def test_json_of_the_wrong_shape_is_malformed(
    backend: BackendConfig, payload: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_PPLX_KEY", SECRET)
    respx.post(url__regex=r"http://(lr|px)\.test/.*").mock(
        return_value=httpx.Response(200, json=payload)
    )
    assert_shape(await failure_of(backend), "malformed")


@pytest.mark.parametrize("tokens", [b"1e400", b"-1e400"])
@respx.mock
async def test_an_infinite_token_count_is_malformed(
    tokens: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """1e400 is valid JSON and an infinite float: int() raised OverflowError, which
    escaped as an untyped exception (no failover; the legacy router raised it)."""
    monkeypatch.setenv("TEST_PPLX_KEY", SECRET)
    body = b'{"choices": [{"message": {"content": "ok"}}], "usage": {"prompt_tokens": %s}}'
    respx.post(url__regex=r"http://px\.test/.*").mock(
        return_value=httpx.Response(200, content=body % tokens)
    )
    assert_shape(await failure_of(PPLX), "malformed")


@respx.mock
async def test_oversized_by_content_length() -> None:
    route = respx.post("http://lr.test/query").mock(
        return_value=httpx.Response(200, json={"response": "x" * 500})
    )
    failure = await failure_of(max_bytes=100)
    assert_shape(failure, "oversized")
    assert route.call_count == 1


async def test_oversized_while_streaming_without_content_length() -> None:
    """A chunked body has no Content-Length: the limit is enforced as the bytes arrive,
    so a runaway backend cannot fill memory (the stream is abandoned, not drained)."""
    sent = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal sent
        yield b'{"response": "'
        for _ in range(10_000):
            sent += 1
            yield b"y" * 64

    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=endless())

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        with pytest.raises(BackendFailure) as info:
            await call_backend(client, LIGHTRAG, QUERY, timeout_s=5, max_bytes=1_000)
    assert_shape(info.value, "oversized")
    assert sent < 100  # stopped early instead of reading 640 kB


@respx.mock
async def test_body_exactly_at_the_limit_is_accepted() -> None:
    body = json.dumps({"response": "z" * 80}).encode()
    respx.post("http://lr.test/query").mock(return_value=httpx.Response(200, content=body))
    answer = await call(max_bytes=len(body))
    assert answer.text == "z" * 80


# -- successes ------------------------------------------------------------------------
@respx.mock
async def test_lightrag_answer_and_estimated_tokens() -> None:
    route = respx.post("http://lr.test/query").mock(
        return_value=httpx.Response(200, json={"response": "Octanoylcarnitine (C8) rises."})
    )
    answer = await call()
    assert answer.text == "Octanoylcarnitine (C8) rises."
    assert answer.tokens_in == len(QUERY) // 4  # LightRAG reports no usage: estimated
    assert answer.tokens_out >= 1
    assert answer.citations == ()
    sent = json.loads(route.calls.last.request.content)
    assert sent == {"query": QUERY, "mode": "hybrid"}


@respx.mock
async def test_perplexity_answer_usage_and_citations(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_PPLX_KEY", SECRET)
    route = respx.post("http://px.test/chat/completions").mock(
        return_value=httpx.Response(
            200,
            json={
                "choices": [{"message": {"role": "assistant", "content": "C8 and C10:1."}}],
                "usage": {"prompt_tokens": 17, "completion_tokens": 230},
                "citations": ["https://a.example/1", "https://b.example/2"],
            },
        )
    )
    answer = await call(PPLX)
    assert answer.text == "C8 and C10:1."
    assert (answer.tokens_in, answer.tokens_out) == (17, 230)
    assert answer.citations == ("https://a.example/1", "https://b.example/2")
    request = route.calls.last.request
    assert request.headers["authorization"] == f"Bearer {SECRET}"
    body = json.loads(request.content)
    assert body["messages"] == [{"role": "user", "content": QUERY}]
    assert body["model"] == "sonar"


@respx.mock
async def test_perplexity_without_usage_estimates_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_PPLX_KEY", SECRET)
    respx.post("http://px.test/chat/completions").mock(
        return_value=httpx.Response(200, json={"choices": [{"message": {"content": "abcdefgh"}}]})
    )
    answer = await call(PPLX)
    assert (answer.tokens_in, answer.tokens_out) == (len(QUERY) // 4, 2)


@respx.mock
async def test_perplexity_without_key_sends_no_authorization(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("TEST_PPLX_KEY", raising=False)
    route = respx.post("http://px.test/chat/completions").mock(return_value=httpx.Response(401))
    failure = await failure_of(PPLX)
    assert_shape(failure, "client")
    assert "authorization" not in route.calls.last.request.headers


@pytest.mark.parametrize(
    "response",
    [
        httpx.Response(401, json={"error": f"bad key {SECRET}"}),
        httpx.Response(500, text=f"echo Authorization: Bearer {SECRET}"),
        httpx.Response(429, headers={"Retry-After": "1"}),
        httpx.Response(200, text=f"not json {SECRET}"),
        httpx.Response(200, json={"choices": f"{SECRET}"}),
        httpx.ConnectError(f"proxy said Bearer {SECRET}"),
    ],
    ids=["401", "500", "429", "not-json", "wrong-shape", "connect"],
)
@respx.mock
async def test_the_api_key_never_appears_in_a_failure(
    response: httpx.Response | Exception, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Failure messages end up in logs, results and analytics: the key must not."""
    monkeypatch.setenv("TEST_PPLX_KEY", SECRET)
    route = respx.post("http://px.test/chat/completions")
    if isinstance(response, Exception):
        route.mock(side_effect=response)
    else:
        route.mock(return_value=response)
    failure = await failure_of(PPLX)
    assert route.calls.last.request.headers["authorization"] == f"Bearer {SECRET}"
    assert SECRET not in str(failure)
    assert SECRET not in repr(failure)
    assert SECRET not in repr(failure.args)


@respx.mock
async def test_the_routers_client_keeps_no_cookie_from_one_user_for_the_next() -> None:
    """One client serves every user: a session cookie a backend sets while answering one
    user is neither stored nor sent with anyone's next request."""
    route = respx.post("http://lr.test/query").mock(
        return_value=httpx.Response(
            200, json={"response": "ok"}, headers={"set-cookie": "session=user-a; Path=/"}
        )
    )
    async with BackendHttpClient() as client:
        for _ in range(2):
            await call_backend(client, LIGHTRAG, QUERY, timeout_s=5, max_bytes=10_000)
        assert len(client.cookies.jar) == 0
        follow_up = await client.post("http://lr.test/query", json={"query": QUERY})
    assert follow_up.status_code == 200
    assert all("cookie" not in call.request.headers for call in route.calls)


@respx.mock
async def test_a_body_that_cannot_be_decoded_is_malformed_not_an_exception() -> None:
    """A corrupt gzip body raised httpx.DecodingError straight through the router."""
    respx.post("http://lr.test/query").mock(
        return_value=httpx.Response(
            200,
            stream=httpx.ByteStream(b"\x1f\x8b not gzip at all"),
            headers={"content-encoding": "gzip"},
        )
    )
    failure = await failure_of()
    assert_shape(failure, "malformed")
    assert "cannot be decoded" in str(failure)


@pytest.mark.parametrize("stored", [f"{SECRET}\n", f"  {SECRET}\r\n"])
@respx.mock
async def test_a_key_read_from_a_file_with_its_newline_is_sent_clean_and_never_leaks(
    stored: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keys mounted from files end in a newline. Sent as is, the header was illegal and
    the transport's error quoted the key escaped ('...\\n'), past redaction."""
    monkeypatch.setenv("TEST_PPLX_KEY", stored)
    route = respx.post("http://px.test/chat/completions").mock(
        return_value=httpx.Response(500, text="boom")
    )
    failure = await failure_of(PPLX)
    assert route.calls.last.request.headers["authorization"] == f"Bearer {SECRET}"
    assert SECRET not in str(failure)


@pytest.mark.parametrize("bad", ["\u00a0x", "\nsecond-line", "\rx", "\x7fx", "\tx"])
@respx.mock
async def test_a_key_no_header_can_carry_is_a_typed_failure_that_names_its_variable(
    bad: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A key pasted with a non-breaking space cannot go into a header: httpx raised
    UnicodeEncodeError, which escaped the balancer (no failover to another backend, no
    health penalty). A line break inside it (a two-line secret file) went out, and on a
    real connection httpcore logged the refused header, key and all, at DEBUG. It is a
    connect-shaped failure now, naming the variable, not the key, and nothing is sent."""
    monkeypatch.setenv("TEST_PPLX_KEY", SECRET + bad)
    route = respx.post("http://px.test/chat/completions").mock(return_value=httpx.Response(200))
    failure = await failure_of(PPLX)
    assert_shape(failure, "connect")
    assert "$TEST_PPLX_KEY" in str(failure) and "non-ASCII" in str(failure)
    assert SECRET not in str(failure)
    assert not route.called


@respx.mock
async def test_credentials_in_a_backend_url_go_as_basic_auth_never_in_the_url(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A LightRAG behind an authenticating proxy (`http://svc:pw@host`). httpx logs every
    request's URL at INFO: the credentials must not be in it."""
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.INFO, logger="httpx")
    backend = BackendConfig(
        name="lr", kind=BackendKind.LIGHTRAG, base_url="http://svc:pw-hidden@lr.test"
    )
    route = respx.post("http://lr.test/query").mock(
        return_value=httpx.Response(200, json={"response": "ok"})
    )
    answer = await call(backend)
    assert answer.text == "ok"
    sent = route.calls.last.request
    assert sent.headers["authorization"] == "Basic " + base64.b64encode(b"svc:pw-hidden").decode()
    assert sent.url.userinfo == b"" and backend.url == "http://lr.test"
    assert "HTTP Request: POST http://lr.test/query" in caplog.text
    assert "pw-hidden" not in caplog.text


@respx.mock
async def test_a_token_count_that_is_not_a_number_is_not_quoted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """int()'s error quotes 200 characters of the value: a body echoing the key there was
    cut short inside it, past the redaction, which looks for the whole key."""
    monkeypatch.setenv("TEST_PPLX_KEY", SECRET)
    usage = {"prompt_tokens": "x" * 190 + SECRET}
    respx.post("http://px.test/chat/completions").mock(
        return_value=httpx.Response(
            200, json={"choices": [{"message": {"content": "ok"}}], "usage": usage}
        )
    )
    failure = await failure_of(PPLX)
    assert_shape(failure, "malformed")
    assert "usage.prompt_tokens is not a whole number" in str(failure)
    assert SECRET[:8] not in str(failure)


async def test_a_secret_quoted_escaped_by_the_transport_is_redacted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Whatever a transport error quotes, in the escaped form a repr gives, is masked."""
    odd = "pplx-key'with\"both-quotes"  # a bytes repr escapes the ' then
    monkeypatch.setenv("TEST_PPLX_KEY", odd)
    escaped = repr(odd.encode())[2:-1]

    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError(f"proxy refused header b'Bearer {escaped}'")

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        with pytest.raises(BackendFailure) as info:
            await call_backend(client, PPLX, QUERY, timeout_s=5, max_bytes=10_000)
    assert escaped not in str(info.value) and "**********" in str(info.value)


def test_each_backends_pool_still_goes_through_the_environments_proxy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Per-backend pools are explicit httpx mounts, which would bypass HTTPS_PROXY if the
    router did not apply it itself; NO_PROXY still exempts internal backends."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        for variant in (name, name.lower()):
            monkeypatch.delenv(variant, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.corp:3128")
    monkeypatch.setenv("NO_PROXY", "lightrag.internal")
    assert env_proxy("https://api.perplexity.ai") == "http://proxy.corp:3128"
    assert env_proxy("https://lightrag.internal:9621") is None
    assert env_proxy("http://other.host") is None  # no HTTP_PROXY, no ALL_PROXY
    monkeypatch.setenv("ALL_PROXY", "http://all.corp:8080")
    assert env_proxy("http://other.host") == "http://all.corp:8080"


@pytest.mark.parametrize("bad", [0, -1, 5000])
def test_a_backends_pool_size_out_of_range_is_refused_by_name(bad: int) -> None:
    with pytest.raises(ValidationError, match="max_connections"):
        BackendConfig.model_validate({**LIGHTRAG.model_dump(), "max_connections": bad})


def _clear_proxy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        for variant in (name, name.lower()):
            monkeypatch.delenv(variant, raising=False)


def test_a_backend_exempted_by_no_proxy_keeps_its_own_pool(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """httpx turns NO_PROXY=host into an exact-host mount that outranked the backend's
    own: the backend fell back to the shared default pool, ignoring its size."""
    _clear_proxy_env(monkeypatch)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.corp:3128")
    monkeypatch.setenv("NO_PROXY", "lightrag.internal,other:9621")
    internal = BackendConfig(
        name="internal", kind=BackendKind.LIGHTRAG, base_url="https://lightrag.internal"
    )
    other = BackendConfig(name="other", kind=BackendKind.LIGHTRAG, base_url="http://other:9621")
    client = BackendHttpClient([internal, other])
    for backend in (internal, other):
        chosen = client._transport_for_url(httpx.URL(backend.url + "/query"))
        assert chosen is not client._transport, backend.name


def test_a_proxy_given_without_a_scheme_is_http_as_httpx_reads_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _clear_proxy_env(monkeypatch)
    monkeypatch.setenv("HTTPS_PROXY", "proxy.corp:3128")
    assert env_proxy("https://api.perplexity.ai") == "http://proxy.corp:3128"
    BackendHttpClient([PPLX])  # built, not "Unknown scheme for proxy URL"


def test_backends_on_one_origin_share_the_largest_pool() -> None:
    """Two Perplexity models behind one API: one pool, sized for the larger of the two."""
    small = PPLX.model_copy(update={"name": "sonar", "max_connections": 4})
    large = PPLX.model_copy(update={"name": "sonar-pro", "max_connections": 200})
    pools = backend_pools([large, small])
    assert list(pools) == ["http://px.test"]
    assert pools["http://px.test"]._pool._max_connections == 200  # type: ignore[union-attr]


# -- keeping httpcore's pools whole under cancellation (router.pool_repair) ---------------
@pytest.mark.parametrize("proxy", [None, "http://127.0.0.1:3128"], ids=["direct", "proxied"])
async def test_a_never_started_connection_nobody_owns_is_dropped_when_the_pool_reassigns(
    proxy: str | None,
) -> None:
    """httpcore 1.0.9 kept such a connection for good (neither idle, closed nor
    expired): one pool slot lost per unlucky cancel, until every call failed. Behind a
    proxy the pool holds wrappers around the connection to the proxy."""
    from types import SimpleNamespace

    import httpcore

    from router.pool_repair import reclaim_orphaned_connections

    transport = httpx.AsyncHTTPTransport(proxy=proxy)
    assert reclaim_orphaned_connections(transport)
    pool = transport._pool
    origin = httpcore.URL("http://127.0.0.1:9/").origin
    orphan, owned = pool.create_connection(origin), pool.create_connection(origin)
    pool._connections.extend([orphan, owned])
    pool._requests.append(SimpleNamespace(connection=owned, is_queued=lambda: False))
    assert pool._assign_requests_to_connections() == []
    assert pool.connections == [owned]
    await transport.aclose()


async def test_a_caller_who_gives_up_never_cancels_the_exchange_until_its_give_up_time() -> None:
    from router.pool_repair import (
        cancel_orphaned_exchanges,
        orphaned_exchanges,
        run_uncancelled,
        wait_for_orphaned_exchanges,
    )

    client = httpx.AsyncClient()
    finished: list[str] = []

    async def exchange(name: str, seconds: float) -> str:
        await asyncio.sleep(seconds)
        finished.append(name)
        return name

    assert await run_uncancelled(client, exchange("quick", 0), give_up_s=1) == "quick"
    with pytest.raises(TimeoutError):  # the caller's own timeout
        await asyncio.wait_for(run_uncancelled(client, exchange("late", 0.1), 5), 0.01)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(run_uncancelled(client, exchange("hung", 60), 0.2), 0.01)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(run_uncancelled(client, exchange("at close", 60), 60), 0.01)
    assert orphaned_exchanges(client) == 3
    assert await wait_for_orphaned_exchanges(client, 1.0) == 1  # "hung" given up at 0.2 s
    assert finished == ["quick", "late"]
    await cancel_orphaned_exchanges(client)  # what a shutdown does before closing
    assert orphaned_exchanges(client) == 0 and finished == ["quick", "late"]
    await client.aclose()


async def test_a_request_that_has_not_gone_out_is_dropped_with_its_caller() -> None:
    """Kept running, requests queued for a slot were still sent for callers long gone,
    ahead of callers still waiting (5 to 6 times fewer answers under overload)."""
    from router.pool_repair import SendTracker, run_uncancelled, wait_for_orphaned_exchanges

    client = httpx.AsyncClient()
    done: list[str] = []

    async def exchange(name: str, tracker: SendTracker, sent: bool) -> None:
        tracker.sent = sent
        await asyncio.sleep(0.2)
        done.append(name)

    for name, sent in (("queued", False), ("sent", True)):
        tracker = SendTracker()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(
                run_uncancelled(client, exchange(name, tracker, sent), 60, tracker), 0.01
            )
    assert await wait_for_orphaned_exchanges(client, 2.0) == 0
    assert done == ["sent"]
    await client.aclose()


async def test_a_connect_to_a_proxy_is_not_the_request_going_out() -> None:
    """A tunnel's CONNECT carries the request's extensions: counted as "sent", a caller
    who gave up while the proxy answered still had the request sent."""
    from types import SimpleNamespace

    from router.pool_repair import SendTracker

    tracker = SendTracker()
    await tracker(
        "http11.send_request_headers.started", {"request": SimpleNamespace(method=b"CONNECT")}
    )
    assert not tracker.sent
    await tracker(
        "http11.send_request_headers.started", {"request": SimpleNamespace(method=b"POST")}
    )
    assert tracker.sent


async def test_an_exchange_given_up_on_stops_at_its_next_chunk_by_raising() -> None:
    """Not by a cancel: one landing in httpx's own close at the end of the body lost
    the pool slot."""
    from router.backend_client import _call
    from router.pool_repair import SendTracker

    tracker = SendTracker()
    tracker.give_up()
    backend = BackendConfig(name="rag", kind=BackendKind.LIGHTRAG, base_url="http://rag.test")
    client = httpx.AsyncClient(
        transport=httpx.MockTransport(lambda r: httpx.Response(200, json={"response": "ok"}))
    )
    with pytest.raises(BackendFailure) as caught:
        await _call(client, backend, "q", 5.0, 10_000, {}, tracker)
    assert caught.value.kind is ErrorKind.TIMEOUT and "gave up" in str(caught.value)
    await client.aclose()


async def test_a_transport_the_caller_passes_is_repaired_too() -> None:
    from router.backend_client import BackendHttpClient

    transport = httpx.AsyncHTTPTransport()
    client = BackendHttpClient([], transport=transport)
    assert "_assign_requests_to_connections" in vars(transport._pool)
    await client.aclose()
