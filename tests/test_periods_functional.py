"""Which period a call belongs to: the one it was admitted in, for every reader.

A call admitted on Oct 31 at 23:59:59 and settled on Nov 1 is October's in the
user's status, the usage export and the console; its hold never blocks a call
of November, and no period's cap is ever passed.
"""

from __future__ import annotations

import asyncio
import calendar
import csv
import io
import re
from decimal import Decimal

from conftest import Clock
from test_admin_functional import close_consoles, sign_in  # noqa: F401 (fixture)
from test_export import export_cli

from wattgate.fakeupstream import FakeModel

OCT_31_LAST_SECOND = calendar.timegm((2026, 10, 31, 23, 59, 59))
SLOW = "fake/slow-3c"  # $0.03 a call, exactly its worst case, and slow to answer


def call(h, app, user: str, model: str, *, stream: bool = False):
    return h.http.post(h.api + "/chat/completions",
                       json={"model": model, "stream": stream,
                             "messages": [{"role": "user", "content": "hi"}]},
                       headers={"Authorization": f"Bearer {app.secret_key}",
                                "x-wattfare-user": user})


async def test_a_call_admitted_on_oct_31_and_settled_on_nov_1_is_octobers_everywhere(
        make_harness, fake_upstream, capsys, monkeypatch):
    fake_upstream.models[SLOW] = FakeModel(Decimal(0), Decimal(0), Decimal("0.03"), delay=0.05)
    clock = Clock(OCT_31_LAST_SECOND)
    h = await make_harness(clock_fn=clock)
    app = await h.create_app()
    await h.connect(app, "ann", monthly_usd=0.05)  # room for one $0.03 call a month

    # Admitted in the last second of October; still streaming when November starts.
    async with call(h, app, "ann", SLOW, stream=True) as october:
        assert october.status == 200
        await october.content.readline()
        clock.advance(2)  # Nov 1, 00:00:01 UTC
        # October's hold is October's: it does not block November's first call.
        async with call(h, app, "ann", SLOW) as november:
            assert november.status == 200, await november.text()
            await november.read()
        await october.read()  # October's call settles now, on Nov 1

    # November: the user's status, the export and the console agree on one call, $0.03.
    status = await h.status(app, "ann")
    assert status["usage"] == {"monthlyUsd": 0.03} and status["remainingUsd"] == 0.02
    rows = list(csv.DictReader(io.StringIO(await export_cli(
        h, capsys, monkeypatch, "--app", app.app_id, "--format", "csv",
        "--from", "2026-11-01", "--to", "2026-11-30"))))
    assert [r["cost_usd"] for r in rows] == ["0.030000000"]
    console = await sign_in(h)
    _, page = await console.page(f"/admin/apps/{app.app_id}")
    assert re.search(r"Spend in November 2026</span><b>\$0.03</b>"
                     r"<span class=\"muted\">1 calls</span>", page), page
    assert re.search(r'data-user="ann".*?<span>\$0.03</span>', page, re.DOTALL)

    # October holds the call admitted in it, dated in it.
    rows = list(csv.DictReader(io.StringIO(await export_cli(
        h, capsys, monkeypatch, "--app", app.app_id, "--format", "csv",
        "--from", "2026-10-01", "--to", "2026-10-31"))))
    assert [(r["time"], r["cost_usd"]) for r in rows] == \
        [("2026-10-31T23:59:59.000Z", "0.030000000")]
    clock.now = OCT_31_LAST_SECOND
    assert (await h.status(app, "ann"))["usage"] == {"monthlyUsd": 0.03}
    clock.advance(2)

    # And November's cap still holds: a second $0.03 call would pass $0.05.
    async with call(h, app, "ann", SLOW) as refused:
        assert refused.status == 402
        assert (await refused.json())["error"]["code"] == "budget_exceeded"
    assert h.fake.charged == Decimal("0.06")


async def test_holds_of_the_previous_month_never_let_a_period_pass_its_cap(
        make_harness, fake_upstream):
    """Racing calls on both sides of the boundary: each month's admitted calls fit its cap."""
    fake_upstream.models[SLOW] = FakeModel(Decimal(0), Decimal(0), Decimal("0.03"), delay=0.05)
    clock = Clock(OCT_31_LAST_SECOND)
    h = await make_harness({"WATTGATE_LIMITS__CHAT_PER_MINUTE": "1000"}, clock_fn=clock)
    app = await h.create_app()
    await h.connect(app, "ann", monthly_usd=0.1)  # three $0.03 calls a month

    async def one() -> int:
        async with call(h, app, "ann", SLOW, stream=True) as r:
            await r.read()
            return r.status

    october = [asyncio.ensure_future(one()) for _ in range(6)]
    # Three admitted (streaming) and three refused, all in October.
    while len(h.fake.calls) < 3 or sum(t.done() for t in october) < 3:
        await asyncio.sleep(0.01)
    clock.advance(2)
    november = [asyncio.ensure_future(one()) for _ in range(6)]
    assert sorted(await asyncio.gather(*october)) == [200] * 3 + [402] * 3
    assert sorted(await asyncio.gather(*november)) == [200] * 3 + [402] * 3
    conn = await h.gw.store.get_connection(app.app_id, "ann")
    assert await h.gw.store.period_spent(conn.connection_id, "2026-10") == 90_000_000
    assert await h.gw.store.period_spent(conn.connection_id, "2026-11") == 90_000_000
