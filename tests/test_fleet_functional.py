"""The four promises on a fleet: three real ``wattgate serve`` processes, one PostgreSQL.

Each test starts its own fleet (``tests/fleet.py``): three processes on one fresh
database, the last with ``--workers 2``, one keys file, one fake OpenRouter in
the test's loop, clients round-robin over the three ports. The ledger is read as
an operator reads it (``wattgate usage export``, ``ledger reconcile|check``,
``GET /status``) and compared with what the fake OpenRouter billed.

The database is a fresh one on the session's server (``WATTGATE_TEST_DATABASE_URL``
when set, else a throwaway cluster: ``tests/pg.py``). The restart drill always
runs on a cluster of its own: it really stops the server (``pg_ctl stop -m fast``,
which ends every session as a restart does) and starts it again, which must never
happen to a server other tests share; terminating sessions with
``pg_terminate_backend`` would leave out the part where nothing answers at all.
"""

from __future__ import annotations

import asyncio
import calendar
import json
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from fleet import App, Fleet, LedgerRow, Serve, differences, funding_key, restartable_cluster
from wattgate import faults
from wattgate.money import usd_to_nanos
from wattgate.store.pg_lifeline import OWNER_GRACE

pytestmark = pytest.mark.slow

MakeFleet = Callable[..., Awaitable[Fleet]]
# A generation the upstream named this long before a kill must be in the ledger: the
# hold's row is written before the answer's first byte, one round trip to PostgreSQL
# (wattgate.faults allows 50 ms for SQLite's local commit; four gateways and the
# database share two cores here).
NAMING_GRACE = 0.25


@pytest.fixture
async def make_fleet(make_pg_url: Callable[[], str],
                     tmp_path: Path) -> AsyncIterator[MakeFleet]:
    """Factory: a started fleet, on a fresh database unless ``database_url`` names one."""
    fleets: list[Fleet] = []

    async def make(env: dict[str, str] | None = None, *, database_url: str | None = None,
                   fake: Any = None) -> Fleet:
        folder = tmp_path / f"fleet{len(fleets)}"
        folder.mkdir()
        fleet = Fleet(database_url or make_pg_url(), folder, env or {})
        if fake is not None:
            fleet.fake = fake
        fleets.append(fleet)
        await fleet.start()
        return fleet

    yield make
    for fleet in fleets:  # before make_pg_url drops their databases
        await fleet.close()


def of_users(ledger: dict[str, LedgerRow], users: set[str]) -> dict[str, LedgerRow]:
    return {g: r for g, r in ledger.items() if r.user_id in users}


async def assert_ledger_matches_upstream(fleet: Fleet, app: App) -> None:
    """After reconcile: every billed generation recorded once at its amount; check passes."""
    await fleet.reconcile()
    ledger = await fleet.ledger(app)
    assert differences(fleet.billed(), ledger) == {}
    code, out = await fleet.cli("ledger", "check")
    assert code == 0, out


# ---- racing admissions ----------------------------------------------------------
async def test_racing_calls_on_one_cap_across_processes_never_pass_it(make_fleet):
    fleet = await make_fleet()
    app = await fleet.create_app()
    await fleet.connect(app, "alice", cap_usd=0.10)
    # fake/flat-3c costs exactly $0.03 at its worst and in fact: room for 3 calls.
    answers = await asyncio.gather(*[
        fleet.chat(app, user="alice", model="fake/flat-3c", stream=i % 2 == 0)
        for i in range(24)])
    assert {a.port for a in answers} == {p.port for p in fleet.processes}
    passed = [a for a in answers if a.status == 200]
    refused = Counter((a.status, a.code) for a in answers if a.status != 200)
    assert len(passed) == 3, (refused, fleet.logs())
    assert refused == Counter({(402, "budget_exceeded"): 21})
    assert await fleet.wait_unheld(app, ["alice"]) == []
    assert sum(fleet.billed().values()) == usd_to_nanos("0.09")
    status = await fleet.status(app, "alice")
    assert usd_to_nanos(status["usage"]["monthlyUsd"]) == usd_to_nanos("0.09")
    assert usd_to_nanos(status["remainingUsd"]) == usd_to_nanos("0.01")
    await assert_ledger_matches_upstream(fleet, app)


async def test_a_grant_raced_across_processes_serves_exactly_its_requests(make_fleet):
    fleet = await make_fleet()
    app = await fleet.create_app()
    key = funding_key("grant")
    grant = await fleet.mint_grant(app, requests=3, key=key)
    answers = await asyncio.gather(*[
        fleet.chat(app, grant=grant, model="fake/flat-2c", stream=i % 2 == 1)
        for i in range(24)])
    passed = [a for a in answers if a.status == 200]
    refused = Counter((a.status, a.code) for a in answers if a.status != 200)
    assert len(passed) == 3, (refused, fleet.logs())
    assert refused == Counter({(402, "grant_invalid"): 21})
    assert sorted(a.headers["x-wattfare-grant-remaining"] for a in passed) == ["0", "1", "2"]
    assert len(fleet.billed({key})) == 3
    for p in fleet.processes:  # every process sees the grant used up
        async with fleet.http.get(p.api + "/grants/current", headers={
                "Authorization": f"Bearer {app.secret_key}",
                "x-wattfare-grant": grant}) as r:
            body = await r.json()
        assert (body["used"], body["remaining"]) == (3, 0), (p.name, body)
    ledger = await fleet.ledger(app)
    assert len(ledger) == 3 and all(r.grant_id is not None for r in ledger.values())
    await assert_ledger_matches_upstream(fleet, app)


# ---- fleet-wide state -----------------------------------------------------------
async def test_rl_chat_is_one_limit_for_the_whole_fleet(make_fleet):
    n = 6  # a token comes back every 10 s: the burst below takes far less
    fleet = await make_fleet({"WATTGATE_LIMITS__CHAT_PER_MINUTE": str(n)})
    app = await fleet.create_app()
    await fleet.connect(app, "alice", cap_usd=10)
    await fleet.connect(app, "bob", cap_usd=10)
    answers = await asyncio.gather(*[fleet.chat(app, user="alice") for _ in range(3 * n)])
    assert {a.port for a in answers} == {p.port for p in fleet.processes}
    outcomes = Counter((a.status, a.code) for a in answers)
    assert outcomes == Counter({(200, None): n, (429, "rate_limited"): 2 * n}), \
        (outcomes, fleet.logs())
    assert all(int(a.headers["Retry-After"]) >= 1 for a in answers if a.status == 429)
    assert len(fleet.billed({funding_key("alice")})) == n  # refused calls never left
    # The limit is per app and user: bob's calls pass on every process.
    for p in fleet.processes:
        assert (await fleet.chat(app, user="bob", via=p)).status == 200


async def test_revocation_through_one_process_stops_the_user_on_all_at_once(make_fleet):
    fleet = await make_fleet()
    app = await fleet.create_app()
    await fleet.connect(app, "alice", cap_usd=10)
    await fleet.connect(app, "bob", cap_usd=10)
    # Each process (and each worker, as far as connections spread) has served alice.
    for p in fleet.processes:
        for _ in range(2 * p.workers):
            assert (await fleet.chat(app, user="alice", via=p)).status == 200
    calls_before = len(fleet.billed({funding_key("alice")}))
    assert await fleet.revoke(app, "alice", via=fleet.processes[1]) == 204
    for p in fleet.processes:  # the very next calls, no wait
        for _ in range(2 * p.workers):
            a = await fleet.chat(app, user="alice", via=p)
            assert (a.status, a.code) == (402, "not_connected"), (p.name, a.body)
    assert len(fleet.billed({funding_key("alice")})) == calls_before
    for p in fleet.processes:
        status = await fleet.status(app, "alice", via=p)
        assert status["connected"] is False, (p.name, status)
        assert (await fleet.chat(app, user="bob", via=p)).status == 200


async def test_rotate_secret_refuses_the_old_key_on_every_process_within_a_second(
        make_fleet):
    fleet = await make_fleet()
    app = await fleet.create_app()
    await fleet.connect(app, "alice", cap_usd=10)
    for p in fleet.processes:  # every process has verified (and may cache) the old key
        for _ in range(2 * p.workers):
            assert (await fleet.chat(app, user="alice", via=p)).status == 200
    code, out = await fleet.cli("apps", "rotate-secret", app.app_id, "--overlap", "0",
                                "--json")
    assert code == 0, out
    new = json.loads(out.splitlines()[-1])["secretKey"]
    assert new != app.secret_key
    await asyncio.sleep(1.0)
    for p in fleet.processes:
        for _ in range(2 * p.workers):
            old = await fleet.chat(app, user="alice", via=p)
            assert (old.status, old.code) == (401, "auth"), (p.name, old.body)
            assert (await fleet.chat(new, user="alice", via=p)).status == 200, p.name


async def connections_status(fleet: Fleet, token: str, via: Serve) -> int:
    assert fleet.http is not None
    async with fleet.http.get(via.api + "/connections",
                              headers={"Authorization": f"Bearer {token}"}) as r:
        await r.read()
        return r.status


async def test_a_rolled_secret_works_on_every_process_until_retired_or_its_deadline(
        make_fleet):
    fleet = await make_fleet()
    app = await fleet.create_app()
    await fleet.connect(app, "alice", cap_usd=10)
    old_token = await fleet.session(app, "alice", via=fleet.processes[0])
    for p in fleet.processes:  # every process has verified (and may cache) the old key
        for _ in range(2 * p.workers):
            assert (await fleet.chat(app, user="alice", via=p)).status == 200

    async def everywhere(secret: str, token: str | None, expect: int) -> None:
        for p in fleet.processes:
            for _ in range(2 * p.workers):
                answer = await fleet.chat(secret, user="alice", via=p)
                assert answer.status == expect, (p.name, answer.body)
                if token is not None:
                    assert await connections_status(fleet, token, p) == expect, p.name

    code, out = await fleet.cli("apps", "rotate-secret", app.app_id, "--overlap", "1h",
                                "--json")
    assert code == 0, out
    b = json.loads(out.splitlines()[-1])["secretKey"]
    await asyncio.sleep(1.0)
    await everywhere(app.secret_key, old_token, 200)  # both work while deploys roll
    await everywhere(b, None, 200)
    code, out = await fleet.cli("apps", "retire-secret", app.app_id)
    assert code == 0, out
    await asyncio.sleep(1.0)
    await everywhere(app.secret_key, old_token, 401)
    await everywhere(b, None, 200)

    # A short overlap on the real clock: B works on every process until its deadline,
    # then on none (no process's cache lets it live on).
    code, out = await fleet.cli("apps", "rotate-secret", app.app_id, "--overlap", "4s",
                                "--json")
    assert code == 0, out
    rolled = json.loads(out.splitlines()[-1])
    c = rolled["secretKey"]
    until = calendar.timegm(time.strptime(rolled["previousValidUntil"], "%Y-%m-%dT%H:%M:%SZ"))
    b_token = await fleet.session(App(app.app_id, b), "alice", via=fleet.processes[2])
    await everywhere(b, b_token, 200)
    assert time.time() < until, "the fleet was too slow to check the overlap"
    await asyncio.sleep(until + 1 - time.time())
    await everywhere(b, b_token, 401)
    await everywhere(c, None, 200)

    # Deleted during an overlap: neither secret works anywhere.
    code, out = await fleet.cli("apps", "rotate-secret", app.app_id, "--overlap", "24h",
                                "--json")
    assert code == 0, out
    d = json.loads(out.splitlines()[-1])["secretKey"]
    await asyncio.sleep(1.0)
    await everywhere(c, None, 200)
    code, out = await fleet.cli("apps", "delete", app.app_id)
    assert code == 0, out
    await asyncio.sleep(1.0)
    await everywhere(c, None, 401)
    await everywhere(d, None, 401)
    code, out = await fleet.cli("apps", "rotate-secret", app.app_id)
    assert code == 1 and "unknown app" in out, out


# ---- a process dies -------------------------------------------------------------
async def run_load(fleet: Fleet, app: App, p: Serve, users: list[str], kinds: list[str],
                   stop: asyncio.Event, seen: Counter[str], concurrency: int) -> None:
    """Fault-drill calls (``wattgate.faults``) on one process until ``stop``."""
    tenant = faults.Tenant(app.app_id, app.secret_key, users)
    queue = list(reversed(kinds))
    async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True)) as http:
        async def worker() -> None:
            while queue and not stop.is_set():
                kind = queue.pop()
                user = users[len(queue) % len(users)]
                seen[await faults.one_call(http, p.api, tenant, user, kind)] += 1
        await asyncio.gather(*[worker() for _ in range(concurrency)])


def in_flight(fleet: Fleet, keys: set[str]) -> int:
    return sum(1 for c in fleet.fake.calls
               if not c.finished and c.authorization.removeprefix("Bearer ") in keys)


async def test_kill_9_of_one_process_mid_load_others_serve_and_nothing_is_lost_or_doubled(
        make_fleet):
    fleet = await make_fleet({"WATTGATE_METERING__RECONCILE_INTERVAL": "1"},
                             fake=faults.drill_fake())
    app = await fleet.create_app()
    users = {p.name: [f"{p.name}-u{j}" for j in range(3)] for p in fleet.processes}
    for p in fleet.processes:  # each process's calls are paid with its users' own keys
        for user in users[p.name]:
            await fleet.connect(app, user, cap_usd=1000)
    victim, survivors = fleet.processes[0], fleet.processes[1:]
    victim_keys = {funding_key(u) for u in users[victim.name]}
    stops = {p.name: asyncio.Event() for p in fleet.processes}
    seen = {p.name: Counter[str]() for p in fleet.processes}
    loads = [asyncio.ensure_future(run_load(
        fleet, app, p, users[p.name], faults.plan(10_000, seed=i), stops[p.name],
        seen[p.name], concurrency=4)) for i, p in enumerate(fleet.processes)]
    deadline = time.monotonic() + 20
    while (in_flight(fleet, victim_keys) < 2 or sum(seen[victim.name].values()) < 10) \
            and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert in_flight(fleet, victim_keys) >= 1, "the kill must land mid-call"
    killed_at = time.monotonic()
    victim.kill9()
    stops[victim.name].set()
    served_at_kill = {p.name: seen[p.name]["200"] for p in survivors}
    await asyncio.sleep(2.0)  # the survivors keep serving
    for p in survivors:
        stops[p.name].set()
    await asyncio.gather(*loads)
    for p in survivors:
        assert seen[p.name]["connection_error"] == 0, (p.name, seen[p.name])
        assert seen[p.name]["200"] > served_at_kill[p.name], (p.name, seen[p.name])
    # The dead process's holds are given back by the fleet itself: its session is gone,
    # and after OWNER_GRACE unseen the leader's next pass sweeps them.
    every_user = [u for us in users.values() for u in us]
    held = await fleet.wait_unheld(app, every_user, timeout=OWNER_GRACE + 15)
    assert held == [], f"budget still held for {held}: the dead process's holds stay"
    await fleet.reconcile()
    ledger = await fleet.ledger(app)
    survivor_keys = {funding_key(u) for p in survivors for u in users[p.name]}
    survivor_users = {u for p in survivors for u in users[p.name]}
    assert differences(fleet.billed(survivor_keys), of_users(ledger, survivor_users)) == {}
    # Of the dead process's calls, only a generation the upstream had not yet named to
    # it (no response headers before the kill) may be missing, and nothing else differs.
    mine = fleet.billed(victim_keys)
    lost = differences(mine, of_users(ledger, set(users[victim.name])))
    missing = lost.pop("billed upstream, not in the ledger", [])
    assert lost == {}
    named_before_kill = [g for g in missing
                         if (t := fleet.fake.generations[g].answered_at) is not None
                         and t < killed_at - NAMING_GRACE]
    assert named_before_kill == []
    code, out = await fleet.cli("ledger", "check")
    assert code == 0, out


# ---- the database goes away -----------------------------------------------------
async def test_postgresql_restarted_mid_load_503s_meters_everything_and_resumes(
        make_fleet):
    cluster = await asyncio.to_thread(restartable_cluster)
    started: list[Fleet] = []
    try:
        fleet = await make_fleet({"WATTGATE_METERING__RECONCILE_INTERVAL": "1"},
                                 database_url=cluster.url, fake=faults.drill_fake())
        started.append(fleet)
        app = await fleet.create_app()
        users = [f"u{j}" for j in range(6)]
        for user in users:
            await fleet.connect(app, user, cap_usd=1000)
        stop = asyncio.Event()
        seen = {p.name: Counter[str]() for p in fleet.processes}
        kinds = ["ok", "stream", "slow_stream"]
        loads = [asyncio.ensure_future(run_load(
            fleet, app, p, users, random.Random(i).choices(kinds, k=10_000), stop,
            seen[p.name], concurrency=2)) for i, p in enumerate(fleet.processes)]
        deadline = time.monotonic() + 20
        while (sum(sum(s.values()) for s in seen.values()) < 15
               or in_flight(fleet, {funding_key(u) for u in users}) < 1) \
                and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

        await asyncio.to_thread(cluster.halt, "fast")
        # While it is down, every new call is refused 503 and none reaches the upstream.
        for p in fleet.processes:
            for i in range(2 * p.workers):
                a = await fleet.chat(app, user=users[i], via=p, content=f"probe-down {p.name}")
                assert (a.status, a.code) == (503, "unavailable"), (p.name, a.status, a.body)
            async with fleet.http.get(p.url + "/healthz") as r:
                assert r.status == 503, p.name
        reached = [c for c in fleet.fake.calls if "probe-down" in json.dumps(c.body)]
        assert reached == [], "a call passed unmetered while the ledger was down"

        await asyncio.to_thread(cluster.resume)
        # Service resumes by itself: each process answers again, nobody restarts it.
        for p in fleet.processes:
            deadline = time.monotonic() + 30
            while (a := await fleet.chat(app, user=users[0], via=p)).status != 200 \
                    and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            assert a.status == 200, (p.name, a.status, a.body, fleet.logs())
        after = await asyncio.gather(*[fleet.chat(app, user=users[i % len(users)])
                                       for i in range(12)])
        assert [a.status for a in after] == [200] * 12, [a.body for a in after]
        stop.set()
        await asyncio.gather(*loads)
        held = await fleet.wait_unheld(app, users, timeout=15)
        assert held == [], (f"budget still held for {held}: calls in flight at the "
                            "restart never settled")
        await assert_ledger_matches_upstream(fleet, app)
        spent = sum([usd_to_nanos((await fleet.status(app, u))["usage"]["monthlyUsd"])
                     for u in users])
        assert spent == sum(fleet.billed().values()) > 0
    finally:
        for fleet in started:
            await fleet.close()  # before its database goes
        await asyncio.to_thread(cluster.stop)

