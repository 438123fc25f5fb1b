"""Deterministic, sticky traffic split.

A subject key (user id, else session id, else request id) is hashed with a salt into
one of 10,000 buckets: ``int.from_bytes(sha256(f"{salt}:{key}").digest()[:8], "big") % 10000``.
The production arm owns the buckets below ``traffic_percent * 100``. A subject's bucket
never changes while the salt stays the same, so raising the percentage only ever adds
subjects to the production arm (monotonic) and a user sees one arm for a whole phase.

Test vectors, reproducible in any language with SHA-256 (the suite checks them):

==============  ==============  ======
salt            key             bucket
==============  ==============  ======
rollout-v1      user-1            9086
rollout-v1      user-2            5580
rollout-v1      user-3            1110
rollout-v1      user-42            588
rollout-v1      alice             6339
rollout-v1      session-7f3a      3705
other-salt      user-1            3722
==============  ==============  ======

With ``traffic_percent=5`` the production arm owns buckets 0..499: ``user-42``
(bucket 588) stays on legacy at 5 % and moves to production at 15 %, where ``user-3``
(bucket 1110) joins too; both stay there at 50 % and 100 %.
"""

from __future__ import annotations

from collections.abc import Mapping
from hashlib import sha256
from typing import Any

BUCKETS = 10_000

#: (salt, key, bucket), computed once with the formula above and frozen here so that
#: any reimplementation (another service, a SQL UDF) can check itself against it.
TEST_VECTORS: tuple[tuple[str, str, int], ...] = (
    ("rollout-v1", "user-1", 9086),
    ("rollout-v1", "user-2", 5580),
    ("rollout-v1", "user-3", 1110),
    ("rollout-v1", "user-42", 588),
    ("rollout-v1", "alice", 6339),
    ("rollout-v1", "session-7f3a", 3705),
    ("other-salt", "user-1", 3722),
)


def bucket_of(key: str, salt: str) -> int:
    digest = sha256(f"{salt}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


def in_production(bucket: int, traffic_percent: float) -> bool:
    """Buckets strictly below `traffic_percent * 100` (so 0.125 % owns buckets 0..12)."""
    return bucket < traffic_percent * 100


def subject_key(context: Mapping[str, Any] | None, request_id: str) -> str:
    """User id, else session id, else the request id (which makes the split per request)."""
    if context:
        for field in ("user_id", "session_id"):
            value = context.get(field)
            if value not in (None, ""):
                return str(value)
    return request_id
