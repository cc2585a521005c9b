"""One-time grants: minting, redemption through the proxy, exact counting."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import openai
import pytest

from conftest import FUNDING_KEY
from wattgate.money import usd_to_nanos


async def mint_grant(h, app, *, requests=3, max_usd=None, funding_key=FUNDING_KEY,
                     user="visitor", headers=None):
    token = await h.session(app, user)
    body = {"requests": requests}
    if max_usd is not None:
        body["maxUsd"] = max_usd
    if funding_key is not None:
        body["fundingKey"] = funding_key
    hdrs = {"Authorization": f"Bearer {token}"}
    hdrs.update(headers or {})
    async with h.http.post(h.api + "/grants", json=body, headers=hdrs) as r:
        return r.status, await r.json()


async def grant_from_connection(h, app, user, *, monthly_usd, requests):
    """The user connects in the popup (presence cookie), then a grant is minted from
    their connection in the same browser: no funding key typed."""
    token = await h.session(app, user)
    same_origin = {"Sec-Fetch-Site": "same-origin", "Origin": h.url}
    async with h.http.post(h.api + "/connections",
                           json={"monthlyUsd": monthly_usd, "fundingKey": FUNDING_KEY},
                           headers={"Authorization": f"Bearer {token}", **same_origin}) as r:
        assert r.status == 200
        cookie = r.cookies["wg_presence"].value
    status, grant = await mint_grant(h, app, user=user, funding_key=None, requests=requests,
                                     headers={**same_origin, "Cookie": f"wg_presence={cookie}"})
    assert status == 200, grant
    return grant


async def redeem(h, app, grant_token, *, model="openai/gpt-4o-mini", stream=False,
                 header="x-wattfare-grant"):
    async with h.http.post(
            h.api + "/chat/completions",
            json={"model": model, "stream": stream,
                  "messages": [{"role": "user", "content": "convert this"}]},
            headers={"Authorization": f"Bearer {app.secret_key}", header: grant_token}) as r:
        body = await r.text()
        return r.status, body, r.headers


async def test_three_requests_then_refused(harness):
    app = await harness.create_app()
    status, grant = await mint_grant(harness, app, requests=3)
    assert status == 200, grant
    assert grant["grantToken"].startswith("wfg_") and grant["requests"] == 3
    assert grant["expiresAt"] == int(harness.clock()) + 600
    remaining = []
    for _ in range(3):
        status, _, headers = await redeem(harness, app, grant["grantToken"])
        assert status == 200
        remaining.append(headers["x-wattfare-grant-remaining"])
    assert remaining == ["2", "1", "0"]
    status, body, headers = await redeem(harness, app, grant["grantToken"])
    assert status == 402 and '"grant_invalid"' in body
    assert headers["x-should-retry"] == "false"
    async with harness.http.get(harness.api + "/grants/current",
                                headers={"Authorization": f"Bearer {app.secret_key}",
                                         "x-wattfare-grant": grant["grantToken"]}) as r:
        info = await r.json()
    assert info["remaining"] == 0 and info["used"] == 3 and info["valid"] is False
    assert usd_to_nanos(Decimal(str(info["spentUsd"]))) == usd_to_nanos(harness.fake.charged)


async def test_fifty_racing_calls_spend_exactly_three(make_harness):
    h = await make_harness({"WATTGATE_LIMITS__CHAT_PER_MINUTE": "1000"})
    app = await h.create_app()
    _, grant = await mint_grant(h, app, requests=3)
    h.fake.chunk_delay = 0.01
    results = await asyncio.gather(*[redeem(h, app, grant["grantToken"], stream=i % 2 == 0)
                                     for i in range(50)])
    statuses = sorted(r[0] for r in results)
    assert statuses.count(200) == 3
    assert statuses.count(402) == 47
    assert all('"grant_invalid"' in r[1] for r in results if r[0] == 402)
    assert len(h.fake.calls) == 3
    assert await h.gw.store.open_holds() == 0


async def test_dollar_cap_is_never_passed(make_harness):
    h = await make_harness({"WATTGATE_LIMITS__CHAT_PER_MINUTE": "1000"})
    app = await h.create_app()
    _, grant = await mint_grant(h, app, requests=10, max_usd=0.05)
    results = await asyncio.gather(*[redeem(h, app, grant["grantToken"], model="fake/flat-2c")
                                     for _ in range(10)])
    assert [r[0] for r in results].count(200) == 2
    assert h.fake.charged == Decimal("0.04")
    stored = await h.gw.store.get_grant(h.gw.hash(grant["grantToken"]))
    assert stored.spent_nanos == usd_to_nanos("0.04") <= usd_to_nanos("0.05")


async def test_expired_wrong_app_tampered_and_swapped_headers(harness):
    app = await harness.create_app()
    other = await harness.create_app(name="Other", origin="http://localhost:4000")
    _, grant = await mint_grant(harness, app, requests=5)
    token = grant["grantToken"]
    status, body, _ = await redeem(harness, other, token)
    assert status == 402 and '"grant_invalid"' in body
    status, body, _ = await redeem(harness, app, token[:-2] + ("AA" if token[-2:] != "AA" else "BB"))
    assert status == 402 and '"grant_invalid"' in body
    status, body, _ = await redeem(harness, app, " ")
    assert status == 401 and '"auth"' in body
    status, body, _ = await redeem(harness, app, token, header="x-wattfare-user")
    assert status == 402 and '"not_connected"' in body
    await harness.connect(app, "real_user")
    status, body, _ = await redeem(harness, app, "real_user")
    assert status == 402 and '"grant_invalid"' in body
    harness.clock.advance(601)
    status, body, _ = await redeem(harness, app, token)
    assert status == 402 and '"grant_invalid"' in body
    assert len(harness.fake.calls) == 0


async def test_failed_call_before_any_byte_gives_the_request_back(harness):
    app = await harness.create_app()
    _, grant = await mint_grant(harness, app, requests=1)
    status, body, _ = await redeem(harness, app, grant["grantToken"], model="fake/fail-500")
    assert status == 502
    status, _, headers = await redeem(harness, app, grant["grantToken"])
    assert status == 200 and headers["x-wattfare-grant-remaining"] == "0"


async def test_bad_grant_requests(harness):
    app = await harness.create_app()
    for body_requests, max_usd in ((0, None), (101, None), ("3", None), (2, 0), (2, -1)):
        status, body = await mint_grant(harness, app, requests=body_requests, max_usd=max_usd)
        assert status == 400 and body["error"]["code"] == "invalid_request", body
    status, body = await mint_grant(harness, app, funding_key="not-a-real-key")
    assert status == 402 and body["error"]["code"] == "funding_invalid"


async def test_secret_key_alone_cannot_fund_a_grant_from_a_connection(harness):
    app = await harness.create_app()
    await harness.connect(app, "uma", monthly_usd=5)
    status, body = await mint_grant(harness, app, user="uma", funding_key=None,
                                    headers={"Origin": harness.url})
    assert status == 403 and body["error"]["code"] == "consent_required"


async def test_grant_funded_by_connection_counts_toward_its_cap(harness):
    app = await harness.create_app()
    grant = await grant_from_connection(harness, app, "vic", monthly_usd=5, requests=2)
    status, _, _ = await redeem(harness, app, grant["grantToken"])
    assert status == 200
    usage = (await harness.status(app, "vic"))["usage"]["monthlyUsd"]
    assert usd_to_nanos(Decimal(str(usage))) == usd_to_nanos(harness.fake.charged) > 0


@pytest.mark.parametrize("stream", [False, True])
async def test_redemption_through_openai_client(harness, stream):
    app = await harness.create_app()
    _, grant = await mint_grant(harness, app, requests=1)
    async with openai.AsyncOpenAI(base_url=harness.api, api_key=app.secret_key, max_retries=0,
                                  default_headers={"x-wattfare-grant": grant["grantToken"]}) as oa:
        if stream:
            chunks = await oa.chat.completions.create(
                model="openai/gpt-4o-mini", stream=True,
                messages=[{"role": "user", "content": "hi"}])
            text = "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])
        else:
            reply = await oa.chat.completions.create(
                model="openai/gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
            text = reply.choices[0].message.content
        assert text.startswith("You wrote 1 word: “hi”.")
        with pytest.raises(openai.APIStatusError) as err:
            await oa.chat.completions.create(
                model="openai/gpt-4o-mini", messages=[{"role": "user", "content": "again"}])
    assert err.value.status_code == 402
    assert err.value.body["code"] == "grant_invalid"


async def test_grant_calls_and_user_calls_racing_share_one_cap(make_harness):
    """A grant funded by the connection and the user's own calls, all at once: the
    cap is checked against every call in flight of both kinds, never passed."""
    h = await make_harness({"WATTGATE_LIMITS__CHAT_PER_MINUTE": "1000"})
    app = await h.create_app()
    grant = await grant_from_connection(h, app, "wes", monthly_usd=0.3, requests=30)
    h.fake.chunk_delay = 0.01
    hdrs = {"Authorization": f"Bearer {app.secret_key}", "x-wattfare-user": "wes"}

    async def own(i: int) -> int:
        async with h.http.post(h.api + "/chat/completions", headers=hdrs, json={
                "model": "fake/flat-3c", "stream": i % 2 == 0, "max_tokens": 16,
                "messages": [{"role": "user", "content": "hi"}]}) as r:
            await r.read()
            return r.status

    async def granted(i: int) -> int:
        return (await redeem(h, app, grant["grantToken"], model="fake/flat-3c",
                             stream=i % 2 == 1))[0]
    results = await asyncio.gather(*[own(i) if i % 2 else granted(i) for i in range(40)])
    assert set(results) <= {200, 402}
    # $0.03 a call against a $0.30 cap: ten fit, and the worst-case holds may refuse more.
    assert 1 <= results.count(200) <= 10
    assert h.fake.charged <= Decimal("0.30")
    spent = (await h.status(app, "wes"))["usage"]["monthlyUsd"]
    assert usd_to_nanos(Decimal(str(spent))) == usd_to_nanos(h.fake.charged)
    assert await h.gw.store.open_holds() == 0 and await h.gw.store.held(1) == 0


NEW_KEY = "sk-or-v1-" + "n" * 48


async def test_a_revoked_connections_grant_stays_dead_after_a_reconnection(harness):
    h = harness
    app = await h.create_app()
    grant = await grant_from_connection(h, app, "wes", monthly_usd=5, requests=3)
    assert (await redeem(h, app, grant["grantToken"]))[0] == 200
    token = await h.session(app, "wes")
    async with h.http.delete(h.api + "/connections",
                             headers={"Authorization": f"Bearer {token}"}) as r:
        assert r.status == 204
    status, body, _ = await redeem(h, app, grant["grantToken"])
    assert status == 402 and '"grant_invalid"' in body
    calls = len(h.fake.calls)

    await h.connect(app, "wes", funding_key=NEW_KEY)  # the user comes back, with a new key
    status, body, _ = await redeem(h, app, grant["grantToken"])
    assert status == 402 and '"grant_invalid"' in body
    assert len(h.fake.calls) == calls  # the new key never paid for the old grant
    assert all(NEW_KEY not in c.authorization for c in h.fake.calls)
    async with h.http.get(h.api + "/grants/current",
                          headers={"Authorization": f"Bearer {app.secret_key}",
                                   "x-wattfare-grant": grant["grantToken"]}) as r:
        info = await r.json()
    assert info["valid"] is False and info["used"] == 1
    # The user's own calls work with the new key, as the new connection allows.
    async with h.http.post(h.api + "/chat/completions",
                           json={"model": "openai/gpt-4o-mini",
                                 "messages": [{"role": "user", "content": "hi"}]},
                           headers={"Authorization": f"Bearer {app.secret_key}",
                                    "x-wattfare-user": "wes"}) as r:
        assert r.status == 200
    assert h.fake.calls[-1].authorization == f"Bearer {NEW_KEY}"


async def test_a_browser_bound_to_a_revoked_connection_is_not_bound_to_its_refunding(harness):
    """The browser that approved a connection may raise its cap and fund grants from it;
    after a revocation, a re-funding made elsewhere (the key sent by the app's backend)
    does not hand that trust back to it."""
    h = harness
    app = await h.create_app()
    token = await h.session(app, "wes")
    same_origin = {"Sec-Fetch-Site": "same-origin", "Origin": h.url}
    async with h.http.post(h.api + "/connections",
                           json={"monthlyUsd": 5, "fundingKey": FUNDING_KEY},
                           headers={"Authorization": f"Bearer {token}", **same_origin}) as r:
        cookie = r.cookies["wg_presence"].value
    browser = {**same_origin, "Cookie": f"wg_presence={cookie}", "Authorization": f"Bearer {token}"}
    async with h.http.delete(h.api + "/connections", headers=browser) as r:
        assert r.status == 204
    await h.connect(app, "wes", monthly_usd=5, funding_key=NEW_KEY)

    async with h.http.post(h.api + "/connections", json={"monthlyUsd": 50},
                           headers=browser) as r:
        assert r.status == 403 and (await r.json())["error"]["code"] == "consent_required"
    status, body = await mint_grant(h, app, user="wes", funding_key=None, requests=1,
                                    headers={**same_origin, "Cookie": f"wg_presence={cookie}"})
    assert status == 403 and body["error"]["code"] == "consent_required"
    assert (await h.status(app, "wes"))["limits"] == {"monthlyUsd": 5}
