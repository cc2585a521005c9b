"""The store's group-commit writer: batching, lock waits off the loop, cancellation."""

from __future__ import annotations

import asyncio
import sqlite3
import time

import pytest

from wattgate.credentials import mint_credentials
from wattgate.store import ACTIVE, SQLiteStore, Usage

pytestmark = pytest.mark.sqlite  # SQLite's internals: PostgreSQL's own are elsewhere


def usage(gen: str, connection_id: int, cost: int) -> Usage:
    return Usage(gen, "app", connection_id, None, "m", 1, 1, cost, False, "ok", 1, 0)


async def make_connection(store: SQLiteStore, cap: int = 10**12):  # type: ignore[no-untyped-def]
    creds = mint_credentials()
    await store.create_app(creds.app_id, "A", "h", ["http://localhost:3000"], now=0)
    return await store.save_connection(creds.app_id, "u", state=ACTIVE, cap_nanos=cap,
                                       sealed_key="v1.k1.x", browser_hash=None, now=0)


async def test_concurrent_writes_share_commits(tmp_path):
    store = SQLiteStore(tmp_path / "w.db")
    conn = await make_connection(store)
    holds = await asyncio.gather(*[store.admit(conn.connection_id, "2026-11", 1, now=0,
                                               expires_at=900) for _ in range(100)])
    assert len({h.hold_id for h in holds}) == 100
    assert await store.held(conn.connection_id) == 100
    before = store.commits
    await asyncio.gather(*[store.settle(h, usage(f"g{i}", conn.connection_id, 1), "2026-11")
                           for i, h in enumerate(holds)])
    assert store.commits - before < 10  # one turn of the loop, one transaction
    assert await store.held(conn.connection_id) == 0
    assert await store.period_spent(conn.connection_id, "2026-11") == 100
    await store.close()


async def test_a_lock_held_by_another_process_never_blocks_the_loop(tmp_path):
    store = SQLiteStore(tmp_path / "w.db")
    conn = await make_connection(store)
    other = sqlite3.connect(tmp_path / "w.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # e.g. a CLI command writing
    hold = await store.admit(conn.connection_id, "2026-11", 5, now=0, expires_at=900)
    write = asyncio.ensure_future(store.settle(hold, usage("g1", conn.connection_id, 3),
                                               "2026-11"))
    ticks = 0
    t0 = time.monotonic()
    while time.monotonic() - t0 < 0.3:
        await asyncio.sleep(0.01)
        ticks += 1
    assert ticks >= 10  # the loop kept running while the writer waited
    assert not write.done()
    # Admission goes on meanwhile, counting the unsettled call's hold: never too little.
    assert await store.held(conn.connection_id) == 5
    second = await store.admit(conn.connection_id, "2026-11", 7, now=0, expires_at=900)
    assert await store.held(conn.connection_id) == 12
    other.execute("COMMIT")
    other.close()
    assert await asyncio.wait_for(write, 5)
    assert await store.held(conn.connection_id) == 7
    assert await store.period_spent(conn.connection_id, "2026-11") == 3
    # and the writer is back on the fast path afterwards
    await store.settle(second, usage("g2", conn.connection_id, 4), "2026-11")
    assert await store.held(conn.connection_id) == 0
    assert await store.period_spent(conn.connection_id, "2026-11") == 7
    await store.close()


async def test_a_cancelled_caller_still_gets_its_write(tmp_path):
    store = SQLiteStore(tmp_path / "w.db")
    conn = await make_connection(store)
    hold = await store.admit(conn.connection_id, "2026-11", 7, now=0, expires_at=900)
    await store.note_generation(hold, "gen-1", "app", "m")  # it has a row now
    task = asyncio.ensure_future(store.release(hold))
    await asyncio.sleep(0)  # queued
    task.cancel()
    await asyncio.sleep(0.05)
    assert await store.held(conn.connection_id) == 0
    await store.close()
