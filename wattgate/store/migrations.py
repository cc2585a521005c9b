"""Ordered schema migrations; ``PRAGMA user_version`` records how many ran.

Each migration is a named function of a sqlite3 connection, run inside the
writer's transaction. Append new ones; never edit one that has shipped.
"""

from __future__ import annotations

import re
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


def m004_ids_never_reused(db: sqlite3.Connection) -> None:
    # SQLite gives an INTEGER PRIMARY KEY without AUTOINCREMENT max(rowid)+1: after
    # the last row is deleted its id comes back, and the money rows that named it
    # (usage, periods, holds) are inherited by a stranger. Rebuilt with
    # AUTOINCREMENT, each table's sqlite_sequence only ever grows; it starts above
    # every id a money row names. A deleted app becomes a tombstone (its rows stay
    # auditable); rows left by apps deleted before this version get tombstones too.
    db.execute("ALTER TABLE apps ADD COLUMN deleted_at REAL")
    for table, key in _SEQUENCED:
        _rebuild_autoincrement(db, table, key)
    db.execute(
        "INSERT INTO apps (app_id, name, secret_hash, created_at, deleted_at) "
        "SELECT app_id, '(deleted)', '', 0, 0 FROM (SELECT app_id FROM usage UNION "
        "SELECT app_id FROM holds WHERE app_id IS NOT NULL) "
        "WHERE app_id NOT IN (SELECT app_id FROM apps)")
    db.execute(
        "INSERT INTO connections (connection_id, app_id, app_user_id, state, created_at, "
        "updated_at) SELECT connection_id, MIN(app_id), '(deleted #' || connection_id || ')', "
        "'revoked', 0, 0 FROM (SELECT connection_id, app_id FROM usage UNION ALL "
        "SELECT connection_id, app_id FROM holds WHERE app_id IS NOT NULL) "
        "WHERE connection_id IS NOT NULL "
        "AND connection_id NOT IN (SELECT connection_id FROM connections) GROUP BY connection_id")
    db.execute(
        "INSERT INTO grants (grant_id, app_id, token_hash, requests, used, spent_nanos, "
        "created_at, expires_at) SELECT grant_id, MIN(app_id), 'deleted:' || grant_id, "
        "COUNT(*), COUNT(*), SUM(cost_nanos), 0, 0 FROM usage WHERE grant_id IS NOT NULL "
        "AND grant_id NOT IN (SELECT grant_id FROM grants) GROUP BY grant_id")
    referenced = {
        "connections": "SELECT MAX(connection_id) FROM (SELECT connection_id FROM usage UNION ALL "
                       "SELECT connection_id FROM periods UNION ALL SELECT connection_id FROM "
                       "holds UNION ALL SELECT connection_id FROM grants)",
        "grants": "SELECT MAX(grant_id) FROM (SELECT grant_id FROM usage UNION ALL "
                  "SELECT grant_id FROM holds)",
    }
    for table, sql in referenced.items():
        raise_sequence(db, table, db.execute(sql).fetchone()[0] or 0)


# Tables whose ids money rows (or reconciliation's paging) point at.
_SEQUENCED = (("connections", "connection_id"), ("grants", "grant_id"), ("holds", "hold_id"),
              ("usage", "usage_id"))


def _rebuild_autoincrement(db: sqlite3.Connection, table: str, key: str) -> None:
    """Recreate ``table`` with ``key`` AUTOINCREMENT, keeping its rows, constraints, indexes."""
    create = db.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?",
                        (table,)).fetchone()[0]
    indexes = [r[0] for r in db.execute("SELECT sql FROM sqlite_master WHERE type = 'index' "
                                        "AND tbl_name = ? AND sql IS NOT NULL", (table,))]
    new = f"{table}_rebuilt"
    body, found = re.subn(rf"\b({key}\s+INTEGER\s+PRIMARY\s+KEY)\b", r"\1 AUTOINCREMENT",
                          create.replace(table, new, 1), count=1)
    assert found == 1, create
    db.execute(body)
    db.execute(f"INSERT INTO {new} SELECT * FROM {table}")
    db.execute(f"DROP TABLE {table}")
    db.execute(f"ALTER TABLE {new} RENAME TO {table}")
    for sql in indexes:
        db.execute(sql)
    top = db.execute(f"SELECT MAX({key}) FROM {table}").fetchone()[0]
    raise_sequence(db, table, top or 0)


def raise_sequence(db: sqlite3.Connection, table: str, at_least: int) -> None:
    """Make ``table``'s next AUTOINCREMENT id greater than ``at_least`` (and than 0)."""
    at_least = max(0, at_least)
    if db.execute("UPDATE sqlite_sequence SET seq = MAX(seq, ?) WHERE name = ?",
                  (at_least, table)).rowcount == 0:
        db.execute("INSERT INTO sqlite_sequence (name, seq) VALUES (?, ?)", (table, at_least))


def m005_usage_dated_in_its_period(db: sqlite3.Connection) -> None:
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


def m006_fleet_state(db: sqlite3.Connection) -> None:
    # ``meta``: facts about the ledger itself (the keys fingerprint, ``bind_keys``).
    # ``admin_sessions``: signed-in console sessions by their cookie's SHA-256, so a
    # restart (or, on PostgreSQL, another process) keeps them.
    _script(db, """
    CREATE TABLE meta (
        name TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    CREATE TABLE admin_sessions (
        session_hash TEXT PRIMARY KEY,
        csrf TEXT NOT NULL,
        expires_at REAL NOT NULL
    );
    CREATE INDEX admin_sessions_expiry ON admin_sessions (expires_at)
    """)


def m007_webhooks(db: sqlite3.Connection) -> None:
    # An app's webhook endpoint and its sealed signing secret; the outbox of events,
    # each written in the transaction of the change it tells (``store/outbox.py``).
    # ``dedupe`` makes an event that must happen once (a threshold per period, a grant
    # used up) a conflict the second time.
    _script(db, """
    ALTER TABLE apps ADD COLUMN webhook_url TEXT;
    ALTER TABLE apps ADD COLUMN webhook_secret TEXT;
    CREATE TABLE webhook_events (
        event_id     INTEGER PRIMARY KEY AUTOINCREMENT,
        public_id    TEXT NOT NULL UNIQUE,
        app_id       TEXT NOT NULL,
        stream       TEXT NOT NULL,
        type         TEXT NOT NULL,
        dedupe       TEXT UNIQUE,
        body         TEXT NOT NULL,
        created_at   REAL NOT NULL,
        status       TEXT NOT NULL DEFAULT 'pending',
        attempts     INTEGER NOT NULL DEFAULT 0,
        next_at      REAL NOT NULL,
        since        REAL NOT NULL,
        last_code    INTEGER,
        last_error   TEXT,
        delivered_at REAL
    );
    CREATE INDEX webhook_events_due ON webhook_events (status, next_at);
    CREATE INDEX webhook_events_stream ON webhook_events (stream, event_id);
    CREATE INDEX webhook_events_app ON webhook_events (app_id, event_id)
    """)


def m008_app_policy(db: sqlite3.Connection) -> None:
    # An app's policy (``records.AppPolicy.to_text``: allowed models, the largest cap a
    # user may approve, the largest output bound of a call, the suggested cap), as
    # JSON with integer nano-dollars; NULL: no policy.
    _script(db, "ALTER TABLE apps ADD COLUMN policy TEXT")


def m009_previous_secret(db: sqlite3.Connection) -> None:
    # Secret rotation with an overlap: the secret a rotation replaced, and until when
    # (epoch seconds) it still authenticates. Written to run whatever migrations of
    # other features come before it (a column already there is left alone).
    have = {r[1] for r in db.execute("PRAGMA table_info(apps)")}
    if "previous_secret_hash" not in have:
        db.execute("ALTER TABLE apps ADD COLUMN previous_secret_hash TEXT")
    if "previous_until" not in have:
        db.execute("ALTER TABLE apps ADD COLUMN previous_until REAL")


def m010_upstream_code(db: sqlite3.Connection) -> None:
    # A call the upstream refused before any byte is a $0 row ("upstream_refused")
    # with the HTTP code it answered, for the request log. NULL on every other row.
    if "upstream_code" not in {r[1] for r in db.execute("PRAGMA table_info(usage)")}:
        db.execute("ALTER TABLE usage ADD COLUMN upstream_code INTEGER")


def _script(db: sqlite3.Connection, sql: str) -> None:
    # executescript() would COMMIT the surrounding transaction; run one by one.
    for statement in sql.split(";"):
        if statement.strip():
            db.execute(statement)


MIGRATIONS: tuple[Callable[[sqlite3.Connection], None], ...] = (
    m001_initial,
    m002_grants_presence_and_call_details,
    m003_hold_generation,
    m004_ids_never_reused,
    m005_usage_dated_in_its_period,
    m006_fleet_state,
    m007_webhooks,
    m008_app_policy,
    m009_previous_secret,
    m010_upstream_code,
)


def migrate(db: sqlite3.Connection, upto: int | None = None) -> int:
    """Run the migrations this database has not seen; returns the new version."""
    target = len(MIGRATIONS) if upto is None else upto
    version = int(db.execute("PRAGMA user_version").fetchone()[0])
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
