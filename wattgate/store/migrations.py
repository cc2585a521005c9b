"""Ordered schema migrations; ``PRAGMA user_version`` records how many ran.

Each migration is a named function of a sqlite3 connection, run inside the
writer's transaction. Append new ones; never edit one that has shipped.
"""

from __future__ import annotations

import sqlite3
from typing import Callable


class SchemaError(Exception):
    """The database was made by a newer wattgate than this one."""


def m001_initial(db: sqlite3.Connection) -> None:
    _script(db, """
    CREATE TABLE apps (
        app_id      TEXT PRIMARY KEY,
        name        TEXT NOT NULL,
        secret_hash TEXT NOT NULL,
        created_at  REAL NOT NULL
    );
    CREATE TABLE app_origins (
        app_id TEXT NOT NULL REFERENCES apps(app_id) ON DELETE CASCADE,
        origin TEXT NOT NULL,
        PRIMARY KEY (app_id, origin)
    );
    CREATE TABLE connections (
        connection_id INTEGER PRIMARY KEY,
        app_id        TEXT NOT NULL REFERENCES apps(app_id) ON DELETE CASCADE,
        app_user_id   TEXT NOT NULL,
        state         TEXT NOT NULL,
        cap_nanos     INTEGER,
        sealed_key    TEXT,
        created_at    REAL NOT NULL,
        updated_at    REAL NOT NULL,
        UNIQUE (app_id, app_user_id)
    );
    CREATE TABLE usage (
        usage_id          INTEGER PRIMARY KEY,
        generation_id     TEXT NOT NULL UNIQUE,
        app_id            TEXT NOT NULL,
        connection_id     INTEGER,
        period            TEXT NOT NULL,
        model             TEXT NOT NULL,
        prompt_tokens     INTEGER NOT NULL,
        completion_tokens INTEGER NOT NULL,
        cost_nanos        INTEGER NOT NULL,
        created_at        REAL NOT NULL
    );
    CREATE INDEX usage_by_connection ON usage (connection_id, created_at);
    CREATE TABLE periods (
        connection_id INTEGER NOT NULL,
        period        TEXT NOT NULL,
        spent_nanos   INTEGER NOT NULL,
        PRIMARY KEY (connection_id, period)
    );
    CREATE TABLE holds (
        hold_id       INTEGER PRIMARY KEY,
        connection_id INTEGER,
        period        TEXT NOT NULL,
        amount_nanos  INTEGER NOT NULL,
        created_at    REAL NOT NULL,
        expires_at    REAL NOT NULL
    );
    CREATE INDEX holds_by_connection ON holds (connection_id);
    """)


def m002_grants_presence_and_call_details(db: sqlite3.Connection) -> None:
    _script(db, """
    ALTER TABLE connections ADD COLUMN browser_hash TEXT;
    ALTER TABLE usage ADD COLUMN grant_id INTEGER;
    ALTER TABLE usage ADD COLUMN provisional INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE usage ADD COLUMN status TEXT NOT NULL DEFAULT 'ok';
    ALTER TABLE usage ADD COLUMN latency_ms INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX usage_by_app ON usage (app_id, created_at);
    ALTER TABLE holds ADD COLUMN grant_id INTEGER;
    CREATE TABLE grants (
        grant_id      INTEGER PRIMARY KEY,
        app_id        TEXT NOT NULL REFERENCES apps(app_id) ON DELETE CASCADE,
        token_hash    TEXT NOT NULL UNIQUE,
        requests      INTEGER NOT NULL,
        used          INTEGER NOT NULL DEFAULT 0,
        max_nanos     INTEGER,
        spent_nanos   INTEGER NOT NULL DEFAULT 0,
        held_nanos    INTEGER NOT NULL DEFAULT 0,
        sealed_key    TEXT,
        connection_id INTEGER,
        created_at    REAL NOT NULL,
        expires_at    REAL NOT NULL
    );
    CREATE TABLE presence (
        browser_hash TEXT PRIMARY KEY,
        created_at   REAL NOT NULL
    );
    """)


def m003_hold_generation(db: sqlite3.Connection) -> None:
    # A hold names its upstream generation as soon as the upstream answers, so a
    # crash mid-call leaves a record to reconcile instead of a lost debit.
    _script(db, """
    ALTER TABLE holds ADD COLUMN generation_id TEXT;
    ALTER TABLE holds ADD COLUMN app_id TEXT;
    ALTER TABLE holds ADD COLUMN model TEXT;
    CREATE INDEX usage_provisional ON usage (provisional) WHERE provisional = 1
    """)


def m_periods_usage_dated_in_its_period(db: sqlite3.Connection) -> None:
    # A call belongs to the period it was admitted in, and its row is now dated at
    # its admission. Rows written before were dated at their settlement: one
    # admitted before a month's end and settled after it carried the next month's
    # date. Date those at the last millisecond of their own period, so every
    # reader that picks a month by date sees the same calls as the aggregates.
    _script(db, """
    UPDATE usage SET created_at =
        CAST(strftime('%s', period || '-01', '+1 month') AS REAL) - 0.001
    WHERE strftime('%Y-%m', created_at, 'unixepoch') > period
    """)


def _script(db: sqlite3.Connection, sql: str) -> None:
    # executescript() would COMMIT the surrounding transaction; run one by one.
    for statement in sql.split(";"):
        if statement.strip():
            db.execute(statement)


MIGRATIONS: tuple[Callable[[sqlite3.Connection], None], ...] = (
    m001_initial,
    m002_grants_presence_and_call_details,
    m003_hold_generation,
    m_periods_usage_dated_in_its_period,
)


def migrate(db: sqlite3.Connection, upto: int | None = None) -> int:
    """Run the migrations this database has not seen; returns the new version."""
    target = len(MIGRATIONS) if upto is None else upto
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version > len(MIGRATIONS):
        raise SchemaError(f"its schema version {version} is newer than this wattgate knows "
                          f"({len(MIGRATIONS)}); upgrade wattgate")
    for index in range(version, target):
        db.execute("BEGIN IMMEDIATE")
        try:
            MIGRATIONS[index](db)
            db.execute(f"PRAGMA user_version = {index + 1}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
    return max(version, target)
