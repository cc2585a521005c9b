"""Deleting an app: nothing it leaves can be inherited, and its history stays auditable."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

from wattgate.money import usd_to_nanos
from wattgate.reconcile import Reconciler
from wattgate.views.state import upstream_key


async def chat(h, app, user, *, stream=True):  # type: ignore[no-untyped-def]
    async with h.http.post(
            h.api + "/chat/completions",
            json={"model": "openai/gpt-4o-mini", "stream": stream,
                  "messages": [{"role": "user", "content": "hello"}]},
            headers={"Authorization": f"Bearer {app.secret_key}", "x-wattfare-user": user}) as r:
        return r.status, await r.read()


async def until(predicate, seconds: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    for _ in range(int(seconds / 0.01)):
        if await predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("timed out")


async def test_a_new_user_of_another_app_inherits_nothing_from_a_deleted_one(harness):
    """Issue 14 item 2: SQLite handed the deleted connection's id to the next one,
    which then started with the deleted user's spend and was charged for the
    deleted app's call still in flight."""
    old = await harness.create_app("Old")
    await harness.connect(old, "alice", monthly_usd=10)
    assert (await chat(harness, old, "alice"))[0] == 200
    spent_before = (await harness.status(old, "alice"))["usage"]["monthlyUsd"]
    assert spent_before > 0

    harness.fake.chunk_delay = 0.05  # a call of the old app, still streaming at the deletion
    in_flight = asyncio.create_task(chat(harness, old, "alice"))
    db = harness.db

    async def held() -> bool:
        return await db.one("SELECT COUNT(*) FROM holds") == 1
    await until(held)
    await harness.gw.store.delete_app(old.app_id, now=harness.clock())

    new = await harness.create_app("New")
    body = await harness.connect(new, "bob", monthly_usd=1)
    assert body["usage"] == {"monthlyUsd": 0} and body["remainingUsd"] == 1
    assert (await in_flight)[0] == 200  # the old app's call finishes and is billed...
    harness.fake.chunk_delay = 0
    status = await harness.status(new, "bob")
    assert status["usage"] == {"monthlyUsd": 0} and status["remainingUsd"] == 1  # ...not to bob

    # ...but to the deleted app's own connection, which nobody else can ever get.
    [(alice_id,)] = await db.query("SELECT connection_id FROM connections "
                                   "WHERE app_user_id = 'alice'")
    [(bob_id,)] = await db.query("SELECT connection_id FROM connections "
                                 "WHERE app_user_id = 'bob'")
    assert bob_id > alice_id
    rows = await db.query("SELECT app_id, connection_id, cost_nanos FROM usage "
                          "ORDER BY usage_id")
    assert [(a, c) for a, c, _ in rows] == [(old.app_id, alice_id)] * 2
    assert sum(r[2] for r in rows) == usd_to_nanos(harness.fake.charged)
    assert await db.one("SELECT COUNT(*) FROM holds") == 0
    assert await harness.gw.store.check(now=harness.clock(), hold_ttl=900) == []

    # Bob spends from zero, against his own cap.
    assert (await chat(harness, new, "bob"))[0] == 200
    bob = await harness.status(new, "bob")
    assert 0 < bob["usage"]["monthlyUsd"] < spent_before * 2


async def test_a_deleted_app_stops_and_its_history_stays_exportable(harness):
    app = await harness.create_app("Gone")
    await harness.connect(app, "carol")
    assert (await chat(harness, app, "carol", stream=False))[0] == 200
    await harness.gw.store.delete_app(app.app_id, now=harness.clock())
    assert (await chat(harness, app, "carol"))[0] == 401
    # The gateway no longer lists the app, nor the user's approval of it.
    assert app.app_id not in [a.app_id for a in await harness.gw.store.list_apps()]
    connection = await harness.gw.store.get_connection(app.app_id, "carol")
    assert connection is not None and connection.state == "revoked" and not connection.connected
    env = harness.db.env

    def wattgate(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "wattgate", *args], env=env,
                              capture_output=True, text=True, timeout=60, check=False)
    out = await asyncio.to_thread(wattgate, "usage", "export", "--app", app.app_id,
                                  "--format", "jsonl")
    assert out.returncode == 0, out.stderr
    [line] = [json.loads(t) for t in out.stdout.splitlines()]
    assert (line["app_id"], line["user_id"], line["state"]) == (app.app_id, "carol", "final")
    check = await asyncio.to_thread(wattgate, "ledger", "check")
    assert check.returncode == 0, check.stdout + check.stderr
    # Its key, which no call can use, was kept (and `ledger check` accepts that) only
    # while a call could still need it: nothing is in flight or provisional, so the
    # next background pass erases it.
    assert connection.sealed_key is not None
    assert await Reconciler(harness.gw, harness.app[upstream_key]).erase_revoked_keys() == 1
    connection = await harness.gw.store.get_connection(app.app_id, "carol")
    assert connection is not None and connection.sealed_key is None


async def test_a_deleted_apps_grant_key_outlives_no_call_that_could_need_it(harness):
    """A typed-key grant of a deleted app ends at once (no call spends from it), but its
    key is kept until the reconciler has asked the upstream the final cost of its
    provisional call, then erased by the background pass."""
    from tests.test_grants_functional import mint_grant, redeem

    app = await harness.create_app("Gone")
    status, grant = await mint_grant(harness, app, requests=2)
    assert status == 200, grant
    status, _, _ = await redeem(harness, app, grant["grantToken"], model="fake/no-usage",
                                stream=True)
    assert status == 200
    [(row, _)] = await harness.gw.store.provisional_usage()
    assert row.grant_id is not None and row.cost_nanos > usd_to_nanos(harness.fake.charged)
    assert await harness.gw.store.delete_app(app.app_id, now=harness.clock())
    assert (await redeem(harness, app, grant["grantToken"]))[0] == 401  # nothing spends
    reconciler = Reconciler(harness.gw, harness.app[upstream_key])
    assert await reconciler.erase_revoked_keys() == 0  # its call may still be corrected
    assert (await harness.gw.store.get_grant_by_id(row.grant_id)).sealed_key is not None
    assert (await reconciler.run_once(force=True)).corrected == 1
    assert await harness.gw.store.provisional_usage() == []
    assert await reconciler.erase_revoked_keys() == 1
    stored = await harness.gw.store.get_grant_by_id(row.grant_id)
    assert stored.sealed_key is None and stored.spent_nanos == usd_to_nanos(harness.fake.charged)
