"""The SQLite store: apps, connections, the ledger, group commit, in a real file."""

from __future__ import annotations

import asyncio
import sqlite3

import pytest

from wattgate.errors import BudgetExceeded, NotConnected
from wattgate.store import ACTIVE, REVOKED, SQLiteStore, Usage

pytestmark = pytest.mark.sqlite  # SQLite's internals: PostgreSQL's own are elsewhere

USD = 1_000_000_000
APP = "app0123456789abcdef"
T = 1_800_000_000.0


@pytest.fixture
async def store(tmp_path):  # type: ignore[no-untyped-def]
    s = SQLiteStore.open(tmp_path / "w.db")
    yield s
    await s.close()


async def funded(store: SQLiteStore, user: str = "u", cap: int | None = 10 * USD):  # type: ignore[no-untyped-def]
    if await store.get_app(APP) is None:
        await store.create_app(APP, "Demo", "hash", ["http://localhost:3000"], now=T)
    return await store.save_connection(APP, user, state=ACTIVE, cap_nanos=cap,
                                       sealed_key="v1.k1.sealed", browser_hash=None, now=T)


def usage(gen: str, connection_id: int | None, cost: int, *, at: float = T) -> Usage:
    return Usage(gen, APP, connection_id, None, "openai/gpt-4o-mini", 10, 20, cost, False, "ok",
                 5, at)


async def test_apps_round_trip(store):
    app = await store.create_app(APP, "Demo", "h1", ["https://a.example", "https://a.example",
                                                     "http://localhost:3000"], now=T)
    assert app.origins == ("https://a.example", "http://localhost:3000")
    got = await store.get_app(APP)
    assert got is not None and got.name == "Demo" and got.secret_hash == "h1"
    assert set(got.origins) == {"https://a.example", "http://localhost:3000"}
    assert [a.app_id for a in await store.list_apps()] == [APP]
    assert await store.get_app("app" + "0" * 16) is None


async def test_secret_rotation_and_origins(store):
    await store.create_app(APP, "Demo", "h1", ["https://a.example"], now=T)
    assert await store.set_app_secret(APP, "h2")
    assert (await store.get_app(APP)).secret_hash == "h2"
    assert not await store.set_app_secret("app" + "0" * 16, "h3")
    assert await store.set_origins(APP, add=["https://b.example"], remove=["https://a.example"])
    assert (await store.get_app(APP)).origins == ("https://b.example",)
    assert await store.origin_registered("https://b.example")
    assert not await store.origin_registered("https://a.example")
    assert not await store.set_origins("app" + "0" * 16, add=["https://c.example"])


async def test_delete_app_takes_its_connections(store):
    c = await funded(store)
    assert await store.delete_app(APP, now=T)
    assert await store.get_app(APP) is None and await store.list_apps() == []
    # Kept and revoked, so the history names its user; never connected again. Its key,
    # unusable, waits for the rule of revoked keys (nothing in flight nor correctable).
    gone = await store.get_connection_by_id(c.connection_id)
    assert gone is not None and gone.state == REVOKED and not gone.connected
    assert gone.browser_hash is None
    with pytest.raises(NotConnected):
        await store.admit(c.connection_id, "2026-11", 1, now=T, expires_at=T + 900)
    assert await store.erase_revoked_keys(since=T - 86400, now=T) == 1
    assert (await store.get_connection_by_id(c.connection_id)).sealed_key is None
    assert (await store.get_app(APP, deleted=True)).deleted_at == T
    assert not await store.delete_app(APP, now=T)
    assert not await store.set_app_secret(APP, "h")


async def test_connection_is_keyed_by_app_and_user(store):
    a = await funded(store, "u1")
    b = await funded(store, "u2", cap=3 * USD)
    again = await store.save_connection(APP, "u1", state=ACTIVE, cap_nanos=2 * USD,
                                        sealed_key=a.sealed_key, browser_hash="b", now=T + 1)
    assert again.connection_id == a.connection_id != b.connection_id
    got = await store.get_connection(APP, "u1")
    assert got is not None and got.cap_nanos == 2 * USD and got.browser_hash == "b"
    assert got.created_at == T and got.updated_at == T + 1
    assert [c.app_user_id for c in await store.connections_for_browser("b")] == ["u1"]


async def test_seal_callback_sees_the_new_row_id(store):
    await funded(store, "other")
    seen = []

    def seal(cid: int) -> str:
        seen.append(cid)
        return f"sealed-for-{cid}"
    c = await store.save_connection(APP, "u", state=ACTIVE, cap_nanos=USD, sealed_key=None,
                                    browser_hash=None, now=T, seal=seal)
    assert seen == [c.connection_id] and c.sealed_key == f"sealed-for-{c.connection_id}"
    assert (await store.get_connection(APP, "u")).sealed_key == c.sealed_key


async def test_revoke_drops_the_sealed_key(store):
    c = await funded(store)
    await store.set_connection_state(c.connection_id, REVOKED, now=T)
    got = await store.get_connection(APP, "u")
    assert got.state == REVOKED and not got.connected
    assert await store.erase_revoked_keys(since=T - 86400) == 1  # nothing left to correct
    assert (await store.get_connection(APP, "u")).sealed_key is None


async def test_settle_is_idempotent_on_generation_id(store):
    c = await funded(store)
    assert await store.settle(None, usage("gen-1", c.connection_id, 123_456), "2027-01")
    assert not await store.settle(None, usage("gen-1", c.connection_id, 123_456), "2027-01")
    assert await store.period_spent(c.connection_id, "2027-01") == 123_456
    assert [u.generation_id for u in await store.recent_usage(c.connection_id)] == ["gen-1"]


async def test_spend_is_per_period(store):
    c = await funded(store)
    await store.settle(None, usage("g1", c.connection_id, 5 * USD), "2027-01")
    await store.settle(None, usage("g2", c.connection_id, 1), "2027-02")
    assert await store.period_spent(c.connection_id, "2027-01") == 5 * USD
    assert await store.period_spent(c.connection_id, "2027-02") == 1
    assert await store.period_spent(c.connection_id, "2027-03") == 0


async def test_admit_holds_and_refuses_past_the_cap(store):
    c = await funded(store, cap=10 * USD)
    hold = await store.admit(c.connection_id, "2027-01", 6 * USD, now=T, expires_at=T + 900)
    assert await store.held(c.connection_id) == 6 * USD
    with pytest.raises(BudgetExceeded):
        await store.admit(c.connection_id, "2027-01", 5 * USD, now=T, expires_at=T + 900)
    await store.settle(hold, usage("g1", c.connection_id, 2 * USD), "2027-01")
    assert await store.held(c.connection_id) == 0
    hold = await store.admit(c.connection_id, "2027-01", 8 * USD, now=T, expires_at=T + 900)
    # Held in this process's memory: no row until the upstream names the generation.
    assert await store.sweep_holds() == 0 and await store.open_holds() == 1
    await store.note_generation(hold, "gen-8", APP, "m")
    assert await store.open_holds() == 1
    assert await store.sweep_holds() == 1 and await store.open_holds() == 0
    # What a restart does: the named generation becomes a provisional row at its estimate.
    assert await store.period_spent(c.connection_id, "2027-01") == 10 * USD
    assert [u.provisional for u in await store.recent_usage(c.connection_id)] == [True, False]


async def test_a_hold_costs_no_commit_until_its_generation_is_named(store):
    c = await funded(store, cap=10 * USD)
    commits = store.commits
    hold = await store.admit(c.connection_id, "2027-01", 6 * USD, now=T, expires_at=T + 900)
    await store.release(hold)
    assert store.commits == commits and await store.held(c.connection_id) == 0
    hold = await store.admit(c.connection_id, "2027-01", 10 * USD, now=T, expires_at=T + 900)
    await store.settle(hold, usage("g1", c.connection_id, 3 * USD), "2027-01")
    assert store.commits == commits + 1  # the settle alone
    assert await store.held(c.connection_id) == 0
    assert await store.period_spent(c.connection_id, "2027-01") == 3 * USD


async def test_the_cached_spend_follows_other_processes(store, tmp_path):
    from wattgate.store import SQLiteStore
    c = await funded(store, cap=10 * USD)
    await store.admit(c.connection_id, "2027-01", 1, now=T, expires_at=T + 900)  # fills the cache
    other = SQLiteStore.open(store.path)  # the CLI, say, reconciling
    try:
        await other.settle(None, usage("g-other", c.connection_id, 9 * USD), "2027-01")
    finally:
        await other.close()
    with pytest.raises(BudgetExceeded):
        await store.admit(c.connection_id, "2027-01", USD, now=T, expires_at=T + 900)
    assert await store.period_spent(c.connection_id, "2027-01") == 9 * USD


async def test_a_revocation_reaches_the_cached_connection_at_once(store):
    c = await funded(store, cap=10 * USD)
    await store.admit(c.connection_id, "2027-01", 1, now=T, expires_at=T + 900)
    assert (await store.get_connection(APP, "u")).connected
    await store.set_connection_state(c.connection_id, REVOKED, now=T)
    with pytest.raises(NotConnected):
        await store.admit(c.connection_id, "2027-01", 1, now=T, expires_at=T + 900)
    assert not (await store.get_connection(APP, "u")).connected


async def test_one_gateway_process_per_database(store):
    from wattgate.store import SQLiteStore
    from wattgate.store.sqlite import StoreInUse
    store.claim()
    other = SQLiteStore.open(store.path)
    try:
        with pytest.raises(StoreInUse, match="another wattgate server"):
            other.claim()
    finally:
        await other.close()


def _locks_held_on(path) -> list[str]:  # type: ignore[no-untyped-def]
    """This process's locks on the file, from /proc/locks: POSIX (SQLite's) and FLOCK."""
    import os
    ino, pid = os.stat(path).st_ino, os.getpid()
    with open("/proc/locks") as f:
        return sorted(line.split()[1] for line in f
                      if f":{ino} " in line and line.split()[4] == str(pid))


@pytest.mark.parametrize("route", ["symlink", "hard link"])
async def test_the_lock_holds_by_the_files_identity(store, route):
    import os
    from wattgate.store import SQLiteStore
    from wattgate.store.sqlite import StoreInUse
    store.claim()
    other_path = store.path.with_name("other.db")
    if route == "symlink":
        other_path.symlink_to(store.path)
    else:
        os.link(store.path, other_path)
    with pytest.raises(StoreInUse, match="another wattgate server"):
        SQLiteStore.open(other_path, claim=True)
    assert not other_path.with_name("other.db-wal").exists()  # refused before SQLite opened it


async def test_a_refused_claim_keeps_sqlites_own_locks(store):
    """Closing any descriptor of a file drops the process's POSIX locks on it: a refused
    claim must not close the one it opened while SQLite has the file open."""
    from wattgate.store import SQLiteStore
    from wattgate.store.sqlite import StoreInUse
    store.claim()
    other = SQLiteStore.open(store.path)
    try:
        before = _locks_held_on(store.path)
        assert before.count("POSIX") >= 1 and before.count("FLOCK") == 1
        with pytest.raises(StoreInUse):
            other.claim()
        assert _locks_held_on(store.path) == before
    finally:
        await other.close()


async def test_admit_refuses_a_revoked_connection(store):
    c = await funded(store)
    await store.set_connection_state(c.connection_id, REVOKED, now=T)
    with pytest.raises(NotConnected):
        await store.admit(c.connection_id, "2027-01", 1, now=T, expires_at=T + 1)


async def test_concurrent_writes_share_commits(store):
    c = await funded(store)
    before = store.commits
    results = await asyncio.gather(*(
        store.settle(None, usage(f"g{i}", c.connection_id, 1_000), "2027-01") for i in range(50)))
    assert all(results)
    assert await store.period_spent(c.connection_id, "2027-01") == 50_000
    assert store.commits - before < 50


async def test_one_failing_write_does_not_sink_its_batch(store):
    c = await funded(store)
    good = store.settle(None, usage("ok", c.connection_id, 7), "2027-01")
    bad = store.create_app(APP, "Duplicate", "h", [], now=T)  # primary key clash
    results = await asyncio.gather(good, bad, return_exceptions=True)
    assert results[0] is True and isinstance(results[1], sqlite3.IntegrityError)
    assert await store.period_spent(c.connection_id, "2027-01") == 7


async def test_replace_sealed_keys_only_where_unchanged(store):
    a = await funded(store, "u1")
    b = await funded(store, "u2")
    assert sorted(r[1] for r in await store.all_sealed_keys()) == sorted(
        [a.connection_id, b.connection_id])
    n = await store.replace_sealed_keys([
        ("connections", a.connection_id, a.sealed_key, "new-a"),
        ("connections", b.connection_id, "stale", "new-b")])
    assert n == 1
    assert (await store.get_connection(APP, "u1")).sealed_key == "new-a"
    assert (await store.get_connection(APP, "u2")).sealed_key == a.sealed_key


async def test_presence(store):
    assert not await store.has_presence("b")
    await store.add_presence("b", now=T)
    await store.add_presence("b", now=T)
    assert await store.has_presence("b")


async def test_ping_and_data_survive_reopen(tmp_path):
    s = SQLiteStore.open(tmp_path / "w.db")
    assert await s.ping()
    await s.create_app(APP, "Demo", "h", [], now=T)
    await s.close()
    s = SQLiteStore.open(tmp_path / "w.db")
    try:
        assert (await s.get_app(APP)).name == "Demo"
        mode = s._read.execute("PRAGMA journal_mode").fetchone()[0]
        assert mode == "wal"
    finally:
        await s.close()


async def test_money_is_stored_as_integers(store):
    c = await funded(store, cap=10 * USD + 1)
    await store.settle(None, usage("g", c.connection_id, 1), "2027-01")
    db = sqlite3.connect(store.path)
    try:
        assert db.execute("SELECT typeof(cap_nanos) FROM connections").fetchone() == ("integer",)
        assert db.execute("SELECT typeof(cost_nanos) FROM usage").fetchone() == ("integer",)
        assert db.execute("SELECT typeof(spent_nanos) FROM periods").fetchone() == ("integer",)
    finally:
        db.close()


async def test_a_cap_change_never_revives_a_connection_revoked_meanwhile(tmp_path):
    """The race: an app lowers a cap while the user revokes; the revoke must win."""
    from wattgate.credentials import mint_credentials
    from wattgate.store import ACTIVE, REVOKED, SQLiteStore

    store = SQLiteStore(tmp_path / "race.db")
    creds = mint_credentials()
    await store.create_app(creds.app_id, "A", "h", ["http://localhost:3000"], now=0)
    conn = await store.save_connection(creds.app_id, "u", state=ACTIVE, cap_nanos=10,
                                       sealed_key="v1.k1.abc", browser_hash=None, now=0)
    # The app's request read `conn` (active) ... then the user's revoke commits ...
    await store.set_connection_state(conn.connection_id, REVOKED, now=1)
    # ... and the app's cap change arrives, based on its stale read.
    assert await store.update_cap(conn.connection_id, 5, expected_key=conn.sealed_key,
                                  expected_cap=10, now=2) is None
    after = await store.get_connection(creds.app_id, "u")
    assert after.state == REVOKED and not after.connected and after.cap_nanos == 10
    # Unchanged connections take the new cap.
    conn2 = await store.save_connection(creds.app_id, "v", state=ACTIVE, cap_nanos=10,
                                        sealed_key="v1.k1.def", browser_hash=None, now=0)
    updated = await store.update_cap(conn2.connection_id, 5, expected_key="v1.k1.def",
                                     expected_cap=10, now=3)
    assert updated is not None and updated.cap_nanos == 5 and updated.connected
    await store.close()


async def test_the_periodic_sweep_bounds_holds_in_memory_too(store):
    c = await funded(store, cap=10 * USD)
    leaked = await store.admit(c.connection_id, "2027-01", 2 * USD, now=T, expires_at=T + 900)
    named = await store.admit(c.connection_id, "2027-01", 3 * USD, now=T, expires_at=T + 900)
    await store.note_generation(named, "gen-long", APP, "m")
    fresh = await store.admit(c.connection_id, "2027-01", 1 * USD, now=T + 100,
                              expires_at=T + 1000)
    assert await store.held(c.connection_id) == 6 * USD
    assert await store.sweep_holds(older_than=T + 50) == 2
    # The named one is a provisional debit at its estimate now; the leak is gone; the
    # fresh one is untouched: 3 spent + 1 held.
    assert await store.period_spent(c.connection_id, "2027-01") == 3 * USD
    assert await store.held(c.connection_id) == 1 * USD
    # The call of the named hold ends after all: its real cost replaces the estimate.
    await store.settle(named, usage("gen-long", c.connection_id, 2 * USD), "2027-01")
    assert await store.period_spent(c.connection_id, "2027-01") == 2 * USD
    await store.release(leaked)  # a late release of a swept hold changes nothing
    await store.release(fresh)
    assert await store.held(c.connection_id) == 0 and await store.open_holds() == 0


@pytest.mark.parametrize("seed", range(5))
async def test_random_interleavings_never_pass_the_cap_nor_lose_a_debit(store, seed):
    """Many calls admitted, settled and released in random order, interleaved with
    writes by another process: spent + held never passes the cap, and every debit
    lands exactly once."""
    import asyncio
    import random

    from wattgate.store import SQLiteStore

    rnd = random.Random(seed)
    cap = 50 * USD
    c = await funded(store, cap=cap)
    other = SQLiteStore.open(store.path)  # the CLI, reconciling meanwhile
    debited = 0
    refused = 0
    outside = 0  # debits by the other process, which bypass admission

    async def call(i: int) -> None:
        nonlocal debited, refused
        await asyncio.sleep(rnd.random() / 1000)
        estimate = rnd.randint(1, 5) * USD
        try:
            hold = await store.admit(c.connection_id, "2027-01", estimate, now=T,
                                     expires_at=T + 900)
        except BudgetExceeded:
            refused += 1
            return
        spent = await store.period_spent(c.connection_id, "2027-01")
        assert spent + await store.held(c.connection_id) <= cap + outside
        if rnd.random() < 0.5:
            await store.note_generation(hold, f"g{seed}-{i}", APP, "m")
        await asyncio.sleep(rnd.random() / 500)
        if rnd.random() < 0.2:
            await store.release(hold)
            return
        cost = rnd.randint(0, estimate)
        await store.settle(hold, usage(f"g{seed}-{i}", c.connection_id, cost), "2027-01")
        debited += cost

    async def cli(i: int) -> None:
        nonlocal debited, outside
        await asyncio.sleep(rnd.random() / 100)
        outside += USD // 10  # counted before its commit: the bound is never too tight
        await other.settle(None, usage(f"cli{seed}-{i}", c.connection_id, USD // 10), "2027-01")
        debited += USD // 10

    await asyncio.gather(*[call(i) for i in range(120)], *[cli(i) for i in range(5)])
    await other.close()
    await asyncio.sleep(0)
    assert refused > 0, "the cap was reached"
    assert await store.held(c.connection_id) == 0 and await store.open_holds() == 0
    assert await store.period_spent(c.connection_id, "2027-01") == debited <= cap + outside
    assert await store.check(now=T, hold_ttl=900) == []


async def test_a_revoked_connection_stays_revoked(store):
    """A call that fails upstream after the user revoked (its key may be gone) would mark
    the connection "needs reconnect": that must not undo the revocation (the key would
    then never be erased, and the user would see "needs reconnect")."""
    from wattgate.store import NEEDS_RECONNECT

    c = await funded(store)
    await store.set_connection_state(c.connection_id, REVOKED, now=T)
    await store.set_connection_state(c.connection_id, NEEDS_RECONNECT, now=T + 1)
    assert (await store.get_connection(APP, "u")).state == REVOKED


async def test_a_revocation_ends_the_grants_it_funds_and_refuses_new_ones(store):
    """A grant whose approval was checked before a revocation is refused when it is
    written after it; one written before ends with the revocation."""
    from wattgate.errors import ConsentRequired

    await funded(store)
    c = await store.save_connection(APP, "u", state=ACTIVE, cap_nanos=USD, sealed_key="k",
                                    browser_hash="browser-1", now=T)

    def grant(n: int):  # type: ignore[no-untyped-def]
        return store.create_grant(APP, f"h{n}", 1, None, sealed_key=None,
                                  connection_id=c.connection_id, now=T, expires_at=T + 600,
                                  approved_by="browser-1")
    before = await grant(1)
    await store.set_connection_state(c.connection_id, REVOKED, now=T + 1)
    assert (await store.get_grant_by_id(before.grant_id)).expires_at == T + 1
    with pytest.raises(ConsentRequired):
        await grant(2)


async def test_ledger_check_names_a_call_dated_outside_its_period(store):
    """The rule every reader relies on: a row's date falls in its period."""
    import calendar

    c = await funded(store)
    oct_31 = calendar.timegm((2026, 10, 31, 23, 59, 59))
    await store.settle(None, usage("gen-oct", c.connection_id, 5, at=oct_31), "2026-10")
    assert await store.check(now=oct_31, hold_ttl=900) == []
    await store.settle(None, usage("gen-bad", c.connection_id, 5, at=oct_31 + 2), "2026-10")
    [problem] = await store.check(now=oct_31, hold_ttl=900)
    assert "gen-bad" in problem and "2026-10" in problem


# ---- hold identity (issue 14, item 3) -----------------------------------------

async def funding_grant(store: SQLiteStore, connection_id: int | None, requests: int = 3):  # type: ignore[no-untyped-def]
    return await store.create_grant(APP, f"token-{requests}-{connection_id}", requests, None,
                                    sealed_key=None if connection_id else "v1.k1.sealed",
                                    connection_id=connection_id, now=T, expires_at=T + 600,
                                    approved_by="browser-1" if connection_id else None)


async def test_hold_ids_come_from_one_sequence_and_never_collide(store):
    """A grant's hold row used to take max(rowid)+1 while the holds in memory counted
    down from -1: with the only row a connection's hold -3, the grant's hold got -2,
    the id of a hold in memory. Its release then skipped the ledger (no refund, the
    row leaked) and the memory kept a phantom amount that refused calls that fit."""
    await funded(store, cap=10 * USD)
    c = await store.save_connection(APP, "u", state=ACTIVE, cap_nanos=10 * USD,
                                    sealed_key="v1.k1.sealed", browser_hash="browser-1", now=T)
    held = [await store.admit(c.connection_id, "2027-01", USD, now=T, expires_at=T + 900)
            for _ in range(3)]
    await store.note_generation(held[2], "g-named", APP, "m")  # its row is written
    grant = await funding_grant(store, c.connection_id)
    _, grant_hold = await store.admit_grant(grant.token_hash, APP, "2027-01", 2 * USD, now=T,
                                            expires_at=T + 900)
    ids = [h.hold_id for h in held] + [grant_hold.hold_id]
    assert len(set(ids)) == 4 and min(ids) > 0
    assert await store.held(c.connection_id) == 5 * USD

    await store.release(grant_hold, refund_request=True)  # refused upstream before any byte
    after = await store.get_grant_by_id(grant.grant_id)
    assert (after.used, after.held_nanos) == (0, 0)  # the request and the money come back
    for hold in held:
        await store.release(hold)
    assert await store.held(c.connection_id) == 0 and await store.open_holds() == 0
    # All the room is there again: a call of the whole cap fits.
    hold = await store.admit(c.connection_id, "2027-01", 10 * USD, now=T, expires_at=T + 900)
    await store.release(hold)
    assert await store.check(now=T, hold_ttl=900) == []


async def test_hold_ids_continue_above_every_id_the_ledger_saw(tmp_path):
    path = tmp_path / "w.db"
    first = SQLiteStore.open(path)
    c = await funded(first)
    hold = await first.admit(c.connection_id, "2027-01", USD, now=T, expires_at=T + 900)
    await first.note_generation(hold, "g-crash", APP, "m")
    await first.close()  # as a crash would leave it: the hold's row, nothing settled
    second = SQLiteStore.open(path)
    try:
        assert await second.sweep_holds() == 1  # what a restart does
        grant = await funding_grant(second, None)
        _, grant_hold = await second.admit_grant(grant.token_hash, APP, "2027-01", USD, now=T,
                                                 expires_at=T + 900)
        again = await second.admit(c.connection_id, "2027-01", USD, now=T, expires_at=T + 900)
        assert hold.hold_id < grant_hold.hold_id < again.hold_id
    finally:
        await second.close()


async def test_a_restart_gives_a_grant_back_the_request_its_unnamed_call_took(tmp_path):
    path = tmp_path / "w.db"
    first = SQLiteStore.open(path)
    await funded(first)
    grant = await funding_grant(first, None, requests=1)
    await first.admit_grant(grant.token_hash, APP, "2027-01", USD, now=T, expires_at=T + 900)
    await first.close()  # killed before the upstream named the call's generation
    second = SQLiteStore.open(path)
    try:
        assert await second.sweep_holds() == 1
        after = await second.get_grant_by_id(grant.grant_id)
        assert (after.used, after.held_nanos, after.spent_nanos) == (0, 0, 0)
        assert await second.check(now=T, hold_ttl=900) == []
    finally:
        await second.close()


# ---- funding keys kept only while a call may need them (attack review) -----------

async def test_a_typed_grant_key_is_kept_exactly_while_a_call_may_need_it(store):
    """One rule for every sealed key: erased once nothing can use it (the grant is used
    up or expired) and nothing can correct a call with it (no hold of the grant, and no
    provisional call naming a real generation at or after the give-up)."""
    import dataclasses

    await funded(store)
    grant = await funding_grant(store, None, requests=1)

    async def erase(*, now: float = T, since: float = T - 86400) -> bool:
        await store.erase_revoked_keys(since=since, now=now)
        return (await store.get_grant_by_id(grant.grant_id)).sealed_key is None

    assert not await erase()  # unused and unexpired: the user may still redeem it
    _, hold = await store.admit_grant(grant.token_hash, APP, "2027-01", USD, now=T,
                                      expires_at=T + 900)
    assert not await erase()  # used up, but its call is in flight
    assert not await erase(now=T + 601, since=T + 1)  # expired too: still in flight
    await store.settle(hold, dataclasses.replace(
        usage("gen-g", None, USD), grant_id=grant.grant_id, provisional=True), "2027-01")
    assert not await erase(now=T + 601)  # its call awaits its final cost upstream
    assert await erase(now=T + 601, since=T + 1)  # that call is past the give-up
    assert await store.erase_revoked_keys(since=T + 1, now=T + 601) == 0  # nothing left

    unused = await store.create_grant(APP, "token-unused", 5, None, sealed_key="v1.k1.k",
                                      connection_id=None, now=T, expires_at=T + 600)
    assert await store.erase_revoked_keys(since=T + 1, now=T + 600) == 1  # expired, unused
    assert (await store.get_grant_by_id(unused.grant_id)).sealed_key is None
