"""Provisional calls are corrected to the upstream's final cost, exactly once."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys

import pytest

from wattgate.money import usd_to_nanos
from wattgate.reconcile import Reconciler
from wattgate.views.state import upstream_key
from wattgate.fakemodel import reply_words


async def ledger_total(h) -> int:
    db = sqlite3.connect(h.tmp_path / "wattgate.db")
    try:
        return db.execute("SELECT COALESCE(SUM(cost_nanos), 0) FROM usage").fetchone()[0]
    finally:
        db.close()


async def call(h, app, user, model, stream=True):
    async with h.http.post(
            h.api + "/chat/completions",
            json={"model": model, "stream": stream,
                  "messages": [{"role": "user", "content": "hello there"}]},
            headers={"Authorization": f"Bearer {app.secret_key}", "x-wattfare-user": user}) as r:
        try:
            return r.status, await r.read()
        except Exception as e:  # an upstream cut may end our stream early, as it should
            return r.status, repr(e).encode()


@pytest.mark.parametrize("model", ["fake/cut", "fake/midstream-error", "fake/no-usage"])
async def test_calls_without_usage_are_provisional_then_exact(harness, model):
    app = await harness.create_app()
    await harness.connect(app, "ann", monthly_usd=5)
    status, _ = await call(harness, app, "ann", model)
    assert status == 200
    rows = await harness.gw.store.provisional_usage()
    assert len(rows) == 1
    estimate = rows[0][0].cost_nanos
    assert estimate > usd_to_nanos(harness.fake.charged) > 0  # never a silent $0
    reconciler = Reconciler(harness.gw, harness.app[upstream_key])
    report = await reconciler.run_once()
    assert report.corrected == 1
    assert await ledger_total(harness) == usd_to_nanos(harness.fake.charged)
    assert await harness.gw.store.provisional_usage() == []
    spent = (await harness.status(app, "ann"))["usage"]["monthlyUsd"]
    assert usd_to_nanos(str(spent)) == usd_to_nanos(harness.fake.charged)
    assert await harness.gw.store.check(now=harness.clock(), hold_ttl=900) == []
    # Idempotent: a second pass changes nothing.
    assert (await reconciler.run_once(force=True)).corrected == 0
    assert await ledger_total(harness) == usd_to_nanos(harness.fake.charged)


async def test_not_ready_upstream_is_retried_with_backoff(harness):
    app = await harness.create_app()
    await harness.connect(app, "ben")
    await call(harness, app, "ben", "fake/cut")
    harness.fake.generation_404s = 2
    reconciler = Reconciler(harness.gw, harness.app[upstream_key])
    assert (await reconciler.run_once()).waiting == 1
    assert (await reconciler.run_once()).waiting == 1  # backing off: not asked again yet
    harness.clock.advance(1.5)
    assert (await reconciler.run_once()).waiting == 1  # asked: 404 again
    harness.clock.advance(5)
    assert (await reconciler.run_once()).corrected == 1
    assert await ledger_total(harness) == usd_to_nanos(harness.fake.charged)


async def test_hold_left_by_a_crash_becomes_a_provisional_row(harness):
    app = await harness.create_app()
    await harness.connect(app, "cat", monthly_usd=5)
    store = harness.gw.store
    conn = await store.get_connection(app.app_id, "cat")
    from wattgate.ledger import period_of
    period = period_of(harness.clock())
    # A call admitted and answered upstream, then the process died before settling.
    await call(harness, app, "cat", "openai/gpt-4o-mini")
    gen = harness.fake.calls[-1].generation_id
    real = usd_to_nanos(harness.fake.charged)
    hold = await store.admit(conn.connection_id, period, 5_000_000, now=harness.clock(),
                             expires_at=harness.clock() + 900)
    # Pretend a second call named a generation the fake also billed.
    harness.fake.charged *= 2
    harness.fake.calls[-1].generation_id = gen  # same fake call record, cost doubles
    other = "gen-crashed"
    harness.fake.generations[other] = harness.fake.calls[-1]
    store.note_generation(hold, other, app.app_id, "openai/gpt-4o-mini")
    assert await store.sweep_holds() == 1  # what a restart does
    assert await store.open_holds() == 0
    rows = await store.provisional_usage()
    assert [r[0].generation_id for r in rows] == [other]
    assert rows[0][0].cost_nanos == 5_000_000
    await Reconciler(harness.gw, harness.app[upstream_key]).run_once()
    assert await ledger_total(harness) == 2 * real == usd_to_nanos(harness.fake.charged)
    assert await store.check(now=harness.clock(), hold_ttl=900) == []


async def test_final_settle_after_a_sweep_is_not_counted_twice(harness):
    from wattgate.store import Usage
    app = await harness.create_app()
    await harness.connect(app, "dot", monthly_usd=5)
    store = harness.gw.store
    conn = await store.get_connection(app.app_id, "dot")
    t = 1_793_577_600.0  # 2026-11-02 00:00 UTC: a call of period 2026-11 is dated in it
    hold = await store.admit(conn.connection_id, "2026-11", 1000, now=t, expires_at=t + 900)
    store.note_generation(hold, "gen-slow", app.app_id, "m")
    await store.sweep_holds(older_than=t + 1)
    final = Usage("gen-slow", app.app_id, conn.connection_id, None, "m", 3, 4, 700, False,
                  "ok", 10, t)
    assert await store.settle(hold, final, "2026-11") is True
    assert await store.settle(hold, final, "2026-11") is False
    assert await store.period_spent(conn.connection_id, "2026-11") == 700
    assert await store.check(now=t + 10, hold_ttl=900) == []


async def test_ledger_check_cli_catches_a_tampered_aggregate(harness, tmp_path):
    app = await harness.create_app()
    await harness.connect(app, "eve")
    await call(harness, app, "eve", "openai/gpt-4o-mini")
    env = {"WATTGATE_DATABASE__PATH": str(tmp_path / "wattgate.db"), "PATH": "/usr/bin:/bin"}
    ok = subprocess.run([sys.executable, "-m", "wattgate", "ledger", "check"], env=env,
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "ledger ok" in ok.stdout
    db = sqlite3.connect(tmp_path / "wattgate.db")
    db.execute("UPDATE periods SET spent_nanos = spent_nanos + 1")
    db.commit()
    db.close()
    bad = subprocess.run([sys.executable, "-m", "wattgate", "ledger", "check"], env=env,
                         capture_output=True, text=True)
    assert bad.returncode == 1
    assert "aggregate" in bad.stdout and "Traceback" not in bad.stderr


async def revoke(h, app, user) -> None:
    token = await h.session(app, user)
    async with h.http.delete(h.api + "/connections",
                             headers={"Authorization": f"Bearer {token}"}) as r:
        assert r.status == 204


async def test_a_revocation_reconciles_before_it_erases_the_key(harness):
    """Without the key nobody can ask what a provisional call really cost: the
    revocation asks first (bounded), then erases it."""
    app = await harness.create_app()
    await harness.connect(app, "bea", monthly_usd=5)
    assert (await call(harness, app, "bea", "fake/no-usage"))[0] == 200
    assert len(await harness.gw.store.provisional_usage()) == 1
    await revoke(harness, app, "bea")
    connection = await harness.gw.store.get_connection(app.app_id, "bea")
    assert connection.state == "revoked" and connection.sealed_key is None
    assert await harness.gw.store.provisional_usage() == []
    assert await ledger_total(harness) == usd_to_nanos(harness.fake.charged) > 0
    assert await harness.gw.store.check(now=harness.clock(), hold_ttl=900) == []


async def test_a_revocation_keeps_the_key_while_the_upstream_cannot_say_yet(harness):
    """The key that can ask about a provisional call stays (unusable for any call)
    until the upstream answered or reconciliation gave up on the call."""
    import time

    app = await harness.create_app()
    await harness.connect(app, "cal", monthly_usd=5)
    assert (await call(harness, app, "cal", "fake/no-usage"))[0] == 200
    harness.fake.generation_404s = 10**6  # "not ready yet", forever
    t0 = time.monotonic()
    await revoke(harness, app, "cal")
    assert time.monotonic() - t0 < 5  # the revocation answers at once all the same
    assert (await call(harness, app, "cal", "openai/gpt-4o-mini"))[0] == 402
    connection = await harness.gw.store.get_connection(app.app_id, "cal")
    assert connection.state == "revoked" and connection.sealed_key is not None
    reconciler = Reconciler(harness.gw, harness.app[upstream_key])
    await reconciler.run_once(force=True)
    assert await reconciler.erase_revoked_keys() == 0  # still worth asking about
    harness.clock.advance(harness.gw.config.metering_reconcile_give_up + 1)
    assert await reconciler.erase_revoked_keys() == 1
    connection = await harness.gw.store.get_connection(app.app_id, "cal")
    assert connection.state == "revoked" and connection.sealed_key is None
    # The row keeps its worst-case estimate: never less than what was billed.
    [(row, _)] = await harness.gw.store.provisional_usage(since=0)
    assert row.cost_nanos > usd_to_nanos(harness.fake.charged)


async def test_a_reconnection_during_a_revocation_keeps_its_new_key(harness):
    from wattgate.reconcile import revoke as revoke_connection
    from wattgate.store import ACTIVE

    app = await harness.create_app()
    await harness.connect(app, "dan", monthly_usd=5)
    assert (await call(harness, app, "dan", "fake/no-usage"))[0] == 200
    store = harness.gw.store
    old = await store.get_connection(app.app_id, "dan")
    real_cost = harness.app[upstream_key].generation_cost

    async def slow_cost(generation_id, key):  # the user reconnects meanwhile
        await store.save_connection(app.app_id, "dan", state=ACTIVE, cap_nanos=old.cap_nanos,
                                    sealed_key="v1.k1.new", browser_hash=None,
                                    now=harness.clock())
        return await real_cost(generation_id, key)
    harness.app[upstream_key].generation_cost = slow_cost
    try:
        await revoke_connection(harness.gw, harness.app[upstream_key], old)
    finally:
        harness.app[upstream_key].generation_cost = real_cost
    now = await store.get_connection(app.app_id, "dan")
    assert now.state == ACTIVE and now.sealed_key == "v1.k1.new"


async def test_keys_left_on_revoked_connections_by_a_crash_are_erased(harness):
    app = await harness.create_app()
    await harness.connect(app, "eve", monthly_usd=5)
    db = sqlite3.connect(harness.tmp_path / "wattgate.db")
    db.execute("UPDATE connections SET state = 'revoked'")  # revoked, key not yet erased
    db.commit()
    db.close()
    # What a start does: nothing of this connection awaits a final cost.
    assert await harness.gw.store.erase_revoked_keys(since=harness.clock() - 86400) == 1
    connection = await harness.gw.store.get_connection(app.app_id, "eve")
    assert connection.state == "revoked" and connection.sealed_key is None


async def test_keys_left_by_a_crash_wait_for_the_calls_they_can_still_correct(harness):
    """A crash mid-revocation leaves a key and a provisional call: a start erases the
    key only once that call had its final cost, not before."""
    app = await harness.create_app()
    await harness.connect(app, "fay", monthly_usd=5)
    assert (await call(harness, app, "fay", "fake/no-usage"))[0] == 200
    db = sqlite3.connect(harness.tmp_path / "wattgate.db")
    db.execute("UPDATE connections SET state = 'revoked'")  # revoked, key not yet erased
    db.commit()
    db.close()
    store = harness.gw.store
    assert await store.erase_revoked_keys(since=harness.clock() - 86400) == 0
    assert (await Reconciler(harness.gw, harness.app[upstream_key]).run_once()).corrected == 1
    assert await store.erase_revoked_keys(since=harness.clock() - 86400) == 1
    assert await ledger_total(harness) == usd_to_nanos(harness.fake.charged)


async def test_a_start_erases_the_typed_key_of_a_grant_that_ended(make_harness, tmp_path,
                                                                   clock):
    """The rule of revoked keys runs at start for grants too: a gateway that was down when
    a typed-key grant expired (used up, or never used) erases its key as it starts, and
    keeps the key of a grant still usable."""
    from wattgate.config import load_config
    from wattgate.gateway import open_gateway

    path = tmp_path / "ended.db"
    store = (await open_gateway(load_config(None, env={"WATTGATE_DATABASE__PATH": str(path)}),
                                clock=clock)).store
    await store.create_app("app0123456789abcdef", "A", "h", ["http://localhost:3000"],
                           now=clock())
    ended, live = [await store.create_grant(
        "app0123456789abcdef", f"token-{n}", 2, None, sealed_key="v1.k1.sealed",
        connection_id=None, now=clock() - 700, expires_at=clock() + offset)
        for n, offset in ((1, -100), (2, 500))]
    await store.close()
    h = await make_harness({"WATTGATE_DATABASE__PATH": str(path)})
    assert (await h.gw.store.get_grant_by_id(ended.grant_id)).sealed_key is None
    assert (await h.gw.store.get_grant_by_id(live.grant_id)).sealed_key == "v1.k1.sealed"


# ---- revocation with calls in flight ------------------------------------------

async def revoke_mid_stream(h, model: str):
    """A slow stream through the openai client; the user revokes after its first chunk.
    Returns (the app, the text the client got, the connection right after the revocation)."""
    import openai

    h.fake.chunk_delay = 0.15
    app = await h.create_app()
    await h.connect(app, "gus", monthly_usd=5)
    async with openai.AsyncOpenAI(base_url=h.api, api_key=app.secret_key, max_retries=0,
                                  default_headers={"x-wattfare-user": "gus"}) as oa:
        chunks = await oa.chat.completions.create(
            model=model, stream=True, messages=[{"role": "user", "content": "hi"}])
        received = []
        async for chunk in chunks:
            if chunk.choices and chunk.choices[0].delta.content:
                received.append(chunk.choices[0].delta.content)
                if len(received) == 1:
                    await revoke(h, app, "gus")
                    during = await h.gw.store.get_connection(app.app_id, "gus")
                    # No new call from the moment of the revocation.
                    with pytest.raises(openai.APIStatusError) as refused:
                        await oa.chat.completions.create(
                            model="openai/gpt-4o-mini",
                            messages=[{"role": "user", "content": "more"}])
                    assert refused.value.status_code == 402
                    assert refused.value.body["code"] == "not_connected"
    return app, "".join(received), during


async def wait_for_erasure(h, app, user):
    for _ in range(200):
        connection = await h.gw.store.get_connection(app.app_id, user)
        if connection.sealed_key is None:
            return connection
        await asyncio.sleep(0.05)
    raise AssertionError("the revoked connection's key was never erased")


async def test_a_call_running_when_the_user_revokes_finishes_and_is_billed_exactly(
        make_harness):
    h = await make_harness({"WATTGATE_METERING__RECONCILE_INTERVAL": "0.1"})
    app, text, during = await revoke_mid_stream(h, "openai/gpt-4o-mini")
    # The client got the whole answer: the call was admitted within the cap before.
    assert text == "".join(reply_words("hi"))
    # The key outlived the revocation while the call ran (it could still be corrected).
    assert during.state == "revoked" and during.sealed_key is not None
    connection = await wait_for_erasure(h, app, "gus")
    assert connection.state == "revoked"
    assert await h.gw.store.provisional_usage(since=0) == []
    assert await ledger_total(h) == usd_to_nanos(h.fake.charged) > 0
    assert await h.gw.store.open_holds() == 0


async def test_a_running_call_that_ends_without_usage_is_reconciled_before_the_key_goes(
        make_harness):
    """The stream ends with no usage after the revocation: the key stays until
    GET /generation gave the exact cost, then goes; no row is left at its estimate."""
    h = await make_harness({"WATTGATE_METERING__RECONCILE_INTERVAL": "0.1"})
    h.fake.generation_404s = 1  # "not ready yet" once
    app, text, during = await revoke_mid_stream(h, "fake/no-usage")
    assert text == "".join(reply_words("hi"))
    assert during.sealed_key is not None
    for _ in range(100):  # past the reconciler's back-off
        if not await h.gw.store.provisional_usage(since=0):
            break
        h.clock.advance(5)
        await asyncio.sleep(0.05)
    connection = await wait_for_erasure(h, app, "gus")
    assert connection.state == "revoked"
    assert await h.gw.store.provisional_usage(since=0) == []
    assert await ledger_total(h) == usd_to_nanos(h.fake.charged) > 0
