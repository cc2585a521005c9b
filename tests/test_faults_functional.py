"""The money promise under faults and a crash, through a real ``wattgate serve`` process.

Smaller forms of the drills in ``scripts/reliability.py`` (figures in
docs/reliability.md): every upstream dollar is recorded exactly once.
"""

from __future__ import annotations

import pytest

from wattgate import faults

pytestmark = pytest.mark.slow


@pytest.fixture
def database_url(backend, request) -> str:  # type: ignore[no-untyped-def]
    """The drilled gateway's ledger: a fresh PostgreSQL database, or its own SQLite file."""
    return request.getfixturevalue("make_pg_url")() if backend == "postgresql" else ""


async def test_mixed_faults_then_reconcile_match_the_upstream_exactly(database_url):
    result = await faults.mixed_faults(120, seed=11, database_url=database_url)
    before, after = result["before"], result["after"]
    kinds = {kind for kind, _ in result["seen"]}
    assert kinds == set(faults.KINDS), "every fault kind was injected"
    assert before.provisional > 0, "some calls ended without usage and were estimated"
    assert after.charged_nanos > 0
    assert after.ledger_nanos == after.aggregate_nanos == after.charged_nanos
    assert not (after.unknown or after.mismatched or after.foreign)
    assert after.provisional == 0 and after.open_holds == 0
    assert result["check"][0] == 0, result["check"][1]


async def test_kill_9_mid_load_loses_no_committed_row_and_double_debits_nothing(database_url):
    result = await faults.kill_nine(160, kill_after=0.5, seed=12, database_url=database_url)
    after = result["after"]
    assert result["in_flight"] > 0, "the kill landed while calls were in flight"
    assert result["check"][0] == 0, result["check"][1]
    assert after.open_holds == 0
    assert not after.mismatched, "a generation recorded at a different amount"
    assert not after.foreign, "a debit for a generation the upstream never billed"
    assert after.ledger_nanos == after.aggregate_nanos
    # Only calls the gateway was still working on may be missing, and exactly their cost:
    # and only those the upstream had not yet named (headers sent) before the kill.
    assert not result["named_lost"], "a generation named before the kill is missing"
    assert len(after.unknown) <= result["exposed"]
    assert after.ledger_nanos + result["unknown_nanos"] == after.charged_nanos
    assert result["ok"]


async def test_uncorrectable_rows_do_not_starve_reconciliation(make_harness):
    import asyncio

    from wattgate.reconcile import Reconciler
    from wattgate.views.state import upstream_key

    h = await make_harness({"WATTGATE_LIMITS__CHAT_PER_MINUTE": "100000"})
    app = await h.create_app()
    await h.connect(app, "alice", monthly_usd=1000)
    await h.connect(app, "bob", monthly_usd=1000)
    headers = {"Authorization": f"Bearer {app.secret_key}"}
    body = {"model": "fake/cut", "stream": True, "max_tokens": 8,
            "messages": [{"role": "user", "content": "x"}]}

    async def cut(user: str) -> None:
        async with h.http.post(h.api + "/chat/completions", json=body,
                               headers={**headers, "x-wattfare-user": user}) as r:
            await r.read()

    for _ in range(17):
        await asyncio.gather(*[cut("alice") for _ in range(30)])
    token = await h.session(app, "alice")
    async with h.http.delete(h.api + "/connections",
                             headers={"Authorization": f"Bearer {token}"}) as r:
        assert r.status == 204  # her key is erased: her 510 rows can never be asked about
    await cut("bob")
    await Reconciler(h.gw, h.app[upstream_key]).run_once(force=True)
    bob = (await h.gw.store.connections_for_app(app.app_id))
    rows = [u for c in bob if c.app_user_id == "bob"
            for u in await h.gw.store.recent_usage(c.connection_id)]
    assert rows and not rows[0].provisional, "bob's cut call was never reconciled"
