"""Short-lived DuckDB connections to the metrics database.

DuckDB allows one read-write process per file, and a reader holds a lock that blocks a
writer. So every connection here lives for one unit of work; readers open read-only;
both retry on a lock for a bounded time and then fail with a message that says who to
wait for, instead of hanging or crashing with DuckDB's raw text.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import duckdb

from flows.store.schema import LATEST_VERSION, MACROS, MIGRATIONS, VIEWS


class StoreError(RuntimeError):
    """A metrics-store problem an operator can act on; the message says how."""


class StoreLocked(StoreError):
    pass


def is_lock_error(exc: BaseException) -> bool:
    text = str(exc)
    return "lock" in text.lower() and ("Conflicting" in text or "Could not set lock" in text)


def _open(path: Path, read_only: bool) -> duckdb.DuckDBPyConnection:
    # No extension downloads, ever: these machines may have no network, and the bundled
    # parquet/json/icu extensions are all we use.
    config: dict[str, object] = {"autoinstall_known_extensions": False}
    if not read_only:
        config["preserve_insertion_order"] = False  # +10-20 % ingest; we always ORDER BY
    con = duckdb.connect(str(path), read_only=read_only, config=config)
    con.execute("SET TimeZone = 'UTC'")  # day boundaries in views must not follow the host
    con.execute("SET enable_progress_bar = false")  # it would print into redirected stdout
    return con


def lock_down(con: duckdb.DuckDBPyConnection, readable: list[Path]) -> None:
    """For user-typed SQL: no file access outside `readable`, no extension installs, no
    settings changes. `read_only` alone still lets COPY TO and EXPORT write files."""
    dirs = [str(p.resolve()) + "/" for p in readable]
    con.execute("SET allowed_directories = ?", [dirs])
    con.execute("SET autoload_known_extensions = false")
    con.execute("SET enable_external_access = false")  # after allowed_directories
    con.execute("SET lock_configuration = true")  # last: nothing can be changed after this


@contextmanager
def connect(
    path: Path,
    *,
    read_only: bool = False,
    wait_s: float = 15.0,
    sandbox: list[Path] | None = None,
) -> Iterator[duckdb.DuckDBPyConnection]:
    """Open, migrate (writers only), yield, close. Retries on a lock until `wait_s`.

    `sandbox` (read-only connections): lock the connection down to these folders.
    """
    path = Path(path)
    if read_only and not path.exists():
        raise StoreError(
            f"no metrics database at {path}: run `rollout collect` or `rollout demo` first, "
            "or pass --data-dir"
        )
    if not read_only:
        path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + wait_s
    delay = 0.05
    while True:
        try:
            con = _open(path, read_only)
            break
        except duckdb.Error as exc:
            if not is_lock_error(exc):
                raise StoreError(f"cannot open {path}: {exc}") from exc
            if time.monotonic() >= deadline:
                role = "read" if read_only else "write"
                raise StoreLocked(
                    f"{path} is locked by another process; waited {wait_s:g}s to {role}. "
                    f"DuckDB said: {str(exc).splitlines()[0]}"
                ) from exc
            time.sleep(delay)
            delay = min(delay * 2, 0.5)
    try:
        if not read_only:
            migrate(con)
        elif sandbox is not None:
            lock_down(con, sandbox)
        yield con
    finally:
        con.close()


def first(cursor: duckdb.DuckDBPyConnection) -> tuple | None:
    """The first row or None, reading the whole (small) result so the connection is free.

    DuckDB 2 streams results: a `fetchone()` leaves the result open, and the next
    appender or relation on that connection fails with ResourceInUseException.
    """
    rows = cursor.fetchall()
    return rows[0] if rows else None


def schema_version(con: duckdb.DuckDBPyConnection) -> int:
    # fetchall, not fetchone: DuckDB 2 streams results, and an unfinished one blocks the
    # connection for appenders and relations.
    exists = con.execute(
        "SELECT count(*) FROM information_schema.tables WHERE table_name = 'schema_version'"
    ).fetchall()
    if not exists[0][0]:
        return 0
    row = con.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchall()
    return int(row[0][0])


def migrate(con: duckdb.DuckDBPyConnection) -> int:
    """Bring the schema to `LATEST_VERSION`, one transaction per step; refresh views."""
    con.execute(
        "CREATE TABLE IF NOT EXISTS schema_version "
        "(version INTEGER PRIMARY KEY, description VARCHAR, applied_at TIMESTAMPTZ)"
    )
    current = schema_version(con)
    if current > LATEST_VERSION:
        raise StoreError(
            f"database schema v{current} is newer than this code (v{LATEST_VERSION}): "
            "upgrade the rollout package"
        )
    for version, description, statements in MIGRATIONS:
        if version <= current:
            continue
        con.execute("BEGIN TRANSACTION")
        try:
            for statement in statements:
                con.execute(statement)
            con.execute(
                "INSERT INTO schema_version VALUES (?, ?, ?)",
                [version, description, datetime.now(UTC)],
            )
            con.execute("COMMIT")
        except Exception:
            con.execute("ROLLBACK")
            raise
    for macro in MACROS:
        con.execute(macro)
    for name, sql in VIEWS.items():
        con.execute(f"CREATE OR REPLACE VIEW {name} AS {sql}")
    return LATEST_VERSION
