"""Short-lived DuckDB connections to the metrics database.

DuckDB allows one read-write process per file, and a reader holds a lock that blocks a
writer. So every connection here lives for one unit of work; readers open read-only;
both retry on a lock for a bounded time and then fail with a message that says who to
wait for, instead of hanging or crashing with DuckDB's raw text.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path

import duckdb

from flows.store.locations import archive_override, is_remote, join, resolve
from flows.store.schema import (
    ARCHIVE_GLOB_VARIABLE,
    ARCHIVE_TABLE_DIR,
    LATEST_VERSION,
    MACROS,
    MIGRATIONS,
    PLACEHOLDER_DAY,
    REQUEST_COLUMN_NAMES,
    VIEWS,
    VIEWS_READ_FROM,
    archive_glob,
    archive_views,
    escape_glob,
    placeholder_name,
    sql_literal,
)

ARCHIVE_SETTING = "archive_location"
#: What `store_settings` records for the default archive, `<database folder>/archive`: a
#: path relative to the database's folder, resolved on every connect, so a data dir that
#: moves (backup restore, another mount) keeps its archive. Explicit locations are
#: recorded absolute, or as URLs.
DEFAULT_ARCHIVE = "archive"

#: The longest a connection waits for a lock (an hour): a NaN or endless wait hung forever.
MAX_WAIT_S = 3600.0


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


def lock_down(con: duckdb.DuckDBPyConnection, readable: list[Path | str]) -> None:
    """For user-typed SQL: no file access outside `readable`, no extension installs, no
    settings changes. `read_only` alone still lets COPY TO and EXPORT write files.

    A URL in `readable` (a remote archive) stays readable if its extension (httpfs) is
    installed: it is loaded here, because loading is impossible once locked."""
    dirs = []
    for item in readable:
        if is_remote(item):
            dirs.append(str(item).rstrip("/") + "/")
            with suppress(duckdb.Error):  # not installed: the query will say so
                con.execute("LOAD httpfs")
        else:
            folder = str(Path(item).resolve())
            dirs.append(folder + "/")
            if escape_glob(folder) != folder:  # the archive glob is checked as written
                dirs.append(escape_glob(folder) + "/")
    con.execute("SET allowed_directories = ?", [dirs])
    con.execute("SET autoload_known_extensions = false")
    con.execute("SET enable_external_access = false")  # after allowed_directories
    con.execute("SET lock_configuration = true")  # last: nothing can be changed after this


_MIGRATED: set[str] = set()


@contextmanager
def connect(
    path: Path,
    *,
    read_only: bool = False,
    wait_s: float = 15.0,
    sandbox: list[Path] | None = None,
    archive: str | Path | None = None,
    relocate_archive: bool = False,
) -> Iterator[duckdb.DuckDBPyConnection]:
    """Open, migrate (writers only), yield, close. Retries on a lock until `wait_s`.

    `sandbox` (read-only connections): lock the connection down to these folders (plus
    the archive folder the database records). `archive` (writers): where archived rows
    live; default `$ROLLOUT_ARCHIVE_URL`, else what the database records, else
    `<database folder>/archive`. See `migrate`. Every connection points the archive views
    at the archive's current location (`use_archive`).
    """
    path = Path(path)
    if "?" in str(path):
        # DuckDB cuts a database path at "?" (connection options) to name its write-ahead
        # log: every commit would fail. `[` and `*` are fine (see `escape_glob`).
        raise StoreError(
            f"the database path {path} contains '?', which DuckDB cannot use (it names the "
            "write-ahead log after the part before '?'): use a data dir without '?'"
        )
    if not (math.isfinite(wait_s) and 0 <= wait_s <= MAX_WAIT_S):
        raise StoreError(f"wait {wait_s:g} s is not allowed: give seconds from 0 to {MAX_WAIT_S:g}")
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
            key = str(path.resolve())
            # Views and macros live in the file: once per process is enough unless the
            # schema moved meanwhile (re-creating them on every short-lived connection
            # cost more than the work done on it).
            if (
                key not in _MIGRATED
                or archive is not None
                or relocate_archive
                or schema_version(con) != LATEST_VERSION
                or views_fingerprint(con) != VIEWS_FINGERPRINT  # another release's writer
            ):
                migrate(con, database=path, archive=archive, relocate_archive=relocate_archive)
                _MIGRATED.add(key)
            else:
                use_archive(con, path)
        else:
            check_readable_version(schema_version(con))
            location = use_archive(con, path)
            _current_views_for_reader(con, path, location)
            if sandbox is not None:
                lock_down(con, [*sandbox, *([location] if location else [])])
        yield con
    finally:
        con.close()


@contextmanager
def transaction(con: duckdb.DuckDBPyConnection) -> Iterator[duckdb.DuckDBPyConnection]:
    """BEGIN ... COMMIT, or ROLLBACK on any exception (KeyboardInterrupt included), so a
    failed step never leaves half of its writes behind."""
    con.execute("BEGIN TRANSACTION")
    try:
        yield con
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")


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


def check_readable_version(current: int) -> None:
    """A database newer than this code is refused by readers too: they failed on a
    missing view with a bare catalog error. An older one stays readable (the commands
    that write read it first, then upgrade it in place)."""
    if current > LATEST_VERSION:
        raise StoreError(
            f"database schema v{current} is newer than this code (v{LATEST_VERSION}): "
            "upgrade the rollout package"
        )


def check_current_schema(con: duckdb.DuckDBPyConnection) -> None:
    """For readers of this release's views (report, dashboard) on a file that no writer of
    this release has upgraded yet: a way out instead of a bare catalog error."""
    current = schema_version(con)
    if current < VIEWS_READ_FROM:
        raise StoreError(
            f"the database is at schema v{current}, older than this code (v{LATEST_VERSION}): "
            "run `rollout collect` once to upgrade it in place"
        )


def migrate(
    con: duckdb.DuckDBPyConnection,
    *,
    database: Path | None = None,
    archive: str | Path | None = None,
    relocate_archive: bool = False,
) -> int:
    """Bring the schema to `LATEST_VERSION`, one transaction per step; refresh views.

    The archive location is settled here: explicit `archive` or `$ROLLOUT_ARCHIVE_URL`
    wins, else the recorded one, else `<database folder>/archive` (recorded relative, see
    `DEFAULT_ARCHIVE`). Moving an archive that already holds batches needs
    `relocate_archive=True` (after copying its files), or those rows would silently
    vanish from every view.
    """
    con.execute(
        "CREATE TABLE IF NOT EXISTS schema_version "
        "(version INTEGER PRIMARY KEY, description VARCHAR, applied_at TIMESTAMPTZ)"
    )
    current = schema_version(con)
    check_readable_version(current)
    for version, description, statements in MIGRATIONS:
        if version <= current:
            continue
        with transaction(con):
            for statement in statements:
                con.execute(statement)
            con.execute(
                "INSERT INTO schema_version VALUES (?, ?, ?)",
                [version, description, datetime.now(UTC)],
            )
    location = _settle_archive(con, database, archive, relocate_archive)
    _create_views(con, location)
    con.execute(
        "INSERT OR REPLACE INTO store_settings VALUES (?, ?, ?)",
        [VIEWS_SETTING, VIEWS_FINGERPRINT, datetime.now(UTC)],
    )
    return LATEST_VERSION


#: `store_settings` key of the fingerprint of the view and macro definitions a writer
#: last created in the file.
VIEWS_SETTING = "views"
#: The fingerprint of this code's definitions (the archive location left out: readers
#: point the views at it with a session variable).
VIEWS_FINGERPRINT = hashlib.sha256(
    "\n".join([*MACROS, *archive_views("").values(), *VIEWS.values()]).encode()
).hexdigest()[:16]


def views_fingerprint(con: duckdb.DuckDBPyConnection) -> str | None:
    """The fingerprint the file's last view-creating writer recorded (schema v2 on)."""
    row = first(con.execute("SELECT value FROM store_settings WHERE key = ?", [VIEWS_SETTING]))
    return str(row[0]) if row else None


def _create_views(con: duckdb.DuckDBPyConnection, location: str, *, temp: bool = False) -> None:
    kind = "TEMP " if temp else ""
    for macro in MACROS:
        con.execute(macro.replace("CREATE OR REPLACE MACRO", f"CREATE OR REPLACE {kind}MACRO"))
    for name, sql in {**archive_views(location), **VIEWS}.items():
        con.execute(f"CREATE OR REPLACE {kind}VIEW {name} AS {sql}")


def _current_views_for_reader(
    con: duckdb.DuckDBPyConnection, database: Path, location: str | None
) -> None:
    """A file whose views a writer of older code created (an upgrade, before the next
    collect or tick) gets this code's views as session-only TEMP views, which DuckDB
    resolves before the file's: `rollout report` and the dashboard crashed on a view the
    file did not have yet. From `VIEWS_READ_FROM` on (older tables lack columns)."""
    if schema_version(con) < VIEWS_READ_FROM or views_fingerprint(con) == VIEWS_FINGERPRINT:
        return
    _create_views(con, location or str(database.parent.resolve() / DEFAULT_ARCHIVE), temp=True)


def recorded_archive(con: duckdb.DuckDBPyConnection) -> str | None:
    """The archive location as the database records it: `DEFAULT_ARCHIVE` (relative to the
    database's folder), an absolute path or a URL. None before schema v2 or first use."""
    exists = con.execute(
        "SELECT count(*) FROM information_schema.tables WHERE table_name = 'store_settings'"
    ).fetchall()
    if not exists[0][0]:
        return None
    row = first(con.execute("SELECT value FROM store_settings WHERE key = ?", [ARCHIVE_SETTING]))
    return str(row[0]) if row else None


def _database_path(con: duckdb.DuckDBPyConnection) -> Path:
    row = first(
        con.execute("SELECT path FROM duckdb_databases() WHERE database_name = current_database()")
    )
    if not row or not row[0]:
        raise StoreError("an in-memory database has no archive folder: pass archive=")
    return Path(row[0])


def default_archive(database: Path) -> str:
    """`<database folder>/archive`, absolute, wherever the database is now."""
    return resolve(Path(database).parent / DEFAULT_ARCHIVE)


def _resolve_recorded(recorded: str, database: Path) -> str:
    if is_remote(recorded) or Path(recorded).is_absolute():
        return recorded
    return resolve(Path(database).parent / recorded)


def archive_location(con: duckdb.DuckDBPyConnection, database: Path | None = None) -> str | None:
    """Where the archive is now: absolute (or a URL), a relative record resolved against
    the database's current folder. None before schema v2 or first use."""
    recorded = recorded_archive(con)
    if recorded is None:
        return None
    return _resolve_recorded(recorded, database or _database_path(con))


def use_archive(con: duckdb.DuckDBPyConnection, database: Path) -> str | None:
    """Point this connection's archive views at the archive's current location.

    A session setting, not the view text: a read-only connection cannot re-create views,
    and a moved data dir must work for readers too. Refuses a missing archive that holds
    rows (`_require_archive`)."""
    location = archive_location(con, database)
    if location is not None:
        _require_archive(con, location, database)
        _point_views(con, location)
    return location


def _point_views(con: duckdb.DuckDBPyConnection, location: str) -> None:
    con.execute(f"SET VARIABLE {ARCHIVE_GLOB_VARIABLE} = ?", [archive_glob(location)])


def _archived_days(con: duckdb.DuckDBPyConnection) -> int:
    return int(con.execute("SELECT count(DISTINCT day) FROM archive_batches").fetchall()[0][0])


def _require_archive(con: duckdb.DuckDBPyConnection, location: str, database: Path) -> None:
    """Fail loudly when a local archive folder is missing while the ledger says days were
    archived: the views would answer without those rows, and a writer would start a new
    archive there."""
    folder = join(location, ARCHIVE_TABLE_DIR)
    if is_remote(location) or Path(folder).is_dir():
        return
    held = _archived_days(con)
    if not held:
        return
    default = default_archive(database)
    elsewhere = "LOCATION" if location == default else default
    raise StoreError(
        f"the archive is missing: {folder} does not exist, but archive_batches records {held} "
        f"archived day(s). Restore the archive there, or if it now lives elsewhere (e.g. "
        f"beside a moved database), run `rollout compact --archive {elsewhere} "
        "--relocate-archive` to record its location"
    )


def _settle_archive(
    con: duckdb.DuckDBPyConnection,
    database: Path | None,
    archive: str | Path | None,
    relocate: bool,
) -> str:
    database = database or _database_path(con)
    recorded = recorded_archive(con)
    current = None if recorded is None else _resolve_recorded(recorded, database)
    chosen = resolve(archive) if archive is not None else archive_override()
    if chosen is None:
        chosen = current or default_archive(database)
    if current is not None and chosen != current and not relocate:
        held = _archived_days(con)
        if held:
            raise StoreError(
                f"the archive holds {held} archived day(s) at {current}; to use {chosen} instead, "
                f"copy {join(current, ARCHIVE_TABLE_DIR)} there first, then run "
                f"`rollout compact --archive {chosen} --relocate-archive`"
            )
    _require_archive(con, chosen, database)
    # Before it is recorded: a location refused here must not become the store's archive
    # (every later reader would fail on it, and nothing would say how to repair it).
    try:
        _ensure_placeholder(con, chosen, force=chosen != current)
    except (OSError, duckdb.IOException, duckdb.HTTPException) as exc:
        if current is not None and chosen != current:
            then = f"; the archive stays at {current}"
        else:  # the recorded one itself: say how to record another
            then = (
                f"; to use the default, run `rollout compact --archive {default_archive(database)}`"
            )
        raise StoreError(
            f"archive location {chosen} is not usable: {exc}. Give a folder this machine can "
            f"create and write, or a URL DuckDB can write to (s3://...){then}"
        ) from exc
    # The default is recorded relative; this also upgrades a database that recorded it
    # absolute (before the data dir could move).
    stored = DEFAULT_ARCHIVE if chosen == default_archive(database) else chosen
    if stored != recorded:
        with transaction(con):
            con.execute(
                "INSERT OR REPLACE INTO store_settings VALUES (?, ?, ?)",
                [ARCHIVE_SETTING, stored, datetime.now(UTC)],
            )
            con.execute(
                "UPDATE archive_batches SET location = ? WHERE location IS DISTINCT FROM ?",
                [stored, stored],
            )
    _point_views(con, chosen)
    return chosen


def _ensure_placeholder(con: duckdb.DuckDBPyConnection, location: str, *, force: bool) -> None:
    """Write the zero-row schema file the archive views need (see `PLACEHOLDER_DAY`)."""
    folder = join(location, ARCHIVE_TABLE_DIR, f"day={PLACEHOLDER_DAY}")
    target = join(folder, placeholder_name())
    if is_remote(location):
        if not force:  # a remote check costs a round trip on every connect: once is enough
            return
    else:
        if Path(target).exists():
            return
        Path(folder).mkdir(parents=True, exist_ok=True)
    columns = ", ".join(REQUEST_COLUMN_NAMES)
    con.execute(
        f"COPY (SELECT {columns}, NULL::VARCHAR AS archive_batch FROM requests LIMIT 0) "
        f"TO {sql_literal(target)} (FORMAT parquet)"
    )
