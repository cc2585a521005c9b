"""Calls the upstream refused before any byte, through the running gateway: the request
log and its error rate show them (status ``upstream_refused``, $0); spend, the grant's
requests, the export and the audit are as if they had never been written."""

from __future__ import annotations

import json
import re

from conftest import FUNDING_KEY
from test_admin_functional import sign_in  # noqa: F401  (its fixture closes consoles)
from test_admin_functional import close_consoles  # noqa: F401
from test_grants_functional import mint_grant, redeem
from test_proxy_functional import post_chat
from wattgate.money import usd_to_nanos


def log_statuses(html: str) -> list[str]:
    return re.findall(r'<tr data-status="([a-z_]+)">', html)


def figure(html: str, chart_id: str) -> str:
    found = re.search(rf'id="{chart_id}".*?<span class="figure">([^<]*)</span>', html, re.S)
    assert found, chart_id
    return found.group(1)


async def test_refused_calls_show_in_the_log_and_bill_nothing(harness):
    h = harness
    app = await h.create_app()
    await h.connect(app, "ann", monthly_usd=1)
    ann = {"x-wattfare-user": "ann"}
    status, _, _ = await post_chat(h, app, ann)
    assert status == 200
    spent = (await h.status(app, "ann"))["usage"]["monthlyUsd"]
    assert spent > 0
    status, body, _ = await post_chat(h, app, ann, model="fake/fail-500")
    assert (status, body["error"]["code"]) == (502, "upstream")
    status, body, _ = await post_chat(h, app, ann, model="fake/fail-429")
    assert status == 429
    status, _, _ = await post_chat(h, app, ann, model="fake/fail-429", stream=True)
    assert status == 429  # streamed: refused before the first byte all the same
    # Refused before the upstream: never in the ledger.
    status, body, _ = await post_chat(h, app, ann, max_tokens=5_000_000)
    assert (status, body["error"]["code"]) == (402, "budget_exceeded")
    # A one-request grant: refused upstream, its request given back, then used.
    _, grant = await mint_grant(h, app, requests=1)
    status, _, _ = await redeem(h, app, grant["grantToken"], model="fake/fail-500")
    assert status == 502
    status, _, headers = await redeem(h, app, grant["grantToken"])
    assert status == 200 and headers["x-wattfare-grant-remaining"] == "0"
    # The user's key refused upstream (401): the connection needs a reconnect.
    h.fake.revoked_keys.add(FUNDING_KEY)
    status, body, _ = await post_chat(h, app, ann)
    assert (status, body["error"]["code"]) == (402, "funding_invalid")
    assert await h.gw.store.open_holds() == 0

    console = await sign_in(h)
    code, page = await console.page(f"/admin/apps/{app.app_id}/requests")
    assert code == 200
    assert log_statuses(page) == ["upstream_refused", "ok", "upstream_refused",
                                  "upstream_refused", "upstream_refused", "upstream_refused",
                                  "ok"]
    assert re.findall(r"upstream refused (\d+)</span>", page) == ["401", "500", "429", "429",
                                                                  "500"]
    assert figure(page, "requests-chart") == "7"
    assert figure(page, "errors-chart").startswith("71.")  # 5 of 7
    code, only = await console.page(f"/admin/apps/{app.app_id}/requests?status=upstream_refused")
    assert code == 200 and len(log_statuses(only)) == 5
    costs = re.findall(r'<td class="num">(\$[^<]*)</td>\s*<td class="num">[^<]*</td>\s*'
                       r'<td><span class="badge warn">upstream refused \d+', only)
    assert costs == ["$0.00"] * 5

    # Billing as before: the user's spend, the app's call count, the export, the audit.
    assert (await h.status(app, "ann"))["usage"]["monthlyUsd"] == spent
    code, export = await console.page(f"/admin/apps/{app.app_id}/usage?format=jsonl")
    lines = [json.loads(x) for x in export.splitlines() if x]
    assert code == 200 and [x["status"] for x in lines] == ["ok", "ok"]
    billed = sum(usd_to_nanos(x["cost_usd"]) for x in lines)
    assert billed == sum(c for c, _ in (await h.billed()).values()) + usd_to_nanos(
        lines[1]["cost_usd"])
    assert len(await h.billed()) == 1  # ann's recent calls: the one she paid for
    code, overview = await console.page("/admin/apps")
    row = re.search(rf'{app.app_id}</div></td>.*?</tr>', overview, re.S)
    assert code == 200 and row is not None
    assert re.findall(r'<td class="num">([^<]*)</td>', row.group(0))[1] == "2"  # calls
    assert await h.gw.store.check(now=h.clock(), hold_ttl=600) == []
    got = await h.gw.store.get_grant_by_id(lines[1]["grant_id"])
    assert got is not None and got.used == 1
