"""The JSON behind the consent popup and the dashboard, and the pages' headers, over HTTP.

The browser tests click through the same flows; these pin the rules a browser
cannot show: same-origin only, one browser's cookie never reaches another's
connections, funding keys never come back, strict headers on every page.
"""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path
from typing import Any

from conftest import FUNDING_KEY

SAME = {"Sec-Fetch-Site": "same-origin"}
CROSS = {"Sec-Fetch-Site": "cross-site"}


async def approve_in_popup(h: Any, app: Any, user: str, cap: float = 5) -> tuple[str, dict]:
    """What the consent page does: a same-origin POST with the key; returns the cookie."""
    token = await h.session(app, user)
    async with h.http.post(h.api + "/connections", json={"monthlyUsd": cap, "fundingKey": FUNDING_KEY},
                           headers={"Authorization": f"Bearer {token}", **SAME}) as r:
        assert r.status == 200, await r.text()
        cookie = r.cookies["wg_presence"].value
        return cookie, await r.json()


def with_cookie(cookie: str, site: dict[str, str] = SAME) -> dict[str, str]:
    return {"Cookie": f"wg_presence={cookie}", **site}


async def test_dashboard_lists_recaps_and_revokes_this_browsers_connections(harness):
    app = await harness.create_app("Notes", "http://localhost:3000")
    cookie, _ = await approve_in_popup(harness, app, "u1", cap=5)
    async with harness.http.get(harness.api + "/account", headers=with_cookie(cookie)) as r:
        assert r.status == 200
        text = await r.text()
        body = await r.json()
    assert FUNDING_KEY not in text and "sealed" not in text
    assert body["recognized"] is True
    [conn] = body["connections"]
    assert conn["app"] == {"name": "Notes", "origin": "http://localhost:3000", "maxCapUsd": None}
    assert conn["status"]["limits"] == {"monthlyUsd": 5} and conn["calls"] == []

    url = f"{harness.api}/account/connections/{conn['id']}"
    async with harness.http.post(url, json={"monthlyUsd": 12}, headers=with_cookie(cookie)) as r:
        assert r.status == 200, await r.text()
        assert (await r.json())["status"]["limits"] == {"monthlyUsd": 12}
    assert (await harness.status(app, "u1"))["limits"] == {"monthlyUsd": 12}

    async with harness.http.delete(url, headers=with_cookie(cookie)) as r:
        assert r.status == 204
    assert (await harness.status(app, "u1"))["connected"] is False
    async with harness.http.get(harness.api + "/account", headers=with_cookie(cookie)) as r:
        assert (await r.json())["connections"][0]["state"] == "revoked"


async def test_dashboard_refuses_cross_site_requests_and_other_browsers(harness):
    app = await harness.create_app()
    cookie, _ = await approve_in_popup(harness, app, "u1")
    other, _ = await approve_in_popup(harness, app, "u2")
    async with harness.http.get(harness.api + "/account", headers=with_cookie(other)) as r:
        [conn_u2] = (await r.json())["connections"]
    async with harness.http.get(harness.api + "/account", headers=with_cookie(cookie)) as r:
        [conn_u1] = (await r.json())["connections"]
    assert conn_u1["id"] != conn_u2["id"]

    # Another site riding the cookie (CSRF) is refused, for reads and writes.
    async with harness.http.get(harness.api + "/account", headers=with_cookie(cookie, CROSS)) as r:
        assert r.status == 401
    url = f"{harness.api}/account/connections/{conn_u1['id']}"
    async with harness.http.delete(url, headers=with_cookie(cookie, CROSS)) as r:
        assert r.status == 401
    async with harness.http.delete(url, headers={"Origin": "https://evil.example",
                                                 "Cookie": f"wg_presence={cookie}"}) as r:
        assert r.status == 401
    # One browser cannot touch (or even confirm) another browser's connection.
    async with harness.http.delete(url, headers=with_cookie(other)) as r:
        assert r.status == 404
    async with harness.http.post(url, json={"monthlyUsd": 50}, headers=with_cookie(other)) as r:
        assert r.status == 404
    # No cookie: nothing to show, nothing to change.
    async with harness.http.get(harness.api + "/account", headers=SAME) as r:
        assert await r.json() == {"recognized": False, "connections": []}
    async with harness.http.delete(url, headers=SAME) as r:
        assert r.status == 401
    assert (await harness.status(app, "u1"))["connected"] is True


async def test_consent_session_tells_the_popup_who_asks(harness):
    app = await harness.create_app("Notes", "http://localhost:3000")
    other = await harness.create_app("Other", "http://localhost:4000")
    token = await harness.session(app, "u1", monthly_usd=7)
    url = harness.api + "/consent/session"
    auth = {"Authorization": f"Bearer {token}"}
    async with harness.http.get(url, params={"pk": app.publishable_key}, headers={**auth, **SAME}) as r:
        assert r.status == 200
        body = await r.json()
    assert body["app"]["name"] == "Notes" and body["app"]["origins"] == ["http://localhost:3000"]
    assert body["requestedLimit"] == {"monthlyUsd": 7}
    assert body["status"]["connected"] is False and body["returning"] is False
    # The token must belong to the app the popup was opened for.
    async with harness.http.get(url, params={"pk": other.publishable_key},
                                headers={**auth, **SAME}) as r:
        assert r.status == 401
    async with harness.http.get(url, params={"pk": app.publishable_key}, headers={**auth, **CROSS}) as r:
        assert r.status == 401


async def test_oauth_code_is_exchanged_server_side(harness):
    verifier = "v" * 64
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).decode().rstrip("=")
    async with harness.http.get(harness.fake.origin + "/auth", allow_redirects=False, params={
            "callback_url": harness.url + "/connect/oauth-callback?n=x",
            "code_challenge": challenge, "code_challenge_method": "S256"}) as r:
        assert r.status == 302
        code = r.headers["Location"].split("code=")[1]
    url = harness.api + "/consent/oauth"
    async with harness.http.post(url, json={"code": code, "codeVerifier": "w" * 64}, headers=SAME) as r:
        assert r.status == 400  # wrong verifier (and the fake burns the code)
    async with harness.http.get(harness.fake.origin + "/auth", allow_redirects=False, params={
            "callback_url": "http://x/cb", "code_challenge": challenge,
            "code_challenge_method": "S256"}) as r:
        code = r.headers["Location"].split("code=")[1]
    async with harness.http.post(url, json={"code": code, "codeVerifier": verifier}, headers=CROSS) as r:
        assert r.status == 401
    async with harness.http.post(url, json={"code": code, "codeVerifier": verifier}, headers=SAME) as r:
        assert r.status == 200
        assert (await r.json())["key"].startswith("sk-or-v1-oauth-")


async def test_pages_are_sent_with_strict_headers(harness):
    app = await harness.create_app()
    for path in (f"/connect?pk={app.publishable_key}",
                 f"/grant?pk={app.publishable_key}&requests=2&maxUsd=0.5", "/account"):
        async with harness.http.get(harness.url + path) as r:
            assert r.status == 200, path
            assert r.content_type == "text/html"
            csp = r.headers["Content-Security-Policy"]
            assert "frame-ancestors 'none'" in csp and "script-src 'self'" in csp
            assert "unsafe-inline" not in csp
            assert r.headers["Referrer-Policy"] == "no-referrer"
            assert r.headers["X-Frame-Options"] == "DENY"
            assert r.headers["Cache-Control"] == "no-store"
    async with harness.http.get(harness.url + f"/grant?pk={app.publishable_key}&requests=2&maxUsd=0.5") as r:
        html = await r.text()
    assert "wants to make 2 AI requests" in html
    async with harness.http.get(harness.url + "/connect?pk=pk_live_app0000000000000000") as r:
        assert r.status == 404 and "Unknown app" in await r.text()
    async with harness.http.get(harness.url + f"/grant?pk={app.publishable_key}&requests=0") as r:
        assert r.status == 400
    # An app name is text, never markup.
    evil = await harness.create_app("<img src=x onerror=alert(1)>", "http://localhost:5000")
    async with harness.http.get(harness.url + f"/connect?pk={evil.publishable_key}") as r:
        html = await r.text()
    assert "<img src=x" not in html and "&lt;img src=x" in html


async def test_sdk_is_served_to_other_origins_from_the_one_source(harness):
    async with harness.http.get(harness.url + "/sdk/client.js") as r:
        assert r.status == 200
        assert r.headers["Access-Control-Allow-Origin"] == "*"
        assert r.content_type == "text/javascript"
        served = await r.read()
    source = Path(__file__).resolve().parent.parent / "js" / "client.js"
    assert served == source.read_bytes()
    async with harness.http.get(harness.url + "/static/demo-app.js") as r:
        assert r.status == 404  # the demo app's files are not the gateway's
