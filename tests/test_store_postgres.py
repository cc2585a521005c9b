"""What only the PostgreSQL store does: owner locks, leadership, NOTIFY, failing closed,
racing processes, migrations. The ledger's common promises are in test_store_contract.py.

Runs on a real server at ``WATTGATE_TEST_DATABASE_URL`` (a fresh database per
module, dropped at the end); fails, never skips, when there is none.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Any
from pathlib import Path

import asyncpg
import pytest

from wattgate.errors import (BudgetExceeded, GrantInvalid, KeysMismatch, NotConnected,
                             RateLimited, Unavailable)
from wattgate.ratelimit import RateLimiter
from wattgate.store.migrations import SchemaError
from wattgate.store.postgres import PostgresStore
from wattgate.store.records import ACTIVE, REVOKED, Usage

SERVER = os.environ.get("WATTGATE_TEST_DATABASE_URL",
                        "postgresql://postgres@127.0.0.1:5432/postgres")
ROOT = Path(__file__).resolve().parent.parent
PERIOD = "2026-03"
NOW = 1772400000.0  # 2026-03-01T21:20:00Z


def _url(name: str) -> str:
    return SERVER.rsplit("/", 1)[0] + "/" + name


async def _admin(sql: str) -> None:
    con = await asyncpg.connect(SERVER)
    try:
        await con.execute(sql)
    finally:
        await con.close()


@contextlib.asynccontextmanager
async def fresh_database() -> AsyncIterator[str]:
    name = "wg_pg_" + secrets.token_hex(6)
    await _admin(f"CREATE DATABASE {name}")
    try:
        yield _url(name)
    finally:
        await _admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture(scope="module")
def db_url() -> Iterator[str]:
    name = "wg_pg_" + secrets.token_hex(6)
    asyncio.run(_admin(f"CREATE DATABASE {name}"))
    try:
        yield _url(name)
    finally:
        asyncio.run(_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


@pytest.fixture
async def open_store(db_url: str) -> AsyncIterator:
    stores: list[PostgresStore] = []

    async def make(url: str | None = None) -> PostgresStore:
        store = await PostgresStore.open(url or db_url, pool_size=4)
        stores.append(store)
        return store
    yield make
    for store in stores:
        await store.close()


async def _connected(store: PostgresStore, cap: int | None = 1_000) -> int:
    app = "app-" + secrets.token_hex(4)
    await store.create_app(app, "Demo", "hash", ["http://localhost:3000"], now=NOW)
    connection = await store.save_connection(app, "alice", state=ACTIVE, cap_nanos=cap,
                                             sealed_key="sealed", browser_hash="b", now=NOW)
    return connection.connection_id


def _usage(connection_id: int, app: str, gen: str, cost: int, *,
           provisional: bool = False) -> Usage:
    return Usage(gen, app, connection_id, None, "m", 1, 1, cost, provisional, "ok", 5, NOW)


async def _until(predicate, what: str, within: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    """Poll ``predicate`` (async) until true; fail naming ``what`` past ``within`` s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not await predicate():
        if loop.time() > deadline:
            pytest.fail(f"{what} did not happen within {within} s")
        await asyncio.sleep(0.05)


async def test_admission_holds_in_the_database_and_settle_counts_once(open_store) -> None:
    a, b = await open_store(), await open_store()
    cid = await _connected(a)
    app = (await a.get_connection_by_id(cid)).app_id  # type: ignore[union-attr]
    first = await a.admit(cid, PERIOD, 600, now=NOW, expires_at=NOW + 60)
    # Another process sees the hold: the room left is 400, not 1000.
    assert await b.held(cid, PERIOD) == 600
    with pytest.raises(BudgetExceeded) as refused:
        await b.admit(cid, PERIOD, 500, now=NOW, expires_at=NOW + 60)
    assert refused.value.shortfall is not None and refused.value.shortfall.left == 400
    await a.note_generation(first, "gen-1", app, "m")  # type: ignore[misc]
    assert await a.settle(first, _usage(cid, app, "gen-1", 450), PERIOD) is True
    assert await b.settle(first, _usage(cid, app, "gen-1", 450), PERIOD) is False
    assert await b.period_spent(cid, PERIOD) == 450 and await b.open_holds() == 0
    # A provisional figure, then the final one: the aggregate moves by the difference.
    assert await a.settle(None, _usage(cid, app, "gen-2", 100, provisional=True), PERIOD)
    assert await a.settle(None, _usage(cid, app, "gen-2", 130), PERIOD) is True
    assert await b.period_spent(cid, PERIOD) == 580
    assert await b.check(now=NOW, hold_ttl=600) == []
    # A cap lowered below what was spent: the audit's cap check runs (any TTL, as a float).
    assert await a.update_cap(cid, 100, expected_key="sealed", expected_cap=1_000,
                              now=NOW + 1)
    assert await b.check(now=NOW, hold_ttl=1e12) == []


async def test_a_revoked_connection_admits_nothing(open_store) -> None:
    store = await open_store()
    cid = await _connected(store)
    await store.set_connection_state(cid, REVOKED, now=NOW)
    with pytest.raises(NotConnected):
        await store.admit(cid, PERIOD, 1, now=NOW, expires_at=NOW + 60)
    await store.set_connection_state(cid, ACTIVE, now=NOW)  # revoked stays revoked
    assert (await store.get_connection_by_id(cid)).state == REVOKED  # type: ignore[union-attr]


async def test_grant_requests_exact_and_refunded_before_the_first_byte(open_store) -> None:
    store = await open_store()
    cid = await _connected(store, cap=10_000)
    app = (await store.get_connection_by_id(cid)).app_id  # type: ignore[union-attr]
    await store.create_grant(app, "tok", 3, 1_000, sealed_key=None, connection_id=cid,
                             now=NOW, expires_at=NOW + 3600, approved_by="b")
    results = await asyncio.gather(
        *(store.admit_grant("tok", app, PERIOD, 100, now=NOW, expires_at=NOW + 60)
          for _ in range(6)), return_exceptions=True)
    holds = [r[1] for r in results if isinstance(r, tuple)]
    assert len(holds) == 3 and sum(isinstance(r, GrantInvalid) for r in results) == 3
    await store.release(holds[0], refund_request=True)
    grant = await store.get_grant("tok")
    assert grant is not None and grant.used == 2 and grant.held_nanos == 200
    assert await store.held(cid, PERIOD) == 200
    assert await store.check(now=NOW, hold_ttl=600) == []


async def test_sweep_takes_only_the_holds_of_a_dead_process(open_store, db_url) -> None:
    survivor = await open_store()
    await survivor.sweep_holds()  # what earlier tests' closed stores left
    doomed = await PostgresStore.open(db_url, pool_size=2)
    cid = await _connected(survivor)
    app = (await survivor.get_connection_by_id(cid)).app_id  # type: ignore[union-attr]
    mine = await survivor.admit(cid, PERIOD, 100, now=NOW, expires_at=NOW + 60)
    named = await doomed.admit(cid, PERIOD, 200, now=NOW, expires_at=NOW + 60)
    await doomed.note_generation(named, "gen-dead", app, "m")  # type: ignore[misc]
    await doomed.admit(cid, PERIOD, 300, now=NOW, expires_at=NOW + 60)  # never named
    assert await survivor.sweep_holds() == 0  # both processes alive
    doomed.close_now()  # as a kill: its sessions end, its owner lock with them
    assert await survivor.sweep_holds() == 0  # within the grace: maybe only reconnecting
    survivor.owner_grace = 0.0  # the grace (15 s) has passed

    async def swept() -> bool:
        return await survivor.sweep_holds() > 0
    await _until(swept, "the dead process's holds being swept")
    # The named call became a provisional row at its estimate; the unnamed one is gone;
    # the survivor's own call in flight is untouched.
    assert await survivor.held(cid, PERIOD) == 100
    assert await survivor.period_spent(cid, PERIOD) == 200
    assert [u.generation_id for u in await survivor.provisional_of_connection(cid)] == \
        ["gen-dead"]
    assert await survivor.settle(mine, _usage(cid, app, "gen-live", 90), PERIOD)
    assert await survivor.check(now=NOW, hold_ttl=600) == []


async def test_sweep_by_age_takes_any_process_holds(open_store) -> None:
    a, b = await open_store(), await open_store()
    cid = await _connected(a)
    await a.admit(cid, PERIOD, 100, now=NOW, expires_at=NOW + 60)
    await a.admit(cid, PERIOD, 100, now=NOW + 500, expires_at=NOW + 560)
    assert await b.sweep_holds(older_than=NOW + 100) == 1
    assert await a.held(cid) == 100


async def test_leadership_moves_when_the_leaders_connection_dies(open_store) -> None:
    a, b = await open_store(), await open_store()
    assert await a.lead("reconcile") is True
    assert await a.lead("reconcile") is True
    assert await b.lead("reconcile") is False
    assert await b.lead("sweep") is True  # tasks are led independently
    await _admin(f"SELECT pg_terminate_backend({a._life._con.get_server_pid()})")

    async def b_leads() -> bool:
        return await b.lead("reconcile")
    await _until(b_leads, "another process taking the lead")
    assert await a.lead("reconcile") is False  # a is back, but b leads now


async def test_a_change_reaches_another_process_within_one_second(open_store) -> None:
    writer, reader = await open_store(), await open_store()
    cid = await _connected(writer)
    before = reader.apps_version()
    assert before is not None
    assert await writer.update_cap(cid, 5, expected_key="sealed", expected_cap=1_000, now=NOW)

    async def moved() -> bool:
        return reader.apps_version() not in (before, None)
    await _until(moved, "the cap change notification", within=1.0)


async def test_no_freshness_vouched_while_the_listener_is_down(open_store) -> None:
    store = await open_store()
    before = store.apps_version()
    await _admin(f"SELECT pg_terminate_backend({store._life._con.get_server_pid()})")

    async def down() -> bool:
        return store.apps_version() is None
    await _until(down, "the listener's loss being noticed")

    async def back() -> bool:
        return store.apps_version() not in (None, before)
    await _until(back, "the listener reconnecting")


class _Gate:
    """A loopback TCP relay to the real server that can be cut and restored."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []
        self.listen_port = 0

    async def open(self) -> None:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", self.listen_port)
        self.listen_port = self.server.sockets[0].getsockname()[1]

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(self.host, self.port)
        self.writers += [writer, up_writer]

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()
        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))

    async def cut(self) -> None:
        assert self.server is not None
        self.server.close()
        for w in self.writers:
            w.transport.abort()
        self.writers.clear()
        await self.server.wait_closed()


async def test_fails_closed_while_unreachable_and_recovers(open_store, db_url) -> None:
    free = _url("x").split("@")[0] + "@127.0.0.1:1/postgres"
    with pytest.raises(Unavailable):
        await PostgresStore.open(free)
    host, port = db_url.split("@")[1].split("/")[0].split(":")
    gate = _Gate(host, int(port))
    await gate.open()
    via_gate = db_url.replace(f"{host}:{port}", f"127.0.0.1:{gate.listen_port}")
    store = await open_store(via_gate)
    cid = await _connected(store)
    await gate.cut()
    for _ in range(3):  # every operation refuses; nothing passes unmetered
        with pytest.raises(Unavailable):
            await store.admit(cid, PERIOD, 1, now=NOW, expires_at=NOW + 60)
    assert await store.ping() is False
    assert store.apps_version() is None
    await gate.open()  # the database is back on the same address

    async def admits() -> bool:
        try:
            await store.admit(cid, PERIOD, 1, now=NOW, expires_at=NOW + 60)
        except Unavailable:
            return False
        return True
    await _until(admits, "the pool reconnecting")
    assert await store.ping() is True
    await gate.cut()



async def test_a_settle_the_database_could_not_take_lands_once_it_is_back(open_store,
                                                                         db_url) -> None:
    host, port = db_url.split("@")[1].split("/")[0].split(":")
    gate = _Gate(host, int(port))
    await gate.open()
    store = await open_store(db_url.replace(f"{host}:{port}", f"127.0.0.1:{gate.listen_port}"))
    direct = await open_store()
    cid = await _connected(direct)
    app = (await direct.get_connection_by_id(cid)).app_id  # type: ignore[union-attr]
    hold = await store.admit(cid, PERIOD, 500, now=NOW, expires_at=NOW + 60)
    await store.note_generation(hold, "gen-retried", app, "m")  # type: ignore[misc]
    await gate.cut()  # the answer came, the ledger is gone: the call's cost is known here only
    with pytest.raises(Unavailable):
        await store.settle(hold, _usage(cid, app, "gen-retried", 420), PERIOD)
    assert await direct.held(cid, PERIOD) == 500
    await gate.open()

    async def landed() -> bool:
        return (await direct.period_spent(cid, PERIOD), await direct.held(cid, PERIOD)) \
            == (420, 0)
    await _until(landed, "the settle landing once the database answers again")
    assert await direct.check(now=NOW, hold_ttl=600) == []
    await gate.cut()


RACER = """
import asyncio, json, sys
from wattgate.errors import BudgetExceeded
from wattgate.store.postgres import PostgresStore

async def main(url, cid):
    store = await PostgresStore.open(url, pool_size=4)
    async def one():
        try:
            await store.admit(cid, "2026-03", 10, now=0.0, expires_at=60.0)
            return 1
        except BudgetExceeded:
            return 0
    won = sum(await asyncio.gather(*(one() for _ in range(40))))
    await store.close()
    print(json.dumps(won))

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


async def test_admissions_racing_from_processes_never_pass_the_cap(open_store, db_url) -> None:
    store = await open_store()
    cid = await _connected(store, cap=250)  # room for exactly 25 calls of 10
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    racers = [await asyncio.create_subprocess_exec(
        sys.executable, "-c", RACER, db_url, str(cid), env=env,
        stdout=subprocess.PIPE) for _ in range(3)]
    won = [json.loads((await p.communicate())[0]) for p in racers]
    assert all(p.returncode == 0 for p in racers)
    assert sum(won) == 25 and await store.held(cid, PERIOD) == 250


async def test_rate_limit_is_one_bucket_for_every_process(open_store) -> None:
    """Two processes share one bucket that answers as the in-memory limiter does."""
    a, b = await open_store(), await open_store()
    reference = RateLimiter(2, name="chat")
    key = "app:" + secrets.token_hex(4)
    answers = []
    for store, at, take in ((a, 0, True), (b, 0, True), (a, 0, False), (b, 10, True),
                            (a, 29, True), (b, 30, True), (a, 31, True), (b, 95, True)):
        try:
            (reference.take if take else reference.check)(key, now=NOW + at)
            expected = None
        except RateLimited as e:
            expected = e.retry_after
        got = await store.rate_take("chat", key, 2, now=NOW + at, take=take)
        assert got == expected, (at, take)
        answers.append(got)
    assert answers[:3] == [None, None, 30] and answers[-1] is None
    assert await a.rate_take("chat", "app:other", 2, now=NOW) is None


async def test_keys_fingerprint_binds_the_ledger(open_store) -> None:
    a, b = await open_store(), await open_store()
    fingerprint = "fp-" + secrets.token_hex(4)
    with contextlib.suppress(KeysMismatch):  # the module's database may be bound already
        await a.bind_keys(fingerprint)
    await _admin_exec(a, "DELETE FROM meta")
    await a.bind_keys(fingerprint)
    await b.bind_keys(fingerprint)
    with pytest.raises(KeysMismatch):
        await b.bind_keys("other")


async def _admin_exec(store: PostgresStore, sql: str) -> None:
    async with store._con() as con:
        await con.execute(sql)


async def test_console_sessions_on_every_process(open_store) -> None:
    a, b = await open_store(), await open_store()
    await a.open_admin_session("s1", "csrf", expires_at=NOW + 60, now=NOW)
    assert await b.find_admin_session("s1", now=NOW) == ("csrf", NOW + 60)
    assert await b.find_admin_session("s1", now=NOW + 61) is None
    await b.close_admin_session("s1")
    assert await a.find_admin_session("s1", now=NOW) is None


async def test_migrations_serialised_idempotent_and_newer_refused() -> None:
    async with fresh_database() as url:
        stores = await asyncio.gather(*(PostgresStore.open(url, pool_size=1) for _ in range(4)))
        for store in stores:
            await store.close()
        again = await PostgresStore.open(url, pool_size=1)
        await _admin_exec(again, "UPDATE wattgate_schema SET version = version + 1")
        await again.close()
        with pytest.raises(SchemaError):
            await PostgresStore.open(url, pool_size=1)
        con = await asyncpg.connect(url)
        try:
            assert await con.fetchval("SELECT COUNT(*) FROM wattgate_schema") == 1
        finally:
            await con.close()


async def test_ids_are_never_reused(open_store) -> None:
    store = await open_store()
    cid = await _connected(store)
    hold = await store.admit(cid, PERIOD, 1, now=NOW, expires_at=NOW + 60)
    await store.release(hold)
    again = await store.admit(cid, PERIOD, 1, now=NOW, expires_at=NOW + 60)
    assert again.hold_id > hold.hold_id


async def _cut_lifeline(store: PostgresStore) -> Any:
    """Terminate ``store``'s lifeline backend and keep it from reconnecting (as a
    network outage of that one connection would); returns the way to let it back."""
    connect = store._life._connect

    async def refused() -> Any:
        raise OSError("lifeline network cut by the test")
    store._life._connect = refused
    await _admin(f"SELECT pg_terminate_backend({store._life._con.get_server_pid()})")

    async def down() -> bool:
        return not store._life.up
    await _until(down, "the lifeline's loss being noticed")

    def restore() -> None:
        store._life._connect = connect
    return restore


async def test_a_lifeline_outage_is_not_a_death_and_a_process_presumed_dead_restores(
        open_store) -> None:
    survivor, flaky = await open_store(), await open_store()
    await survivor.sweep_holds()  # what earlier tests' closed stores left
    cid = await _connected(survivor)
    app = (await survivor.get_connection_by_id(cid)).app_id  # type: ignore[union-attr]
    running = await flaky.admit(cid, PERIOD, 600, now=NOW, expires_at=NOW + 60)
    let_back = await _cut_lifeline(flaky)
    # While its lifeline is down the process admits nothing (its liveness is unvouched).
    with pytest.raises(Unavailable):
        await flaky.admit(cid, PERIOD, 1, now=NOW, expires_at=NOW + 60)
    # Its owner lock is free, but it was seen moments ago: its call still narrows the cap.
    assert await survivor.sweep_holds() == 0
    assert await survivor.held(cid, PERIOD) == 600
    with pytest.raises(BudgetExceeded):
        await survivor.admit(cid, PERIOD, 500, now=NOW, expires_at=NOW + 60)
    # Gone longer than the grace: presumed dead, swept.
    survivor.owner_grace = 0.0

    async def swept() -> bool:
        return await survivor.sweep_holds() > 0
    await _until(swept, "the unseen process's holds being swept")
    assert await survivor.held(cid, PERIOD) == 0
    # It comes back, learns it was presumed dead, and puts its running call's hold back.
    let_back()

    async def restored() -> bool:
        return await survivor.held(cid, PERIOD) == 600
    await _until(restored, "the process restoring its swept hold")
    with pytest.raises(BudgetExceeded):
        await survivor.admit(cid, PERIOD, 500, now=NOW, expires_at=NOW + 60)
    await flaky.note_generation(running, "gen-back", app, "m")  # type: ignore[misc]
    assert await flaky.settle(running, _usage(cid, app, "gen-back", 550), PERIOD)
    assert await survivor.held(cid, PERIOD) == 0 and await survivor.period_spent(cid, PERIOD) == 550
    assert await flaky.admit(cid, PERIOD, 400, now=NOW, expires_at=NOW + 60)
    assert await survivor.check(now=NOW, hold_ttl=600) == []


async def test_the_leaders_reconciler_frees_a_killed_process_holds(open_store, db_url) -> None:
    from types import SimpleNamespace

    from wattgate.reconcile import Reconciler

    leader = await open_store()
    await leader.sweep_holds()
    leader.owner_grace = 0.0
    killed = await PostgresStore.open(db_url, pool_size=2)
    cid = await _connected(leader)
    await killed.admit(cid, PERIOD, 700, now=NOW, expires_at=NOW + 60)
    killed.close_now()  # kill -9: nothing released, its sessions end
    gw = SimpleNamespace(store=leader, clock=lambda: NOW,
                         config=SimpleNamespace(metering_hold_ttl_seconds=600.0))
    reconciler = Reconciler(gw, None)  # type: ignore[arg-type]

    async def freed() -> bool:
        await reconciler.sweep()
        return await leader.held(cid, PERIOD) == 0
    await _until(freed, "the reconciler pass sweeping the killed process's holds")


async def test_a_cached_connection_is_dropped_on_another_process_change(open_store) -> None:
    """get_connection answers from memory until a change is notified, by any process."""
    writer, reader = await open_store(), await open_store()
    cid = await _connected(writer)
    app = (await writer.get_connection_by_id(cid)).app_id  # type: ignore[union-attr]
    first = await reader.get_connection(app, "alice")
    assert first is not None and first.connected
    assert await reader.get_connection(app, "alice") is first  # no read: nothing changed
    await writer.set_connection_state(cid, REVOKED, now=NOW)

    async def revoked_seen() -> bool:
        c = await reader.get_connection(app, "alice")
        return c is not None and not c.connected
    await _until(revoked_seen, "the revocation reaching the other process's cache")
    with pytest.raises(NotConnected):  # and admission re-checks in the database regardless
        await reader.admit(cid, PERIOD, 1, now=NOW, expires_at=NOW + 60)


async def test_no_connection_is_cached_while_the_listener_is_down(open_store, db_url) -> None:
    store = await open_store()
    cid = await _connected(store)
    app = (await store.get_connection_by_id(cid)).app_id  # type: ignore[union-attr]
    await store.get_connection(app, "alice")
    store._life.close_now()  # the listener gone for good: no change can be heard
    assert store.apps_version() is None
    # A change this process cannot hear about: written straight into the database.
    con = await asyncpg.connect(db_url)
    try:
        await con.execute("UPDATE connections SET cap_nanos = 7 WHERE connection_id = $1", cid)
    finally:
        await con.close()
    c = await store.get_connection(app, "alice")
    assert c is not None and c.cap_nanos == 7


async def test_settles_group_commit_each_caller_told_its_own_answer(open_store) -> None:
    store = await open_store()
    cid = await _connected(store, cap=None)
    app = (await store.get_connection_by_id(cid)).app_id  # type: ignore[union-attr]
    holds = [await store.admit(cid, PERIOD, 10, now=NOW, expires_at=NOW + 60)
             for _ in range(40)]
    # Queued in one loop turn: 40 calls, a duplicate of one of them, and one
    # final figure for a generation recorded provisionally by the same batch.
    settles = [store.settle(h, _usage(cid, app, f"gc{i}", 3), PERIOD)
               for i, h in enumerate(holds)]
    settles.append(store.settle(None, _usage(cid, app, "gc0", 3), PERIOD))
    settles.append(store.settle(None, _usage(cid, app, "gp", 5, provisional=True), PERIOD))
    settles.append(store.settle(None, _usage(cid, app, "gp", 4), PERIOD))
    results = await asyncio.gather(*settles)
    assert results == [True] * 40 + [False, True, True]
    assert await store.period_spent(cid, PERIOD) == 40 * 3 + 4
    assert await store.held(cid) == 0
    assert len(await store.recent_usage(cid, 100)) == 41  # 40 calls, "gp" once, no twin


async def test_one_bad_settle_in_a_batch_fails_alone(open_store) -> None:
    store = await open_store()
    cid = await _connected(store, cap=None)
    app = (await store.get_connection_by_id(cid)).app_id  # type: ignore[union-attr]
    good = [store.settle(None, _usage(cid, app, f"ok{i}", 2), PERIOD) for i in range(5)]
    bad = store.settle(None, _usage(cid, app, "too-big", 2**70), PERIOD)  # no BIGINT holds it
    results = await asyncio.gather(*good, bad, return_exceptions=True)
    assert results[:5] == [True] * 5
    assert isinstance(results[5], Exception)
    assert await store.period_spent(cid, PERIOD) == 10


async def test_a_settle_outlives_its_cancelled_caller(open_store) -> None:
    store = await open_store()
    cid = await _connected(store, cap=None)
    app = (await store.get_connection_by_id(cid)).app_id  # type: ignore[union-attr]
    hold = await store.admit(cid, PERIOD, 10, now=NOW, expires_at=NOW + 60)

    async def caller() -> bool:
        return await store.settle(hold, _usage(cid, app, "cancelled", 6), PERIOD)
    task = asyncio.ensure_future(caller())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    async def settled() -> bool:
        return await store.period_spent(cid, PERIOD) == 6
    await _until(settled, "the cancelled caller's settle committing")
    assert await store.held(cid) == 0


async def test_rate_takes_queued_together_stay_exact_across_processes(open_store) -> None:
    """Takes group-committed in one transaction still count one by one, fleet-wide."""
    a, b = await open_store(), await open_store()
    takes = [s.rate_take("chat", "app:burst", 10, now=NOW) for s in (a, b) for _ in range(25)]
    takes += [a.rate_take("chat", "app:calm", 10, now=NOW)]
    results = await asyncio.gather(*takes)
    assert sum(r is None for r in results[:50]) == 10
    assert results[50] is None  # another key's bucket is its own


async def test_an_admission_outlives_its_cancelled_caller_and_holds_nothing(open_store) -> None:
    store = await open_store()
    cid = await _connected(store, cap=None)

    async def caller() -> None:
        await store.admit(cid, PERIOD, 10, now=NOW, expires_at=NOW + 60)
    task = asyncio.ensure_future(caller())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    async def released() -> bool:
        return not store._writes and await store.held(cid) == 0
    await _until(released, "the unowned hold being released")


# ---- group commit under failure, the connection cache, migration 3 ----------------

async def _gated(db_url: str) -> tuple[_Gate, str]:
    host, port = db_url.split("@")[1].split("/")[0].split(":")
    gate = _Gate(host, int(port))
    await gate.open()
    return gate, db_url.replace(f"{host}:{port}", f"127.0.0.1:{gate.listen_port}")


@contextlib.asynccontextmanager
async def _row_locked(db_url: str, sql: str, *args: Any) -> AsyncIterator[None]:
    """Another session holding a row lock (``sql``: a SELECT … FOR UPDATE) until exit."""
    con = await asyncpg.connect(db_url)
    try:
        async with con.transaction():
            await con.execute(sql, *args)
            yield
    finally:
        await con.close()


async def _waiting(function: str) -> None:
    """Until a statement calling ``function`` waits on a row lock on the server."""
    async def waits() -> bool:
        con = await asyncpg.connect(SERVER)
        try:
            return bool(await con.fetchval(
                "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND query LIKE $1)", f"%{function}(%"))
        finally:
            await con.close()
    await _until(waits, f"a batch of {function} waiting on the locked row")


async def test_admissions_cut_mid_batch_commit_unanswered_and_are_undone(
        open_store, db_url) -> None:
    """A batch of admissions sent, then the database out of reach while the server still
    runs it (waiting for a row lock): the server commits with no one to answer. Every
    caller hears 503, each on its own; the orphaned holds are dropped once the statement
    can no longer be running, and the cap then admits exactly what it has room for."""
    direct = await open_store()
    cid = await _connected(direct, cap=1_000)
    gate, via_gate = await _gated(db_url)
    store = await open_store(via_gate)
    async with _row_locked(db_url, "SELECT 1 FROM connections WHERE connection_id = $1 "
                           "FOR UPDATE", cid):
        calls = [asyncio.ensure_future(store.admit(cid, PERIOD, 100, now=NOW + i,
                                                   expires_at=NOW + 60)) for i in range(5)]
        await _waiting("wattgate_admit_many")
        await gate.cut()
        answers = await asyncio.gather(*calls, return_exceptions=True)
        assert all(isinstance(a, Unavailable) for a in answers), answers
        await gate.open()
        await asyncio.sleep(0.8)  # the database answers again; the orphan still waits
    # The lock is gone: the orphaned statement commits the five holds, no caller owning them.

    async def orphaned() -> bool:
        return await direct.held(cid, PERIOD) == 500
    await _until(orphaned, "the unanswered batch committing on the server")

    async def undone() -> bool:
        return await direct.held(cid, PERIOD) == 0
    await _until(undone, "the process dropping the holds of its admissions in doubt",
                 within=15.0)
    won = 0
    for i in range(11):
        try:
            await store.admit(cid, PERIOD, 100, now=NOW + 10 + i, expires_at=NOW + 60)
            won += 1
        except BudgetExceeded:
            pass
    assert won == 10 and await direct.held(cid, PERIOD) == 1_000
    assert await direct.check(now=NOW, hold_ttl=600) == []
    await gate.cut()


async def test_settles_cut_mid_batch_land_exactly_once(open_store, db_url) -> None:
    """A batch of settles (and a duplicate) sent, the database cut off while the server
    runs it, which commits unanswered: every caller hears 503, the retries land again
    on the generation ids, and each call is counted once, none lost."""
    direct = await open_store()
    cid = await _connected(direct, cap=None)
    app = (await direct.get_connection_by_id(cid)).app_id  # type: ignore[union-attr]
    assert await direct.settle(None, _usage(cid, app, "first", 1), PERIOD)  # the period row
    gate, via_gate = await _gated(db_url)
    store = await open_store(via_gate)
    holds = [await store.admit(cid, PERIOD, 50, now=NOW, expires_at=NOW + 60)
             for _ in range(6)]
    async with _row_locked(db_url, "SELECT 1 FROM periods WHERE connection_id = $1 "
                           "FOR UPDATE", cid):
        settles = [asyncio.ensure_future(store.settle(h, _usage(cid, app, f"cut{i}", 10 + i),
                                                      PERIOD))  # type: ignore[arg-type]
                   for i, h in enumerate(holds)]
        settles.append(asyncio.ensure_future(
            store.settle(None, _usage(cid, app, "cut0", 10), PERIOD)))  # type: ignore[arg-type]
        await _waiting("wattgate_settle")
        await gate.cut()
        answers = await asyncio.gather(*settles, return_exceptions=True)
        assert all(isinstance(a, Unavailable) for a in answers), answers
        await gate.open()

    async def landed() -> bool:
        return not store._writes and await direct.held(cid) == 0
    await _until(landed, "the retried settles landing", within=20.0)
    assert await direct.period_spent(cid, PERIOD) == 1 + sum(10 + i for i in range(6))
    rows = await direct.recent_usage(cid, 100)
    assert sorted(r.generation_id for r in rows) == sorted(["first"] + [f"cut{i}"
                                                                        for i in range(6)])
    assert await direct.check(now=NOW, hold_ttl=600) == []
    await gate.cut()


async def test_one_bad_admission_in_a_batch_fails_alone(open_store) -> None:
    """Queued in one loop turn: one admission the server cannot take fails on its own;
    the batch is run again item by item and the cap holds to the nano."""
    store = await open_store()
    cid = await _connected(store, cap=1_000)
    calls = [store.admit(cid, PERIOD, 100, now=NOW, expires_at=NOW + 60) for _ in range(6)]
    calls.append(store.admit(cid, PERIOD, 2**64, now=NOW, expires_at=NOW + 60))  # no BIGINT
    calls += [store.admit(cid, PERIOD, 100, now=NOW, expires_at=NOW + 60) for _ in range(6)]
    answers = await asyncio.gather(*calls, return_exceptions=True)
    assert isinstance(answers[6], Exception) and not isinstance(answers[6], Unavailable)
    rest = answers[:6] + answers[7:]
    assert sum(not isinstance(a, BaseException) for a in rest) == 10
    assert sum(isinstance(a, BudgetExceeded) for a in rest) == 2
    assert await store.held(cid, PERIOD) == 1_000
    assert len({a.hold_id for a in rest if not isinstance(a, BaseException)}) == 10


CAP_LOWERER = """
import asyncio, sys
from wattgate.store.postgres import PostgresStore

async def main(url, cid):
    store = await PostgresStore.open(url, pool_size=1)
    await store.update_cap(cid, 100, expected_key="sealed", expected_cap=10_000, now=0.0)
    print("lowered", flush=True)
    await store.close()

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


async def test_a_cap_lowered_by_another_process_is_seen_within_a_second(open_store,
                                                                         db_url) -> None:
    """The connection cache of one process is dropped by the NOTIFY of another OS process:
    within 1 s its answers carry the lowered cap, and what the old cap allowed is refused."""
    reader = await open_store()
    cid = await _connected(reader, cap=10_000)
    app = (await reader.get_connection_by_id(cid)).app_id  # type: ignore[union-attr]
    cached = await reader.get_connection(app, "alice")
    assert cached is not None and cached.cap_nanos == 10_000
    assert await reader.get_connection(app, "alice") is cached  # served from memory
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CAP_LOWERER, db_url, str(cid),
        env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE)
    assert proc.stdout is not None
    assert (await proc.stdout.readline()).strip() == b"lowered"
    loop = asyncio.get_running_loop()
    lowered_at = loop.time()

    async def seen() -> bool:
        c = await reader.get_connection(app, "alice")
        return c is not None and c.cap_nanos == 100
    await _until(seen, "the lowered cap reaching the other process's cache", within=1.0)
    assert loop.time() - lowered_at < 1.0
    with pytest.raises(BudgetExceeded):
        await reader.admit(cid, PERIOD, 500, now=NOW, expires_at=NOW + 60)
    await proc.wait()
    assert proc.returncode == 0


OLD_OWNER = 4242


async def _old_connection(old: Any) -> int:
    """An app 'app-old' and its user alice's connection (cap 1000 nanos), written as a
    previous version wrote them, on its own connection ``old``."""
    await old.execute("INSERT INTO apps (app_id, name, secret_hash, created_at) "
                      "VALUES ('app-old', 'Old', 'hash', $1)", NOW)
    cid: int = await old.fetchval(
        "INSERT INTO connections (app_id, app_user_id, state, cap_nanos, sealed_key, "
        "browser_hash, created_at, updated_at) VALUES ('app-old', 'alice', $1, 1000, "
        "'sealed', 'b', $2, $2) RETURNING connection_id", ACTIVE, NOW)
    return cid


async def test_a_schema_2_ledger_with_live_holds_migrates_to_3(open_store) -> None:
    """A ledger a previous version serves (schema 2), with calls in flight on a living
    process, takes migration 3 under it: the old holds narrow the new admission function's
    cap, are not swept while their owner lives, and settle and sweep as before after."""
    from wattgate.store.pg_migrations import MIGRATIONS, migrate, schema_version

    async with fresh_database() as url:
        old = await asyncpg.connect(url)
        try:
            assert await migrate(old, upto=2) == 2
            # The previous version's process: its owner lock held, its heartbeat, its rows.
            await old.execute("SELECT pg_advisory_lock($1)", OLD_OWNER)
            await old.execute("INSERT INTO owners (owner, last_seen) "
                              "VALUES ($1, extract(epoch FROM clock_timestamp()))", OLD_OWNER)
            cid = await _old_connection(old)
            await old.execute("INSERT INTO periods (connection_id, period, spent_nanos) "
                              "VALUES ($1, $2, 200)", cid, PERIOD)
            await old.execute("INSERT INTO usage (generation_id, app_id, connection_id, "
                              "period, model, prompt_tokens, completion_tokens, cost_nanos, "
                              "provisional, status, latency_ms, created_at) VALUES ('gen-past', "
                              "'app-old', $1, $2, 'm', 1, 1, 200, FALSE, 'ok', 5, $3)",
                              cid, PERIOD, NOW)
            for gen in ("gen-named", None):
                await old.execute(
                    "INSERT INTO holds (owner, connection_id, app_id, period, amount_nanos, "
                    "generation_id, model, created_at, expires_at) VALUES ($1, $2, "
                    "'app-old', $3, 300, $4, 'm', $5, $6)", OLD_OWNER, cid, PERIOD, gen, NOW,
                    NOW + 600)

            new = await open_store(url)
            assert await schema_version(old) == len(MIGRATIONS)  # 3 and every later one
            with pytest.raises(BudgetExceeded):  # 200 spent + 600 held + 201 > 1000
                await new.admit(cid, PERIOD, 201, now=NOW, expires_at=NOW + 60)
            hold = await new.admit(cid, PERIOD, 200, now=NOW, expires_at=NOW + 60)
            assert await new.sweep_holds() == 0  # their process lives
        finally:
            await old.close()  # it dies: its owner lock is gone
        new.owner_grace = 0.0

        async def swept() -> bool:
            return await new.sweep_holds() == 2
        await _until(swept, "the dead previous-version process's holds being swept")
        # Its named call became a provisional row at its estimate; the final figure corrects it.
        assert await new.period_spent(cid, PERIOD) == 500
        assert await new.settle(None, _usage(cid, "app-old", "gen-named", 250), PERIOD)
        assert await new.settle(hold, _usage(cid, "app-old", "gen-new", 150), PERIOD)
        assert await new.period_spent(cid, PERIOD) == 200 + 250 + 150
        assert await new.held(cid) == 0
        assert await new.check(now=NOW, hold_ttl=600) == []


async def test_a_schema_3_ledger_takes_the_outbox_settle_and_its_batches_tell_once(
        open_store) -> None:
    """A ledger the hot path's version serves (schema 3: ``wattgate_settle`` without the
    outbox, a provisional row recorded by it) migrates to 4: the function is replaced in
    place, and the next batch, mixing that row's final figure with new calls that cross
    80 % together, writes one threshold event with the batch's spend."""
    from wattgate.store.pg_migrations import migrate

    async with fresh_database() as url:
        old = await asyncpg.connect(url)
        try:
            assert await migrate(old, upto=3) == 3
            cid = await _old_connection(old)
            counted = await old.fetchval(
                "SELECT wattgate_settle(ARRAY[NULL]::bigint[], ARRAY['gen-est'], "
                "ARRAY['app-old'], ARRAY[$1]::bigint[], ARRAY[NULL]::bigint[], ARRAY[$2], "
                "ARRAY['m'], ARRAY[0]::bigint[], ARRAY[0]::bigint[], ARRAY[500]::bigint[], "
                "ARRAY[TRUE], ARRAY['swept'], ARRAY[0]::bigint[], ARRAY[$3]::float8[])",
                cid, PERIOD, NOW)
            assert counted == [True]
        finally:
            await old.close()
        new = await open_store(url)
        assert await new.set_webhook("app-old", "https://example.test/h", "sealed-secret")
        results = await asyncio.gather(
            new.settle(None, _usage(cid, "app-old", "gen-est", 600), PERIOD),  # 500 → 600
            *(new.settle(None, _usage(cid, "app-old", f"gen-{i}", 50), PERIOD)
              for i in range(4)))  # 600 → 800: 80 % of 1000, reached together
        assert results == [True] * 5
        assert await new.period_spent(cid, PERIOD) == 800
        events = await new.recent_webhooks("app-old")
        assert [(e.type, json.loads(e.body)["data"]["spentUsd"]) for e in events] == [
            ("budget.threshold", "0.0000008")]
        assert await new.check(now=NOW, hold_ttl=600) == []


async def test_settles_committing_during_admissions_never_let_the_cap_pass(open_store) -> None:
    """A settle drops its hold and moves its spend in one transaction; an admission on
    another process that read spent before that commit and held after it would count the
    call in neither, and pass the cap by its amount. Rounds of settles committing one by
    one while admissions hammer the same connection: never more admitted than the cap
    leaves room for (one call a round)."""
    settler, admitter = await open_store(), await open_store()
    amount, rounds, passed_over = 100, 120, []
    for n in range(rounds):
        cid = await _connected(settler, cap=10 * amount)
        app = (await settler.get_connection_by_id(cid)).app_id  # type: ignore[union-attr]
        first = [await settler.admit(cid, PERIOD, amount, now=NOW, expires_at=NOW + 60)
                 for _ in range(9)]
        done = asyncio.Event()
        admitted = 0

        async def settle_one_by_one() -> None:
            for i, h in enumerate(first):
                await settler.settle(h, _usage(cid, app, f"g{n}-{i}", amount), PERIOD)
            done.set()

        async def hammer() -> None:
            nonlocal admitted
            while not done.is_set():
                try:
                    await admitter.admit(cid, PERIOD, amount, now=NOW, expires_at=NOW + 60)
                    admitted += 1
                except BudgetExceeded:
                    pass
        await asyncio.gather(settle_one_by_one(), *(hammer() for _ in range(4)))
        if admitted > 1:
            passed_over.append((n, admitted))
        assert await settler.period_spent(cid, PERIOD) == 9 * amount
    assert passed_over == [], f"rounds where the cap was passed: {passed_over}"
