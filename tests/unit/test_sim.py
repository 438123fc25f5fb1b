"""The simulated LightRAG and Perplexity servers: their APIs, per-arm fault injection
through the admin endpoint, and a rate limiter that honours its own Retry-After.

Most tests drive the Starlette app in-process (`httpx.ASGITransport`); the last ones
start a real `FleetThread` on 127.0.0.1 and stop it.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import httpx
import pytest

from flows.sim.fleet import Fleet, FleetThread, SimBackendSpec, demo_fleet, set_profile
from flows.sim.profile import BackendProfile
from flows.sim.servers import SimState, make_app
from router.backends import BackendKind

KEY = "sim-secret"
QUERY = "Which acylcarnitines rise in MCAD deficiency?"
INSTANT = BackendProfile(latency_ms=0, quality=1.0)


def client_for(kind: BackendKind, api_key: str | None = None) -> httpx.AsyncClient:
    state = SimState("sim-1", kind, INSTANT, api_key=api_key, rng=random.Random(1))
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=make_app(state)), base_url="http://sim"
    )


@pytest.fixture
async def lightrag() -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(BackendKind.LIGHTRAG) as client:
        yield client


@pytest.fixture
async def perplexity() -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(BackendKind.PERPLEXITY, KEY) as client:
        yield client


AUTH = {"Authorization": f"Bearer {KEY}"}


def chat(text: str = QUERY) -> dict[str, object]:
    return {"model": "sonar", "messages": [{"role": "user", "content": text}]}


# -- LightRAG --------------------------------------------------------------------------
async def test_lightrag_query_and_health(lightrag: httpx.AsyncClient) -> None:
    response = await lightrag.post("/query", json={"query": QUERY, "mode": "hybrid"})
    assert response.status_code == 200
    assert isinstance(response.json()["response"], str) and "MCAD" in response.json()["response"]
    health = await lightrag.get("/health")
    assert health.json() == {"status": "healthy", "name": "sim-1"}


@pytest.mark.parametrize("body", [{}, {"query": ""}, {"query": 3}, ["query"]])
async def test_lightrag_rejects_a_bad_query_with_a_message(
    lightrag: httpx.AsyncClient, body: object
) -> None:
    response = await lightrag.post("/query", json=body)
    assert response.status_code == 422
    assert "query" in response.json()["error"]["message"]


async def test_the_same_question_gets_the_same_bytes(lightrag: httpx.AsyncClient) -> None:
    """Content depends on backend and question only, so a test can compare answers
    across runs even when other traffic (a shadow) hits the same server in between."""
    first = await lightrag.post("/query", json={"query": QUERY})
    await lightrag.post("/query", json={"query": "something else entirely"})
    again = await lightrag.post(
        "/query", json={"query": QUERY}, headers={"X-Router-Arm": "production"}
    )
    assert first.content == again.content


# -- Perplexity ------------------------------------------------------------------------
async def test_perplexity_chat_completion(perplexity: httpx.AsyncClient) -> None:
    response = await perplexity.post("/chat/completions", json=chat(), headers=AUTH)
    assert response.status_code == 200
    body = response.json()
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert "MCAD" in body["choices"][0]["message"]["content"]
    usage = body["usage"]
    assert usage["prompt_tokens"] >= 1 and usage["completion_tokens"] >= 1
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert len(body["citations"]) == 3  # quality 1.0: a good answer cites its sources


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}])
async def test_perplexity_needs_the_key(perplexity: httpx.AsyncClient, headers: dict) -> None:
    assert (
        await perplexity.post("/chat/completions", json=chat(), headers=headers)
    ).status_code == 401
    assert (await perplexity.get("/models", headers=headers)).status_code == 401
    models = await perplexity.get("/models", headers=AUTH)
    assert models.status_code == 200 and models.json()["data"][0]["id"] == "sonar"


async def test_perplexity_rejects_a_request_without_a_user_turn(
    perplexity: httpx.AsyncClient,
) -> None:
    response = await perplexity.post(
        "/chat/completions", json={"messages": [{"role": "system", "content": "hi"}]}, headers=AUTH
    )
    assert response.status_code == 400
    assert "user turn" in response.json()["error"]["message"]


# -- admin: profiles, per-arm overrides ------------------------------------------------
async def test_admin_put_get_delete_with_an_arm_override(lightrag: httpx.AsyncClient) -> None:
    put = await lightrag.put("/admin/profile", json={"latency_sigma": 0.1})
    assert put.json()["profile"]["latency_sigma"] == 0.1
    assert put.json()["profile"]["quality"] == 1.0  # a patch keeps what it does not name
    arm = await lightrag.put("/admin/profile", params={"arm": "production"}, json={"error_rate": 1})
    assert arm.json() == {
        "arm": "production",
        "profile": {**put.json()["profile"], "error_rate": 1.0},
    }
    shown = (await lightrag.get("/admin/profile")).json()
    assert shown["profile"]["error_rate"] == 0.0
    assert shown["arms"]["production"]["error_rate"] == 1.0

    async def status(arm: str | None) -> int:
        headers = {"X-Router-Arm": arm} if arm else {}
        return (await lightrag.post("/query", json={"query": QUERY}, headers=headers)).status_code

    assert [await status("production"), await status("legacy"), await status(None)] == [
        503,
        200,
        200,
    ]
    stats = (await lightrag.get("/admin/stats")).json()["counts"]
    assert stats == {"production:error": 1, "legacy:ok": 1, "none:ok": 1}

    removed = await lightrag.delete("/admin/profile", params={"arm": "production"})
    assert removed.json() == {"arm": "production", "removed": True}
    assert await status("production") == 200
    again = await lightrag.delete("/admin/profile", params={"arm": "production"})
    assert again.json() == {"arm": "production", "removed": False}
    assert (await lightrag.delete("/admin/profile")).status_code == 400


@pytest.mark.parametrize(
    ("patch", "mentions"),
    [
        ({"error_rte": 0.5}, "error_rte"),
        ({"error_rate": 1.5}, "error_rate"),
        ({"latency_ms": -1}, "latency_ms"),
        ({"latency_ms": "fast"}, "latency_ms"),
        ([1, 2], "body"),
    ],
)
async def test_bad_admin_input_is_refused_with_a_message(
    lightrag: httpx.AsyncClient, patch: object, mentions: str
) -> None:
    before = (await lightrag.get("/admin/profile")).json()
    response = await lightrag.put("/admin/profile", json=patch)
    assert response.status_code == 422
    assert mentions in response.json()["error"]["message"]
    assert (await lightrag.get("/admin/profile")).json() == before  # nothing changed


async def test_admin_input_that_is_not_json(lightrag: httpx.AsyncClient) -> None:
    response = await lightrag.put("/admin/profile", content=b"{error_rate: 1")
    assert response.status_code == 400
    assert "JSON" in response.json()["error"]["message"]


# -- faults ----------------------------------------------------------------------------
async def test_throttling_window_after_a_429(perplexity: httpx.AsyncClient) -> None:
    """Once it says 429, it keeps saying so (to every arm: one rate limiter per API key,
    as with the real service) until its Retry-After has passed."""
    await perplexity.put("/admin/profile", json={"rate_limit_rate": 1.0, "retry_after_s": 0.3})
    first = await perplexity.post("/chat/completions", json=chat(), headers=AUTH)
    assert first.status_code == 429 and first.headers["retry-after"] == "0.3"
    await perplexity.put("/admin/profile", json={"rate_limit_rate": 0.0})
    for arm in ("legacy", "production"):
        during = await perplexity.post(
            "/chat/completions", json=chat(), headers={**AUTH, "X-Router-Arm": arm}
        )
        assert during.status_code == 429
        assert float(during.headers["retry-after"]) >= 0.3  # never earlier than the window
    await asyncio.sleep(0.35)
    after = await perplexity.post("/chat/completions", json=chat(), headers=AUTH)
    assert after.status_code == 200


async def test_a_throttled_answer_never_announces_an_earlier_end(
    perplexity: httpx.AsyncClient,
) -> None:
    """Retry-After is rounded up: a client that waits as told is not refused again."""
    await perplexity.put("/admin/profile", json={"rate_limit_rate": 1.0, "retry_after_s": 1.4})
    await perplexity.post("/chat/completions", json=chat(), headers=AUTH)
    during = await perplexity.post("/chat/completions", json=chat(), headers=AUTH)
    assert during.status_code == 429
    assert during.headers["retry-after"] == "2"


async def test_timeout_fault_hangs_then_gives_up(lightrag: httpx.AsyncClient) -> None:
    await lightrag.put("/admin/profile", json={"timeout_rate": 1.0, "hang_s": 0.05})
    response = await lightrag.post("/query", json={"query": QUERY})
    assert response.status_code == 504


# -- real servers on loopback ----------------------------------------------------------
def test_fleet_thread_serves_on_loopback_and_stops() -> None:
    with FleetThread(demo_fleet(api_key=KEY)) as fleet:
        assert fleet.info is not None
        urls = [m.url for m in fleet.info.members]
        assert all(url.startswith("http://127.0.0.1:") for url in urls)
        member = fleet.info.member("lightrag-1")
        assert httpx.get(f"{member.url}/health", timeout=5).json()["status"] == "healthy"
        changed = set_profile(member.admin_url, {"latency_ms": 5.0}, arm="production")
        assert changed["arm"] == "production" and changed["profile"]["latency_ms"] == 5.0
        with pytest.raises(httpx.HTTPStatusError, match="error_rte"):
            set_profile(member.admin_url, {"error_rte": 0.5})
        px = fleet.info.member("perplexity-1")
        assert httpx.get(f"{px.url}/models", timeout=5).status_code == 401
        assert all(b.api_key_env for b in fleet.info.backend_configs() if b.kind == "perplexity")
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{urls[0]}/health", timeout=2)


def test_fleet_binds_loopback_only() -> None:
    spec = SimBackendSpec(name="x", kind=BackendKind.LIGHTRAG)
    with pytest.raises(ValueError, match="loopback"):
        Fleet([spec], host="0.0.0.0")


async def test_an_outage_fails_queries_and_health_at_once_until_lifted(
    lightrag: httpx.AsyncClient, perplexity: httpx.AsyncClient
) -> None:
    for client, probe in ((lightrag, "/health"), (perplexity, "/models")):
        assert (await client.put("/admin/profile", json={"down": True})).status_code == 200
        headers = {"authorization": f"Bearer {KEY}"}
        assert (await client.get(probe, headers=headers)).status_code == 503
        (await client.put("/admin/profile", json={"down": False})).raise_for_status()
        assert (await client.get(probe, headers=headers)).status_code == 200
    await lightrag.put("/admin/profile", json={"down": True})
    refused = await lightrag.post("/query", json={"query": QUERY, "mode": "hybrid"})
    assert refused.status_code == 503
    assert refused.json()["error"]["message"] == "simulated outage"
