"""Schema migrations: a database made by the first schema upgrades in place, rows intact."""

from __future__ import annotations

import calendar
import sqlite3

import pytest

from wattgate.ledger import status_body
from wattgate.store import SQLiteStore
from wattgate.store.migrations import MIGRATIONS, SchemaError, migrate

pytestmark = pytest.mark.sqlite  # SQLite's internals: PostgreSQL's own are elsewhere

APP = "app0123456789abcdef"
USD = 1_000_000_000


def version_1_database(path) -> None:  # type: ignore[no-untyped-def]
    db = sqlite3.connect(path, isolation_level=None)
    assert migrate(db, upto=1) == 1
    db.execute("INSERT INTO apps (app_id, name, secret_hash, created_at) "
               "VALUES (?, 'Old app', 'hash', 1.0)", (APP,))
    db.execute("INSERT INTO app_origins (app_id, origin) VALUES (?, 'https://old.example')",
               (APP,))
    db.execute("INSERT INTO connections (connection_id, app_id, app_user_id, state, cap_nanos, "
               "sealed_key, created_at, updated_at) VALUES (1, ?, 'u1', 'active', ?, "
               "'v1.k1.sealed', 1.0, 2.0)", (APP, 10 * USD))
    db.execute("INSERT INTO usage (generation_id, app_id, connection_id, period, model, "
               "prompt_tokens, completion_tokens, cost_nanos, created_at) "
               "VALUES ('gen-old', ?, 1, '2026-11', 'openai/gpt-4o-mini', 3, 4, ?, 5.0)",
               (APP, 3 * USD + 200_000_000))
    db.execute("INSERT INTO periods (connection_id, period, spent_nanos) VALUES (1, '2026-11', ?)",
               (3 * USD + 200_000_000,))
    db.close()


async def test_first_schema_upgrades_with_rows_intact(tmp_path):
    path = tmp_path / "old.db"
    version_1_database(path)
    store = SQLiteStore.open(path)  # migrates on open
    try:
        assert store._read.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
        app = await store.get_app(APP)
        assert app is not None and app.name == "Old app" and app.origins == ("https://old.example",)
        conn = await store.get_connection(APP, "u1")
        assert conn is not None and conn.connected and conn.browser_hash is None
        spent = await store.period_spent(conn.connection_id, "2026-11")
        assert status_body(conn, spent) == {"connected": True, "limits": {"monthlyUsd": 10},
                                            "usage": {"monthlyUsd": 3.2}, "remainingUsd": 6.8,
                                            "heldUsd": 0}
        [old] = await store.recent_usage(conn.connection_id)
        assert (old.generation_id, old.status, old.provisional, old.grant_id) == \
            ("gen-old", "ok", False, None)
        # The new tables work on the upgraded file.
        await store.add_presence("b", now=1.0)
        assert await store.has_presence("b")
        # An old app has no previous secret; it can be rolled with an overlap.
        assert (app.secret_hash, app.previous_secret_hash, app.previous_until) == (
            "hash", None, None)
        assert await store.set_app_secret(APP, "hash2", keep_previous_until=9.0)
        rolled = await store.get_app(APP)
        assert rolled is not None and (rolled.previous_secret_hash, rolled.previous_until) == (
            "hash", 9.0)
    finally:
        await store.close()


def test_migrate_is_idempotent(tmp_path):
    db = sqlite3.connect(tmp_path / "w.db", isolation_level=None)
    try:
        assert migrate(db) == len(MIGRATIONS)
        assert migrate(db) == len(MIGRATIONS)
    finally:
        db.close()


def test_a_newer_database_is_refused(tmp_path):
    db = sqlite3.connect(tmp_path / "w.db", isolation_level=None)
    db.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    try:
        with pytest.raises(SchemaError, match="newer"):
            migrate(db)
    finally:
        db.close()


def test_a_failing_migration_leaves_the_old_version(tmp_path, monkeypatch):
    import wattgate.store.migrations as m

    def broken(db: sqlite3.Connection) -> None:
        db.execute("CREATE TABLE half_done (x)")
        raise RuntimeError("boom")
    monkeypatch.setattr(m, "MIGRATIONS", (m.MIGRATIONS[0], broken))
    db = sqlite3.connect(tmp_path / "w.db", isolation_level=None)
    try:
        with pytest.raises(RuntimeError):
            m.migrate(db)
        assert db.execute("PRAGMA user_version").fetchone()[0] == 1
        assert db.execute("SELECT name FROM sqlite_master WHERE name = 'half_done'").fetchone() \
            is None
    finally:
        db.close()


def test_a_row_settled_after_its_month_is_dated_in_its_own_period(tmp_path):
    """Before the rule "a call is its admission period's, everywhere", a row was dated
    at its settlement: an October call settled on Nov 1 showed in November's export."""
    import calendar

    from wattgate.ledger import period_of

    path = tmp_path / "old.db"
    db = sqlite3.connect(path, isolation_level=None)
    try:
        migrate(db, upto=3)
        nov_1 = calendar.timegm((2026, 11, 1, 0, 0, 5))
        for gen, period, at in (("gen-late", "2026-10", nov_1), ("gen-in", "2026-11", nov_1)):
            db.execute("INSERT INTO usage (generation_id, app_id, connection_id, period, model, "
                       "prompt_tokens, completion_tokens, cost_nanos, created_at) "
                       "VALUES (?, ?, 1, ?, 'm', 1, 1, 7, ?)", (gen, APP, period, at))
        migrate(db)
        dated = dict(db.execute("SELECT generation_id, created_at FROM usage"))
    finally:
        db.close()
    assert dated["gen-late"] == calendar.timegm((2026, 11, 1, 0, 0, 0)) - 0.001
    assert period_of(dated["gen-late"]) == "2026-10"
    assert dated["gen-in"] == nov_1


NOV_5 = calendar.timegm((2026, 11, 5, 0, 0, 0))  # the rows' month is 2026-11


def version_3_database(path) -> None:  # type: ignore[no-untyped-def]
    """A ledger of version 3 where SQLite already recycled ids: connection 2 and grant 1
    were deleted with their app (rows left behind), and holds in memory wrote negative ids."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA foreign_keys = ON")
    assert migrate(db, upto=3) == 3
    db.execute("INSERT INTO apps VALUES (?, 'Live', 'hash', 1.0)", (APP,))
    db.execute("INSERT INTO connections (connection_id, app_id, app_user_id, state, cap_nanos, "
               "sealed_key, created_at, updated_at, browser_hash) VALUES "
               "(1, ?, 'u1', 'active', ?, 'v1.k1.sealed', 1.0, 2.0, 'b1')", (APP, 10 * USD))
    db.execute("INSERT INTO grants (grant_id, app_id, token_hash, requests, used, spent_nanos, "
               "connection_id, created_at, expires_at) VALUES (2, ?, 'th', 3, 1, 7, 1, 1.0, 9.0)",
               (APP,))
    rows = [("gen-live", APP, 1, None, 5), ("gen-grant", APP, 1, 2, 7),
            ("gen-gone", "appdeleted000000000", 2, None, 11),
            ("gen-gone-grant", "appdeleted000000000", None, 1, 13)]
    for gen, app, cid, gid, cost in rows:
        db.execute("INSERT INTO usage (generation_id, app_id, connection_id, grant_id, period, "
                   "model, prompt_tokens, completion_tokens, cost_nanos, created_at) "
                   "VALUES (?, ?, ?, ?, '2026-11', 'm', 1, 2, ?, ?)",
                   (gen, app, cid, gid, cost, NOV_5 + 5))
    db.execute("INSERT INTO periods VALUES (1, '2026-11', 12)")
    db.execute("INSERT INTO periods VALUES (2, '2026-11', 11)")
    db.execute("INSERT INTO holds (hold_id, connection_id, period, amount_nanos, created_at, "
               "expires_at, generation_id, app_id, model) "
               "VALUES (-4, 1, '2026-11', 3, ?, ?, 'gen-flying', ?, 'm')",
               (NOV_5 + 5, NOV_5 + 905, APP))
    db.close()


async def test_version_3_upgrades_with_rows_intact_and_ids_never_come_back(tmp_path):
    path = tmp_path / "v3.db"
    version_3_database(path)
    store = SQLiteStore.open(path)
    try:
        conn = await store.get_connection(APP, "u1")
        assert conn is not None and conn.connected and conn.browser_hash == "b1"
        assert await store.period_spent(1, "2026-11") == 12
        assert [u.generation_id for u in await store.recent_usage(1)] == ["gen-grant", "gen-live"]
        assert (await store.get_grant_by_id(2)).spent_nanos == 7
        # Rows of the app deleted before the upgrade stay, attached to tombstones.
        assert await store.get_app("appdeleted000000000") is None
        assert (await store.get_app("appdeleted000000000", deleted=True)).deleted_at is not None
        assert await store.sweep_holds() == 1  # the restart's sweep: a provisional row
        assert await store.check(now=NOV_5 + 10, hold_ttl=900) == []
        # New ids start above every id a row ever named, deleted ones included.
        fresh = await store.save_connection(APP, "u2", state="active", cap_nanos=USD,
                                            sealed_key="s", browser_hash=None, now=6.0)
        assert fresh.connection_id == 3 and await store.period_spent(3, "2026-11") == 0
        grant = await store.create_grant(APP, "th2", 1, None, sealed_key="s", connection_id=None,
                                         now=6.0, expires_at=99.0)
        assert grant.grant_id == 3 and grant.spent_nanos == 0
        hold = await store.admit(3, "2026-11", 1, now=6.0, expires_at=906.0)
        assert hold.hold_id > 0
        await store.release(hold)
        indexes = {r[0] for r in store._read.execute(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL")}
        assert {"usage_by_connection", "usage_by_app", "usage_provisional",
                "holds_by_connection"} <= indexes
    finally:
        await store.close()


def test_the_previous_secret_migration_runs_whatever_came_before_it(tmp_path):
    # m009 may land after other features' migrations or before them: a column already
    # there (its run on a branch, say) is left alone, and it never fails twice.
    from wattgate.store.migrations import m009_previous_secret

    db = sqlite3.connect(tmp_path / "w.db", isolation_level=None)
    try:
        migrate(db)
        m009_previous_secret(db)
        columns = [r[1] for r in db.execute("PRAGMA table_info(apps)")]
        assert columns.count("previous_secret_hash") == 1 and columns.count("previous_until") == 1
    finally:
        db.close()


def test_the_upstream_code_migration_keeps_old_rows_and_runs_twice_harmlessly(tmp_path):
    # m010: usage rows written before it read NULL (they were never refused calls).
    from wattgate.store.migrations import m010_upstream_code

    db = sqlite3.connect(tmp_path / "w.db", isolation_level=None)
    try:
        assert migrate(db, upto=9) == 9
        db.execute("INSERT INTO usage (generation_id, app_id, connection_id, period, model, "
                   "prompt_tokens, completion_tokens, cost_nanos, created_at) "
                   "VALUES ('gen-old', 'app', 1, '2026-11', 'm', 1, 2, 3, 0)")
        assert migrate(db) == len(MIGRATIONS) >= 10
        m010_upstream_code(db)
        assert db.execute("SELECT status, upstream_code FROM usage").fetchall() == [("ok", None)]
    finally:
        db.close()
