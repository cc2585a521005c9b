"""Consent integrity, as an attack: an app holding only its secret key tries every forbidden move.

The app can mint any session token and send any header from its server
(``Origin``, ``Sec-Fetch-Site``), but it has neither the user's funding key nor
the HttpOnly presence cookie the gateway gave the user's browser on approval.
Each forbidden move must answer ``403 consent_required`` and leave the stored
connection exactly as it was.
"""

from __future__ import annotations

from http.cookies import SimpleCookie
from typing import Any

import pytest
from conftest import FUNDING_KEY

from wattgate.consent import PRESENCE_COOKIE
from wattgate.sealing import connection_aad

USD = 1_000_000_000
FORGED = [{}, {"Sec-Fetch-Site": "same-origin"}, "public-origin"]


def forged_headers(h, kind: Any) -> dict[str, str]:  # type: ignore[no-untyped-def]
    if kind == "public-origin":
        return {"Origin": h.url, "Sec-Fetch-Site": "same-origin", "Referer": h.url + "/connect"}
    return dict(kind)


async def post(h, token: str, body: dict[str, Any], headers: dict[str, str] | None = None,  # type: ignore[no-untyped-def]
               cookie: str | None = None) -> tuple[int, dict[str, Any], Any]:
    hdrs = {"Authorization": f"Bearer {token}"} | (headers or {})
    if cookie is not None:
        hdrs["Cookie"] = f"{PRESENCE_COOKIE}={cookie}"
    async with h.http.post(h.api + "/connections", json=body, headers=hdrs) as r:
        return r.status, await r.json(), r.headers


async def stored(h, app, user: str):  # type: ignore[no-untyped-def]
    return await h.gw.store.get_connection(app.app_id, user)


def refused(result: tuple[int, Any, Any]) -> None:
    status, body, _ = result
    assert (status, body["error"]["code"]) == (403, "consent_required"), body


async def approve_in_browser(h, app, user: str, cap: Any = 10, key: str = FUNDING_KEY,  # type: ignore[no-untyped-def]
                             cookie: str | None = None) -> tuple[dict[str, Any], str | None]:
    """What the consent page does: a same-origin request carrying the user's funding key."""
    token = await h.session(app, user)
    status, body, headers = await post(h, token, {"monthlyUsd": cap, "fundingKey": key},
                                       {"Origin": h.url, "Sec-Fetch-Site": "same-origin"},
                                       cookie=cookie)
    assert status == 200, body
    jar = SimpleCookie()
    for value in headers.getall("Set-Cookie", []):
        jar.load(value)
    return body, (jar[PRESENCE_COOKIE].value if PRESENCE_COOKIE in jar else None)


@pytest.fixture
async def h(make_harness):  # type: ignore[no-untyped-def]
    return await make_harness({"WATTGATE_DEV__ALLOW_UNLIMITED": "true"})


# ---- with the secret key alone ----------------------------------------------

@pytest.mark.parametrize("forge", FORGED, ids=["plain", "sec-fetch-site", "public-origin"])
async def test_cannot_create_a_funded_connection(h, forge):
    app = await h.create_app()
    token = await h.session(app, "victim", monthly_usd=50)
    for body in ({"monthlyUsd": 50}, {}, {"monthlyUsd": None}):
        refused(await post(h, token, body, forged_headers(h, forge)))
    assert await stored(h, app, "victim") is None
    assert (await h.status(app, "victim"))["connected"] is False


@pytest.mark.parametrize("forge", FORGED, ids=["plain", "sec-fetch-site", "public-origin"])
async def test_cannot_raise_a_cap_or_make_it_unlimited(h, forge):
    app = await h.create_app()
    await approve_in_browser(h, app, "victim", cap=10)
    before = await stored(h, app, "victim")
    token = await h.session(app, "victim", monthly_usd=1000)
    for cap in (10.000000001, 11, 1000, None):
        refused(await post(h, token, {"monthlyUsd": cap}, forged_headers(h, forge)))
    assert await stored(h, app, "victim") == before
    assert (await h.status(app, "victim"))["limits"] == {"monthlyUsd": 10}


@pytest.mark.parametrize("forge", FORGED, ids=["plain", "sec-fetch-site", "public-origin"])
async def test_cannot_refund_a_revoked_connection(h, forge):
    app = await h.create_app()
    await approve_in_browser(h, app, "victim", cap=10)
    token = await h.session(app, "victim")
    async with h.http.delete(h.api + "/connections",
                             headers={"Authorization": f"Bearer {token}"}) as r:
        assert r.status == 204
    before = await stored(h, app, "victim")
    for body in ({"monthlyUsd": 10}, {"monthlyUsd": 1}, {}):
        refused(await post(h, token, body, forged_headers(h, forge)))
    assert await stored(h, app, "victim") == before
    assert before.sealed_key is None and not before.connected


async def test_cannot_reattach_the_key_of_a_connection_needing_reconnect(h):
    app = await h.create_app()
    await approve_in_browser(h, app, "victim", cap=10)
    conn = await stored(h, app, "victim")
    await h.gw.store.set_connection_state(conn.connection_id, "needs_reconnect", now=h.clock())
    before = await stored(h, app, "victim")
    token = await h.session(app, "victim")
    refused(await post(h, token, {"monthlyUsd": 10}, forged_headers(h, "public-origin")))
    assert await stored(h, app, "victim") == before


async def test_a_key_the_upstream_refuses_changes_nothing(h):
    app = await h.create_app()
    await approve_in_browser(h, app, "victim", cap=10)
    before = await stored(h, app, "victim")
    token = await h.session(app, "victim")
    status, body, _ = await post(h, token, {"monthlyUsd": 500, "fundingKey": "made-up-key"})
    assert (status, body["error"]["code"]) == (402, "funding_invalid")
    assert await stored(h, app, "victim") == before


async def test_a_new_key_replaces_the_users_key_rather_than_spending_it(h):
    """The funding key is the proof: a key the app owns funds the connection itself.

    The user's key is dropped, never charged past the cap the user chose.
    """
    app = await h.create_app()
    await approve_in_browser(h, app, "victim", cap=10)
    token = await h.session(app, "victim")
    apps_own_key = "sk-or-v1-" + "a" * 48
    status, body, _ = await post(h, token, {"monthlyUsd": 500, "fundingKey": apps_own_key})
    assert status == 200 and body["limits"] == {"monthlyUsd": 500}
    conn = await stored(h, app, "victim")
    assert h.gw.sealer.unseal(conn.sealed_key, connection_aad(conn.connection_id)) == apps_own_key


async def test_lowering_and_revoking_need_nothing(h):
    app = await h.create_app()
    await approve_in_browser(h, app, "u", cap=10)
    token = await h.session(app, "u")
    status, body, _ = await post(h, token, {"monthlyUsd": 4.5})
    assert status == 200 and body["limits"] == {"monthlyUsd": 4.5}
    assert (await stored(h, app, "u")).cap_nanos == 4_500_000_000
    status, body, _ = await post(h, token, {})  # no change at all is fine too
    assert status == 200 and body["limits"] == {"monthlyUsd": 4.5}
    refused(await post(h, token, {"monthlyUsd": 10}))  # going back up is a raise
    async with h.http.delete(h.api + "/connections",
                             headers={"Authorization": f"Bearer {token}"}) as r:
        assert r.status == 204
    assert (await h.status(app, "u"))["connected"] is False


# ---- the user's browser -----------------------------------------------------

async def test_approval_sets_an_httponly_samesite_strict_presence_cookie(h):
    app = await h.create_app()
    token = await h.session(app, "u")
    _, _, headers = await post(h, token, {"monthlyUsd": 10, "fundingKey": FUNDING_KEY},
                               {"Sec-Fetch-Site": "same-origin"})
    [raw] = [v for v in headers.getall("Set-Cookie", []) if v.startswith(PRESENCE_COOKIE)]
    jar = SimpleCookie()
    jar.load(raw)
    morsel = jar[PRESENCE_COOKIE]
    assert morsel["httponly"] and morsel["samesite"] == "Strict" and morsel["path"] == "/"
    assert len(morsel.value) >= 32
    # Stored only as a keyed hash: a copy of the database redeems nothing.
    for f in h.tmp_path.glob("wattgate.db*"):
        assert morsel.value.encode() not in f.read_bytes()


async def test_no_cookie_for_an_app_server_or_a_cross_site_page(h):
    app = await h.create_app()
    for headers in ({}, {"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"},
                    {"Origin": "http://localhost:3000"}):
        token = await h.session(app, f"u{len(headers)}{list(headers.values())}")
        status, _, resp = await post(h, token, {"monthlyUsd": 10, "fundingKey": FUNDING_KEY},
                                     headers)
        assert status == 200
        assert not any(v.startswith(PRESENCE_COOKIE) for v in resp.getall("Set-Cookie", []))


async def test_the_browser_that_approved_can_raise_the_cap(h):
    app = await h.create_app()
    _, cookie = await approve_in_browser(h, app, "u", cap=10)
    assert cookie
    token = await h.session(app, "u")
    status, body, _ = await post(h, token, {"monthlyUsd": 25}, {"Sec-Fetch-Site": "same-origin"},
                                 cookie=cookie)
    assert status == 200 and body["limits"] == {"monthlyUsd": 25}
    status, body, _ = await post(h, token, {"monthlyUsd": None}, {"Sec-Fetch-Site": "same-origin"},
                                 cookie=cookie)
    assert status == 200 and body["limits"] == {"monthlyUsd": None}
    # Reconnecting with a key from the same browser gives it a fresh proof; the old one is spent.
    _, again = await approve_in_browser(h, app, "u", cap=5, cookie=cookie)
    assert again and again != cookie
    refused(await post(h, token, {"monthlyUsd": 6}, {"Sec-Fetch-Site": "same-origin"},
                       cookie=cookie))
    status, _, _ = await post(h, token, {"monthlyUsd": 6}, {"Sec-Fetch-Site": "same-origin"},
                              cookie=again)
    assert status == 200


@pytest.mark.parametrize("where", [{"Sec-Fetch-Site": "cross-site"},
                                   {"Sec-Fetch-Site": "same-site"},
                                   {"Sec-Fetch-Site": "none"},
                                   {"Origin": "https://evil.example"}])
async def test_the_cookie_only_counts_on_the_gateways_own_pages(h, where):
    app = await h.create_app()
    _, cookie = await approve_in_browser(h, app, "u", cap=10)
    token = await h.session(app, "u")
    refused(await post(h, token, {"monthlyUsd": 20}, where, cookie=cookie))
    assert (await stored(h, app, "u")).cap_nanos == 10 * USD


async def test_the_cookie_of_another_browser_cannot_raise(h):
    app = await h.create_app()
    _, victims = await approve_in_browser(h, app, "victim", cap=10)
    _, attackers = await approve_in_browser(h, app, "attacker", cap=10,
                                            key="sk-or-v1-" + "b" * 48)
    assert victims and attackers and victims != attackers
    token = await h.session(app, "victim")
    for cookie in (attackers, "made-up-cookie-value", ""):
        refused(await post(h, token, {"monthlyUsd": 99}, {"Sec-Fetch-Site": "same-origin"},
                           cookie=cookie))
    assert (await stored(h, app, "victim")).cap_nanos == 10 * USD


async def test_another_browser_cannot_take_over_a_connection_by_lowering_it(h):
    """The app's operator approves their own connection to get a cookie, then tries to bind
    it to the victim's connection with an allowed change (a lower cap) before raising."""
    app = await h.create_app()
    await approve_in_browser(h, app, "victim", cap=10)
    _, operators = await approve_in_browser(h, app, "operator", cap=1,
                                            key="sk-or-v1-" + "c" * 48)
    token = await h.session(app, "victim")
    same_origin = {"Sec-Fetch-Site": "same-origin"}
    status, _, _ = await post(h, token, {"monthlyUsd": 9}, same_origin, cookie=operators)
    assert status == 200  # lowering is always allowed...
    refused(await post(h, token, {"monthlyUsd": 100}, same_origin, cookie=operators))
    conn = await stored(h, app, "victim")
    assert conn.cap_nanos == 9 * USD  # ...but it bound nothing: the raise is refused
    assert h.gw.sealer.unseal(conn.sealed_key, connection_aad(conn.connection_id)) == FUNDING_KEY


async def account_ids(h, cookie: str) -> list[int]:  # type: ignore[no-untyped-def]
    async with h.http.get(h.api + "/account", headers={
            "Sec-Fetch-Site": "same-origin", "Cookie": f"{PRESENCE_COOKIE}={cookie}"}) as r:
        assert r.status == 200
        return sorted(c["id"] for c in (await r.json())["connections"])


async def test_a_presence_cookie_planted_before_the_approval_proves_nothing_after_it(h):
    """Issue 14, item 9: someone who can set a cookie on the gateway's host (another port,
    a sibling subdomain's Domain= cookie) plants a presence value they hold, a real one
    from approving their own connection, then waits for the user to approve."""
    app = await h.create_app()
    _, planted = await approve_in_browser(h, app, "planter", cap=1, key="sk-or-v1-" + "e" * 48)
    assert planted
    _, users = await approve_in_browser(h, app, "victim", cap=10, cookie=planted)
    assert users and users != planted  # minted for this approval, never the value brought
    victim = await stored(h, app, "victim")

    # The planter's value can neither raise the cap, nor see, re-cap or revoke the
    # connection on the dashboard, nor fund a grant from it.
    token = await h.session(app, "victim")
    same_origin = {"Sec-Fetch-Site": "same-origin"}
    refused(await post(h, token, {"monthlyUsd": 999_999}, same_origin, cookie=planted))
    assert victim.connection_id not in await account_ids(h, planted)
    cookie = {"Sec-Fetch-Site": "same-origin", "Cookie": f"{PRESENCE_COOKIE}={planted}"}
    url = f"{h.api}/account/connections/{victim.connection_id}"
    async with h.http.post(url, json={"monthlyUsd": 999_999}, headers=cookie) as r:
        assert r.status in (401, 404)
    async with h.http.delete(url, headers=cookie) as r:
        assert r.status in (401, 404)
    async with h.http.post(h.api + "/grants", json={"requests": 3},
                           headers={"Authorization": f"Bearer {token}", **cookie}) as r:
        assert (r.status, (await r.json())["error"]["code"]) == (403, "consent_required")
    assert (await stored(h, app, "victim")) == victim

    # The user's own browser keeps working.
    assert victim.connection_id in await account_ids(h, users)
    status, body, _ = await post(h, token, {"monthlyUsd": 20}, same_origin, cookie=users)
    assert status == 200 and body["limits"] == {"monthlyUsd": 20}


async def test_each_approval_renews_the_cookie_and_keeps_the_browsers_connections(h):
    first_app, second_app = await h.create_app(), await h.create_app()
    _, first = await approve_in_browser(h, first_app, "u", cap=5)
    [first_id] = await account_ids(h, first)
    _, second = await approve_in_browser(h, second_app, "u", cap=7, cookie=first)
    assert second and second != first
    second_id = (await stored(h, second_app, "u")).connection_id
    assert await account_ids(h, second) == sorted([first_id, second_id])
    assert await account_ids(h, first) == []  # the replaced value is spent
    token = await h.session(first_app, "u")
    status, body, _ = await post(h, token, {"monthlyUsd": 9}, {"Sec-Fetch-Site": "same-origin"},
                                 cookie=second)
    assert status == 200 and body["limits"] == {"monthlyUsd": 9}


async def test_on_https_the_cookie_is_host_prefixed(make_harness):
    h = await make_harness({"WATTGATE_SERVER__PUBLIC_URL": "https://gw.example.com"})
    app = await h.create_app()
    token = await h.session(app, "u")
    async with h.http.post(h.api + "/connections",
                           json={"monthlyUsd": 10, "fundingKey": FUNDING_KEY},
                           headers={"Authorization": f"Bearer {token}",
                                    "Sec-Fetch-Site": "same-origin"}) as r:
        assert r.status == 200
        raw = [v for v in r.headers.getall("Set-Cookie") if v.startswith("__Host-")]
    [line] = raw
    assert line.startswith(f"__Host-{PRESENCE_COOKIE}=")
    attrs = {a.strip().split("=")[0].lower(): a.strip() for a in line.split(";")[1:]}
    assert "secure" in attrs and attrs["path"] == "Path=/" and "domain" not in attrs
    assert "httponly" in attrs and attrs["samesite"] == "SameSite=Strict"
    value = line.split(";")[0].split("=", 1)[1]

    same_origin = {"Authorization": f"Bearer {token}", "Sec-Fetch-Site": "same-origin"}
    async with h.http.post(h.api + "/connections", json={"monthlyUsd": 20}, headers={
            **same_origin, "Cookie": f"__Host-{PRESENCE_COOKIE}={value}"}) as r:
        assert r.status == 200, await r.text()
    # Next to a __Host- cookie, the unprefixed name (which another host can plant) is not read.
    async with h.http.post(h.api + "/connections", json={"monthlyUsd": 30}, headers={
            **same_origin,
            "Cookie": f"{PRESENCE_COOKIE}={value}; __Host-{PRESENCE_COOKIE}=planted"}) as r:
        assert r.status == 403


async def test_the_pages_header_proves_same_origin_only_where_no_sec_fetch_site_is_sent(h):
    """Plain http at a LAN hostname: the browser sends no Sec-Fetch-Site, and no Origin on
    a GET; the gateway's pages send X-Wattgate-Page, which no other origin may send."""
    app = await h.create_app()
    _, cookie = await approve_in_browser(h, app, "u", cap=10)
    token = await h.session(app, "u")
    page = {"X-Wattgate-Page": "1"}
    status, body, _ = await post(h, token, {"monthlyUsd": 20}, page, cookie=cookie)
    assert status == 200 and body["limits"] == {"monthlyUsd": 20}
    async with h.http.get(h.api + "/consent/session", headers={
            "Authorization": f"Bearer {token}", "Cookie": f"{PRESENCE_COOKIE}={cookie}",
            **page}) as r:
        assert r.status == 200 and (await r.json())["returning"] is True
    # Where the browser does say where a request comes from, that is what counts.
    refused(await post(h, token, {"monthlyUsd": 30}, {**page, "Sec-Fetch-Site": "same-site"},
                       cookie=cookie))
    # No other origin is ever allowed to send it.
    async with h.http.options(h.api + "/connections", headers={
            "Origin": app.origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "x-wattgate-page"}) as r:
        allowed = r.headers.get("Access-Control-Allow-Headers", "").lower()
        assert "authorization" in allowed and "x-wattgate-page" not in allowed


async def test_a_cookie_planted_next_to_the_users_own_hides_nothing_and_gets_nothing(h):
    """A sibling subdomain's Domain= cookie planted after the approval rides along with the
    gateway's own (the browser sends both, the planted one last)."""
    app, other_app = await h.create_app(), await h.create_app()
    _, planted = await approve_in_browser(h, app, "planter", cap=1, key="sk-or-v1-" + "e" * 48)
    _, users = await approve_in_browser(h, app, "victim", cap=10)
    assert planted and users
    both = f"{users}; {PRESENCE_COOKIE}={planted}"
    victim = await stored(h, app, "victim")
    assert victim.connection_id in await account_ids(h, both)
    token = await h.session(app, "victim")
    status, _, _ = await post(h, token, {"monthlyUsd": 12}, {"Sec-Fetch-Site": "same-origin"},
                              cookie=both)
    assert status == 200
    # The user's next approval keeps every connection this browser showed, and the
    # planted value is spent.
    _, renewed = await approve_in_browser(h, other_app, "victim", cap=3, cookie=both)
    assert renewed
    assert victim.connection_id in await account_ids(h, renewed)
    assert await account_ids(h, planted) == [] and await account_ids(h, users) == []
