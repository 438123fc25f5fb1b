"""The metrics database schema: versioned migrations for tables, derived views re-created.

Tables only ever move forward through `MIGRATIONS`; each step runs in one transaction
with its `schema_version` row, so a crash mid-upgrade leaves the previous version
intact. Views hold no data and are replaced on every connect-for-write, so a view fix
needs no migration. Column-by-column documentation: `docs/schema.md`.

The DDL of a released migration is frozen (`REQUEST_COLUMNS` is version 1's): a database
created by that version must end up identical to one upgraded to it.
"""

from __future__ import annotations

import re

from flows.store.locations import is_remote
from flows.store.phase_names import AFTER_COMPLETION_PHASE
from router.record import SHADOW_PAIRS_SQL

REQUEST_COLUMNS = """
    request_id          VARCHAR NOT NULL,
    ts                  TIMESTAMPTZ NOT NULL,
    router_instance     VARCHAR NOT NULL,
    config_version      BIGINT NOT NULL,
    mode                VARCHAR NOT NULL,
    arm                 VARCHAR NOT NULL,
    is_shadow           BOOLEAN NOT NULL,
    primary_request_id  VARCHAR,
    subject_bucket      INTEGER NOT NULL,
    query_category      VARCHAR NOT NULL,
    algorithm           VARCHAR NOT NULL,
    backend             VARCHAR,
    attempts            INTEGER NOT NULL,
    fallback_used       BOOLEAN NOT NULL,
    outcome             VARCHAR NOT NULL,
    http_status         INTEGER,
    error_kind          VARCHAR,
    latency_ms          DOUBLE NOT NULL,
    tokens_in           INTEGER NOT NULL,
    tokens_out          INTEGER NOT NULL,
    cost_usd            DOUBLE NOT NULL,
    quality_score       DOUBLE,
    query_hash          VARCHAR NOT NULL,
    query_length        INTEGER NOT NULL
"""

_V1_NAMES = ", ".join(line.split()[0] for line in REQUEST_COLUMNS.strip().splitlines())

#: Version 2 of `requests`: uncompressed request ids, plus `segment`, the ledger key
#: ("<instance>/<file>") of the segment file each row came from, so exactly-once can be
#: audited (rows per segment = `ingested_segments.rows`).
REQUEST_COLUMNS_V2 = (
    REQUEST_COLUMNS.replace(
        "request_id          VARCHAR NOT NULL",
        "request_id          VARCHAR USING COMPRESSION uncompressed NOT NULL",
    )
    .replace(
        "primary_request_id  VARCHAR,",
        "primary_request_id  VARCHAR USING COMPRESSION uncompressed,",
    )
    .rstrip()
    + ",\n    segment             VARCHAR\n"
)
assert REQUEST_COLUMNS_V2.count("USING COMPRESSION") == 2

MIGRATIONS: list[tuple[int, str, list[str]]] = [
    (
        1,
        "initial schema",
        [
            f"CREATE TABLE requests ({REQUEST_COLUMNS})",
            """CREATE TABLE ingested_segments (
                path            VARCHAR PRIMARY KEY,
                router_instance VARCHAR NOT NULL,
                kind            VARCHAR NOT NULL,
                status          VARCHAR NOT NULL,
                rows            BIGINT NOT NULL,
                bytes           BIGINT NOT NULL,
                ingested_at     TIMESTAMPTZ NOT NULL,
                reason          VARCHAR
            )""",
            """CREATE TABLE router_events (
                event_id        VARCHAR PRIMARY KEY,
                ts              TIMESTAMPTZ NOT NULL,
                router_instance VARCHAR NOT NULL,
                kind            VARCHAR NOT NULL,
                config_version  BIGINT,
                backend         VARCHAR,
                detail          VARCHAR NOT NULL
            )""",
            """CREATE TABLE config_versions (
                version         BIGINT PRIMARY KEY,
                rollout_id      VARCHAR,
                phase_index     INTEGER,
                phase_name      VARCHAR,
                mode            VARCHAR NOT NULL,
                traffic_percent DOUBLE NOT NULL,
                algorithm       VARCHAR NOT NULL,
                reason          VARCHAR,
                published_at    TIMESTAMPTZ NOT NULL,
                document        VARCHAR NOT NULL
            )""",
            """CREATE TABLE rollouts (
                rollout_id      VARCHAR PRIMARY KEY,
                router_group    VARCHAR NOT NULL,
                plan_name       VARCHAR NOT NULL,
                plan            VARCHAR NOT NULL,
                state           VARCHAR NOT NULL,
                phase_index     INTEGER NOT NULL,
                started_at      TIMESTAMPTZ NOT NULL,
                updated_at      TIMESTAMPTZ NOT NULL,
                ended_at        TIMESTAMPTZ,
                reason          VARCHAR
            )""",
            """CREATE TABLE rollout_transitions (
                rollout_id      VARCHAR NOT NULL,
                seq             INTEGER NOT NULL,
                occurred_at     TIMESTAMPTZ NOT NULL,
                from_state      VARCHAR,
                to_state        VARCHAR NOT NULL,
                phase_index     INTEGER NOT NULL,
                cause           VARCHAR NOT NULL,
                actor           VARCHAR NOT NULL,
                PRIMARY KEY (rollout_id, seq)
            )""",
            """CREATE TABLE phases (
                rollout_id      VARCHAR NOT NULL,
                phase_index     INTEGER NOT NULL,
                name            VARCHAR NOT NULL,
                mode            VARCHAR NOT NULL,
                traffic_percent DOUBLE NOT NULL,
                config_version  BIGINT,
                started_at      TIMESTAMPTZ,
                ended_at        TIMESTAMPTZ,
                outcome         VARCHAR,
                PRIMARY KEY (rollout_id, phase_index)
            )""",
            """CREATE TABLE gate_evaluations (
                evaluation_id   VARCHAR NOT NULL,
                rollout_id      VARCHAR,
                phase_index     INTEGER,
                config_version  BIGINT NOT NULL,
                evaluated_at    TIMESTAMPTZ NOT NULL,
                check_kind      VARCHAR NOT NULL,
                metric          VARCHAR NOT NULL,
                estimate        DOUBLE,
                lower_bound     DOUBLE,
                upper_bound     DOUBLE,
                e_value         DOUBLE,
                n_legacy        BIGINT,
                n_production    BIGINT,
                threshold       DOUBLE,
                decision        VARCHAR NOT NULL,
                metric_mode     VARCHAR NOT NULL,
                reason          VARCHAR NOT NULL
            )""",
            """CREATE TABLE decisions (
                decision_id     VARCHAR PRIMARY KEY,
                rollout_id      VARCHAR,
                phase_index     INTEGER,
                config_version  BIGINT,
                decided_at      TIMESTAMPTZ NOT NULL,
                verdict         VARCHAR NOT NULL,
                action          VARCHAR NOT NULL,
                actor           VARCHAR NOT NULL,
                reason          VARCHAR NOT NULL,
                evaluation_id   VARCHAR,
                n_legacy        BIGINT,
                n_production    BIGINT
            )""",
        ],
    ),
    (
        2,
        "faster requests (uncompressed ids) with segment provenance, archive ledger, "
        "store settings, segment deletion, nightly comparisons",
        [
            # `requests` is rebuilt (columns cannot change compression in place): the
            # request ids are unique 32-hex strings that no method compresses well, and
            # trying (dictionary + FSST analysis) was a quarter of the ingest CPU. Adds
            # `segment`, NULL for rows ingested before version 2.
            f"CREATE TABLE requests_v2 ({REQUEST_COLUMNS_V2})",
            f"INSERT INTO requests_v2 ({_V1_NAMES}) SELECT {_V1_NAMES} FROM requests",
            "DROP TABLE requests",
            "ALTER TABLE requests_v2 RENAME TO requests",
            # When retention deleted the segment file (its rows stay in the store).
            "ALTER TABLE ingested_segments ADD COLUMN deleted_at TIMESTAMPTZ",
            # One row per (archive batch, day): the rows of that day moved from `requests`
            # to Parquet. Archive files whose batch is not here are leftovers of a crash
            # between COPY and DELETE: the views ignore them and the next compaction
            # deletes them, so nothing is counted twice or lost.
            """CREATE TABLE archive_batches (
                batch_id        VARCHAR NOT NULL,
                day             DATE NOT NULL,
                rows            BIGINT NOT NULL,
                min_ts          TIMESTAMPTZ NOT NULL,
                max_ts          TIMESTAMPTZ NOT NULL,
                location        VARCHAR NOT NULL,
                archived_at     TIMESTAMPTZ NOT NULL,
                PRIMARY KEY (batch_id, day)
            )""",
            # The nightly legacy-against-production comparison (flows/nightly.py): one row
            # per run, backend and query category, so trends can be queried later.
            """CREATE TABLE nightly_comparisons (
                run_id              VARCHAR NOT NULL,
                window_start        TIMESTAMPTZ NOT NULL,
                window_end          TIMESTAMPTZ NOT NULL,
                backend             VARCHAR NOT NULL,
                query_category      VARCHAR NOT NULL,
                legacy_requests     BIGINT NOT NULL,
                production_requests BIGINT NOT NULL,
                legacy_error_rate   DOUBLE,
                production_error_rate DOUBLE,
                legacy_p95_ms       DOUBLE,
                production_p95_ms   DOUBLE,
                p95_rel_diff        DOUBLE,
                legacy_cost_usd     DOUBLE,
                production_cost_usd DOUBLE,
                cost_rel_diff       DOUBLE,
                legacy_quality      DOUBLE,
                production_quality  DOUBLE,
                PRIMARY KEY (run_id, backend, query_category)
            )""",
            # Store-wide settings that must outlive a process, e.g. `archive_location`
            # (the views read it, so every reader sees the same archive).
            """CREATE TABLE store_settings (
                key             VARCHAR PRIMARY KEY,
                value           VARCHAR NOT NULL,
                updated_at      TIMESTAMPTZ NOT NULL
            )""",
        ],
    ),
    (
        3,
        "archive_location recorded relative to the database folder",
        # No table changes: the stored value changed meaning (`DEFAULT_ARCHIVE` is now
        # relative to the database's folder). Version-2 code read it relative to its
        # working directory, archived there, and rows vanished from this release's views;
        # at version 3 it refuses the file instead ("newer than this code").
        [],
    ),
]

LATEST_VERSION = MIGRATIONS[-1][0]
#: The oldest schema whose tables this release's views read: later steps changed no
#: table, so readers give such a file this release's views until a writer upgrades it.
VIEWS_READ_FROM = 2

#: Columns of `requests` at LATEST_VERSION, in table order (the archive stores the same).
REQUEST_COLUMN_NAMES: tuple[str, ...] = (
    *(line.split()[0] for line in REQUEST_COLUMNS.strip().splitlines()),
    "segment",
)

#: Failures as the user sees them. A 4xx ("rejected") is the caller's fault and counts
#: against neither arm.
FAILURE_OUTCOMES = ("error", "timeout", "rate_limited")

MACROS = [
    "CREATE OR REPLACE MACRO is_failure(outcome) AS outcome IN ('error', 'timeout', 'rate_limited')",
    "CREATE OR REPLACE MACRO rel_diff(production, legacy) AS "
    "CASE WHEN legacy IS NULL OR legacy = 0 THEN NULL ELSE (production - legacy) / legacy END",
]

#: Sub-folder of the archive location holding the `requests` archive (hive layout
#: `day=YYYY-MM-DD/part-<batch>-<uuid>.parquet`).
ARCHIVE_TABLE_DIR = "requests"
#: A zero-row file with the table's columns, so the archive glob always matches and the
#: view keeps the table's exact schema while no day is archived yet (an empty glob fails
#: at CREATE VIEW; `allow_empty` would add a stray `empty` column). One per schema
#: version: every column the view names must exist in at least one file.
PLACEHOLDER_DAY = "1970-01-01"


def placeholder_name(version: int = LATEST_VERSION) -> str:
    return f"_schema_v{version}.parquet"


def sql_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


#: Session variable holding the archive glob. Every connection sets it (flows/store/
#: database.py), resolved against the database's current folder, so the views follow a
#: data dir that moved; the view text keeps a fallback for a plain DuckDB shell.
ARCHIVE_GLOB_VARIABLE = "rollout_archive_glob"


def escape_glob(path: str) -> str:
    """`path` with DuckDB's glob characters made literal (`[` -> `[[]`, `*` -> `[*]`,
    `?` -> `[?]`), so a data dir named e.g. `rollout[prod]` matches itself."""
    return re.sub(r"[\[*?]", lambda m: f"[{m.group()}]", path)


def archive_glob(location: str) -> str:
    """The glob of the archive's Parquet files; a local path is escaped (a URL is kept:
    object stores are addressed by prefixes we chose, and their glob syntax differs)."""
    root = location.rstrip("/")
    if not is_remote(root):
        root = escape_glob(root)
    return f"{root}/{ARCHIVE_TABLE_DIR}/*/*.parquet"


def archive_views(location: str) -> dict[str, str]:
    """`archived_requests` (committed archive batches only) and `all_requests`.

    The archive is read from the `ARCHIVE_GLOB_VARIABLE` the connection sets; `location`
    (absolute, or a URL) is only the fallback for connections that did not set it.
    """
    columns = ", ".join(REQUEST_COLUMN_NAMES)
    glob = (
        f"coalesce(getvariable({sql_literal(ARCHIVE_GLOB_VARIABLE)}), "
        f"{sql_literal(archive_glob(location))})"
    )
    scan = (
        f"read_parquet({glob}, hive_partitioning = true, "
        "hive_types = {'day': DATE}, union_by_name = true)"
    )
    return {
        "archived_requests": f"""
            SELECT {columns} FROM {scan}
            WHERE archive_batch IN (SELECT batch_id FROM archive_batches)
        """,
        "all_requests": f"""
            SELECT {columns} FROM requests
            UNION ALL
            SELECT {columns} FROM archived_requests
        """,
    }


#: True for a row routed after its completed rollout ended (`r`: the row, `ro`: its
#: rollout); such rows keep the last phase's config version, which stays live.
AFTER_COMPLETION = "coalesce(ro.state = 'completed' AND r.ts > ro.ended_at, false)"

#: Analysis views. They read `all_requests` (the table plus the Parquet archive), so
#: compaction never changes an answer.
VIEWS: dict[str, str] = {
    # A completed rollout's last document stays live: the rows routed under it after the
    # rollout ended are steady state, not the phase's (or a report read a month later
    # compared a month of production with the rollout's legacy rows). `arm_summary` keeps
    # them under `phase_name = 'after completion'`; `phase_requests` leaves them out.
    "arm_summary": f"""
        SELECT cv.rollout_id, cv.phase_index,
               CASE WHEN {AFTER_COMPLETION} THEN '{AFTER_COMPLETION_PHASE}'
                    ELSE cv.phase_name END AS phase_name,
               r.config_version, r.arm,
               count(*) AS requests,
               count(*) FILTER (WHERE r.is_shadow) AS shadow_requests,
               avg(CASE WHEN r.outcome = 'ok' THEN 1.0 ELSE 0.0 END) AS success_rate,
               avg(CASE WHEN is_failure(r.outcome) THEN 1.0 ELSE 0.0 END) AS error_rate,
               quantile_cont(r.latency_ms, 0.5) AS p50_ms,
               quantile_cont(r.latency_ms, 0.95) AS p95_ms,
               quantile_cont(r.latency_ms, 0.99) AS p99_ms,
               avg(r.cost_usd) AS cost_per_request_usd,
               avg(r.quality_score) AS mean_quality,
               min(r.ts) AS first_ts, max(r.ts) AS last_ts
        FROM all_requests r
        LEFT JOIN config_versions cv ON cv.version = r.config_version
        LEFT JOIN rollouts ro ON ro.rollout_id = cv.rollout_id
        GROUP BY ALL
    """,
    # The rows that count for a rollout's phase, through `config_versions` (so a phase
    # republished under a new version, by a restore or a reconcile, keeps its earlier
    # rows). Not a rollback's or abort's legacy_only document: it carries the phase it
    # ended and stays live until the next rollout (a finished 100 % phase kept gaining
    # legacy requests). Not the rows after a completed rollout's end (see above).
    "phase_requests": f"""
        SELECT cv.rollout_id, cv.phase_index, cv.phase_name, r.*
        FROM all_requests r
        JOIN config_versions cv ON cv.version = r.config_version
        LEFT JOIN rollouts ro ON ro.rollout_id = cv.rollout_id
        WHERE cv.rollout_id IS NOT NULL AND cv.mode <> 'legacy_only'
          AND NOT {AFTER_COMPLETION}
    """,
    "phase_timeline": """
        WITH counts AS (
            SELECT rollout_id, phase_index,
                   count(*) FILTER (WHERE arm = 'legacy') AS legacy_requests,
                   count(*) FILTER (WHERE arm = 'production') AS production_requests
            FROM phase_requests
            GROUP BY rollout_id, phase_index
        )
        SELECT p.rollout_id, p.phase_index, p.name, p.mode, p.traffic_percent,
               p.config_version, p.started_at, p.ended_at,
               date_diff('millisecond', p.started_at, coalesce(p.ended_at, now())) / 1000.0
                   AS duration_s,
               p.outcome,
               coalesce(c.legacy_requests, 0) AS legacy_requests,
               coalesce(c.production_requests, 0) AS production_requests,
               (SELECT d.verdict FROM decisions d WHERE d.rollout_id = p.rollout_id
                  AND d.phase_index = p.phase_index ORDER BY d.decided_at DESC LIMIT 1)
                   AS last_verdict
        FROM phases p
        LEFT JOIN counts c ON c.rollout_id = p.rollout_id AND c.phase_index = p.phase_index
    """,
    "daily_comparison": """
        WITH per_arm AS (
            -- UTC days in any session's TimeZone (a user's DuckDB shell uses the host's)
            SELECT date_trunc('day', ts AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' AS day, arm,
                   count(*) AS requests,
                   avg(CASE WHEN outcome = 'ok' THEN 1.0 ELSE 0.0 END) AS success_rate,
                   avg(CASE WHEN is_failure(outcome) THEN 1.0 ELSE 0.0 END) AS error_rate,
                   quantile_cont(latency_ms, 0.5) AS p50_ms,
                   quantile_cont(latency_ms, 0.95) AS p95_ms,
                   avg(cost_usd) AS cost_per_request_usd,
                   avg(quality_score) AS mean_quality
            FROM all_requests GROUP BY ALL
        ),
        days AS (SELECT DISTINCT day FROM per_arm)
        SELECT d.day,
               l.requests AS legacy_requests, p.requests AS production_requests,
               l.success_rate AS legacy_success_rate, p.success_rate AS production_success_rate,
               l.p95_ms AS legacy_p95_ms, p.p95_ms AS production_p95_ms,
               rel_diff(p.p95_ms, l.p95_ms) AS p95_rel_diff,
               p.error_rate - l.error_rate AS error_rate_diff,
               l.cost_per_request_usd AS legacy_cost_usd, p.cost_per_request_usd AS production_cost_usd,
               rel_diff(p.cost_per_request_usd, l.cost_per_request_usd) AS cost_rel_diff,
               l.mean_quality AS legacy_quality, p.mean_quality AS production_quality,
               p.mean_quality - l.mean_quality AS quality_diff
        FROM days d
        LEFT JOIN per_arm l ON l.day = d.day AND l.arm = 'legacy'
        LEFT JOIN per_arm p ON p.day = d.day AND p.arm = 'production'
    """,
    "backend_health": """
        SELECT time_bucket(INTERVAL 1 MINUTE, ts) AS window_start, backend, arm,
               count(*) AS requests,
               avg(CASE WHEN is_failure(outcome) THEN 1.0 ELSE 0.0 END) AS error_rate,
               count(*) FILTER (WHERE outcome = 'timeout') AS timeouts,
               count(*) FILTER (WHERE outcome = 'rate_limited') AS rate_limited,
               count(*) FILTER (WHERE fallback_used) AS failovers,
               quantile_cont(latency_ms, 0.95) AS p95_ms
        FROM all_requests WHERE backend IS NOT NULL
        GROUP BY ALL
    """,
    "shadow_pairs": SHADOW_PAIRS_SQL.format(
        table="all_requests",
        columns="""s.primary_request_id AS request_id, s.request_id AS shadow_request_id,
               s.config_version, p.ts,
               p.backend AS primary_backend, s.backend AS shadow_backend,
               p.backend IS NOT DISTINCT FROM s.backend AS same_backend,
               p.outcome AS primary_outcome, s.outcome AS shadow_outcome,
               p.latency_ms AS primary_latency_ms, s.latency_ms AS shadow_latency_ms,
               s.latency_ms - p.latency_ms AS latency_delta_ms,
               s.cost_usd - p.cost_usd AS cost_delta_usd,
               s.quality_score - p.quality_score AS quality_delta""",
        where="",
    ),
}
