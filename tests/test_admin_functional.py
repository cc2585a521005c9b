"""The admin console over HTTP: sign-in, session cookie, CSRF, and each page's actions."""

from __future__ import annotations

import re
import time

import aiohttp
import pytest

ADMIN = "admin-token-for-tests-0123456789"


class Console:
    """A browser-like client of the console: its own cookie jar (the harness's refuses
    cookies from an IP address), signed in, with the session's CSRF token."""

    def __init__(self, h) -> None:
        self.h = h
        self.http = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
        self.csrf = ""

    async def page(self, path: str) -> tuple[int, str]:
        async with self.http.get(self.h.url + path, allow_redirects=False) as r:
            return r.status, await r.text()

    async def post(self, path: str, data: dict, **headers: str) -> aiohttp.ClientResponse:
        async with self.http.post(self.h.url + path, data=data, allow_redirects=False,
                                  headers=headers) as r:
            r.text_body = await r.text()  # type: ignore[attr-defined]
            return r


_open: list[Console] = []


async def sign_in(h, token: str | None = None) -> Console:
    """A console client signed in with the admin token."""
    c = Console(h)
    _open.append(c)
    r = await c.post("/admin/login", {"token": token or h.gw.keys.admin_token})
    assert r.status == 303, r.text_body
    _, body = await c.page("/admin/apps")
    c.csrf = re.search(r'name="csrf" value="([^"]+)"', body).group(1)
    return c


@pytest.fixture(autouse=True)
async def close_consoles():
    yield
    while _open:
        await _open.pop().http.close()


async def test_login_sets_a_strict_httponly_cookie(make_harness, monkeypatch):
    monkeypatch.setenv("WATTGATE_ADMIN_TOKEN", ADMIN)
    h = await make_harness()
    c = Console(h)
    _open.append(c)
    status, body = await c.page("/admin")
    assert status == 200 and 'name="token"' in body
    r = await c.post("/admin/login", {"token": ADMIN})
    assert r.status == 303
    cookie = r.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/admin" in cookie
    assert ADMIN not in cookie
    status, body = await c.page("/admin")
    assert status == 200 and "Overview" in body
    async with c.http.get(h.url + "/admin") as r:
        csp = r.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "script-src" not in csp


async def test_wrong_token_is_refused_then_rate_limited(harness):
    c = Console(harness)
    _open.append(c)
    for _ in range(10):
        assert (await c.post("/admin/login", {"token": "guess"})).status == 401
    r = await c.post("/admin/login", {"token": "guess"})
    assert r.status == 429 and int(r.headers["Retry-After"]) >= 1
    assert (await c.page("/admin/apps"))[0] == 303  # still signed out


async def test_past_the_limit_even_the_right_token_is_refused_until_the_window_passes(
        make_harness, clock):
    # Judged before the limiter, a right guess would still sign in while wrong ones got
    # 429: an attacker would just keep guessing and wait for the one 303.
    h = await make_harness()
    c = Console(h)
    _open.append(c)
    for _ in range(10):
        assert (await c.post("/admin/login", {"token": "guess"})).status == 401
    r = await c.post("/admin/login", {"token": h.gw.keys.admin_token})
    assert r.status == 429 and int(r.headers["Retry-After"]) >= 1
    assert (await c.page("/admin/apps"))[0] == 303  # still signed out
    clock.advance(int(r.headers["Retry-After"]))
    assert (await c.post("/admin/login", {"token": h.gw.keys.admin_token})).status == 303
    assert (await c.page("/admin/apps"))[0] == 200


async def test_posts_need_the_session_csrf_token(harness):
    c = await sign_in(harness)
    form = {"name": "X", "origins": "https://x.example"}
    assert (await c.post("/admin/apps", form)).status == 403
    assert (await c.post("/admin/apps", {**form, "csrf": "forged"})).status == 403
    r = await c.post("/admin/apps", {**form, "csrf": c.csrf}, Origin="https://evil.example")
    assert r.status == 403
    assert await harness.gw.store.list_apps() == []
    # The same form from another client (no session cookie) is refused too.
    stranger = Console(harness)
    _open.append(stranger)
    assert (await stranger.post("/admin/apps", {**form, "csrf": c.csrf})).status == 403
    assert (await c.post("/admin/apps", {**form, "csrf": c.csrf})).status == 200
    assert [a.name for a in await harness.gw.store.list_apps()] == ["X"]


def secret_in(body: str) -> str:
    return re.search(r'id="secret-key">(sk_live_[^<]+)<', body).group(1)


async def test_create_rotate_and_origins(harness):
    c = await sign_in(harness)
    r = await c.post("/admin/apps", {"name": "Notes", "csrf": c.csrf,
                                     "origins": "https://notes.example\nhttp://localhost:3000/"})
    secret = secret_in(r.text_body)
    assert r.headers["Cache-Control"] == "no-store"
    app = (await harness.gw.store.list_apps())[0]
    assert app.origins == ("http://localhost:3000", "https://notes.example")
    assert (await harness.gw.app_for_secret(secret)).app_id == app.app_id
    _, detail = await c.page(f"/admin/apps/{app.app_id}")
    assert secret not in detail  # shown once, never again

    status, confirm = await c.page(f"/admin/apps/{app.app_id}/rotate-secret")
    assert status == 200 and "stops working at once" in confirm
    assert await harness.gw.app_for_secret(secret)  # asking is not rotating
    r = await c.post(f"/admin/apps/{app.app_id}/rotate-secret", {"csrf": c.csrf,
                                                                 "overlap": "0"})
    new = secret_in(r.text_body)
    assert "stopped working just now" in r.text_body
    assert new != secret
    async with harness.http.get(harness.api + "/models",
                                headers={"Authorization": f"Bearer {secret}"}) as resp:
        assert resp.status == 401
    async with harness.http.get(harness.api + "/models",
                                headers={"Authorization": f"Bearer {new}"}) as resp:
        assert resp.status == 200

    await c.post(f"/admin/apps/{app.app_id}/origins", {"origin": "https://b.example",
                                                        "csrf": c.csrf})
    await c.post(f"/admin/apps/{app.app_id}/origins/remove", {"origin": "http://localhost:3000",
                                                               "csrf": c.csrf})
    app = await harness.gw.store.get_app(app.app_id)
    assert app.origins == ("https://b.example", "https://notes.example")
    r = await c.post(f"/admin/apps/{app.app_id}/origins", {"origin": "javascript:alert(1)",
                                                            "csrf": c.csrf})
    assert r.status == 400


async def test_revoke_and_pages_escape_user_ids(harness):
    app = await harness.create_app()
    evil = "<script>alert(1)</script>"
    await harness.connect(app, evil)
    await harness.connect(app, "bob")
    c = await sign_in(harness)
    status, body = await c.page(f"/admin/apps/{app.app_id}")
    assert status == 200
    assert "<script>alert(1)" not in body and "&lt;script&gt;alert(1)" in body
    bob = await harness.gw.store.get_connection(app.app_id, "bob")
    r = await c.post(f"/admin/apps/{app.app_id}/connections/{bob.connection_id}/revoke",
                     {"csrf": c.csrf})
    assert r.status == 303
    assert (await harness.status(app, "bob"))["connected"] is False
    assert (await harness.status(app, evil))["connected"] is True
    # Another app's page cannot revoke this app's connection.
    other = await harness.create_app("Other")
    victim = await harness.gw.store.get_connection(app.app_id, evil)
    r = await c.post(f"/admin/apps/{other.app_id}/connections/{victim.connection_id}/revoke",
                     {"csrf": c.csrf})
    assert r.status == 404 and "No such app or connection" in r.text_body
    assert (await harness.status(app, evil))["connected"] is True
    assert (await c.page("/admin/apps/app0000000000000000"))[0] == 404


async def test_sign_out_ends_the_session(harness):
    c = await sign_in(harness)
    assert (await c.post("/admin/logout", {"csrf": c.csrf})).status == 303
    assert (await c.page("/admin/apps"))[0] == 303


async def models_status(h, secret: str) -> int:  # type: ignore[no-untyped-def]
    async with h.http.get(h.api + "/models", headers={"Authorization": f"Bearer {secret}"}) as r:
        return r.status


async def test_rotate_with_an_overlap_then_retire_from_the_app_page(harness):
    h = harness
    c = await sign_in(h)
    r = await c.post("/admin/apps", {"name": "Roll", "csrf": c.csrf,
                                     "origins": "https://roll.example"})
    old = secret_in(r.text_body)
    app = (await h.gw.store.list_apps())[0]
    _, detail = await c.page(f"/admin/apps/{app.app_id}")
    assert "Previous secret key" not in detail and "/retire-secret" not in detail
    _, confirm = await c.page(f"/admin/apps/{app.app_id}/rotate-secret")
    assert '<option value="24h" selected>' in confirm  # the default: roll, do not break
    r = await c.post(f"/admin/apps/{app.app_id}/rotate-secret", {"csrf": c.csrf})
    new = secret_in(r.text_body)
    until = (await h.gw.store.get_app(app.app_id)).previous_until
    shown = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(until))
    assert until == pytest.approx(h.clock() + 86400, abs=1)
    assert f"keeps working until <b>{shown}</b>" in r.text_body
    assert await models_status(h, old) == 200 and await models_status(h, new) == 200

    _, detail = await c.page(f"/admin/apps/{app.app_id}")
    assert f"valid until <b>{shown}</b>" in detail
    retire = f'<form method="post" action="/admin/apps/{app.app_id}/retire-secret"'
    assert retire in detail and new not in detail and old not in detail
    # Without the session's CSRF token, or from another site: refused, nothing retired.
    assert (await c.post(f"/admin/apps/{app.app_id}/retire-secret", {})).status == 403
    r = await c.post(f"/admin/apps/{app.app_id}/retire-secret", {"csrf": c.csrf},
                     Origin="https://evil.example")
    assert r.status == 403
    assert await models_status(h, old) == 200
    r = await c.post(f"/admin/apps/{app.app_id}/retire-secret", {"csrf": c.csrf})
    assert r.status == 303
    assert await models_status(h, old) == 401 and await models_status(h, new) == 200
    _, detail = await c.page(r.headers["Location"])
    assert "The previous secret key no longer works" in detail
    assert "Previous secret key" not in detail
    r = await c.post(f"/admin/apps/{app.app_id}/retire-secret", {"csrf": c.csrf})
    _, detail = await c.page(r.headers["Location"])
    assert "no previous secret key to retire" in detail


async def test_the_app_page_stops_showing_the_previous_key_at_its_deadline(harness):
    h = harness
    c = await sign_in(h)
    app = await h.create_app()
    r = await c.post(f"/admin/apps/{app.app_id}/rotate-secret", {"csrf": c.csrf,
                                                                 "overlap": "1h"})
    assert r.status == 200 and "keeps working until" in r.text_body
    _, detail = await c.page(f"/admin/apps/{app.app_id}")
    assert "Previous secret key" in detail
    h.clock.advance(3601)
    _, detail = await c.page(f"/admin/apps/{app.app_id}")
    assert "Previous secret key" not in detail
    assert await models_status(h, app.secret_key) == 401


@pytest.mark.parametrize("overlap", ["1w", "forever", "-5", "9999999d"])
async def test_a_bad_overlap_rotates_nothing(harness, overlap):
    c = await sign_in(harness)
    app = await harness.create_app()
    r = await c.post(f"/admin/apps/{app.app_id}/rotate-secret", {"csrf": c.csrf,
                                                                 "overlap": overlap})
    assert r.status == 400 and "overlap" in r.text_body and "sk_live_" not in r.text_body
    assert await models_status(harness, app.secret_key) == 200
    assert (await harness.gw.store.get_app(app.app_id)).previous_secret_hash is None


async def test_a_deleted_app_cannot_be_rotated_or_retired_from_the_console(harness):
    c = await sign_in(harness)
    app = await harness.create_app()
    await harness.gw.store.set_app_secret(app.app_id, "x" * 64,
                                          keep_previous_until=harness.clock() + 3600)
    await harness.gw.store.delete_app(app.app_id, now=harness.clock())
    for action in ("rotate-secret", "retire-secret"):
        r = await c.post(f"/admin/apps/{app.app_id}/{action}", {"csrf": c.csrf})
        assert r.status == 404 and "sk_live_" not in r.text_body
    assert await models_status(harness, app.secret_key) == 401
