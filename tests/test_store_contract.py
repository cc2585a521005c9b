"""The ledger contract (``wattgate.store.contract.Ledger``), on every backend.

A new engine passes this file or it is not a ledger. Every test here speaks
only the contract's methods and the rows of ``wattgate.store.records`` (and
the report rows the contract returns), never a backend's tables, files or
caches: the ``ledger`` fixture runs each test on SQLite and on PostgreSQL (a
fresh database of its own, ``tests/pg.py``), and ``place.open()`` opens
another instance on the same ledger (another process, the CLI, a restart).

Each scenario ends with ``consistent``: the audit (``check``) finds nothing,
every connection's period aggregate equals the sum of its usage rows, and every
grant's spent, held and used figures agree with its rows and holds.

What a test is only run on PostgreSQL (``parametrize("ledger", ["postgresql"],
indirect=True)``) is what SQLite does not promise: several OS processes
admitting on one ledger, a token bucket or a console session shared between
instances, leadership moving between instances.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import json
import secrets
import sys
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from wattgate.errors import BudgetExceeded, ConsentRequired, GrantInvalid, NotConnected
from wattgate.ledger import period_bounds, period_of
from wattgate.store.contract import Ledger
from wattgate.store.records import (ACTIVE, NEEDS_RECONNECT, REVOKED, App, AppPolicy, Connection,
                                   Grant, Hold, Usage)

USD = 1_000_000_000
T = 1_800_000_000.0  # 2027-01-15T08:00:00Z
PERIOD = period_of(T)  # "2027-01"
NEXT = "2027-02"
TTL = 900.0
BACKENDS = ["sqlite", "postgresql"]


# ---- opening a backend ---------------------------------------------------------

async def open_at(kind: str, where: str) -> Ledger:
    """A store on the ledger at ``where``: through ``open_store(config)`` once it takes
    a config (the one way the gateway and the CLI open it), else the backend's own
    ``open``."""
    from wattgate import store as store_package

    if inspect.iscoroutinefunction(store_package.open_store):
        from wattgate.config import load_config

        key = "WATTGATE_DATABASE__URL" if kind == "postgresql" else "WATTGATE_DATABASE__PATH"
        opened: Ledger = await store_package.open_store(load_config(None, env={key: where}))
        return opened
    if kind == "sqlite":
        from wattgate.store.sqlite import SQLiteStore

        return SQLiteStore.open(Path(where))  # type: ignore[return-value]
    from wattgate.store.postgres import PostgresStore  # type: ignore[import-not-found,unused-ignore]

    return await PostgresStore.open(where)  # type: ignore[no-any-return]


@dataclasses.dataclass
class Place:
    """Where a test's ledger lives; every store opened on it is closed after the test."""

    kind: str
    where: str
    opened: list[Ledger] = dataclasses.field(default_factory=list)
    closed: set[int] = dataclasses.field(default_factory=set)

    async def open(self) -> Ledger:
        store = await open_at(self.kind, self.where)
        self.opened.append(store)
        return store

    async def close(self, store: Ledger) -> None:
        self.closed.add(id(store))
        await store.close()

    async def close_all(self) -> None:
        for store in reversed(self.opened):
            if id(store) not in self.closed:
                await self.close(store)


PLACE = pytest.StashKey[Place]()


@pytest.fixture(params=BACKENDS)
async def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Ledger]:
    if request.param == "sqlite":
        place = Place("sqlite", str(tmp_path / "ledger.db"))
    else:
        place = Place("postgresql", request.getfixturevalue("pg_url"))
    request.node.stash[PLACE] = place
    try:
        yield await place.open()
    finally:
        await place.close_all()


@pytest.fixture
def place(request: pytest.FixtureRequest, ledger: Ledger) -> Place:
    """The test's ledger, to open more instances on it."""
    return request.node.stash[PLACE]


pg_only = pytest.mark.parametrize("ledger", ["postgresql"], indirect=True)


# ---- helpers -------------------------------------------------------------------

async def new_app(ledger: Ledger) -> App:
    return await ledger.create_app("app" + secrets.token_hex(8), "Demo", "hash-" + secrets.token_hex(4),
                                   ["http://localhost:3000"], now=T)


async def funded(ledger: Ledger, app: App, user: str = "u", cap: int | None = 10 * USD,
                 browser: str | None = "browser-1") -> Connection:
    return await ledger.save_connection(app.app_id, user, state=ACTIVE, cap_nanos=cap,
                                        sealed_key=f"v1.k1.sealed-{user}", browser_hash=browser,
                                        now=T)


def usage(gen: str, app: App, connection_id: int | None, cost: int, *, grant_id: int | None = None,
          provisional: bool = False, at: float = T) -> Usage:
    return Usage(gen, app.app_id, connection_id, grant_id, "openai/gpt-4o-mini", 10, 20, cost,
                 provisional, "ok", 5, at)


def billed(hold: Hold, app: App, gen: str, cost: int, **kw: Any) -> Usage:
    return usage(gen, app, hold.connection_id, cost, grant_id=hold.grant_id, **kw)


async def admit(ledger: Ledger, c: Connection, amount: int, period: str = PERIOD,
                now: float = T) -> Hold:
    return await ledger.admit(c.connection_id, period, amount, now=now, expires_at=now + TTL)


async def connection_grant(ledger: Ledger, app: App, c: Connection, requests: int,
                           max_nanos: int | None = None) -> Grant:
    return await ledger.create_grant(app.app_id, "tok-" + secrets.token_hex(8), requests, max_nanos,
                                     sealed_key=None, connection_id=c.connection_id, now=T,
                                     expires_at=T + 600, approved_by=c.browser_hash)


async def typed_grant(ledger: Ledger, app: App, requests: int,
                      max_nanos: int | None = None) -> Grant:
    return await ledger.create_grant(app.app_id, "tok-" + secrets.token_hex(8), requests, max_nanos,
                                     sealed_key="v1.k1.typed", connection_id=None, now=T,
                                     expires_at=T + 600)


async def rows_of(ledger: Ledger, connection_id: int) -> list[Usage]:
    return await ledger.recent_usage(connection_id, 100_000)


async def consistent(ledger: Ledger, *apps: App, in_flight: bool = False) -> None:
    """The ledger agrees with itself: the audit, and every aggregate against its rows."""
    assert await ledger.check(now=T + 60, hold_ttl=TTL) == []
    for app in apps:
        lines = [line async for page in ledger.usage_lines(app.app_id) for line in page]
        assert len({line.generation_id for line in lines}) == len(lines), "a call counted twice"
        for c in await ledger.connections_for_app(app.app_id):
            by_period: dict[str, int] = defaultdict(int)
            for row in await rows_of(ledger, c.connection_id):
                by_period[period_of(row.created_at)] += row.cost_nanos
            for period in {PERIOD, NEXT, *by_period}:
                assert await ledger.period_spent(c.connection_id, period) == by_period[period], \
                    (c.connection_id, period)
            if not in_flight:
                assert await ledger.held(c.connection_id) == 0
        for g in await ledger.grants_for_app(app.app_id):
            assert g.spent_nanos == sum(line.cost_nanos for line in lines
                                        if line.grant_id == g.grant_id), g
            assert 0 <= g.used <= g.requests, g
            if not in_flight:
                assert g.held_nanos == 0, g
    if not in_flight:
        assert await ledger.open_holds() == 0


async def eventually(predicate: Any, *, seconds: float = 5.0) -> bool:
    """Poll ``predicate`` (async) until true or ``seconds`` pass (never a fixed sleep)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while True:
        if await predicate():
            return True
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.02)


# ---- basics ----------------------------------------------------------------------

async def test_the_store_says_what_it_is_and_answers(ledger, request):
    assert isinstance(ledger, Ledger)
    assert ledger.kind == request.node.callspec.params["ledger"]
    assert await ledger.ping() is True
    assert await ledger.holds_apps() is False
    await new_app(ledger)
    assert await ledger.holds_apps() is True


async def test_apps_origins_and_secrets_round_trip(ledger):
    app = await ledger.create_app("app" + "a" * 16, "Demo", "h1",
                                  ["https://a.example", "https://a.example", "http://localhost:3000"],
                                  now=T)
    assert set(app.origins) == {"https://a.example", "http://localhost:3000"}
    got = await ledger.get_app(app.app_id)
    assert got is not None and (got.name, got.secret_hash, got.created_at) == ("Demo", "h1", T)
    assert [a.app_id for a in await ledger.list_apps()] == [app.app_id]
    assert await ledger.set_app_secret(app.app_id, "h2")
    assert (await ledger.get_app(app.app_id)).secret_hash == "h2"  # type: ignore[union-attr]
    assert not await ledger.set_app_secret("app" + "0" * 16, "h3")
    assert await ledger.set_origins(app.app_id, add=["https://b.example"], remove=["https://a.example"])
    assert await ledger.origin_registered("https://b.example")
    assert not await ledger.origin_registered("https://a.example")
    assert await ledger.get_app("app" + "0" * 16) is None


async def test_a_rotation_with_overlap_keeps_exactly_one_previous_secret(ledger, place):
    app = await ledger.create_app("app" + "b" * 16, "Roll", "h1", ["https://r.example"], now=T)
    assert (app.previous_secret_hash, app.previous_until) == (None, None)
    assert await ledger.set_app_secret(app.app_id, "h2", keep_previous_until=T + 100)
    got = await ledger.get_app(app.app_id)
    assert got is not None and (got.secret_hash, got.previous_secret_hash,
                                got.previous_until) == ("h2", "h1", T + 100)
    # A second rotation during the overlap: the oldest secret is dropped, never three.
    assert await ledger.set_app_secret(app.app_id, "h3", keep_previous_until=T + 200)
    other = await place.open()  # another process sees the same, in get and list
    for seen in (await other.get_app(app.app_id), (await other.list_apps())[0]):
        assert seen is not None and (seen.secret_hash, seen.previous_secret_hash,
                                     seen.previous_until) == ("h3", "h2", T + 200)
    assert await other.retire_previous_secret(app.app_id)
    got = await ledger.get_app(app.app_id)
    assert got is not None and (got.secret_hash, got.previous_secret_hash,
                                got.previous_until) == ("h3", None, None)
    assert not await ledger.retire_previous_secret(app.app_id)  # nothing left to retire
    # An immediate rotation (a leaked secret) ends an overlap in progress too.
    assert await ledger.set_app_secret(app.app_id, "h4", keep_previous_until=T + 300)
    assert await ledger.set_app_secret(app.app_id, "h5")
    got = await ledger.get_app(app.app_id)
    assert got is not None and (got.secret_hash, got.previous_secret_hash,
                                got.previous_until) == ("h5", None, None)
    # Deleting an app during an overlap takes both secrets; nothing brings them back.
    assert await ledger.set_app_secret(app.app_id, "h6", keep_previous_until=T + 400)
    assert await ledger.delete_app(app.app_id, now=T + 1)
    tomb = await ledger.get_app(app.app_id, deleted=True)
    assert tomb is not None and (tomb.secret_hash, tomb.previous_secret_hash,
                                 tomb.previous_until) == ("", None, None)
    assert not await ledger.set_app_secret(app.app_id, "h7", keep_previous_until=T + 500)
    assert not await ledger.retire_previous_secret(app.app_id)
    tomb = await ledger.get_app(app.app_id, deleted=True)
    assert tomb is not None and (tomb.secret_hash, tomb.previous_secret_hash) == ("", None)
    assert not await ledger.retire_previous_secret("app" + "0" * 16)
async def test_an_apps_policy_round_trips_exactly_and_clears(ledger, place):
    app = await new_app(ledger)
    assert app.policy == AppPolicy() and (await ledger.get_app(app.app_id)).policy.empty
    # Amounts far past a float's 53 bits and a nano-dollar: kept exactly.
    policy = AppPolicy(("openai/*", "anthropic/claude-3.5-sonnet"), 123_456_789_012_345_678,
                       4096, 1)
    saved = await ledger.set_app_policy(app.app_id, policy)
    assert saved is not None and saved.policy == policy and saved.secret_hash == app.secret_hash
    assert (await ledger.get_app(app.app_id)).policy == policy  # type: ignore[union-attr]
    assert [a.policy for a in await ledger.list_apps()] == [policy]
    reopened = await place.open()  # another process, the CLI, a restart
    assert (await reopened.get_app(app.app_id)).policy == policy  # type: ignore[union-attr]
    cleared = await ledger.set_app_policy(app.app_id, AppPolicy())
    assert cleared is not None and cleared.policy == AppPolicy()
    assert [a.policy for a in await reopened.list_apps()] == [AppPolicy()]
    assert await ledger.set_app_policy("app" + "0" * 16, policy) is None  # no such app
    await ledger.delete_app(app.app_id, now=T)
    assert await ledger.set_app_policy(app.app_id, policy) is None  # nor a deleted one


async def test_a_connection_is_keyed_by_app_and_user(ledger):
    app = await new_app(ledger)
    seen: list[int] = []

    def seal(cid: int) -> str:
        seen.append(cid)
        return f"sealed-for-{cid}"
    a = await ledger.save_connection(app.app_id, "u1", state=ACTIVE, cap_nanos=USD, sealed_key=None,
                                     browser_hash="b", now=T, seal=seal)
    assert seen == [a.connection_id] and a.sealed_key == f"sealed-for-{a.connection_id}"
    again = await ledger.save_connection(app.app_id, "u1", state=ACTIVE, cap_nanos=2 * USD,
                                         sealed_key=a.sealed_key, browser_hash="b", now=T + 1)
    assert again.connection_id == a.connection_id
    got = await ledger.get_connection(app.app_id, "u1")
    assert got is not None and got.cap_nanos == 2 * USD and got.connected
    assert (got.created_at, got.updated_at) == (T, T + 1)
    assert [c.app_user_id for c in await ledger.connections_for_browser("b")] == ["u1"]
    assert await ledger.get_connection_by_id(a.connection_id) == got
    # A cap change based on a stale read of the key is refused.
    assert await ledger.update_cap(a.connection_id, USD, expected_key="stale",
                                   expected_cap=2 * USD, now=T + 2) is None
    # Nor one judged against a cap that has moved since it was read (a lowering by the
    # user is not undone by an app's stale "unchanged" cap), unlimited included.
    assert await ledger.update_cap(a.connection_id, USD, expected_key=a.sealed_key,
                                   expected_cap=3 * USD, now=T + 2) is None
    assert await ledger.update_cap(a.connection_id, USD, expected_key=a.sealed_key,
                                   expected_cap=None, now=T + 2) is None
    assert (await ledger.get_connection_by_id(a.connection_id)).cap_nanos == 2 * USD
    updated = await ledger.update_cap(a.connection_id, None, expected_key=a.sealed_key,
                                      expected_cap=2 * USD, now=T + 2)
    assert updated is not None and updated.cap_nanos is None
    assert await ledger.update_cap(a.connection_id, USD, expected_key=a.sealed_key,
                                   expected_cap=2 * USD, now=T + 2) is None
    updated = await ledger.update_cap(a.connection_id, USD, expected_key=a.sealed_key,
                                      expected_cap=None, now=T + 2)
    assert updated is not None and updated.cap_nanos == USD


async def test_presence_rotates_at_once(ledger):
    assert not await ledger.has_presence("p1")
    await ledger.add_presence("p1", now=T)
    await ledger.add_presence("p1", now=T)
    await ledger.rotate_presence(["p1"], "p2", now=T + 1)
    assert not await ledger.has_presence("p1") and await ledger.has_presence("p2")


# ---- the cap under races -------------------------------------------------------

async def test_racing_admissions_never_pass_the_cap(ledger):
    """60 calls at once, each holding $0.70 of a $10 cap: exactly 14 fit, whatever the order."""
    app = await new_app(ledger)
    c = await funded(ledger, app, cap=10 * USD)
    amount = 7 * USD // 10

    async def call() -> Hold | None:
        try:
            return await admit(ledger, c, amount)
        except BudgetExceeded:
            return None
    holds = [h for h in await asyncio.gather(*(call() for _ in range(60))) if h is not None]
    assert len(holds) == 14
    assert len({h.hold_id for h in holds}) == 14
    assert await ledger.held(c.connection_id) == await ledger.held(c.connection_id, PERIOD) == 14 * amount
    assert await ledger.open_holds() == 14
    # Half are billed less than held, half never reached the model.
    results = await asyncio.gather(*(
        ledger.settle(h, billed(h, app, f"g{i}", amount // 2), PERIOD) if i % 2 else ledger.release(h)
        for i, h in enumerate(holds)))
    assert results.count(True) == 7
    assert await ledger.period_spent(c.connection_id, PERIOD) == 7 * (amount // 2)
    # What is left is all there again: a call of exactly the rest fits, one nano more does not.
    rest = 10 * USD - 7 * (amount // 2)
    with pytest.raises(BudgetExceeded):
        await admit(ledger, c, rest + 1)
    await ledger.release(await admit(ledger, c, rest))
    await consistent(ledger, app)


@pytest.mark.parametrize("cap, spent, held, amount", [
    (10 * USD, 0, 0, 10 * USD),              # exactly the cap, nothing spent
    (10 * USD, 3 * USD, 2 * USD, 5 * USD),   # spent + held + amount == cap
    (10 * USD, 3 * USD, 2 * USD, 5 * USD + 1),  # one nano over
    (10 * USD, 10 * USD, 0, 1),              # spent up to the cap
    (0, 0, 0, 0),                            # a zero cap, a free call
    (0, 0, 0, 1),
    (None, 9 * USD, 0, 10**17),              # no cap (the dev switch)
])
async def test_admission_decides_as_budget_cap_refusal_at_the_boundary(ledger, cap, spent, held,
                                                                        amount):
    """Each backend performs the check-and-hold (PostgreSQL inside ``wattgate_admit``), but
    what it decides must be ``budget.cap_refusal``'s: same inequality, same numbers."""
    from wattgate import budget

    app = await new_app(ledger)
    c = await funded(ledger, app, cap=cap)
    if spent:
        h = await ledger.admit(c.connection_id, PERIOD, spent, now=T, expires_at=T + TTL) \
            if cap is None or spent <= cap else None
        assert h is not None
        assert await ledger.settle(h, billed(h, app, "spent", spent), PERIOD) is True
    if held:
        await admit(ledger, c, held)
    expected = budget.cap_refusal(cap, spent, held, amount)
    if expected is None:
        hold = await admit(ledger, c, amount)
        assert hold.amount_nanos == amount
        assert await ledger.held(c.connection_id, PERIOD) == held + amount
    else:
        with pytest.raises(BudgetExceeded) as refused:
            await admit(ledger, c, amount)
        assert refused.value.shortfall == expected
        assert await ledger.held(c.connection_id, PERIOD) == held
    await consistent(ledger, app, in_flight=True)


async def racer(kind: str, where: str, mode: str, target: str, app_id: str, tasks: int,
                amount: int, tag: str) -> None:
    """One OS process of ``test_racing_admissions_across_processes``: open a store, say
    ready, wait for go, race ``tasks`` admissions, report and settle what it got."""
    store = await open_at(kind, where)
    loop = asyncio.get_running_loop()
    print("ready", flush=True)
    await loop.run_in_executor(None, sys.stdin.readline)

    async def one() -> Hold | None:
        try:
            if mode == "cap":
                return await store.admit(int(target), PERIOD, amount, now=T, expires_at=T + TTL)
            return (await store.admit_grant(target, app_id, PERIOD, amount, now=T,
                                            expires_at=T + TTL))[1]
        except (BudgetExceeded, GrantInvalid):
            return None
    holds = [h for h in await asyncio.gather(*(one() for _ in range(tasks))) if h is not None]
    print(json.dumps([h.hold_id for h in holds]), flush=True)
    app = App(app_id, "", "", (), T)
    for i, h in enumerate(holds):
        assert await store.settle(h, billed(h, app, f"{tag}-{i}", amount), PERIOD)
    await store.close()


async def race_processes(place: Place, mode: str, target: str, app_id: str, *, processes: int,
                         tasks: int, amount: int) -> list[int]:
    """Run ``processes`` racers at once; the hold ids they were granted, all of them."""
    here = Path(__file__).parent
    root = Path(inspect.getfile(Ledger)).parents[2]
    children = []
    for n in range(processes):
        code = (f"import sys, asyncio; sys.path[:0] = [{str(root)!r}, {str(here)!r}]\n"
                "from test_store_contract import racer\n"
                f"asyncio.run(racer({place.kind!r}, {place.where!r}, {mode!r}, {target!r}, "
                f"{app_id!r}, {tasks}, {amount}, 'p{n}'))\n")
        children.append(await asyncio.create_subprocess_exec(
            sys.executable, "-c", code, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE))
    for child in children:
        assert child.stdout is not None
        line = await asyncio.wait_for(child.stdout.readline(), 120)
        if line.strip() != b"ready":
            _, err = await child.communicate()
            raise AssertionError(f"a racer did not start: {line!r} {err.decode()[-2000:]}")
    for child in children:  # all open and waiting: go at once
        assert child.stdin is not None
        child.stdin.write(b"go\n")
        await child.stdin.drain()
    ids: list[int] = []
    for child in children:
        out, err = await asyncio.wait_for(child.communicate(), 300)
        assert child.returncode == 0, err.decode()[-2000:]
        ids += json.loads(out.decode().splitlines()[-1])
    return ids


@pg_only
async def test_racing_admissions_across_processes(ledger, place):
    """Three OS processes, each with its own store, race 15 admissions each on one cap:
    exactly as many pass as fit, and their settles are all counted."""
    app = await new_app(ledger)
    c = await funded(ledger, app, cap=10 * USD)
    amount = 6 * USD // 10
    ids = await race_processes(place, "cap", str(c.connection_id), app.app_id, processes=3,
                               tasks=15, amount=amount)
    assert len(ids) == len(set(ids)) == 16  # 16 × $0.60 ≤ $10 < 17 × $0.60
    assert await ledger.period_spent(c.connection_id, PERIOD) == 16 * amount
    await consistent(ledger, app)


@pg_only
async def test_a_grant_raced_across_processes_serves_exactly_its_count(ledger, place):
    app = await new_app(ledger)
    grant = await typed_grant(ledger, app, requests=11)
    ids = await race_processes(place, "grant", grant.token_hash, app.app_id, processes=3,
                               tasks=8, amount=USD // 100)
    assert len(ids) == len(set(ids)) == 11
    after = await ledger.get_grant_by_id(grant.grant_id)
    assert after is not None
    assert (after.used, after.held_nanos, after.spent_nanos) == (11, 0, 11 * (USD // 100))
    await consistent(ledger, app)


# ---- grants ----------------------------------------------------------------------

async def test_racing_grant_admissions_use_exactly_its_requests(ledger):
    app = await new_app(ledger)
    grant = await typed_grant(ledger, app, requests=7)

    async def call() -> Hold | None:
        try:
            return (await ledger.admit_grant(grant.token_hash, app.app_id, PERIOD, USD // 10,
                                             now=T, expires_at=T + TTL))[1]
        except GrantInvalid:
            return None
    holds = [h for h in await asyncio.gather(*(call() for _ in range(30))) if h is not None]
    assert len(holds) == 7 and all(h.grant_id == grant.grant_id for h in holds)
    g = await ledger.get_grant(grant.token_hash)
    assert g is not None and (g.used, g.held_nanos) == (7, 7 * (USD // 10))
    await consistent(ledger, app, in_flight=True)
    # Two were refused upstream before any byte: their requests come back (the gateway
    # never releases a grant's hold without the refund: ``check`` counts requests used
    # against calls recorded and in flight); the rest are billed.
    await ledger.release(holds[0], refund_request=True)
    await ledger.release(holds[1], refund_request=True)
    for i, h in enumerate(holds[2:]):
        assert await ledger.settle(h, billed(h, app, f"gg{i}", USD // 20), PERIOD)
    g = await ledger.get_grant(grant.token_hash)
    assert g is not None and (g.used, g.held_nanos, g.spent_nanos) == (5, 0, 5 * (USD // 20))
    # The two refunded requests can be used again, and no more.
    for i in range(2):
        _, h = await ledger.admit_grant(grant.token_hash, app.app_id, PERIOD, 1, now=T,
                                        expires_at=T + TTL)
        await ledger.settle(h, billed(h, app, f"again{i}", 1), PERIOD)
    with pytest.raises(GrantInvalid):
        await ledger.admit_grant(grant.token_hash, app.app_id, PERIOD, 1, now=T, expires_at=T + TTL)
    g = await ledger.get_grant(grant.token_hash)
    assert g is not None and (g.used, g.held_nanos) == (7, 0)
    await consistent(ledger, app)


async def test_a_grant_funded_by_a_connection_is_bounded_by_its_cap(ledger):
    app = await new_app(ledger)
    c = await funded(ledger, app, cap=5 * USD)
    grant = await connection_grant(ledger, app, c, requests=20)
    own = await admit(ledger, c, USD)  # the user's own call shares the cap

    async def call() -> Hold | None:
        try:
            return (await ledger.admit_grant(grant.token_hash, app.app_id, PERIOD, USD, now=T,
                                             expires_at=T + TTL))[1]
        except (BudgetExceeded, GrantInvalid):
            return None
    holds = [h for h in await asyncio.gather(*(call() for _ in range(12))) if h is not None]
    assert len(holds) == 4
    assert all(h.connection_id == c.connection_id for h in holds)
    assert await ledger.held(c.connection_id) == 5 * USD
    g = await ledger.get_grant_by_id(grant.grant_id)
    assert g is not None and g.used == 4  # a refused call uses no request
    for i, h in enumerate(holds):
        await ledger.settle(h, billed(h, app, f"cg{i}", USD), PERIOD)
    await ledger.release(own)
    assert await ledger.period_spent(c.connection_id, PERIOD) == 4 * USD
    g = await ledger.get_grant_by_id(grant.grant_id)
    assert g is not None and g.spent_nanos == 4 * USD
    await consistent(ledger, app)


async def test_a_grants_dollar_cap_counts_what_is_held(ledger):
    app = await new_app(ledger)
    grant = await typed_grant(ledger, app, requests=10, max_nanos=3 * USD)
    _, h1 = await ledger.admit_grant(grant.token_hash, app.app_id, PERIOD, 2 * USD, now=T,
                                     expires_at=T + TTL)
    with pytest.raises(GrantInvalid):
        await ledger.admit_grant(grant.token_hash, app.app_id, PERIOD, 2 * USD, now=T,
                                 expires_at=T + TTL)
    await ledger.settle(h1, billed(h1, app, "d1", USD), PERIOD)
    _, h2 = await ledger.admit_grant(grant.token_hash, app.app_id, PERIOD, 2 * USD, now=T,
                                     expires_at=T + TTL)
    await ledger.release(h2, refund_request=True)
    g = await ledger.get_grant_by_id(grant.grant_id)
    assert g is not None and (g.used, g.spent_nanos, g.held_nanos) == (1, USD, 0)
    await consistent(ledger, app)


# ---- settle, sweep and reconcile in any order ------------------------------------

async def named_hold(ledger: Ledger, app: App, c: Connection, gen: str, amount: int) -> Hold:
    hold = await admit(ledger, c, amount)
    named = ledger.note_generation(hold, gen, app.app_id, "openai/gpt-4o-mini")
    assert named is not None
    await named
    return hold


def rows_named(rows: list[Usage], gen: str) -> list[Usage]:
    return [r for r in rows if r.generation_id == gen]


@pytest.mark.parametrize("order", [
    "settle,settle,sweep,correct",
    "sweep,settle,settle,correct",
    "sweep,correct,settle,sweep",
    "settle_provisional,correct,correct,settle",
    "settle_provisional,settle,correct,sweep",
])
async def test_settle_is_idempotent_in_any_order_with_sweep_and_correct(ledger, order):
    """One call named upstream ($4 held, $3 billed, the upstream's figure $2.5): whatever
    the order settle, the sweep and the reconciler reach it, its row exists once, and
    its spend is the provisional estimate until a final figure replaces it, once."""
    app = await new_app(ledger)
    c = await funded(ledger, app)
    hold = await named_hold(ledger, app, c, "gen-x", 4 * USD)
    final = {"settle": 3 * USD, "correct": 5 * USD // 2}
    expected: int | None = None  # what the connection has spent after each step
    provisional = False  # whether the call's row (once there) is provisional
    for step in order.split(","):
        if step == "settle":
            await ledger.settle(hold, billed(hold, app, "gen-x", final["settle"]), PERIOD)
            if expected is None or provisional:
                expected = final["settle"]
        elif step == "settle_provisional":
            await ledger.settle(hold, billed(hold, app, "gen-x", 4 * USD, provisional=True), PERIOD)
            expected = 4 * USD
        elif step == "sweep":
            await ledger.sweep_holds(older_than=T + 1)
            if expected is None:
                expected = 4 * USD  # a provisional row at the estimate
        elif step == "correct":
            corrected = await ledger.correct_usage("gen-x", final["correct"])
            assert corrected == (expected is not None and provisional), step
            if corrected:
                expected = final["correct"]
        [row] = rows_named(await rows_of(ledger, c.connection_id), "gen-x")
        provisional = row.provisional
        assert row.cost_nanos == expected, (step, row)
        assert await ledger.period_spent(c.connection_id, PERIOD) == expected, step
        assert await ledger.held(c.connection_id) == 0, step
    assert not provisional  # every order here ends with a final figure
    # A late settle or a late release of the same hold changes nothing.
    assert not await ledger.settle(hold, billed(hold, app, "gen-x", 9 * USD), PERIOD)
    await ledger.release(hold, refund_request=True)
    assert await ledger.period_spent(c.connection_id, PERIOD) == expected
    assert await ledger.provisional_count() == 0
    await consistent(ledger, app)


async def test_a_provisional_row_is_listed_for_reconciliation_until_corrected(ledger):
    app = await new_app(ledger)
    c = await funded(ledger, app)
    hold = await admit(ledger, c, 2 * USD)
    await ledger.settle(hold, billed(hold, app, "gen-p", 2 * USD, provisional=True), PERIOD)
    assert await ledger.provisional_count() == 1
    [(uid, row, period)] = await ledger.provisional_page(10)
    assert (row.generation_id, row.provisional, period) == ("gen-p", True, PERIOD)
    assert [u.generation_id for u in await ledger.provisional_of_connection(c.connection_id)] == ["gen-p"]
    assert await ledger.correct_usage("gen-p", USD)
    assert not await ledger.correct_usage("gen-p", 7 * USD)  # never twice
    assert await ledger.provisional_count() == 0 and await ledger.provisional_page(10) == []
    assert (uid, "gen-p") in [(i, u.generation_id) for i, u in await ledger.recent_final_usage(10)]
    assert await ledger.period_spent(c.connection_id, PERIOD) == USD
    await consistent(ledger, app)


async def test_a_settle_whose_caller_is_cancelled_still_lands(ledger):
    app = await new_app(ledger)
    c = await funded(ledger, app)
    g = await typed_grant(ledger, app, requests=2)
    hold = await admit(ledger, c, 2 * USD)
    _, ghold = await ledger.admit_grant(g.token_hash, app.app_id, PERIOD, USD, now=T,
                                        expires_at=T + TTL)
    settling = ledger.settle(hold, billed(hold, app, "gen-c", USD), PERIOD)
    releasing = ledger.release(ghold, refund_request=True)

    async def caller(write: Any) -> None:
        await write
    callers = [asyncio.ensure_future(caller(settling)), asyncio.ensure_future(caller(releasing))]
    await asyncio.sleep(0)
    for task in callers:
        task.cancel()
    for task in callers:
        with pytest.raises(asyncio.CancelledError):
            await task

    async def landed() -> bool:
        grant = await ledger.get_grant_by_id(g.grant_id)
        return (await ledger.period_spent(c.connection_id, PERIOD) == USD
                and grant is not None and grant.used == 0 and await ledger.open_holds() == 0)
    assert await eventually(landed)
    assert [r.generation_id for r in await rows_of(ledger, c.connection_id)] == ["gen-c"]
    await consistent(ledger, app)


async def test_a_hold_no_longer_held_cannot_be_named(ledger):
    app = await new_app(ledger)
    c = await funded(ledger, app)
    settled = await admit(ledger, c, USD)
    await ledger.settle(settled, billed(settled, app, "gen-s", USD), PERIOD)
    released = await admit(ledger, c, USD)
    await ledger.release(released)
    for hold in (settled, released):
        assert ledger.note_generation(hold, "gen-late", app.app_id, "m") is None
    assert await ledger.open_holds() == 0
    assert [r.generation_id for r in await rows_of(ledger, c.connection_id)] == ["gen-s"]
    await consistent(ledger, app)


@pytest.mark.parametrize("seed", range(3))
async def test_random_interleavings_never_pass_the_cap_nor_lose_a_debit(ledger, place, seed):
    """Calls admitted, named, settled and released in random order on one instance,
    while another instance (the CLI reconciling; on PostgreSQL another gateway too)
    writes on the same connection: spent + held never passes the cap beyond what
    bypassed admission, and every debit lands exactly once."""
    import random

    rnd = random.Random(seed)
    cap = 30 * USD
    app = await new_app(ledger)
    c = await funded(ledger, app, cap=cap)
    other = await place.open()
    instances = [ledger, other] if place.kind == "postgresql" else [ledger]
    debited = refused = outside = 0

    async def call(i: int) -> None:
        nonlocal debited, refused
        store = instances[i % len(instances)]
        await asyncio.sleep(rnd.random() / 1000)
        estimate = rnd.randint(1, 5) * USD
        try:
            hold = await store.admit(c.connection_id, PERIOD, estimate, now=T, expires_at=T + TTL)
        except BudgetExceeded:
            refused += 1
            return
        spent = await store.period_spent(c.connection_id, PERIOD)
        assert spent + await store.held(c.connection_id) <= cap + outside
        if rnd.random() < 0.5:
            named = store.note_generation(hold, f"g{i}", app.app_id, "m")
            assert named is not None
            await named
        await asyncio.sleep(rnd.random() / 500)
        if rnd.random() < 0.2:
            await store.release(hold)
            return
        cost = rnd.randint(0, estimate)
        assert await store.settle(hold, billed(hold, app, f"g{i}", cost), PERIOD)
        debited += cost

    async def cli(i: int) -> None:
        nonlocal debited, outside
        await asyncio.sleep(rnd.random() / 100)
        outside += USD // 10  # counted before its commit: the bound is never too tight
        assert await other.settle(None, usage(f"cli{i}", app, c.connection_id, USD // 10), PERIOD)
        debited += USD // 10

    await asyncio.gather(*[call(i) for i in range(80)], *[cli(i) for i in range(5)])
    assert refused > 0, "the cap was reached"
    assert await ledger.period_spent(c.connection_id, PERIOD) == debited <= cap + outside
    await consistent(ledger, app)


# ---- revocation and key rotation -----------------------------------------------

async def test_a_revocation_refuses_new_calls_and_ends_its_grants(ledger):
    app = await new_app(ledger)
    c = await funded(ledger, app)
    grant = await connection_grant(ledger, app, c, requests=5)
    running = await admit(ledger, c, USD)  # admitted before the revocation
    await ledger.set_connection_state(c.connection_id, REVOKED, now=T + 1)
    with pytest.raises(NotConnected):
        await admit(ledger, c, 1)
    with pytest.raises((GrantInvalid, NotConnected)):
        await ledger.admit_grant(grant.token_hash, app.app_id, PERIOD, 1, now=T + 2,
                                 expires_at=T + 2 + TTL)
    ended = await ledger.get_grant_by_id(grant.grant_id)
    assert ended is not None and ended.expires_at <= T + 1
    with pytest.raises(ConsentRequired):  # a grant approved before, written after
        await connection_grant(ledger, app, c, requests=1)
    assert await ledger.update_cap(c.connection_id, 20 * USD, expected_key=c.sealed_key,
                                   expected_cap=c.cap_nanos, now=T + 3) is None
    await ledger.set_connection_state(c.connection_id, NEEDS_RECONNECT, now=T + 4)
    after = await ledger.get_connection(app.app_id, c.app_user_id)
    assert after is not None and after.state == REVOKED and not after.connected
    # The call that was running finishes and is billed exactly, to this connection.
    assert await ledger.settle(running, billed(running, app, "gen-r", USD // 2), PERIOD)
    assert await ledger.period_spent(c.connection_id, PERIOD) == USD // 2
    await consistent(ledger, app)


async def test_re_seal_replaces_a_key_only_where_it_is_still_the_old_one(ledger):
    app = await new_app(ledger)
    a = await funded(ledger, app, "u1")
    b = await funded(ledger, app, "u2")
    g = await typed_grant(ledger, app, requests=1)
    keys = await ledger.all_sealed_keys()
    assert sorted(k[2] for k in keys) == sorted([a.sealed_key, b.sealed_key, g.sealed_key])
    where = {k[2]: (k[0], k[1]) for k in keys}
    assert where[a.sealed_key][1] == a.connection_id and where[g.sealed_key][1] == g.grant_id
    changes = [(*where[a.sealed_key], a.sealed_key, "v1.k2.new-a"),
               (*where[b.sealed_key], "v1.k1.changed-meanwhile", "v1.k2.new-b"),
               (*where[g.sealed_key], g.sealed_key, "v1.k2.new-g")]
    assert await ledger.replace_sealed_keys(changes) == 2  # type: ignore[arg-type]
    assert (await ledger.get_connection(app.app_id, "u1")).sealed_key == "v1.k2.new-a"  # type: ignore[union-attr]
    assert (await ledger.get_connection(app.app_id, "u2")).sealed_key == b.sealed_key  # type: ignore[union-attr]
    assert (await ledger.get_grant_by_id(g.grant_id)).sealed_key == "v1.k2.new-g"  # type: ignore[union-attr]
    assert await ledger.replace_sealed_keys(changes) == 0  # a second pass finds nothing old


async def test_a_revoked_key_is_erased_once_no_call_can_need_it(ledger):
    """Kept while a call of the connection is in flight or awaits its final cost
    (a provisional row after ``since``); erased after, once."""
    app = await new_app(ledger)
    c = await funded(ledger, app)
    running = await admit(ledger, c, USD)
    await ledger.set_connection_state(c.connection_id, REVOKED, now=T + 1)
    assert await ledger.erase_revoked_keys(since=T - 86400, now=T + 2) == 0
    await ledger.settle(running, billed(running, app, "gen-e", USD, provisional=True), PERIOD)
    assert await ledger.erase_revoked_keys(since=T - 86400, now=T + 3) == 0  # correctable
    assert (await ledger.get_connection_by_id(c.connection_id)).sealed_key == c.sealed_key  # type: ignore[union-attr]
    assert await ledger.erase_revoked_keys(since=T + 1, now=T + 4) == 1  # past its give-up
    gone = await ledger.get_connection_by_id(c.connection_id)
    assert gone is not None and gone.sealed_key is None and gone.state == REVOKED
    assert all(k[2] != c.sealed_key for k in await ledger.all_sealed_keys())
    assert await ledger.erase_revoked_keys(since=T + 1, now=T + 5) == 0
    await consistent(ledger, app)


# ---- ids, deletion, periods --------------------------------------------------------

async def test_ids_are_never_reused_after_deletes_and_restarts(ledger, place):
    app = await new_app(ledger)
    c = await funded(ledger, app)
    g = await connection_grant(ledger, app, c, requests=3)
    h1 = await admit(ledger, c, USD)
    _, h2 = await ledger.admit_grant(g.token_hash, app.app_id, PERIOD, USD, now=T, expires_at=T + TTL)
    await ledger.settle(h1, billed(h1, app, "gen-1", USD), PERIOD)
    await ledger.release(h2, refund_request=True)
    [(u1, _)] = await ledger.recent_final_usage(10)
    assert await ledger.delete_app(app.app_id, now=T + 1)
    # Every hold gone, the app deleted, the process restarted.
    await place.close(ledger)
    again = await place.open()
    other = await new_app(again)
    c2 = await funded(again, other)
    g2 = await connection_grant(again, other, c2, requests=3)
    h3 = await again.admit(c2.connection_id, PERIOD, USD, now=T, expires_at=T + TTL)
    _, h4 = await again.admit_grant(g2.token_hash, other.app_id, PERIOD, USD, now=T,
                                    expires_at=T + TTL)
    await again.settle(h3, billed(h3, other, "gen-3", USD), PERIOD)
    await again.settle(h4, billed(h4, other, "gen-4", USD), PERIOD)
    assert c2.connection_id > c.connection_id
    assert g2.grant_id > g.grant_id
    assert min(h3.hold_id, h4.hold_id) > max(h1.hold_id, h2.hold_id)
    assert h3.hold_id != h4.hold_id
    assert min(i for i, row in await again.recent_final_usage(10) if row.app_id == other.app_id) > u1
    await consistent(again, app, other)


async def test_a_deleted_apps_spend_holds_and_rows_stay_its_own(ledger):
    old = await new_app(ledger)
    c = await funded(ledger, old, "alice")
    grant = await connection_grant(ledger, old, c, requests=3)
    await ledger.settle(None, usage("gen-old", old, c.connection_id, 3 * USD), PERIOD)
    flying = await named_hold(ledger, old, c, "gen-flying", 2 * USD)
    _, gflying = await ledger.admit_grant(grant.token_hash, old.app_id, PERIOD, USD, now=T,
                                          expires_at=T + TTL)
    assert await ledger.delete_app(old.app_id, now=T + 1)
    assert (await ledger.get_app(old.app_id, deleted=True)).deleted_at == T + 1  # type: ignore[union-attr]
    assert await ledger.get_app(old.app_id) is None
    with pytest.raises(GrantInvalid):
        await ledger.admit_grant(grant.token_hash, old.app_id, PERIOD, 1, now=T + 2,
                                 expires_at=T + 2 + TTL)
    # A new user of another app, even one with the same user name, starts at $0.
    new = await new_app(ledger)
    n = await funded(ledger, new, "alice", cap=10 * USD)
    assert n.connection_id != c.connection_id
    assert await ledger.period_spent(n.connection_id, PERIOD) == 0
    assert await ledger.held(n.connection_id) == 0
    assert await rows_of(ledger, n.connection_id) == []
    await ledger.release(await admit(ledger, n, 10 * USD))  # the whole cap is its own
    # The deleted app's calls in flight settle to its own connection and grant.
    assert await ledger.settle(flying, billed(flying, old, "gen-flying", USD), PERIOD)
    assert await ledger.settle(gflying, billed(gflying, old, "gen-gflying", USD), PERIOD)
    assert await ledger.period_spent(c.connection_id, PERIOD) == 5 * USD
    assert await ledger.period_spent(n.connection_id, PERIOD) == 0
    assert (await ledger.get_grant_by_id(grant.grant_id)).spent_nanos == USD  # type: ignore[union-attr]
    spend = {s.connection.connection_id: s.spent_nanos
             for s in await ledger.connection_spend(new.app_id, PERIOD)}
    assert spend.get(n.connection_id, 0) == 0 and c.connection_id not in spend
    start, end = period_bounds(PERIOD)
    totals = await ledger.app_totals(start, end)
    assert new.app_id not in totals or totals[new.app_id].cost_nanos == 0
    assert await ledger.top_payers(start, end, app_id=new.app_id) == []
    assert {p.app_user_id: p.cost_nanos
            for p in await ledger.top_payers(start, end, app_id=old.app_id)} == {"alice": 5 * USD}
    await consistent(ledger, old, new)


async def test_a_call_belongs_to_the_period_it_was_admitted_in(ledger):
    app = await new_app(ledger)
    c = await funded(ledger, app, cap=10 * USD)
    _, end = period_bounds(PERIOD)
    late = end - 1  # the last second of January
    jan = await admit(ledger, c, 9 * USD, now=late)
    named = await named_hold(ledger, app, c, "gen-jan-named", USD)
    assert jan.period == named.period == PERIOD
    # January's holds narrow January's cap only: February has all of its own.
    assert await ledger.held(c.connection_id, PERIOD) == 10 * USD
    assert await ledger.held(c.connection_id, NEXT) == 0
    feb = await admit(ledger, c, 10 * USD, period=NEXT, now=end + 1)
    with pytest.raises(BudgetExceeded):
        await admit(ledger, c, 1, now=late)
    # The January call ends in February: its row is January's, dated in January.
    await ledger.settle(jan, billed(jan, app, "gen-jan", 4 * USD, at=late), PERIOD)
    await ledger.sweep_holds(older_than=T + 1)  # the named one: a provisional row at its estimate
    assert await ledger.period_spent(c.connection_id, PERIOD) == 5 * USD
    assert await ledger.period_spent(c.connection_id, NEXT) == 0
    assert all(period_of(r.created_at) == PERIOD for r in await rows_of(ledger, c.connection_id))
    await ledger.release(feb)
    await consistent(ledger, app)


async def test_holds_left_by_a_dead_process_are_swept_by_the_next(ledger, place):
    """A process dies with calls in flight: the next one's sweep makes a named call a
    provisional row at its estimate, gives a grant back the request of an unnamed one,
    and leaves no hold behind."""
    app = await new_app(ledger)
    c = await funded(ledger, app)
    g = await typed_grant(ledger, app, requests=1)
    await named_hold(ledger, app, c, "gen-crash", 2 * USD)
    await admit(ledger, c, USD)
    await ledger.admit_grant(g.token_hash, app.app_id, PERIOD, USD, now=T, expires_at=T + TTL)
    await place.close(ledger)  # as a crash leaves it: nothing settled or released
    after = await place.open()
    assert await after.sweep_holds() >= 2
    assert await after.open_holds() == 0 and await after.held(c.connection_id) == 0
    assert await after.period_spent(c.connection_id, PERIOD) == 2 * USD
    [row] = await rows_of(after, c.connection_id)
    assert (row.generation_id, row.provisional, row.cost_nanos) == ("gen-crash", True, 2 * USD)
    grant = await after.get_grant_by_id(g.grant_id)
    assert grant is not None and (grant.used, grant.held_nanos, grant.spent_nanos) == (0, 0, 0)
    await consistent(after, app)


@pg_only
async def test_a_sweep_never_takes_a_living_process_holds(ledger, place):
    app = await new_app(ledger)
    c = await funded(ledger, app)
    other = await place.open()
    hold = await other.admit(c.connection_id, PERIOD, 2 * USD, now=T, expires_at=T + TTL)
    await ledger.sweep_holds()  # the other process is alive: its hold is not ours to sweep
    assert await ledger.held(c.connection_id) == 2 * USD
    assert await other.settle(hold, billed(hold, app, "gen-alive", USD), PERIOD)
    assert await ledger.period_spent(c.connection_id, PERIOD) == USD
    await consistent(ledger, app)


# ---- fleet-wide state --------------------------------------------------------------

async def test_rate_take_is_a_token_bucket(ledger):
    assert await ledger.rate_take("chat", "a:u", 3, now=T, take=False) is None  # a check only
    for _ in range(3):
        assert await ledger.rate_take("chat", "a:u", 3, now=T) is None
    wait = await ledger.rate_take("chat", "a:u", 3, now=T)
    assert isinstance(wait, int) and 0 < wait <= 20
    assert await ledger.rate_take("chat", "a:other", 3, now=T) is None
    assert await ledger.rate_take("sessions", "a:u", 3, now=T) is None
    assert await ledger.rate_take("chat", "a:u", 3, now=T + 60) is None  # refilled


@pg_only
async def test_rate_take_is_one_bucket_for_every_instance(ledger, place):
    other = await place.open()
    assert await ledger.rate_take("chat", "a:u", 3, now=T) is None
    assert await other.rate_take("chat", "a:u", 3, now=T) is None
    assert await ledger.rate_take("chat", "a:u", 3, now=T) is None
    assert await other.rate_take("chat", "a:u", 3, now=T) is not None
    assert await ledger.rate_take("chat", "a:u", 3, now=T) is not None


async def test_admin_sessions_open_find_expire_and_close(ledger):
    await ledger.open_admin_session("s1", "csrf-1", expires_at=T + 60, now=T)
    assert await ledger.find_admin_session("s1", now=T + 1) == ("csrf-1", T + 60)
    assert await ledger.find_admin_session("s1", now=T + 61) is None
    assert await ledger.find_admin_session("nope", now=T) is None
    await ledger.open_admin_session("s2", "csrf-2", expires_at=T + 600, now=T)
    await ledger.close_admin_session("s2")
    assert await ledger.find_admin_session("s2", now=T) is None


@pg_only
async def test_an_admin_session_is_found_from_another_instance(ledger, place):
    other = await place.open()
    await ledger.open_admin_session("s1", "csrf-1", expires_at=T + 60, now=T)
    assert await other.find_admin_session("s1", now=T) == ("csrf-1", T + 60)
    await other.close_admin_session("s1")
    assert await ledger.find_admin_session("s1", now=T) is None


async def test_the_only_instance_leads(ledger):
    """SQLite: one server per database file; PostgreSQL: nobody else holds the lead."""
    assert await ledger.lead("reconciler") is True
    assert await ledger.lead("reconciler") is True  # and keeps it
    assert await ledger.lead("export") is True  # each task on its own


@pg_only
async def test_exactly_one_instance_leads_and_the_lead_moves_when_it_closes(ledger, place):
    other = await place.open()
    first = [await ledger.lead("reconciler"), await other.lead("reconciler")]
    assert sorted(first) == [False, True]
    assert [await ledger.lead("reconciler"), await other.lead("reconciler")] == first  # kept
    leader, follower = (ledger, other) if first[0] else (other, ledger)
    await place.close(leader)

    async def took_over() -> bool:
        return await follower.lead("reconciler")
    assert await eventually(took_over, seconds=10)


async def test_bind_keys_refuses_another_fingerprint(ledger, place):
    from wattgate.errors import KeysMismatch  # type: ignore[attr-defined,unused-ignore]

    await ledger.bind_keys("fingerprint-1")
    await ledger.bind_keys("fingerprint-1")  # the same keys: fine, again
    other = await place.open()
    await other.bind_keys("fingerprint-1")
    with pytest.raises(KeysMismatch):
        await other.bind_keys("fingerprint-2")
    with pytest.raises(KeysMismatch):
        await ledger.bind_keys("fingerprint-2")


async def test_apps_version_follows_another_instances_write_within_a_second(ledger, place):
    app = await new_app(ledger)
    c = await funded(ledger, app)
    other = await place.open()
    loop = asyncio.get_running_loop()
    for change in ("revoke", "secret", "retire", "app", "policy"):
        async def vouched() -> bool:
            return ledger.apps_version() is not None
        assert await eventually(vouched)
        before = ledger.apps_version()
        if change == "revoke":
            await other.set_connection_state(c.connection_id, REVOKED, now=T + 1)
        elif change == "secret":
            await other.set_app_secret(app.app_id, "rotated", keep_previous_until=T + 3600)
        elif change == "retire":
            assert await other.retire_previous_secret(app.app_id)
        elif change == "policy":
            await other.set_app_policy(app.app_id, AppPolicy(max_tokens=100))
        else:
            await new_app(other)
        written = loop.time()

        async def moved() -> bool:
            return ledger.apps_version() != before
        assert await eventually(moved, seconds=1.0), change
        assert loop.time() - written <= 1.0, change
        await asyncio.sleep(0)  # let the next turn of the loop settle the version
    got = await ledger.get_connection(app.app_id, c.app_user_id)
    assert got is not None and got.state == REVOKED
    rotated = await ledger.get_app(app.app_id)
    assert rotated is not None and (rotated.secret_hash, rotated.previous_secret_hash) == (
        "rotated", None)
    assert rotated.policy == AppPolicy(max_tokens=100)  # another instance's policy, read here


# ---- the console's pages -----------------------------------------------------------

async def test_connections_page_by_page_search_and_state(ledger):
    from wattgate.store.browse import MAX_PAGE

    app, other = await new_app(ledger), await new_app(ledger)
    users = [f"user-{i:03d}" for i in range(60)] + ["50%_off", "x_y"]
    made = {u: await funded(ledger, app, u) for u in users}
    await funded(ledger, other, "user-001")  # another app's user of the same name
    for i in range(5):  # five spenders, user-005 the biggest
        c = made[f"user-{i + 1:03d}"]
        await ledger.settle(None, usage(f"gen-{i}", app, c.connection_id, (i + 1) * USD), PERIOD)
    await ledger.set_connection_state(made["user-010"].connection_id, REVOKED, now=T)
    pages = [await ledger.connections_page(app.app_id, PERIOD, offset=o, limit=25)
             for o in (0, 25, 50)]
    assert [p.total for p in pages] == [62, 62, 62]
    seen = [r.connection.app_user_id for p in pages for r in p.rows]
    assert sorted(seen) == sorted(users) and len(seen) == len(set(seen))  # each exactly once
    assert seen[:5] == ["user-005", "user-004", "user-003", "user-002", "user-001"]
    assert pages[0].rows[0].spent_nanos == 5 * USD
    assert seen[5:] == sorted(seen[5:])  # then by user id
    # Search is a plain substring: SQL wildcards in it match themselves only.
    found = await ledger.connections_page(app.app_id, PERIOD, search="%")
    assert [r.connection.app_user_id for r in found.rows] == ["50%_off"] and found.total == 1
    found = await ledger.connections_page(app.app_id, PERIOD, search="_")
    assert {r.connection.app_user_id for r in found.rows} == {"50%_off", "x_y"}
    found = await ledger.connections_page(app.app_id, PERIOD, search="user-00")
    assert found.total == 10 and all(r.connection.app_id == app.app_id for r in found.rows)
    revoked = await ledger.connections_page(app.app_id, PERIOD, state=REVOKED)
    assert [r.connection.app_user_id for r in revoked.rows] == ["user-010"]
    assert (await ledger.connections_page(app.app_id, PERIOD, state=ACTIVE)).total == 61
    assert (await ledger.connections_page(app.app_id, PERIOD, search="nobody")).rows == []
    assert len((await ledger.connections_page(app.app_id, PERIOD, limit=10_000)).rows) \
        == min(62, MAX_PAGE)
    assert (await ledger.connections_page(app.app_id, PERIOD, offset=-5)).rows[0] \
        .connection.app_user_id == "user-005"  # a negative offset is the first page
    await consistent(ledger, app, other)


async def test_grants_page_states_as_the_console_names_them(ledger):
    from wattgate import budget

    app = await new_app(ledger)
    ann, bob = await funded(ledger, app, "ann"), await funded(ledger, app, "bob")
    g_ann = await connection_grant(ledger, app, ann, requests=1)
    g_bob = await connection_grant(ledger, app, bob, requests=3)
    g_typed = await typed_grant(ledger, app, requests=2)
    _, hold = await ledger.admit_grant(g_ann.token_hash, app.app_id, PERIOD, USD, now=T,
                                       expires_at=T + TTL)
    await ledger.settle(hold, billed(hold, app, "gen-ann", USD), PERIOD)  # ann's is spent
    later = T + 601  # bob's and the typed grant have expired
    for now, want in ((T + 1, {"spent": 1, "live": 2, "expired": 0}),
                      (later, {"spent": 1, "live": 0, "expired": 2})):
        for state, count in want.items():
            page = await ledger.grants_page(app.app_id, now=now, state=state)
            assert page.total == count == len(page.rows), (now, state)
            for row in page.rows:
                assert budget.grant_state(row.grant, now) == state
    page = await ledger.grants_page(app.app_id, now=T)
    assert [r.grant.grant_id for r in page.rows] == sorted(
        [g_ann.grant_id, g_bob.grant_id, g_typed.grant_id], reverse=True)
    assert {r.grant.grant_id: r.app_user_id for r in page.rows} == {
        g_ann.grant_id: "ann", g_bob.grant_id: "bob", g_typed.grant_id: None}
    found = await ledger.grants_page(app.app_id, now=T, search="bo")
    assert [r.grant.grant_id for r in found.rows] == [g_bob.grant_id] and found.total == 1
    two = await ledger.grants_page(app.app_id, now=T, limit=2, offset=2)
    assert len(two.rows) == 1 and two.total == 3
    await consistent(ledger, app)


async def test_the_request_log_filters_and_pages_newest_first(ledger):
    from wattgate.store.browse import LogFilter

    app, other = await new_app(ledger), await new_app(ledger)
    ann, bob = await funded(ledger, app, "ann"), await funded(ledger, app, "bob")
    stranger = await funded(ledger, other, "ann")
    statuses = ["ok", "ok", "upstream_error", "ok", "client_gone"]
    for i in range(30):
        who = ann if i % 3 else bob
        row = Usage(f"gen-log-{i}", app.app_id, who.connection_id, None,
                    "m/big" if i % 2 else "m/small", 100 + i, 10 * i, 1000 + i, False,
                    statuses[i % 5], 50 + i, T + 60 * i)
        await ledger.settle(None, row, PERIOD)
    await ledger.settle(None, usage("gen-other", other, stranger.connection_id, 1), PERIOD)
    lines, before = [], None
    while True:  # pages of 7, the keyset carried from the last line
        page = await ledger.request_log(LogFilter(app.app_id, before=before), limit=7)
        lines += page
        if len(page) < 7:
            break
        before = (page[-1].created_at, page[-1].usage_id)
    assert [ln.created_at for ln in lines] == [T + 60 * i for i in range(29, -1, -1)]
    first = lines[0]
    assert (first.app_user_id, first.model, first.prompt_tokens, first.completion_tokens,
            first.cost_nanos, first.status, first.latency_ms) == \
        ("ann", "m/big", 129, 290, 1029, "client_gone", 79)
    mine = await ledger.request_log(LogFilter(app.app_id, app_user_id="ann"), limit=200)
    assert len(mine) == 20 and {ln.app_user_id for ln in mine} == {"ann"}
    errors = await ledger.request_log(LogFilter(app.app_id, status="upstream_error"), limit=200)
    assert [ln.created_at for ln in errors] == [T + 60 * i for i in (27, 22, 17, 12, 7, 2)]
    small = await ledger.request_log(LogFilter(app.app_id, model="m/small", since=T + 600,
                                               until=T + 1200), limit=200)
    assert [ln.created_at for ln in small] == [T + 60 * i for i in (18, 16, 14, 12, 10)]
    assert await ledger.request_log(LogFilter(app.app_id, app_user_id="nobody")) == []
    assert await ledger.request_log(LogFilter(app.app_id, model="' OR 1=1 --")) == []
    days = await ledger.daily_calls(app.app_id, T - 86400, T + 86400)
    assert len(days) == 1
    day = days[0]
    assert (day.calls, day.errors) == (30, 12)
    assert day.tokens == sum(100 + i + 10 * i for i in range(30))
    assert day.latency_ms_total == sum(50 + i for i in range(30))
    by_bob = await ledger.daily_calls(app.app_id, T - 86400, T + 86400, app_user_id="bob")
    assert by_bob[0].calls == 10
    every = await ledger.daily_calls(None, T - 86400, T + 86400)  # the overview's: every app
    assert [d.calls for d in every] == [31]
    assert await ledger.delete_app(other.app_id, now=T + 1)
    assert [d.calls for d in await ledger.daily_calls(None, T - 86400, T + 86400)] == [30]
    await consistent(ledger, app, other)


# ---- webhooks: the outbox ----------------------------------------------------------

async def hooked(ledger: Ledger) -> App:
    app = await new_app(ledger)
    assert await ledger.set_webhook(app.app_id, "https://example.test/hook", "sealed-secret")
    return app


def events_of(events: list[Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(e.type, json.loads(e.body)["data"]) for e in sorted(events, key=lambda e: e.event_id)]


async def test_a_webhook_is_set_read_and_cleared(ledger):
    app = await new_app(ledger)
    assert await ledger.get_webhook(app.app_id) is None
    assert not await ledger.set_webhook("no-such-app", "https://x.test/", "s")
    assert await ledger.set_webhook(app.app_id, "https://x.test/h", "sealed")
    hook = await ledger.get_webhook(app.app_id)
    assert hook is not None and (hook.url, hook.sealed_secret) == ("https://x.test/h", "sealed")
    assert await ledger.set_webhook(app.app_id, None, None)
    assert await ledger.get_webhook(app.app_id) is None


async def test_connection_changes_write_their_events_and_an_app_without_endpoint_none(ledger):
    quiet = await new_app(ledger)
    c0 = await funded(ledger, quiet)
    await ledger.set_connection_state(c0.connection_id, REVOKED, now=T)
    assert await ledger.recent_webhooks(quiet.app_id) == []

    app = await hooked(ledger)
    c = await funded(ledger, app, "alice", cap=10 * USD)
    await ledger.update_cap(c.connection_id, 25 * USD, expected_key=c.sealed_key,
                            expected_cap=10 * USD, now=T + 1)
    await ledger.update_cap(c.connection_id, 30 * USD, expected_key="stale",  # refused
                            expected_cap=25 * USD, now=T + 2)
    assert await ledger.update_cap(c.connection_id, 30 * USD, expected_key=c.sealed_key,
                                   expected_cap=10 * USD, now=T + 2) is None  # a stale cap
    await ledger.set_connection_state(c.connection_id, NEEDS_RECONNECT, now=T + 3)
    await ledger.set_connection_state(c.connection_id, REVOKED, now=T + 4)
    await ledger.set_connection_state(c.connection_id, REVOKED, now=T + 5)  # already: nothing
    events = await ledger.recent_webhooks(app.app_id)
    assert events_of(events) == [
        ("connection.created", {"appId": app.app_id, "appUserId": "alice", "capUsd": "10"}),
        ("connection.cap_changed", {"appId": app.app_id, "appUserId": "alice", "capUsd": "25",
                                    "previousCapUsd": "10"}),
        ("funding.invalid", {"appId": app.app_id, "appUserId": "alice", "capUsd": "25"}),
        ("connection.revoked", {"appId": app.app_id, "appUserId": "alice", "capUsd": "25"}),
    ]
    assert len({e.public_id for e in events}) == 4
    assert {e.stream for e in events} == {f"c{c.connection_id}"}
    assert all(e.status == "pending" and e.attempts == 0 for e in events)
    assert [e.event_id for e in events] == sorted((e.event_id for e in events), reverse=True)
    body = json.loads(events[-2].body)  # newest first: the cap's change, at T + 1
    assert set(body) == {"id", "type", "created", "data"} and body["created"] == int(T + 1)
    assert body["id"] == events[-2].public_id and body["type"] == "connection.cap_changed"


async def test_thresholds_are_written_by_the_settle_once_per_period_each(ledger):
    app = await hooked(ledger)
    c = await funded(ledger, app, "bob", cap=10 * USD)
    for i, cost in enumerate([7 * USD, USD - 1]):  # 7.999999999: not yet 80 %
        h = await admit(ledger, c, cost)
        assert await ledger.settle(h, billed(h, app, f"t{i}", cost), PERIOD)
    assert [e.type for e in await ledger.recent_webhooks(app.app_id)] == ["connection.created"]
    h = await admit(ledger, c, 1)  # exactly 8 dollars: 80 %
    await ledger.settle(h, billed(h, app, "t2", 1), PERIOD)
    h = await admit(ledger, c, USD)  # 9: nothing new
    await ledger.settle(h, billed(h, app, "t3", USD), PERIOD)
    h = await admit(ledger, c, USD)  # 10: 100 %
    await ledger.settle(h, billed(h, app, "t4", USD), PERIOD)
    await ledger.settle(h, billed(h, app, "t4", USD), PERIOD)  # a repeat: nothing
    thresholds = [d for t, d in events_of(await ledger.recent_webhooks(app.app_id))
                  if t == "budget.threshold"]
    assert thresholds == [
        {"appId": app.app_id, "appUserId": "bob", "period": PERIOD, "percent": 80,
         "capUsd": "10", "spentUsd": "8"},
        {"appId": app.app_id, "appUserId": "bob", "period": PERIOD, "percent": 100,
         "capUsd": "10", "spentUsd": "10"},
    ]
    # A new cap in the same period does not repeat them; the next period does.
    c = await ledger.update_cap(c.connection_id, 20 * USD, expected_key=c.sealed_key,
                                expected_cap=10 * USD, now=T)
    assert c is not None
    h = await admit(ledger, c, 9 * USD)
    await ledger.settle(h, billed(h, app, "t5", 9 * USD), PERIOD)
    h = await admit(ledger, c, 16 * USD, period=NEXT)
    await ledger.settle(h, billed(h, app, "t6", 16 * USD, at=T + 40 * 86400), NEXT)
    types = [(t, d.get("period"), d.get("percent"))
             for t, d in events_of(await ledger.recent_webhooks(app.app_id))]
    assert types.count(("budget.threshold", PERIOD, 80)) == 1
    assert types.count(("budget.threshold", PERIOD, 100)) == 1
    assert ("budget.threshold", NEXT, 80) in types
    await consistent(ledger, app)


async def test_one_settle_past_both_lines_tells_both_in_order(ledger):
    app = await hooked(ledger)
    c = await funded(ledger, app, "carol", cap=USD)
    h = await admit(ledger, c, USD)
    await ledger.settle(h, billed(h, app, "big", USD), PERIOD)
    assert [(t, d.get("percent")) for t, d in events_of(await ledger.recent_webhooks(app.app_id))] \
        == [("connection.created", None), ("budget.threshold", 80), ("budget.threshold", 100)]


async def test_concurrent_settles_crossing_a_line_together_tell_it_once(ledger):
    """Settles in flight together (PostgreSQL: one ``wattgate_settle`` batch, the
    period's aggregate moved once for all of them; SQLite: one writer's batch)."""
    app = await hooked(ledger)
    c = await funded(ledger, app, "erin", cap=10 * USD)
    first = [await admit(ledger, c, USD // 2) for _ in range(15)]  # 7.5: under 80 %
    await asyncio.gather(*(ledger.settle(h, billed(h, app, f"a{i}", USD // 2), PERIOD)
                           for i, h in enumerate(first)))
    assert [e.type for e in await ledger.recent_webhooks(app.app_id)] == ["connection.created"]
    crossing = [await admit(ledger, c, USD // 10) for _ in range(24)]  # 7.5 → 9.9
    assert all(await asyncio.gather(*(ledger.settle(h, billed(h, app, f"b{i}", USD // 10),
                                                    PERIOD) for i, h in enumerate(crossing))))
    told = [(t, d) for t, d in events_of(await ledger.recent_webhooks(app.app_id))
            if t == "budget.threshold"]
    assert [d["percent"] for _, d in told] == [80]
    spent = told[0][1]["spentUsd"]
    assert 8 <= float(spent) <= 9.9 and told[0][1]["capUsd"] == "10"
    # The last line, crossed by many at once; and again: nothing more.
    last = [await admit(ledger, c, USD // 100) for _ in range(10)]  # 9.9 → 10.0
    await asyncio.gather(*(ledger.settle(h, billed(h, app, f"c{i}", USD // 100), PERIOD)
                           for i, h in enumerate(last)))
    await asyncio.gather(*(ledger.settle(h, billed(h, app, f"c{i}", USD // 100), PERIOD)
                           for i, h in enumerate(last)))  # repeats: counted never again
    percents = [d["percent"] for t, d in events_of(await ledger.recent_webhooks(app.app_id))
                if t == "budget.threshold"]
    assert percents == [80, 100]
    assert await ledger.period_spent(c.connection_id, PERIOD) == 10 * USD
    await consistent(ledger, app)


async def test_a_final_figure_replacing_a_provisional_one_tells_the_line_it_crosses(ledger):
    app = await hooked(ledger)
    c = await funded(ledger, app, "fay", cap=10 * USD)
    h = await admit(ledger, c, 7 * USD)
    await ledger.settle(h, billed(h, app, "p1", 7 * USD, provisional=True), PERIOD)
    assert [e.type for e in await ledger.recent_webhooks(app.app_id)] == ["connection.created"]
    assert await ledger.settle(None, billed(h, app, "p1", 9 * USD), PERIOD)  # +2: 9 dollars
    assert not await ledger.settle(None, billed(h, app, "p1", 9 * USD), PERIOD)  # final: once
    h = await admit(ledger, c, USD // 2)
    await ledger.settle(h, billed(h, app, "p2", USD // 2, provisional=True), PERIOD)
    assert await ledger.settle(None, billed(h, app, "p2", USD // 4), PERIOD)  # down: nothing
    told = [d for t, d in events_of(await ledger.recent_webhooks(app.app_id))
            if t == "budget.threshold"]
    assert told == [{"appId": app.app_id, "appUserId": "fay", "period": PERIOD, "percent": 80,
                     "capUsd": "10", "spentUsd": "9"}]
    assert await ledger.period_spent(c.connection_id, PERIOD) == 9 * USD + USD // 4
    await consistent(ledger, app)


async def test_event_bodies_are_the_python_rendering_byte_for_byte(ledger):
    """Whichever backend (or SQL function) wrote it, a body is ``webhooks.body_of``'s:
    the receiver's signature is over these bytes. Escapes, non-ASCII user ids, a cap
    at the ledger's largest amount (no overflow, no digit rounded away)."""
    from wattgate.webhooks import body_of
    app = await hooked(ledger)
    user = 'zoë "q" \\ \t\u0001'
    big = 10 ** 18  # a billion dollars: the largest amount the ledger takes
    c = await funded(ledger, app, user, cap=big)
    h = await admit(ledger, c, big - 199_999_999_999_999_999)  # 800000000.000000001
    await ledger.settle(h, billed(h, app, "big", big - 199_999_999_999_999_999,
                                  at=T + 0.75), PERIOD)
    g = await connection_grant(ledger, app, c, 1, max_nanos=USD)
    _, gh = await ledger.admit_grant(g.token_hash, app.app_id, PERIOD, 3, now=T,
                                     expires_at=T + TTL)
    await ledger.settle(gh, billed(gh, app, "g", 3), PERIOD)
    events = await ledger.recent_webhooks(app.app_id)
    assert {e.type for e in events} == {"connection.created", "budget.threshold",
                                        "grant.exhausted"}
    for e in events:
        parsed = json.loads(e.body)
        assert e.body == body_of(e.public_id, e.type, e.created_at, parsed["data"])
        assert parsed["data"]["appUserId"] == user
        assert e.public_id.startswith("evt_") and len(e.public_id) == 28
        int(e.public_id[4:], 16)
    threshold = next(json.loads(e.body) for e in events if e.type == "budget.threshold")
    assert threshold["created"] == int(T)
    assert threshold["data"]["spentUsd"] == "800000000.000000001"
    assert threshold["data"]["capUsd"] == "1000000000"
    grant = next(json.loads(e.body)["data"] for e in events if e.type == "grant.exhausted")
    assert (grant["spentUsd"], grant["maxUsd"]) == ("0.000000003", "1")


async def test_a_grant_used_up_tells_once_when_its_last_call_settles(ledger):
    app = await hooked(ledger)
    c = await funded(ledger, app, "dan", cap=100 * USD)
    g = await connection_grant(ledger, app, c, 2)
    holds = [(await ledger.admit_grant(g.token_hash, app.app_id, PERIOD, USD, now=T,
                                       expires_at=T + TTL))[1] for _ in range(2)]
    await ledger.settle(holds[0], billed(holds[0], app, "g1", USD // 2), PERIOD)
    assert "grant.exhausted" not in [e.type for e in await ledger.recent_webhooks(app.app_id)]
    await ledger.settle(holds[1], billed(holds[1], app, "g2", USD // 4), PERIOD)
    typed = await typed_grant(ledger, app, 5, max_nanos=USD)
    _, h = await ledger.admit_grant(typed.token_hash, app.app_id, PERIOD, USD, now=T,
                                    expires_at=T + TTL)
    await ledger.settle(h, billed(h, app, "g3", USD), PERIOD)  # its dollar cap spent
    exhausted = [(e.stream, d) for e in await ledger.recent_webhooks(app.app_id)
                 for t, d in [(e.type, json.loads(e.body)["data"])] if t == "grant.exhausted"]
    assert sorted(exhausted, key=lambda x: x[1]["grantId"]) == [
        (f"c{c.connection_id}", {"appId": app.app_id, "appUserId": "dan", "grantId": g.grant_id,
                                 "requests": 2, "used": 2, "maxUsd": None, "spentUsd": "0.75"}),
        (f"g{typed.grant_id}", {"appId": app.app_id, "appUserId": None,
                                "grantId": typed.grant_id, "requests": 5, "used": 1,
                                "maxUsd": "1", "spentUsd": "1"}),
    ]


async def test_claims_deliver_in_order_per_stream_and_lease_against_a_second_claimer(ledger, place):
    app = await hooked(ledger)
    a = await funded(ledger, app, "a")
    b = await funded(ledger, app, "b")
    await ledger.update_cap(a.connection_id, 20 * USD, expected_key=a.sealed_key,
                            expected_cap=a.cap_nanos, now=T)
    other = await place.open()
    first = await ledger.claim_webhooks(now=T, lease_until=T + 60)
    assert [e.stream for e in first] == [f"c{a.connection_id}", f"c{b.connection_id}"]
    assert [e.type for e in first] == ["connection.created"] * 2
    assert all(e.attempts == 1 for e in first)
    assert await other.claim_webhooks(now=T + 1, lease_until=T + 61) == []  # leased, in order
    a_created = first[0]
    await ledger.record_webhook(a_created.event_id, status="delivered", next_at=T + 1,
                                code=204, error=None, now=T + 1)
    await ledger.record_webhook(first[1].event_id, status="pending", next_at=T + 30,
                                code=500, error=None, now=T + 1)
    nxt = await other.claim_webhooks(now=T + 2, lease_until=T + 62)
    assert [(e.stream, e.type) for e in nxt] == [(f"c{a.connection_id}", "connection.cap_changed")]
    await other.record_webhook(nxt[0].event_id, status="delivered", next_at=T + 2, code=200,
                               error=None, now=T + 2)
    again = await other.claim_webhooks(now=T + 31, lease_until=T + 91)
    assert [(e.public_id, e.attempts) for e in again] == [(first[1].public_id, 2)]
    await other.record_webhook(again[0].event_id, status="failed", next_at=T + 31, code=None,
                               error="timeout", now=T + 31)
    recent = {e.public_id: e for e in await ledger.recent_webhooks(app.app_id)}
    assert recent[a_created.public_id].status == "delivered"
    assert recent[a_created.public_id].last_code == 204
    assert recent[a_created.public_id].delivered_at == T + 1
    failed = recent[first[1].public_id]
    assert (failed.status, failed.attempts, failed.last_error) == ("failed", 2, "timeout")
    # Resend: the same id and body, pending again from now; a pending one is not resent.
    assert await ledger.resend_webhook(app.app_id, failed.public_id, now=T + 100)
    assert not await ledger.resend_webhook(app.app_id, failed.public_id, now=T + 100)
    assert not await ledger.resend_webhook("another-app", a_created.public_id, now=T + 100)
    resent = await ledger.claim_webhooks(now=T + 100, lease_until=T + 160)
    assert [(e.public_id, e.body, e.since) for e in resent] == \
        [(failed.public_id, failed.body, T + 100)]


async def test_old_delivered_and_failed_events_are_pruned_never_pending_ones(ledger):
    app = await hooked(ledger)
    for user in ("a", "b", "c"):
        await funded(ledger, app, user)
    first, second, third = sorted(await ledger.claim_webhooks(now=T, lease_until=T + 60),
                                  key=lambda e: e.event_id)
    await ledger.record_webhook(first.event_id, status="delivered", next_at=T, code=200,
                                error=None, now=T)
    await ledger.record_webhook(second.event_id, status="failed", next_at=T, code=500,
                                error=None, now=T)
    assert await ledger.prune_webhooks(before=T) == 0  # created at T: not before it
    assert await ledger.prune_webhooks(before=T + 1) == 2
    assert [e.public_id for e in await ledger.recent_webhooks(app.app_id)] == [third.public_id]


# ---- webhooks: what the sweep, reconciliation and releases tell --------------------

def told(events: list[Any], event_type: str) -> list[dict[str, Any]]:
    return [d for t, d in events_of(events) if t == event_type]


async def test_a_swept_estimate_and_its_final_figure_tell_the_lines_they_cross(ledger):
    """Neither the sweep's estimate nor reconciliation's final figure may move spend
    past a line silently: later settles start above it, so it would never be told."""
    app = await hooked(ledger)
    c = await funded(ledger, app, "gil", cap=10 * USD)
    await named_hold(ledger, app, c, "gen-swept", 9 * USD)
    assert await ledger.sweep_holds(older_than=T + 1) == 1  # 9 dollars at its estimate
    line = {"appId": app.app_id, "appUserId": "gil", "period": PERIOD, "capUsd": "10"}
    assert told(await ledger.recent_webhooks(app.app_id), "budget.threshold") == [
        {**line, "percent": 80, "spentUsd": "9"}]
    assert await ledger.correct_usage("gen-swept", 10 * USD, now=T + 7200)  # final: 100 %
    assert not await ledger.correct_usage("gen-swept", 10 * USD, now=T + 7201)
    events = await ledger.recent_webhooks(app.app_id)
    # Dated when told (so its day of retries starts then), the sweep's at the call's time.
    assert sorted(e.created_at for e in events if e.type == "budget.threshold") == \
        [T, T + 7200]
    assert all(e.since == e.created_at for e in events)
    assert told(events, "budget.threshold") == [{**line, "percent": 80, "spentUsd": "9"},
                                                {**line, "percent": 100, "spentUsd": "10"}]
    assert {e.stream for e in events} == {f"c{c.connection_id}"}
    from wattgate.webhooks import body_of
    for e in events:
        parsed = json.loads(e.body)
        assert e.body == body_of(e.public_id, e.type, e.created_at, parsed["data"])
    # A provisional row made final by reconciliation alone; then a settle past
    # nothing new: the 80 % line is told once, by the correction.
    d = await funded(ledger, app, "hal", cap=10 * USD)
    h = await admit(ledger, d, 7 * USD)
    await ledger.settle(h, billed(h, app, "gen-prov", 7 * USD, provisional=True), PERIOD)
    assert await ledger.correct_usage("gen-prov", 8 * USD)
    h = await admit(ledger, d, USD)
    await ledger.settle(h, billed(h, app, "gen-more", USD), PERIOD)
    assert [(x["appUserId"], x["percent"], x["spentUsd"]) for x in
            told(await ledger.recent_webhooks(app.app_id), "budget.threshold")] == [
        ("gil", 80, "9"), ("gil", 100, "10"), ("hal", 80, "8")]
    await consistent(ledger, app)


async def test_every_path_that_uses_a_grant_up_tells_it_exactly_once(ledger):
    """Used up (``webhooks.grant_exhausted``): every request used with nothing held, or
    its dollar cap spent. Besides a settle, the call that leaves it so may be swept to
    its estimate or given its final figure by reconciliation: each tells it, once. A
    call released before the model (its request given back) leaves it usable: not
    told, until a later call really uses it up."""
    app = await hooked(ledger)
    c = await funded(ledger, app, "ivy", cap=100 * USD)

    async def take(g: Grant, amount: int = USD) -> Hold:
        return (await ledger.admit_grant(g.token_hash, app.app_id, PERIOD, amount, now=T,
                                         expires_at=T + TTL))[1]

    async def name(h: Hold, gen: str) -> None:
        named = ledger.note_generation(h, gen, app.app_id, "openai/gpt-4o-mini")
        assert named is not None
        await named

    refunded = await connection_grant(ledger, app, c, 2)
    a, b = await take(refunded), await take(refunded)
    await ledger.settle(b, billed(b, app, "gen-rb", USD // 2), PERIOD)  # a still held
    await ledger.release(a, refund_request=True)  # its last call, released: a request left
    last_swept = await connection_grant(ledger, app, c, 2)
    a, b = await take(last_swept), await take(last_swept)
    await ledger.settle(b, billed(b, app, "gen-lb", USD // 2), PERIOD)  # a still held
    await name(a, "gen-la")  # a reached the model; its process died: swept
    swept = await typed_grant(ledger, app, 1)
    await name(await take(swept), "gen-gs")
    unnamed = await typed_grant(ledger, app, 1)
    await take(unnamed)  # never reached the model: swept, its request given back
    assert await ledger.sweep_holds(older_than=T + 1) == 3
    assert await ledger.correct_usage("gen-gs", USD // 4)  # told already: not again
    assert await ledger.correct_usage("gen-la", USD // 4)
    capped = await typed_grant(ledger, app, 5, max_nanos=USD)
    h = await take(capped, USD // 2)
    await ledger.settle(h, billed(h, app, "gen-cap", USD // 2, provisional=True), PERIOD)
    assert await ledger.correct_usage("gen-cap", USD)  # its dollar cap spent
    exhausted = told(await ledger.recent_webhooks(app.app_id), "grant.exhausted")
    by_grant = {d["grantId"]: d for d in exhausted}
    assert len(exhausted) == len(by_grant) == 3
    assert set(by_grant) == {last_swept.grant_id, swept.grant_id, capped.grant_id}
    assert by_grant[last_swept.grant_id] == {
        "appId": app.app_id, "appUserId": "ivy", "grantId": last_swept.grant_id,
        "requests": 2, "used": 2, "maxUsd": None, "spentUsd": "1.5"}  # 0.5 + the estimate
    assert (by_grant[swept.grant_id]["spentUsd"], by_grant[swept.grant_id]["appUserId"]) \
        == ("1", None)
    assert (by_grant[capped.grant_id]["used"], by_grant[capped.grant_id]["spentUsd"],
            by_grant[capped.grant_id]["maxUsd"]) == (1, "1", "1")
    for g in (refunded, unnamed):  # usable again: told when really used up
        h = await take(g)
        await ledger.settle(h, billed(h, app, f"gen-again-{g.grant_id}", 1), PERIOD)
    exhausted = told(await ledger.recent_webhooks(app.app_id), "grant.exhausted")
    assert sorted(d["grantId"] for d in exhausted) == sorted(
        [*by_grant, refunded.grant_id, unnamed.grant_id])
    await consistent(ledger, app)


async def test_re_sealing_covers_the_apps_webhook_signing_secrets(ledger):
    app = await hooked(ledger)  # sealed "sealed-secret"
    quiet = await new_app(ledger)
    c = await funded(ledger, quiet, "u1")
    keys = await ledger.all_sealed_keys()
    assert sorted((k[0], k[2]) for k in keys) == [("apps", "sealed-secret"),
                                                  ("connections", c.sealed_key)]
    [(table, row_id, old)] = [k for k in keys if k[0] == "apps"]
    assert row_id == app.app_id
    assert await ledger.replace_sealed_keys([(table, row_id, "stale", "v1.k2.no")]) == 0
    assert await ledger.replace_sealed_keys([(table, row_id, old, "v1.k2.hook")]) == 1
    hook = await ledger.get_webhook(app.app_id)
    assert hook is not None and (hook.url, hook.sealed_secret) == \
        ("https://example.test/hook", "v1.k2.hook")


async def test_a_call_the_upstream_refused_is_logged_at_zero_and_never_metered(ledger):
    """release(record=...) drops the hold, gives a grant's request back and writes the $0
    row in one write: the request log and its error rate show the call; spend, call
    counts, the export, the user's recent calls and a grant's used requests do not."""
    from wattgate.metering import refused_row
    from wattgate.store.browse import LogFilter
    from wattgate.store.records import UPSTREAM_REFUSED

    app = await new_app(ledger)
    ann = await funded(ledger, app, "ann", cap=USD)
    grant = await connection_grant(ledger, app, ann, requests=1)
    await ledger.settle(await admit(ledger, ann, USD // 4), usage("gen-paid", app,
                                                                  ann.connection_id, USD // 4),
                        PERIOD)
    before_spend = await ledger.daily_spend(T - 86400, T + 86400, app_id=app.app_id)
    before_totals = (await ledger.app_totals(T - 86400, T + 86400))[app.app_id]
    # Refused with the whole rest of the cap held: the room comes back at once.
    hold = await admit(ledger, ann, USD - USD // 4)
    await ledger.release(hold, record=refused_row(
        app_id=app.app_id, connection_id=ann.connection_id, grant_id=None,
        model="m/refused", code=429, started=T, now=T + 0.25, admitted_at=T + 1))
    g, ghold = await ledger.admit_grant(grant.token_hash, app.app_id, PERIOD, USD // 10,
                                        now=T + 2, expires_at=T + 2 + TTL)
    await ledger.release(ghold, refund_request=True, record=refused_row(
        app_id=app.app_id, connection_id=ann.connection_id, grant_id=g.grant_id,
        model="m/refused", code=500, started=T + 2, now=T + 2.5, admitted_at=T + 2))
    assert await ledger.held(ann.connection_id) == 0 and await ledger.open_holds() == 0
    assert await ledger.period_spent(ann.connection_id, PERIOD) == USD // 4
    again = await ledger.get_grant(grant.token_hash)
    assert again is not None and again.used == 0 and again.held_nanos == 0  # request refunded
    await admit(ledger, ann, USD - USD // 4)  # the whole rest of the cap is admissible again

    log = await ledger.request_log(LogFilter(app.app_id), limit=10)
    assert [(ln.status, ln.model, ln.cost_nanos, ln.grant_id, ln.app_user_id) for ln in log] \
        == [(UPSTREAM_REFUSED, "m/refused", 0, g.grant_id, "ann"),
            (UPSTREAM_REFUSED, "m/refused", 0, None, "ann"), ("ok", "openai/gpt-4o-mini",
                                                               USD // 4, None, "ann")]
    assert log[1].latency_ms == 250 and log[1].created_at == T + 1
    assert [ln.upstream_code for ln in log] == [500, 429, None]
    only = await ledger.request_log(LogFilter(app.app_id, status=UPSTREAM_REFUSED))
    assert len(only) == 2
    day = (await ledger.daily_calls(app.app_id, T - 86400, T + 86400))[0]
    assert (day.calls, day.errors) == (3, 2)  # the error rate counts them

    assert await ledger.daily_spend(T - 86400, T + 86400, app_id=app.app_id) == before_spend
    assert (await ledger.app_totals(T - 86400, T + 86400))[app.app_id] == before_totals
    payers = await ledger.top_payers(T - 86400, T + 86400, app_id=app.app_id)
    assert [(p.calls, p.cost_nanos) for p in payers] == [(1, USD // 4)]
    lines = [ln async for page in ledger.usage_lines(app.app_id) for ln in page]
    assert [ln.generation_id for ln in lines] == ["gen-paid"]
    assert [u.generation_id for u in await ledger.recent_usage(ann.connection_id)] \
        == ["gen-paid"]
    assert await ledger.provisional_count() == 0  # nothing for reconciliation
    await consistent(ledger, app, in_flight=True)
