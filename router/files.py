"""Crash-safe file replacement shared by the recorder and the control store."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

#: A temporary file this old was left by a writer that died: no write takes an hour.
STALE_TEMP_S = 3600.0


def sync_directory(directory: Path) -> None:
    """fsync a folder, so that a rename in it survives a host crash (without it, a
    finished file could come back under its temporary name). A no-op where folders
    cannot be opened (Windows)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove_old_files(directory: Path, pattern: str, older_than_s: float = STALE_TEMP_S) -> int:
    """Delete `pattern` files not modified for `older_than_s` (by default: temporary
    files left by writers that died between writing and renaming); returns how many.
    Younger ones may still be written."""
    removed = 0
    cutoff = time.time() - older_than_s
    for temp in directory.glob(pattern):
        with contextlib.suppress(OSError):
            if temp.stat().st_mtime < cutoff:
                temp.unlink()
                removed += 1
    return removed
