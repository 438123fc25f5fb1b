"""`rollout control serve`: the HTTP control endpoint over a control folder.

A stand-in for a fleet's endpoint (the routes of `router.http_control_store`): it
stores what is published as it is (routers refuse an invalid document and say so in
their heartbeat, as they do with the folder), and accepts a heartbeat only for the
instance its path names, under a safe name.
"""

from __future__ import annotations

import hashlib
import re

from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from router.control_store import Acknowledgement, FileControlStore, atomic_write

INSTANCE = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
MAX_BODY = 1_000_000


def _problem(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status)


def make_app(store: FileControlStore) -> Starlette:
    async def get_config(request: Request) -> Response:
        found = await run_in_threadpool(store.read_document)
        if found is None:
            return _problem(404, "nothing published yet")
        text = found[1]
        etag = hashlib.sha256(text.encode()).hexdigest()
        return Response(text, media_type="application/json", headers={"etag": etag})

    async def put_config(request: Request) -> Response:
        body = await request.body()
        if len(body) > MAX_BODY:
            return _problem(413, f"document over {MAX_BODY} bytes")
        try:
            text = body.decode()
        except UnicodeDecodeError:
            return _problem(400, "document is not UTF-8")
        await run_in_threadpool(atomic_write, store.config_path, text)
        return Response(status_code=204)

    async def get_acks(request: Request) -> Response:
        acks = await run_in_threadpool(store.read_acks)
        return JSONResponse([a.model_dump(mode="json") for a in acks])

    async def put_ack(request: Request) -> Response:
        instance = request.path_params["instance"]
        if not INSTANCE.match(instance):
            return _problem(400, "instance names are letters, digits, '_', '.', '-'")
        try:
            ack = Acknowledgement.model_validate_json(await request.body())
        except ValidationError as exc:
            return _problem(422, f"not a heartbeat: {exc.errors()[0]['msg']}")
        if ack.instance != instance:
            return _problem(400, f"heartbeat of {ack.instance!r} sent for {instance!r}")
        await run_in_threadpool(store.write_ack, ack)
        return Response(status_code=204)

    return Starlette(
        routes=[
            Route("/config", get_config, methods=["GET"]),
            Route("/config", put_config, methods=["PUT"]),
            Route("/acks", get_acks, methods=["GET"]),
            Route("/acks/{instance}", put_ack, methods=["PUT"]),
        ]
    )
