"""Provisional calls are corrected to the upstream's final cost, exactly once."""

from __future__ import annotations

import sqlite3
import subprocess
import sys

import pytest

from wattgate.money import usd_to_nanos
from wattgate.reconcile import Reconciler
from wattgate.views.state import upstream_key


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
    hold = await store.admit(conn.connection_id, "2026-11", 1000, now=0, expires_at=900)
    store.note_generation(hold, "gen-slow", app.app_id, "m")
    await store.sweep_holds(older_than=1)
    final = Usage("gen-slow", app.app_id, conn.connection_id, None, "m", 3, 4, 700, False,
                  "ok", 10, 5.0)
    assert await store.settle(hold, final, "2026-11") is True
    assert await store.settle(hold, final, "2026-11") is False
    assert await store.period_spent(conn.connection_id, "2026-11") == 700
    assert await store.check(now=10, hold_ttl=900) == []


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


async def test_a_revocation_erases_the_key_even_when_the_upstream_cannot_say_yet(harness):
    import time

    app = await harness.create_app()
    await harness.connect(app, "cal", monthly_usd=5)
    assert (await call(harness, app, "cal", "fake/no-usage"))[0] == 200
    harness.fake.generation_404s = 10**6  # "not ready yet", forever
    t0 = time.monotonic()
    await revoke(harness, app, "cal")
    assert time.monotonic() - t0 < 5
    connection = await harness.gw.store.get_connection(app.app_id, "cal")
    assert connection.state == "revoked" and connection.sealed_key is None
    # The row keeps its worst-case estimate: never less than what was billed.
    [(row, _)] = await harness.gw.store.provisional_usage()
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
    assert await harness.gw.store.erase_revoked_keys() == 1  # what a start does
    connection = await harness.gw.store.get_connection(app.app_id, "eve")
    assert connection.state == "revoked" and connection.sealed_key is None
