"""An attacker's review of the PostgreSQL ledger, part 2: lock order between the
fleet's writers, cancelled queries, a refused login at runtime, and what a bad
``database.url`` prints. Each test was written failing first (or as the guard of
a behaviour found sound); the report names which.

Real parts only: the session's PostgreSQL server (``tests/pg.py``), a fresh
database per test, the ``wattgate`` CLI as a subprocess.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from wattgate.errors import Unavailable
from wattgate.store.postgres import PostgresStore
from wattgate.store.records import ACTIVE, Usage

ROOT = Path(__file__).resolve().parent.parent
PERIOD = "2026-03"
NOW = 1772400000.0
PASSWORD = "pgreview2-Pw-" + secrets.token_hex(6)


@pytest.fixture
async def stores(pg_url: str) -> AsyncIterator[Callable[..., Any]]:
    opened: list[PostgresStore] = []

    async def make(url: str | None = None, pool_size: int = 4) -> PostgresStore:
        store = await PostgresStore.open(url or pg_url, pool_size=pool_size)
        opened.append(store)
        return store
    yield make
    for store in opened:
        await store.close()


async def _funded(store: PostgresStore, cap: int = 1_000_000) -> tuple[str, int]:
    app = "app-" + secrets.token_hex(4)
    await store.create_app(app, "Demo", "hash", [], now=NOW)
    connection = await store.save_connection(app, "alice", state=ACTIVE, cap_nanos=cap,
                                             sealed_key="sealed", browser_hash="b", now=NOW)
    return app, connection.connection_id


async def _waiting_on_locks(url: str, n: int) -> None:
    """Until ``n`` of the store's backends wait for a lock (no clock: polled)."""
    con = await asyncpg.connect(url)
    try:
        for _ in range(2000):
            waiting = await con.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND application_name = 'wattgate' AND wait_event_type = 'Lock'")
            if waiting >= n:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"never saw {n} backends waiting for a lock")
    finally:
        await con.close()


# ---- lock order: a dead process's sweep against a live settle ---------------------
async def test_sweeping_a_dead_process_never_deadlocks_with_a_settle(stores, pg_url) -> None:
    """A dead process left two named holds on one user's connection: one of its own
    calls, one of a grant that user funds. The sweep (one transaction per dead owner)
    debits the user's period, then the grant. A live process settling a call of that
    grant meanwhile locks the grant, then the period: a deadlock, one side aborted
    (a 503, and if it is the settle, the call's real cost never recorded)."""
    a, b = await stores(), await stores()
    app, cid = await _funded(a)
    grant = await a.create_grant(app, "tok", 10, None, sealed_key=None, connection_id=cid,
                                 now=NOW, expires_at=NOW + 3600, approved_by="b")
    _, live = await a.admit_grant("tok", app, PERIOD, 500, now=NOW, expires_at=NOW + 60)
    dead = secrets.randbits(62) + 1
    raw = await asyncpg.connect(pg_url)
    try:
        await raw.execute(
            "INSERT INTO holds (owner, connection_id, grant_id, app_id, period, amount_nanos, "
            "generation_id, model, created_at, expires_at) VALUES "
            "($1, $2, NULL, $3, $4, 100, 'gen-dead-own', 'm', $5, $6), "
            "($1, $2, $7, $3, $4, 200, 'gen-dead-grant', 'm', $5, $6)",
            dead, cid, app, PERIOD, NOW, NOW + 60, grant.grant_id)
        await raw.execute("UPDATE grants SET used = used + 1, held_nanos = held_nanos + 200 "
                          "WHERE grant_id = $1", grant.grant_id)
        second = await raw.fetchval("SELECT hold_id FROM holds WHERE generation_id = "
                                    "'gen-dead-grant'")
        # Hold the sweep between its two holds: it has debited the period by then.
        gate = raw.transaction()
        await gate.start()
        await raw.execute("SELECT 1 FROM holds WHERE hold_id = $1 FOR UPDATE", second)
        sweep = asyncio.ensure_future(b.sweep_holds())
        await _waiting_on_locks(pg_url, 1)
        usage = Usage("gen-live", app, cid, grant.grant_id, "m", 1, 1, 700, False, "ok", 5, NOW)
        settle = asyncio.ensure_future(a.settle(live, usage, PERIOD))
        await _waiting_on_locks(pg_url, 2)
        await gate.commit()
        results = await asyncio.gather(sweep, settle, return_exceptions=True)
        assert results == [2, True], results
        spent = await raw.fetchval("SELECT spent_nanos FROM periods WHERE connection_id = $1",
                                   cid)
        g = await raw.fetchrow("SELECT spent_nanos, held_nanos FROM grants WHERE grant_id = $1",
                               grant.grant_id)
        rows = await raw.fetchval("SELECT count(*) FROM usage")
    finally:
        await raw.close()
    assert (spent, g["spent_nanos"], g["held_nanos"], rows) == (100 + 200 + 700, 900, 0, 3)
    assert await a.check(now=NOW, hold_ttl=3600) == []


# ---- a task cancelled while its query waits -----------------------------------------
async def test_a_cancelled_write_leaves_no_transaction_nor_lock_behind(stores, pg_url) -> None:
    """A revocation cancelled while it waits for the connection's row lock: nothing of
    it is half-done, and the pooled connection (pool of 1) serves the next caller clean."""
    store = await stores(pool_size=1)
    app, cid = await _funded(store)
    await store.create_grant(app, "tok", 10, None, sealed_key=None, connection_id=cid,
                             now=NOW, expires_at=NOW + 3600, approved_by="b")
    raw = await asyncpg.connect(pg_url)
    try:
        gate = raw.transaction()
        await gate.start()
        await raw.execute("SELECT 1 FROM grants WHERE connection_id = $1 FOR UPDATE", cid)
        revoke = asyncio.ensure_future(store.set_connection_state(cid, "revoked", now=NOW + 1))
        await _waiting_on_locks(pg_url, 1)  # the connection row is updated by now
        revoke.cancel()
        with pytest.raises(asyncio.CancelledError):
            await revoke
        await gate.rollback()
        # The next user of the one pooled connection: sees the revocation whole or not at all.
        connection = await store.get_connection_by_id(cid)
        assert connection is not None and connection.state == ACTIVE
        grant = await store.get_grant("tok")
        assert grant is not None and grant.expires_at == NOW + 3600
        _, hold = await store.admit_grant("tok", app, PERIOD, 10, now=NOW, expires_at=NOW + 60)
        assert hold.grant_id == grant.grant_id
        stuck = await raw.fetch(
            "SELECT state FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name = 'wattgate' AND state LIKE 'idle in transaction%'")
        assert stuck == []
        locks = await raw.fetchval(
            "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity s ON s.pid = l.pid "
            "WHERE s.datname = current_database() AND s.application_name = 'wattgate' "
            "AND l.locktype IN ('relation', 'tuple', 'transactionid') AND s.pid <> "
            "pg_backend_pid()")
        assert locks == 0
    finally:
        await raw.close()


# ---- a login refused at runtime ---------------------------------------------------
async def test_a_login_refused_at_runtime_is_unavailable(stores, pg_url, pg_server) -> None:
    """The database refuses the gateway's role (password changed, role locked) while
    it serves: each call is a 503 ``Unavailable``, never a raw driver error (a 500)."""
    role = "pgreview2_" + secrets.token_hex(4)
    pg_server.execute(f"CREATE ROLE {role} LOGIN SUPERUSER")
    try:
        parts = urlsplit(pg_url)
        url = urlunsplit((parts.scheme, f"{role}@{parts.hostname}:{parts.port}", parts.path,
                          parts.query, ""))
        store = await stores(url)
        assert await store.get_app("nope") is None
        pg_server.execute(f"ALTER ROLE {role} NOLOGIN")
        pg_server.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          f"WHERE usename = '{role}'")
        for _ in range(3):
            with pytest.raises(Unavailable):
                await store.get_app("nope")
        store.close_now()
    finally:
        pg_server.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          f"WHERE usename = '{role}'")
        pg_server.execute(f"DROP ROLE IF EXISTS {role}")


# ---- a bad database.url at start: one line, the problem named, no password ----------
def _cli(url: str, *argv: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "WATTGATE_DATABASE__URL": url, "PYTHONPATH": str(ROOT),
           "WATTGATE_KEYS_PATH": str(tmp / "keys.json")}
    return subprocess.run([sys.executable, "-m", "wattgate", *argv], cwd=tmp, env=env,
                          capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize("problem", ["role", "database", "sslmode", "ipv6"])
def test_a_bad_database_url_is_one_line_naming_it_without_the_password(
        problem: str, pg_server, tmp_path: Path) -> None:
    parts = urlsplit(pg_server.url)
    host = f"{parts.hostname}:{parts.port}"
    url, named = {
        "role": (f"postgresql://nobody_pgreview2:{PASSWORD}@{host}/postgres",
                 'role "nobody_pgreview2" does not exist'),
        "database": (f"postgresql://postgres:{PASSWORD}@{host}/nosuchdb_pgreview2",
                     'database "nosuchdb_pgreview2" does not exist'),
        "sslmode": (f"postgresql://postgres:{PASSWORD}@{host}/postgres?sslmode=bogus",
                    "sslmode"),
        "ipv6": (f"postgresql://postgres:{PASSWORD}@[::1/postgres",
                 "not a valid database URL"),
    }[problem]
    for argv in (["ledger", "check"], ["apps", "list"], ["serve", "--port", "0"]):
        done = _cli(url, *argv, tmp=tmp_path)
        out = done.stdout + done.stderr
        assert done.returncode == 1, (argv, out)
        assert PASSWORD not in out, (argv, out)
        errors = [line for line in done.stderr.splitlines() if "error:" in line]
        assert len(errors) == 1, (argv, out)
        assert errors[0].startswith("wattgate: error:") and named in errors[0], (argv, out)
        assert "try again" not in errors[0], (argv, out)


# ---- duplicate settles and corrections racing on two processes -------------------
async def test_one_generation_settled_by_two_processes_at_once_counts_once(stores) -> None:
    a, b = await stores(), await stores()
    app, cid = await _funded(a)
    hold = await a.admit(cid, PERIOD, 900, now=NOW, expires_at=NOW + 60)
    final = Usage("gen-dup", app, cid, None, "m", 1, 1, 700, False, "ok", 5, NOW)
    results = await asyncio.gather(
        a.settle(hold, final, PERIOD),
        *(s.settle(None, final, PERIOD) for s in (a, b, b, a, b)),
        *(s.correct_usage("gen-dup", 650) for s in (a, b)))
    assert sorted(results, key=str) == [False] * 7 + [True]
    assert await b.period_spent(cid, PERIOD) == 700
    assert await b.held(cid) == 0
    assert await a.check(now=NOW, hold_ttl=3600) == []


async def test_a_final_settle_racing_the_reconciler_on_a_provisional_row_counts_once(
        stores) -> None:
    a, b = await stores(), await stores()
    app, cid = await _funded(a)
    estimate = Usage("gen-prov", app, cid, None, "m", 0, 0, 900, True, "swept", 0, NOW)
    assert await a.settle(None, estimate, PERIOD) is True
    final = Usage("gen-prov", app, cid, None, "m", 3, 4, 300, False, "ok", 5, NOW)
    results = await asyncio.gather(a.settle(None, final, PERIOD), b.correct_usage("gen-prov", 300),
                                   b.settle(None, final, PERIOD), a.correct_usage("gen-prov", 300))
    assert sorted(results) == [False, False, False, True]
    assert await a.period_spent(cid, PERIOD) == 300
    assert await a.check(now=NOW, hold_ttl=3600) == []


# ---- every id is a bound parameter -------------------------------------------------
HOSTILE = "x'); DELETE FROM usage; --\\ $1 %s _%"


async def test_hostile_ids_and_model_names_are_data_not_sql(stores) -> None:
    store = await stores()
    app = HOSTILE + "app"
    await store.create_app(app, HOSTILE, "hash", [], now=NOW)
    connection = await store.save_connection(app, HOSTILE, state=ACTIVE, cap_nanos=10_000,
                                             sealed_key="sealed", browser_hash=HOSTILE,
                                             now=NOW)
    cid = connection.connection_id
    first = Usage("gen-first", app, cid, None, "m", 1, 1, 100, False, "ok", 5, NOW)
    assert await store.settle(None, first, PERIOD) is True
    hold = await store.admit(cid, PERIOD, 500, now=NOW, expires_at=NOW + 60)
    await store.note_generation(hold, HOSTILE, app, HOSTILE)  # type: ignore[misc]
    usage = Usage(HOSTILE, app, cid, None, HOSTILE, 1, 1, 200, False, "ok", 5, NOW)
    assert await store.settle(hold, usage, PERIOD) is True
    assert await store.get_connection(app, HOSTILE) == connection
    assert sorted(u.generation_id for u in await store.recent_usage(cid)) == \
        sorted([HOSTILE, "gen-first"])
    assert await store.period_spent(cid, PERIOD) == 300
    assert [c.connection_id for c in await store.connections_for_browser(HOSTILE)] == [cid]
    assert await store.get_app(app) is not None
    assert await store.delete_app(app, now=NOW + 1) is True
    assert await store.check(now=NOW + 1, hold_ttl=3600) == []


# ---- pool exhaustion and lock_timeout: a 503, nothing half-done -----------------------
async def test_an_exhausted_pool_is_a_503_and_admits_nothing(stores) -> None:
    store = await stores(pool_size=1)
    _, cid = await _funded(store)
    async with store._pool.acquire():  # every connection of the pool busy elsewhere
        admitting = asyncio.ensure_future(
            store.admit(cid, PERIOD, 500, now=NOW, expires_at=NOW + 60))
        # A hang guard, not a timing assertion: the store's own bound is ACQUIRE_TIMEOUT.
        with pytest.raises(Unavailable):
            await asyncio.wait_for(admitting, 120)
    assert await store.held(cid) == 0
    assert await store.open_holds() == 0


async def test_a_lock_timeout_mid_deletion_leaves_the_app_whole(stores, pg_url) -> None:
    store = await stores()
    app, cid = await _funded(store)
    await store.set_origins(app, add=["https://app.example"])
    raw = await asyncpg.connect(pg_url)
    try:
        async with raw.transaction():
            await raw.execute("SELECT 1 FROM connections WHERE connection_id = $1 FOR UPDATE",
                              cid)
            with pytest.raises(Unavailable):  # lock_timeout on the connection's row
                await store.delete_app(app, now=NOW + 1)
    finally:
        await raw.close()
    kept = await store.get_app(app)
    assert kept is not None and kept.origins == ("https://app.example",)
    assert kept.secret_hash == "hash"
    connection = await store.get_connection_by_id(cid)
    assert connection is not None and connection.state == ACTIVE
    hold = await store.admit(cid, PERIOD, 10, now=NOW, expires_at=NOW + 60)
    assert hold.connection_id == cid
