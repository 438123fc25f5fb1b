"""`rollout control serve`: the HTTP control endpoint over a control folder.

A stand-in for a fleet's endpoint (the routes of `router.http_control_store`): it
stores what is published as it is (routers refuse an invalid document and say so in
their heartbeat, as they do with the folder), except that a document whose version is
not above the stored one is refused with 409 (and one without an integer version with
422): two publishers who both read version 6 must not both publish a 7, or routers that
polled in between would run different documents under one version. It accepts a heartbeat only for the instance its path
names, under a safe name.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from datetime import UTC, datetime

from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from router.control_store import Acknowledgement, FileControlStore, atomic_write
from router.http_control_store import STORE_TIME_HEADER

INSTANCE = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
MAX_BODY = 1_000_000


def _problem(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status)


class _TooLarge(Exception):
    pass


async def _body(request: Request) -> bytes:
    """The request body, refused past MAX_BODY before it is all in memory."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY:
        raise _TooLarge
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise _TooLarge
    return bytes(body)


def _version(text: str) -> int | None:
    """The document's version, if it is a JSON integer (as routers read it)."""
    try:
        version = json.loads(text).get("version")
    except (ValueError, AttributeError, RecursionError):  # RecursionError: [[[...]]]
        return None
    return version if isinstance(version, int) and not isinstance(version, bool) else None


def make_app(store: FileControlStore) -> Starlette:
    publishing = threading.Lock()  # compare-and-write of the document, one at a time
    store.sweep_heartbeat_temps()  # PUT /config writes the document itself, not publish()

    def store_if_newer(text: str) -> JSONResponse | None:
        """Write `text` unless it does not advance the version; else the refusal."""
        new = _version(text)
        if new is None:
            # without a version the rule below cannot hold ("6" or 6.0 went through it)
            return _problem(422, "the document's version must be a JSON integer")
        with publishing:
            found = store.read_document()
            old = _version(found[1]) if found else None  # None: unreadable, replace it
            if old is not None and new <= old:
                return _problem(409, f"version {new} is not above the published version {old}")
            atomic_write(store.config_path, text)
            return None

    async def get_config(request: Request) -> Response:
        found = await run_in_threadpool(store.read_document)
        if found is None:
            return _problem(404, "nothing published yet")
        # The bytes as stored: a corrupt (not UTF-8) document is served for routers to
        # refuse and report, not turned into a 500 they cannot tell from an outage.
        raw = found[1].encode("utf-8", errors="surrogateescape")
        etag = hashlib.sha256(raw).hexdigest()
        return Response(raw, media_type="application/json", headers={"etag": etag})

    async def put_config(request: Request) -> Response:
        try:
            text = (await _body(request)).decode()
        except _TooLarge:
            return _problem(413, f"document over {MAX_BODY} bytes")
        except UnicodeDecodeError:
            return _problem(400, "document is not UTF-8")
        refused = await run_in_threadpool(store_if_newer, text)
        return refused or Response(status_code=204)

    async def get_acks(request: Request) -> Response:
        acks = await run_in_threadpool(store.read_acks)
        # Our clock, read after the heartbeats: the reader shifts `received_at` into its
        # own clock with it (see router.http_control_store).
        return JSONResponse(
            [a.model_dump(mode="json") for a in acks],
            headers={STORE_TIME_HEADER: datetime.now(UTC).isoformat()},
        )

    async def put_ack(request: Request) -> Response:
        instance = request.path_params["instance"]
        if not INSTANCE.match(instance):
            return _problem(400, "instance names are letters, digits, '_', '.', '-'")
        try:
            ack = Acknowledgement.model_validate_json(await _body(request))
        except _TooLarge:
            return _problem(413, f"heartbeat over {MAX_BODY} bytes")
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
