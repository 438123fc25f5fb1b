"""The control store over HTTP, for a fleet with no shared folder.

    GET  {url}/config               the current document (404: none yet); ETag = change token
    PUT  {url}/config               publish a document
    GET  {url}/acks                 every instance's heartbeat, a JSON list; header
                                    `x-store-time`: the endpoint's clock (ISO 8601)
    PUT  {url}/acks/{instance}      one instance's heartbeat

Any server with these four routes will do (`rollout control serve` is one, over a
folder). Network errors surface as `OSError`, which the router treats as "unreadable
this time": it keeps the config it runs and tries again at the next poll.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta

import httpx
from pydantic import ValidationError

from router.backends import split_credentials
from router.control_store import Acknowledgement, DocumentReads, decode_document
from router.router_config import RouterConfig
from router.settings_errors import mask_url


class HttpControlStore(DocumentReads):
    def __init__(
        self, url: str, *, timeout_s: float = 2.0, transport: httpx.BaseTransport | None = None
    ) -> None:
        parsed = httpx.URL(url)
        if parsed.query or parsed.fragment:
            # the routes are appended to the path: `?token=x` would become `?token=x/config`
            # and every GET a 404, read as "nothing published yet"
            raise ValueError(
                f"control URL {mask_url(url)} has a query or fragment: the routes are "
                "appended to its path, so give credentials as user:password@ instead"
            )
        # Credentials go in the Authorization header, not in the URL the client requests:
        # httpx logs every request's URL at INFO, and this one is polled for ever.
        bare, basic = split_credentials(url)
        self.url = bare.rstrip("/")
        headers = {} if basic is None else {"Authorization": basic}
        self.client = httpx.Client(timeout=timeout_s, transport=transport, headers=headers)

    def _call(self, method: str, path: str, **kwargs: object) -> httpx.Response:
        # Errors are logged at every poll: never with a password from the URL.
        where = mask_url(f"{self.url}{path}")
        try:
            response = self.client.request(method, f"{self.url}{path}", **kwargs)  # type: ignore[arg-type]
        except httpx.HTTPError as exc:
            raise OSError(f"control endpoint {where}: {mask_url(repr(exc))}") from None
        if response.status_code >= 400 and not (method == "GET" and response.status_code == 404):
            try:
                said = f": {response.json()['error']}"
            except (ValueError, KeyError, TypeError, RecursionError):
                said = ""
            raise OSError(f"control endpoint {where}: HTTP {response.status_code}{said}")
        return response

    def publish(self, config: RouterConfig) -> None:
        self._call(
            "PUT",
            "/config",
            content=config.to_json(indent=2),
            headers={"content-type": "application/json"},
        )

    def read_document(self) -> tuple[object, str] | None:
        response = self._call("GET", "/config")
        if response.status_code == 404:
            return None
        # The bytes as sent, not `response.text`: that guesses a charset and replaces what
        # it cannot decode, so a corrupt document could be applied instead of refused.
        raw = response.content
        token = response.headers.get("etag") or hashlib.sha256(raw).hexdigest()
        return token, decode_document(raw)

    def write_ack(self, ack: Acknowledgement) -> None:
        self._call(
            "PUT",
            f"/acks/{ack.instance}",
            content=ack.model_dump_json(),
            headers={"content-type": "application/json"},
        )

    def read_acks(self) -> list[Acknowledgement]:
        response = self._call("GET", "/acks")
        try:
            items = response.json()
        except (ValueError, RecursionError):
            items = None
        if not isinstance(items, list):
            raise OSError(f"control endpoint {mask_url(self.url)}/acks: not a JSON list")
        shift = _clock_offset(response)
        acks = []
        for item in items:
            try:
                ack = Acknowledgement.model_validate(item)
            except ValidationError:
                continue  # one bad heartbeat must not hide the others
            if ack.received_at is not None and shift is not None:
                ack = ack.model_copy(update={"received_at": ack.received_at + shift})
            acks.append(ack)
        return acks

    def close(self) -> None:
        self.client.close()


STORE_TIME_HEADER = "x-store-time"


def _clock_offset(response: httpx.Response) -> timedelta | None:
    """Our clock minus the endpoint's, from its `x-store-time` header (None without one).

    `received_at` is by the endpoint's clock; shifted by this, ages are by ours. A flows
    host 20 s ahead of the endpoint saw every router as gone, and one behind kept dead
    routers "live" until the phase's ack timeout restored the previous phase.
    """
    said = response.headers.get(STORE_TIME_HEADER)
    if not said:
        return None
    try:
        store_now = datetime.fromisoformat(said)
    except ValueError:
        return None
    if store_now.tzinfo is None:
        return None
    return datetime.now(UTC) - store_now
