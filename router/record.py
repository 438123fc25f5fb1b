"""The per-request metrics row and the router event row, as written to segment files.

This module is the schema contract between the router (writer), the metrics store
(loader) and the checks (readers); it depends on nothing but pyarrow.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import NamedTuple

import pyarrow as pa


class Outcome(StrEnum):
    OK = "ok"
    ERROR = "error"
    TIMEOUT = "timeout"
    RATE_LIMITED = "rate_limited"
    REJECTED = "rejected"


class ErrorKind(StrEnum):
    CONNECT = "connect"
    TIMEOUT = "timeout"
    SERVER_ERROR = "server_error"
    RATE_LIMITED = "rate_limited"
    CLIENT_ERROR = "client_error"
    MALFORMED = "malformed"
    OVERSIZED = "oversized"
    NO_BACKEND = "no_backend"
    CANCELLED = "cancelled"


class RequestRecord(NamedTuple):
    """One routed request (or one shadow execution). Never holds the query text or user id."""

    request_id: str
    ts: datetime
    router_instance: str
    config_version: int
    mode: str
    arm: str
    is_shadow: bool
    primary_request_id: str | None
    subject_bucket: int
    query_category: str
    algorithm: str
    backend: str | None
    attempts: int
    fallback_used: bool
    outcome: str
    http_status: int | None
    error_kind: str | None
    latency_ms: float
    tokens_in: int
    tokens_out: int
    cost_usd: float
    quality_score: float | None
    query_hash: str
    query_length: int


REQUEST_SCHEMA = pa.schema(
    [
        ("request_id", pa.string()),
        ("ts", pa.timestamp("us", tz="UTC")),
        ("router_instance", pa.string()),
        ("config_version", pa.int64()),
        ("mode", pa.string()),
        ("arm", pa.string()),
        ("is_shadow", pa.bool_()),
        ("primary_request_id", pa.string()),
        ("subject_bucket", pa.int32()),
        ("query_category", pa.string()),
        ("algorithm", pa.string()),
        ("backend", pa.string()),
        ("attempts", pa.int32()),
        ("fallback_used", pa.bool_()),
        ("outcome", pa.string()),
        ("http_status", pa.int32()),
        ("error_kind", pa.string()),
        ("latency_ms", pa.float64()),
        ("tokens_in", pa.int32()),
        ("tokens_out", pa.int32()),
        ("cost_usd", pa.float64()),
        ("quality_score", pa.float64()),
        ("query_hash", pa.string()),
        ("query_length", pa.int32()),
    ]
)
assert tuple(REQUEST_SCHEMA.names) == RequestRecord._fields


class EventKind(StrEnum):
    CONFIG_APPLIED = "config_applied"
    CONFIG_REFUSED = "config_refused"
    FAILBACK = "failback"
    BREAKER_OPENED = "breaker_opened"
    BREAKER_CLOSED = "breaker_closed"
    BACKEND_EJECTED = "backend_ejected"
    BACKEND_RETURNED = "backend_returned"
    BACKEND_UNHEALTHY = "backend_unhealthy"
    BACKEND_HEALTHY = "backend_healthy"
    BREAKER_HALF_OPEN = "breaker_half_open"
    ROWS_DROPPED = "rows_dropped"
    SHADOWS_SKIPPED = "shadows_skipped"
    SHADOWS_YIELDED = "shadows_yielded"
    INSTANCE_SHARED = "instance_shared"
    SEGMENT_QUARANTINED = "segment_quarantined"


def shadows_yielded_detail(count: int) -> str:
    """The `shadows_yielded` event's text. It starts with the count, which the gate's
    shadow coverage reads back (`checks.sample_ratio.SHADOWS_YIELDED_SQL`)."""
    return (
        f"{count} shadow execution(s) not sent: every backend that may answer them was "
        "rate-limited (429 Retry-After), and that quota is the users' too"
    )


class RouterEvent(NamedTuple):
    """Something an operator must be able to find later: a failback, a refused config..."""

    event_id: str
    ts: datetime
    router_instance: str
    kind: str
    config_version: int | None
    backend: str | None
    detail: str


EVENT_SCHEMA = pa.schema(
    [
        ("event_id", pa.string()),
        ("ts", pa.timestamp("us", tz="UTC")),
        ("router_instance", pa.string()),
        ("kind", pa.string()),
        ("config_version", pa.int64()),
        ("backend", pa.string()),
        ("detail", pa.string()),
    ]
)
assert tuple(EVENT_SCHEMA.names) == RouterEvent._fields


#: How a shadow row finds its primary, for every reader (the `shadow_pairs` view, the
#: gate's paired tests): the served row of the SAME router instance and config version
#: whose request id the shadow names. Request ids may come from the caller, so an id
#: alone pairs a shadow with unrelated rows (another instance, an earlier rollout) and
#: with every attempt of a caller's retry; when the id repeats within one instance and
#: version, the primary that ended closest in time to the shadow is taken, so each
#: shadow pairs with exactly one primary (the version in the partition is implied by the
#: join, and lets a filter on it reach the scans). `{table}` is the rows' table or view,
#: `{columns}` the select list (aliases `s` for the shadow, `p` for the primary),
#: `{where}` extra conditions (`AND ...`) on them.
SHADOW_PAIRS_SQL = """
SELECT {columns}
FROM {table} s JOIN {table} p
  ON p.request_id = s.primary_request_id
 AND p.router_instance = s.router_instance
 AND p.config_version = s.config_version
 AND NOT p.is_shadow
WHERE s.is_shadow {where}
QUALIFY row_number() OVER (
    PARTITION BY s.router_instance, s.config_version, s.request_id
    ORDER BY abs(epoch(p.ts) - epoch(s.ts)), p.ts
) = 1
"""
