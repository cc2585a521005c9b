"""``wattgate ledger check``: passes on a healthy ledger, names the row on every broken one.

A healthy ledger is made through the running gateway (calls, grants, a
revocation, an app deletion); each broken one is then made with SQL on the
same database, as an attacker or a bug would leave it: the SQLite file, or with
``--backend postgresql`` the PostgreSQL database (``store/pg_audit.py``'s
sentences are ``store/audit.py``'s).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from ledgerdb import LedgerDatabase

import pytest
from test_grants_functional import grant_from_connection, mint_grant, redeem

USD = 1_000_000_000


async def chat(h, app, user, model="openai/gpt-4o-mini"):  # type: ignore[no-untyped-def]
    async with h.http.post(
            h.api + "/chat/completions",
            json={"model": model, "stream": True, "messages": [{"role": "user", "content": "hi"}]},
            headers={"Authorization": f"Bearer {app.secret_key}", "x-wattfare-user": user}) as r:
        assert r.status == 200, await r.text()
        await r.read()


async def revoke(h, app, user) -> None:  # type: ignore[no-untyped-def]
    token = await h.session(app, user)
    async with h.http.delete(h.api + "/connections",
                             headers={"Authorization": f"Bearer {token}"}) as r:
        assert r.status == 204


@dataclass
class Ledger:
    """Ids of the healthy ledger's rows, for the cases to break."""

    db: LedgerDatabase
    now: float        # the gateway's clock when it was made
    app: str          # a live app
    other_app: str    # another live app
    ann: int          # ann's connection (live app, $1 cap), with calls
    ben: int          # another app's user
    funded_grant: int  # a grant funded by ann's connection, used once
    gen: str          # one of ann's settled generations
    period: str

    async def one(self, sql: str, *params: object) -> object:
        return await self.db.one(sql, *params)

    async def run(self, sql: str, *params: object) -> list[tuple[object, ...]]:
        return await self.db.query(sql, *params)


async def healthy(h) -> Ledger:  # type: ignore[no-untyped-def]
    app, other, gone = [await h.create_app(n) for n in ("Live", "Other", "Gone")]
    await h.connect(app, "ann", monthly_usd=1)
    await h.connect(other, "ben", monthly_usd=5)
    await h.connect(gone, "gia")
    for a, user in ((app, "ann"), (app, "ann"), (other, "ben"), (gone, "gia")):
        await chat(h, a, user)
    grant = await grant_from_connection(h, app, "ann2", monthly_usd=2, requests=2)
    assert (await redeem(h, app, grant["grantToken"]))[0] == 200
    status, own = await mint_grant(h, other, requests=3, max_usd=1)
    assert status == 200
    assert (await redeem(h, other, own["grantToken"]))[0] == 200
    assert (await redeem(h, other, own["grantToken"], model="fake/fail-500"))[0] == 502
    await h.connect(other, "cyd")
    await chat(h, other, "cyd", model="fake/no-usage")  # provisional, then reconciled on revoke
    await revoke(h, other, "cyd")
    await h.gw.store.delete_app(gone.app_id, now=h.clock())
    db = h.db
    ids = {u: await db.one("SELECT connection_id FROM connections WHERE app_user_id = ?", u)
           for u in ("ann", "ann2", "ben")}
    return Ledger(
        db, h.clock(), app.app_id, other.app_id, ids["ann"], ids["ben"],
        await db.one("SELECT grant_id FROM grants WHERE connection_id = ?", ids["ann2"]),
        await db.one("SELECT generation_id FROM usage WHERE connection_id = ? LIMIT 1",
                     ids["ann"]),
        await db.one("SELECT period FROM periods LIMIT 1"))


async def debit(lg: Ledger, gen: str, app: str, cid: int | None, cost: int,
                grant: int | None = None) -> None:
    """A usage row with its aggregate moved, so the sums agree and only the rule is broken."""
    await lg.run("INSERT INTO usage (generation_id, app_id, connection_id, grant_id, period, "
                 "model, prompt_tokens, completion_tokens, cost_nanos, created_at) "
                 "VALUES (?, ?, ?, ?, ?, 'm', 1, 1, ?, ?)",
                 gen, app, cid, grant, lg.period, cost, lg.now + 60)
    if cid is not None:
        await lg.run("INSERT INTO periods VALUES (?, ?, ?) ON CONFLICT (connection_id, period) "
                     "DO UPDATE SET spent_nanos = periods.spent_nanos + excluded.spent_nanos",
                     cid, lg.period, cost)


async def hold(lg: Ledger, cid: int | None, amount: int, gen: str | None, *,
               hold_id: int | None = None, app: str | None = None,
               grant: int | None = None) -> int:
    row: dict[str, object] = {
        "connection_id": cid, "grant_id": grant, "period": lg.period, "amount_nanos": amount,
        "created_at": lg.now, "expires_at": lg.now + 900, "generation_id": gen,
        "app_id": app or lg.app, "model": "m"}
    overriding = ""
    if lg.db.backend == "postgresql":
        row["owner"] = 1  # a hold there belongs to its process's database connection
        overriding = "OVERRIDING SYSTEM VALUE " if hold_id is not None else ""
    if hold_id is not None:
        row["hold_id"] = hold_id
    return int(await lg.one(  # type: ignore[call-overload]
        f"INSERT INTO holds ({', '.join(row)}) {overriding}"
        f"VALUES ({', '.join('?' * len(row))}) RETURNING hold_id", *row.values()))


async def over_cap(lg: Ledger) -> str:  # $5 spent on a $1 cap
    await debit(lg, "gen-big", lg.app, lg.ann, 5 * USD)
    return f"connection {lg.ann} period {lg.period}: spent"


async def aggregate_off(lg: Ledger) -> str:
    await lg.run("UPDATE periods SET spent_nanos = spent_nanos + 1 WHERE connection_id = ?",
                 lg.ben)
    return f"connection {lg.ben} period {lg.period}: aggregate"


async def another_apps_spend(lg: Ledger) -> str:  # one app's row charged to another's user
    await debit(lg, "gen-foreign", lg.other_app, lg.ann, 1)
    rid = await lg.one("SELECT usage_id FROM usage WHERE generation_id = 'gen-foreign'")
    return f"usage row {rid} (gen-foreign): connection {lg.ann} belongs to app {lg.app}"


async def row_of_missing_connection(lg: Ledger) -> str:
    await debit(lg, "gen-orphan", lg.app, 10_000, 1)
    rid = await lg.one("SELECT usage_id FROM usage WHERE generation_id = 'gen-orphan'")
    return f"usage row {rid} (gen-orphan): connection 10000 does not exist"


async def connection_deleted_under_its_rows(lg: Ledger) -> str:
    await lg.run("DELETE FROM connections WHERE connection_id = ?", lg.ben)
    return f"connection {lg.ben} period {lg.period}: connection {lg.ben} does not exist"


async def row_of_missing_grant(lg: Ledger) -> str:
    await debit(lg, "gen-nogrant", lg.app, None, 1, grant=10_000)
    rid = await lg.one("SELECT usage_id FROM usage WHERE generation_id = 'gen-nogrant'")
    return f"usage row {rid} (gen-nogrant): grant 10000 does not exist"


async def row_of_missing_app(lg: Ledger) -> str:
    await debit(lg, "gen-noapp", "app0000000000000000", None, 1)
    rid = await lg.one("SELECT usage_id FROM usage WHERE generation_id = 'gen-noapp'")
    return f"usage row {rid} (gen-noapp): app app0000000000000000 does not exist"


async def leaked_hold(lg: Ledger) -> str:  # the call settled, its hold stayed
    hid = await hold(lg, lg.ann, USD // 10, lg.gen)
    return f"hold {hid}: its call {lg.gen} was already settled"


async def hold_without_call(lg: Ledger) -> str | None:
    hid = await hold(lg, lg.ann, USD // 10, None)
    if lg.db.backend == "postgresql":
        # Holds live in the database from admission there: this is a call in flight.
        return None
    return f"hold {hid}: no call behind it"


async def phantom_hold(lg: Ledger) -> str:  # the id a hold in memory used to have
    await hold(lg, lg.ann, USD // 10, None, hold_id=-2)
    return "hold -2: not an id of the ledger's sequence"


async def hold_of_missing_connection(lg: Ledger) -> str:
    hid = await hold(lg, 10_001, 1, "gen-x")
    return f"hold {hid}: connection 10001 does not exist"


async def old_hold(lg: Ledger) -> str:
    hid = await hold(lg, lg.ann, 1, "gen-old")
    await lg.run("UPDATE holds SET created_at = created_at - 100000 WHERE hold_id = ?", hid)
    return f"hold {hid} is "


async def grant_used_off(lg: Ledger) -> str:
    await lg.run("UPDATE grants SET used = used + 1 WHERE grant_id = ?", lg.funded_grant)
    return f"grant {lg.funded_grant}: 2 requests used but 1 calls recorded"


async def grant_spend_off(lg: Ledger) -> str:
    await lg.run("UPDATE grants SET spent_nanos = 0 WHERE grant_id = ?", lg.funded_grant)
    return f"grant {lg.funded_grant}: spent 0/held 0 but rows sum to"


async def grant_over_its_cap(lg: Ledger) -> str:
    gid = await lg.one("SELECT grant_id FROM grants WHERE max_nanos IS NOT NULL")
    await debit(lg, "gen-greedy", lg.other_app, None, 2 * USD, grant=gid)  # type: ignore[arg-type]
    await lg.run("UPDATE grants SET spent_nanos = spent_nanos + ?, used = used + 1 "
                 "WHERE grant_id = ?", 2 * USD, gid)
    return f"grant {gid}: spent"


async def deleted_app_revived(lg: Ledger) -> str:
    cid = await lg.one("SELECT connection_id FROM connections WHERE app_user_id = 'gia'")
    await lg.run("UPDATE connections SET state = 'active', sealed_key = 'v1.k1.x' "
                 "WHERE connection_id = ?", cid)
    return f"connection {cid}: app "


BROKEN: list[Callable[[Ledger], Awaitable[str | None]]] = [
    over_cap, aggregate_off, another_apps_spend, row_of_missing_connection,
    connection_deleted_under_its_rows, row_of_missing_grant, row_of_missing_app, leaked_hold,
    hold_without_call, phantom_hold, hold_of_missing_connection, old_hold, grant_used_off,
    grant_spend_off, grant_over_its_cap, deleted_app_revived,
]


async def test_a_healthy_ledger_passes_after_deletions_revocations_and_grants(harness):
    lg = await healthy(harness)
    assert await lg.one("SELECT COUNT(*) FROM apps WHERE deleted_at IS NOT NULL") == 1
    assert await lg.one("SELECT COUNT(*) FROM connections WHERE state = 'revoked'") == 2
    assert await harness.gw.store.check(now=harness.clock(), hold_ttl=900) == []


@pytest.mark.parametrize("damage", BROKEN, ids=[f.__name__ for f in BROKEN])
async def test_check_names_the_row_of_each_broken_ledger(harness, damage):
    lg = await healthy(harness)
    expected = await damage(lg)
    problems = await harness.gw.store.check(now=harness.clock(), hold_ttl=900)
    if expected is None:  # not damage on this backend
        assert problems == []
    else:
        assert any(p.startswith(expected) for p in problems), (expected, problems)


async def test_the_command_exits_1_and_prints_the_rows(harness):
    lg = await healthy(harness)

    async def check() -> subprocess.CompletedProcess:
        return await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "wattgate", "ledger", "check"],
            env=harness.db.env, capture_output=True, text=True, timeout=60, check=False)
    ok = await check()
    assert ok.returncode == 0 and "ledger ok" in ok.stdout, ok.stdout + ok.stderr
    wanted = [await over_cap(lg), await leaked_hold(lg), await another_apps_spend(lg)]
    bad = await check()
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    lines = bad.stdout.splitlines()
    for expected in wanted:
        assert any(line.startswith("ledger: " + expected) for line in lines), (expected, lines)
    assert "ledger check failed" in bad.stderr


async def test_check_upstream_compares_recent_calls_with_what_the_provider_billed(harness):
    app = await harness.create_app()
    await harness.connect(app, "dee")
    for _ in range(3):
        await chat(harness, app, "dee")
    env = {**harness.db.env, "WATTGATE_UPSTREAM__BASE_URL": harness.fake.base_url}

    async def check() -> subprocess.CompletedProcess:
        # In a thread: the fake upstream it asks is served by this test's event loop.
        return await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "wattgate", "ledger", "check", "--upstream"],
            env=env, capture_output=True, text=True, timeout=60, check=False)
    ok = await check()
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "compared 3 calls with the upstream (0 it could not" in ok.stdout
    # A row (and its month, so the sums agree) that says less than the provider billed.
    [(usage_id, gen)] = await harness.db.query(
        "SELECT usage_id, generation_id FROM usage LIMIT 1")
    await harness.db.query("UPDATE usage SET cost_nanos = cost_nanos - 1 WHERE usage_id = ?",
                           usage_id)
    await harness.db.query("UPDATE periods SET spent_nanos = spent_nanos - 1")
    bad = await check()
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert f"ledger: usage row {usage_id} ({gen}): ledger " in bad.stdout
    assert "but the upstream billed" in bad.stdout


@pytest.mark.sqlite  # on PostgreSQL: test_store_postgres.py's admission test
async def test_a_cap_lowered_below_the_spend_is_no_false_alarm_but_spend_after_it_is(tmp_path):
    from wattgate.store import ACTIVE, SQLiteStore, Usage

    t, period = 1_800_000_000.0, "2027-01"
    store = SQLiteStore.open(tmp_path / "w.db")

    def row(gen: str, cid: int, cost: int, at: float) -> Usage:
        return Usage(gen, "app0123456789abcdef", cid, None, "m", 1, 1, cost, False, "ok", 1, at)
    try:
        await store.create_app("app0123456789abcdef", "A", "h", ["http://localhost:3000"], now=t)
        c = await store.save_connection("app0123456789abcdef", "u", state=ACTIVE,
                                        cap_nanos=10 * USD, sealed_key="k", browser_hash=None,
                                        now=t)
        done = await store.admit(c.connection_id, period, 3 * USD, now=t, expires_at=t + 900)
        await store.settle(done, row("g1", c.connection_id, 3 * USD, t + 1), period)
        flying = await store.admit(c.connection_id, period, 2 * USD, now=t + 2,
                                   expires_at=t + 902)
        assert await store.update_cap(c.connection_id, USD, expected_key="k",
                                      expected_cap=10 * USD, now=t + 3)
        await store.settle(flying, row("g2", c.connection_id, 2 * USD, t + 4), period)
        assert await store.check(now=t + 5, hold_ttl=900) == []  # $5 on a cap lowered to $1
        # A debit that bypassed admission long after the change is reported.
        await store.settle(None, row("g3", c.connection_id, USD, t + 1000), period)
        expected = (f"connection {c.connection_id} period {period}: spent {6 * USD} nano-USD "
                    f"on a cap of {USD}")
        assert await store.check(now=t + 1001, hold_ttl=900) == [expected]
    finally:
        await store.close()
