"""Where segments and the Parquet archive live: a local folder by default, any location
DuckDB reads otherwise (`s3://bucket/prefix`, `gs://...`, `az://...` with httpfs/azure).

This is the scale seam of the store: router instances on many machines write segments to
a shared location, and old rows move to a shared archive, while the DuckDB file keeps
only the recent window. Local paths are made absolute here, because DuckDB views store
their text and a relative path would follow each reader's working directory.
"""

from __future__ import annotations

import os
from pathlib import Path

from flows.paths import DataPaths

SEGMENTS_ENV = "ROLLOUT_SEGMENTS_URL"
ARCHIVE_ENV = "ROLLOUT_ARCHIVE_URL"
RETENTION_ENV = "ROLLOUT_RETENTION_DAYS"
DEFAULT_RETENTION_DAYS = 30


def is_remote(location: str | Path) -> bool:
    """A URL DuckDB reads through an extension (s3://, gs://, https://...), not a path."""
    text = str(location)
    return "://" in text and not text.startswith("file://")


def resolve(location: str | Path) -> str:
    """An absolute local path, or the URL unchanged (without a trailing slash)."""
    text = str(location)
    if text.startswith("file://"):
        text = text[len("file://") :]
    if is_remote(text):
        return text.rstrip("/")
    return str(Path(text).expanduser().resolve())


def join(location: str, *parts: str) -> str:
    return "/".join([location.rstrip("/"), *parts])


def segments_location(paths: DataPaths, override: str | Path | None = None) -> str:
    """`override`, else `$ROLLOUT_SEGMENTS_URL`, else `<data dir>/segments`."""
    return resolve(override or os.environ.get(SEGMENTS_ENV) or paths.segments)


def archive_override(override: str | Path | None = None) -> str | None:
    """An explicitly chosen archive location (`override` or `$ROLLOUT_ARCHIVE_URL`).

    None means "keep the one the database already records" (default `<data dir>/archive`).
    """
    chosen = override or os.environ.get(ARCHIVE_ENV)
    return resolve(chosen) if chosen else None


#: 1,000 years ("keep for ever"); dates overflow near 739,000 days before today.
MAX_RETENTION_DAYS = 365_000


def retention_days(override: int | None = None) -> int:
    """`override`, else `$ROLLOUT_RETENTION_DAYS`, else 30. Refuses negatives and junk."""
    if override is not None:
        value: int | str = override
    else:
        value = os.environ.get(RETENTION_ENV) or DEFAULT_RETENTION_DAYS
    try:
        days = int(value)
    except ValueError:
        raise ValueError(
            f"{RETENTION_ENV}={value!r} is not a whole number of days (e.g. 30)"
        ) from None
    if not 0 <= days <= MAX_RETENTION_DAYS:  # beyond it, the cutoff date overflows
        raise ValueError(
            f"retention (--retention-days or {RETENTION_ENV}) must be 0 to "
            f"{MAX_RETENTION_DAYS:,} days, got {days}"
        )
    return days
