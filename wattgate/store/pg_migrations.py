"""Ordered schema migrations of the PostgreSQL ledger; ``wattgate_schema`` records how many ran.

The same scheme as ``migrations.py`` (SQLite): each migration is a named
function of one connection, run in its own transaction; append new ones,
never edit one that has shipped; a database made by a newer wattgate is
refused with ``SchemaError``. A fleet's processes start together, so every
migration transaction first takes a transaction-level advisory lock and reads
the version again under it: one process migrates, the others wait, then find
nothing left to do.

Migration 1 is the SQLite schema as migration 5 left it (apps with
tombstones, their origins, connections, usage, period aggregates, holds,
grants, presence) with money in BIGINT nano-dollars and ids from identity
sequences (never reused, whatever is deleted), plus what a fleet shares:
holds name their owning process, token buckets of the rate limits, console
sessions, and a meta row for the keys fingerprint. Timestamps are epoch
seconds (DOUBLE PRECISION), as in SQLite, so the code above the store is
the same for both.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable

from .migrations import SchemaError

__all__ = ["MIGRATIONS", "MIGRATION_LOCK", "SchemaError", "migrate", "schema_version"]

# Two-key advisory lock space of wattgate ("Watg"); key 0 serialises migrations.
LOCK_SPACE = 0x57617467
MIGRATION_LOCK = 0


async def m001_initial(con: Any) -> None:
    await con.execute("""
    CREATE TABLE apps (
        app_id      TEXT PRIMARY KEY,
        name        TEXT NOT NULL,
        secret_hash TEXT NOT NULL,
        created_at  DOUBLE PRECISION NOT NULL,
        deleted_at  DOUBLE PRECISION
    );
    CREATE TABLE app_origins (
        app_id TEXT NOT NULL REFERENCES apps(app_id) ON DELETE CASCADE,
        origin TEXT NOT NULL,
        PRIMARY KEY (app_id, origin)
    );
    CREATE INDEX app_origins_by_origin ON app_origins (origin);
    CREATE TABLE connections (
        connection_id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        app_id        TEXT NOT NULL REFERENCES apps(app_id) ON DELETE CASCADE,
        app_user_id   TEXT NOT NULL,
        state         TEXT NOT NULL,
        cap_nanos     BIGINT,
        sealed_key    TEXT,
        browser_hash  TEXT,
        created_at    DOUBLE PRECISION NOT NULL,
        updated_at    DOUBLE PRECISION NOT NULL,
        UNIQUE (app_id, app_user_id)
    );
    CREATE INDEX connections_by_browser ON connections (browser_hash);
    CREATE TABLE usage (
        usage_id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        generation_id     TEXT NOT NULL UNIQUE,
        app_id            TEXT NOT NULL,
        connection_id     BIGINT,
        grant_id          BIGINT,
        period            TEXT NOT NULL,
        model             TEXT NOT NULL,
        prompt_tokens     BIGINT NOT NULL,
        completion_tokens BIGINT NOT NULL,
        cost_nanos        BIGINT NOT NULL,
        provisional       BOOLEAN NOT NULL DEFAULT FALSE,
        status            TEXT NOT NULL DEFAULT 'ok',
        latency_ms        BIGINT NOT NULL DEFAULT 0,
        created_at        DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX usage_by_connection ON usage (connection_id, created_at);
    CREATE INDEX usage_by_app ON usage (app_id, created_at);
    CREATE INDEX usage_by_grant ON usage (grant_id) WHERE grant_id IS NOT NULL;
    CREATE INDEX usage_provisional ON usage (usage_id) WHERE provisional;
    CREATE TABLE periods (
        connection_id BIGINT NOT NULL,
        period        TEXT NOT NULL,
        spent_nanos   BIGINT NOT NULL,
        PRIMARY KEY (connection_id, period)
    );
    CREATE TABLE grants (
        grant_id      BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        app_id        TEXT NOT NULL REFERENCES apps(app_id) ON DELETE CASCADE,
        token_hash    TEXT NOT NULL UNIQUE,
        requests      BIGINT NOT NULL,
        used          BIGINT NOT NULL DEFAULT 0,
        max_nanos     BIGINT,
        spent_nanos   BIGINT NOT NULL DEFAULT 0,
        held_nanos    BIGINT NOT NULL DEFAULT 0,
        sealed_key    TEXT,
        connection_id BIGINT,
        created_at    DOUBLE PRECISION NOT NULL,
        expires_at    DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX grants_by_app ON grants (app_id, created_at);
    CREATE INDEX grants_by_connection ON grants (connection_id);
    CREATE TABLE holds (
        hold_id       BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        owner         BIGINT NOT NULL,
        connection_id BIGINT,
        grant_id      BIGINT,
        app_id        TEXT,
        period        TEXT NOT NULL,
        amount_nanos  BIGINT NOT NULL,
        generation_id TEXT,
        model         TEXT,
        created_at    DOUBLE PRECISION NOT NULL,
        expires_at    DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX holds_by_connection ON holds (connection_id, period);
    CREATE INDEX holds_by_grant ON holds (grant_id);
    CREATE INDEX holds_by_owner ON holds (owner);
    CREATE TABLE presence (
        browser_hash TEXT PRIMARY KEY,
        created_at   DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE rate_buckets (
        limiter    TEXT NOT NULL,
        key        TEXT NOT NULL,
        tokens     DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL,
        allowed    BOOLEAN NOT NULL,
        PRIMARY KEY (limiter, key)
    );
    CREATE TABLE admin_sessions (
        session_hash TEXT PRIMARY KEY,
        csrf         TEXT NOT NULL,
        expires_at   DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE meta (
        name  TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    """)


async def m002_owners(con: Any) -> None:
    # Each living process's heartbeat (server clock, epoch seconds): a sweep takes a
    # process's holds only once its owner lock is free AND it has not been seen for
    # a grace period, so a lifeline reconnecting is not taken for a death.
    await con.execute("""
    CREATE TABLE owners (
        owner     BIGINT PRIMARY KEY,
        last_seen DOUBLE PRECISION NOT NULL
    );
    """)


async def m006_previous_secret(con: Any) -> None:
    # Secret rotation with an overlap (as SQLite's m009): the secret a rotation
    # replaced, and until when (epoch seconds) it still authenticates.
    await con.execute("""
    ALTER TABLE apps ADD COLUMN IF NOT EXISTS previous_secret_hash TEXT;
    ALTER TABLE apps ADD COLUMN IF NOT EXISTS previous_until DOUBLE PRECISION;
    """)
async def _m003_reserved(con: Any) -> None:
    # Numbers 3 and 4 belong to other branches' migrations (issue 17); these no-ops
    # keep m005's place until those are merged in their stead.
    pass


async def _m004_reserved(con: Any) -> None:
    pass


async def m005_app_policy(con: Any) -> None:
    # An app's policy as JSON (``records.AppPolicy.to_text``); NULL: no policy.
    await con.execute("ALTER TABLE apps ADD COLUMN policy TEXT")


MIGRATIONS: tuple[Callable[[Any], Awaitable[None]], ...] = (
    m001_initial,
    m002_owners,
    _m003_reserved,
    _m004_reserved,
    m005_app_policy,
    m006_previous_secret,  # numbered for its place after the other features' migrations
)


async def schema_version(con: Any) -> int:
    await con.execute("CREATE TABLE IF NOT EXISTS wattgate_schema (version INTEGER NOT NULL)")
    version = await con.fetchval("SELECT version FROM wattgate_schema")
    return int(version or 0)


async def migrate(con: Any, upto: int | None = None) -> int:
    """Run the migrations this database has not seen (one at a time, fleet-wide);
    returns the new version."""
    target = len(MIGRATIONS) if upto is None else upto
    while True:
        async with con.transaction():
            await con.execute("SELECT pg_advisory_xact_lock($1, $2)", LOCK_SPACE,
                              MIGRATION_LOCK)
            version = await schema_version(con)
            if version > len(MIGRATIONS):
                raise SchemaError(f"its schema version {version} is newer than this wattgate "
                                  f"knows ({len(MIGRATIONS)}); upgrade wattgate")
            if version >= target:
                return version
            await MIGRATIONS[version](con)
            if version == 0:
                await con.execute("DELETE FROM wattgate_schema")
                await con.execute("INSERT INTO wattgate_schema (version) VALUES ($1)", 1)
            else:
                await con.execute("UPDATE wattgate_schema SET version = $1", version + 1)
