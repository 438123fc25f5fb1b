"""Starlette apps that speak the LightRAG and Perplexity HTTP APIs, with injectable faults.

Admin endpoints change behaviour while the server runs, optionally for one arm only
(requests carry `X-Router-Arm`), so a scenario can degrade the production path alone:

    GET    /admin/profile                 current profile and per-arm overrides
    PUT    /admin/profile[?arm=NAME]      partial update (ProfilePatch JSON)
    DELETE /admin/profile?arm=NAME        drop an arm's override
    GET    /admin/stats                   requests served, by arm and outcome
"""

from __future__ import annotations

import asyncio
import math
import random
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from flows.sim.content import answer_text
from flows.sim.profile import BackendProfile, Fault, ProfilePatch, draw_fault, draw_latency_s
from router.backends import BackendKind


@dataclass
class SimState:
    name: str
    kind: BackendKind
    profile: BackendProfile
    api_key: str | None = None
    arms: dict[str, BackendProfile] = field(default_factory=dict)
    stats: Counter[str] = field(default_factory=Counter)
    rng: random.Random = field(default_factory=random.Random)
    #: Like a real API's rate limiter: once it says 429, it keeps saying so to everyone
    #: until Retry-After has passed. Clients that ignore Retry-After keep failing.
    throttled_until: float = 0.0

    def profile_for(self, arm: str | None) -> BackendProfile:
        return self.arms.get(arm or "", self.profile)


def _error(status: int, message: str, **headers: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "code": status}}, status, headers=headers)


async def _simulate(state: SimState, request: Request) -> JSONResponse | None:
    """Apply the profile: sleep, maybe fail. None means "answer normally"."""
    arm = request.headers.get("x-router-arm")
    profile = state.profile_for(arm)
    if profile.down:
        state.stats[f"{arm or 'none'}:down"] += 1
        return _error(503, "simulated outage")
    now = time.monotonic()
    if now < state.throttled_until:
        state.stats[f"{arm or 'none'}:{Fault.RATE_LIMITED}"] += 1
        # Rounded up: a client that waits as told must not arrive before the window ends.
        remaining = max(1, math.ceil(state.throttled_until - now))
        return _error(429, "rate limited", **{"Retry-After": str(remaining)})
    fault = draw_fault(profile, state.rng)
    state.stats[f"{arm or 'none'}:{fault}"] += 1
    if fault == Fault.TIMEOUT:
        await asyncio.sleep(profile.hang_s)
        return _error(504, "simulated upstream timeout")
    await asyncio.sleep(draw_latency_s(profile, state.rng))
    if fault == Fault.RATE_LIMITED:
        state.throttled_until = time.monotonic() + profile.retry_after_s
        return _error(429, "rate limited", **{"Retry-After": f"{profile.retry_after_s:g}"})
    if fault == Fault.ERROR:
        return _error(503, "simulated backend error")
    return None


def _content_rng(state: SimState, query: str) -> random.Random:
    """Answer content depends on the backend and the question only, not on how many
    requests came before: the same question gets the same bytes from the same backend,
    whatever else (a shadow, another arm) the server is doing."""
    return random.Random(f"{state.name}\0{query}")


def _authorised(state: SimState, request: Request) -> bool:
    if not state.api_key:
        return True
    return request.headers.get("authorization") == f"Bearer {state.api_key}"


def lightrag_routes(state: SimState) -> list[Route]:
    async def query(request: Request) -> JSONResponse:
        try:
            body = await request.json()
            text = body["query"]
            if not isinstance(text, str) or not text.strip():
                raise ValueError("query must be a non-empty string")
        except (ValueError, KeyError, TypeError) as exc:
            return _error(422, f"expected {{'query': str, 'mode': str}}: {exc}")
        failed = await _simulate(state, request)
        if failed is not None:
            return failed
        answer, _ = answer_text(
            text,
            state.profile_for(request.headers.get("x-router-arm")).quality,
            _content_rng(state, text),
        )
        return JSONResponse({"response": answer})

    async def health(request: Request) -> JSONResponse:
        if state.profile.down:
            return JSONResponse({"status": "down", "name": state.name}, 503)
        return JSONResponse({"status": "healthy", "name": state.name})

    return [Route("/query", query, methods=["POST"]), Route("/health", health)]


def perplexity_routes(state: SimState) -> list[Route]:
    async def completions(request: Request) -> JSONResponse:
        if not _authorised(state, request):
            return _error(401, "invalid or missing API key")
        try:
            body = await request.json()
            messages = body["messages"]
            text = next(m["content"] for m in reversed(messages) if m.get("role") == "user")
            model = str(body.get("model", "sonar"))
        except (ValueError, KeyError, TypeError, StopIteration) as exc:
            return _error(400, f"expected OpenAI-style messages with a user turn: {exc!r}")
        failed = await _simulate(state, request)
        if failed is not None:
            return failed
        profile = state.profile_for(request.headers.get("x-router-arm"))
        answer, citations = answer_text(text, profile.quality, _content_rng(state, text))
        prompt_tokens = max(1, int(len(text) / 4 * profile.tokens_scale))
        completion_tokens = max(1, int(len(answer) / 4 * profile.tokens_scale))
        return JSONResponse(
            {
                "id": uuid.uuid4().hex,
                "model": model,
                "created": int(time.time()),
                "object": "chat.completion",
                "choices": [
                    {
                        "index": 0,
                        "finish_reason": "stop",
                        "message": {"role": "assistant", "content": answer},
                    }
                ],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                },
                "citations": citations,
            }
        )

    async def models(request: Request) -> JSONResponse:
        if not _authorised(state, request):
            return _error(401, "invalid or missing API key")
        if state.profile.down:
            return _error(503, "simulated outage")
        return JSONResponse({"object": "list", "data": [{"id": "sonar", "object": "model"}]})

    return [Route("/chat/completions", completions, methods=["POST"]), Route("/models", models)]


def admin_routes(state: SimState) -> list[Route]:
    async def get_profile(request: Request) -> JSONResponse:
        return JSONResponse(
            {
                "name": state.name,
                "kind": state.kind.value,
                "profile": state.profile.model_dump(),
                "arms": {arm: p.model_dump() for arm, p in state.arms.items()},
            }
        )

    async def put_profile(request: Request) -> JSONResponse:
        try:
            patch = ProfilePatch.model_validate(await request.json())
        except ValidationError as exc:
            return _error(
                422,
                "; ".join(
                    f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors()
                ),
            )
        except ValueError:
            return _error(400, "body must be a JSON object")
        arm = request.query_params.get("arm")
        if arm:
            state.arms[arm] = patch.apply(state.arms.get(arm, state.profile))
            return JSONResponse({"arm": arm, "profile": state.arms[arm].model_dump()})
        state.profile = patch.apply(state.profile)
        return JSONResponse({"profile": state.profile.model_dump()})

    async def delete_profile(request: Request) -> JSONResponse:
        arm = request.query_params.get("arm")
        if not arm:
            return _error(400, "DELETE needs ?arm=NAME")
        removed = state.arms.pop(arm, None) is not None
        return JSONResponse({"arm": arm, "removed": removed})

    async def stats(request: Request) -> JSONResponse:
        return JSONResponse({"name": state.name, "counts": dict(state.stats)})

    return [
        Route("/admin/profile", get_profile, methods=["GET"]),
        Route("/admin/profile", put_profile, methods=["PUT"]),
        Route("/admin/profile", delete_profile, methods=["DELETE"]),
        Route("/admin/stats", stats, methods=["GET"]),
    ]


def make_app(state: SimState) -> Starlette:
    routes = (
        lightrag_routes(state) if state.kind is BackendKind.LIGHTRAG else perplexity_routes(state)
    )
    return Starlette(routes=routes + admin_routes(state))
