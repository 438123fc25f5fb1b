"""Realistic synthetic request rows, for benchmarks and tests.

The value distributions mirror what the router records (uuid4-hex request ids, a few
hundred distinct question hashes, a handful of backends, log-normal latencies), because
compression, and therefore ingest speed, depends on the entropy of each column: uniform
toy data would flatter the numbers.
"""

from __future__ import annotations

import hashlib
import random
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from router.record import REQUEST_SCHEMA, RequestRecord
from router.recorder import write_segment

BACKENDS = ("lightrag-1", "lightrag-2", "perplexity-1")
CATEGORIES = ("general", "pathway_mechanism", "recent_events")
ALGORITHMS = {"legacy": "weighted_round_robin", "production": "health_aware"}
OUTCOMES = ("ok", "error", "timeout", "rate_limited", "rejected")
OUTCOME_P = (0.94, 0.025, 0.015, 0.01, 0.01)
ERROR_KIND = {"error": "server_error", "timeout": "timeout", "rate_limited": "rate_limited"}
HTTP_STATUS = {"ok": 200, "error": 502, "rate_limited": 429, "rejected": 400}
QUESTIONS = 273
START = datetime(2025, 6, 1, tzinfo=UTC)


def query_hashes(count: int = QUESTIONS) -> list[str]:
    return [hashlib.sha256(f"q{i}".encode()).hexdigest()[:16] for i in range(count)]


def make_records(
    n: int,
    *,
    seed: int = 0,
    start: datetime = START,
    config_version: int = 1,
    mode: str = "ab_test",
    instance: str = "app-1",
    step_s: float = 0.01,
) -> list[RequestRecord]:
    """`n` rows as the router builds them (Python tuples), about 1 % shadow rows."""
    rng = random.Random(seed)
    hashes = query_hashes()
    rows: list[RequestRecord] = []
    last_primary: str | None = None
    for i in range(n):
        arm = "production" if rng.random() < 0.5 else "legacy"
        outcome = rng.choices(OUTCOMES, OUTCOME_P)[0]
        ok = outcome == "ok"
        shadow = last_primary is not None and rng.random() < 0.01
        request_id = uuid.UUID(int=rng.getrandbits(128), version=4).hex
        tokens_in = rng.randint(20, 400)
        tokens_out = rng.randint(50, 900) if ok else 0
        rows.append(
            RequestRecord(
                request_id=request_id,
                ts=start + timedelta(seconds=i * step_s),
                router_instance=instance,
                config_version=config_version,
                mode=mode,
                arm="production" if shadow else arm,
                is_shadow=shadow,
                primary_request_id=last_primary if shadow else None,
                subject_bucket=rng.randrange(10_000),
                query_category=rng.choice(CATEGORIES),
                algorithm=ALGORITHMS["production" if shadow else arm],
                backend=rng.choice(BACKENDS),
                attempts=1 if ok or rng.random() < 0.5 else 2,
                fallback_used=not ok and rng.random() < 0.3,
                outcome=outcome,
                http_status=HTTP_STATUS.get(outcome),
                error_kind=ERROR_KIND.get(outcome),
                latency_ms=rng.lognormvariate(6.0, 0.5),
                tokens_in=tokens_in,
                tokens_out=tokens_out,
                cost_usd=(tokens_in + tokens_out) * 2e-6 if ok else 0.0,
                quality_score=rng.random() if ok and rng.random() < 0.7 else None,
                query_hash=rng.choice(hashes),
                query_length=rng.randint(20, 300),
            )
        )
        if not shadow:
            last_primary = request_id
    return rows


def make_table(
    n: int,
    *,
    seed: int = 0,
    start: datetime = START,
    config_version: int = 1,
    mode: str = "ab_test",
    instance: str = "app-1",
    step_s: float = 0.01,
) -> pa.Table:
    """The same distributions as `make_records`, built column-wise (fast for millions)."""
    rng = np.random.default_rng(seed)
    arm_prod = rng.random(n) < 0.5
    outcome_idx = rng.choice(len(OUTCOMES), size=n, p=OUTCOME_P)
    ok = outcome_idx == 0
    shadow = rng.random(n) < 0.01
    shadow[0] = False
    raw = rng.bytes(16 * n)
    request_ids = [raw[i : i + 16].hex() for i in range(0, 16 * n, 16)]
    primary = [request_ids[i - 1] if shadow[i] else None for i in range(n)]
    tokens_in = rng.integers(20, 401, n, dtype=np.int32)
    tokens_out = np.where(ok, rng.integers(50, 901, n, dtype=np.int32), 0).astype(np.int32)
    outcomes = np.array(OUTCOMES, dtype=object)[outcome_idx]
    status = np.array([HTTP_STATUS.get(o) for o in OUTCOMES], dtype=object)[outcome_idx]
    error_kind = np.array([ERROR_KIND.get(o) for o in OUTCOMES], dtype=object)[outcome_idx]
    arms = np.where(arm_prod | shadow, "production", "legacy").astype(object)
    quality = np.where(ok & (rng.random(n) < 0.7), rng.random(n), np.nan)
    start_us = int(start.timestamp() * 1_000_000)
    columns = {
        "request_id": request_ids,
        "ts": pa.array(start_us + (np.arange(n) * step_s * 1e6).astype(np.int64)).cast(
            REQUEST_SCHEMA.field("ts").type
        ),
        "router_instance": [instance] * n,
        "config_version": np.full(n, config_version, dtype=np.int64),
        "mode": [mode] * n,
        "arm": arms,
        "is_shadow": shadow,
        "primary_request_id": primary,
        "subject_bucket": rng.integers(0, 10_000, n, dtype=np.int32),
        "query_category": np.array(CATEGORIES, dtype=object)[rng.integers(0, 3, n)],
        "algorithm": np.where(arm_prod | shadow, ALGORITHMS["production"], ALGORITHMS["legacy"]),
        "backend": np.array(BACKENDS, dtype=object)[rng.integers(0, 3, n)],
        "attempts": np.where(ok | (rng.random(n) < 0.5), 1, 2).astype(np.int32),
        "fallback_used": ~ok & (rng.random(n) < 0.3),
        "outcome": outcomes,
        "http_status": pa.array(status, type=pa.int32(), from_pandas=True),
        "error_kind": pa.array(error_kind, type=pa.string(), from_pandas=True),
        "latency_ms": rng.lognormal(6.0, 0.5, n),
        "tokens_in": tokens_in,
        "tokens_out": tokens_out,
        "cost_usd": np.where(ok, (tokens_in + tokens_out) * 2e-6, 0.0),
        "quality_score": pa.array(quality, type=pa.float64(), from_pandas=True),
        "query_hash": np.array(query_hashes(), dtype=object)[rng.integers(0, QUESTIONS, n)],
        "query_length": rng.integers(20, 301, n, dtype=np.int32),
    }
    arrays = [pa.array(columns[f.name], type=f.type) for f in REQUEST_SCHEMA]
    return pa.Table.from_arrays(arrays, schema=REQUEST_SCHEMA)


def write_request_segments(
    segments_dir: Path,
    instance: str,
    *,
    files: int,
    rows: int,
    seed: int = 0,
    **table_options: Any,
) -> list[Path]:
    """`files` segment files of `rows` rows each, written like the recorder writes them."""
    written = []
    for index in range(files):
        table = make_table(rows, seed=seed * 1_000 + index, instance=instance, **table_options)
        written.append(write_segment(table, Path(segments_dir) / instance, "requests", index))
    return written
