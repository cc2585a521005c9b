"""Security review of the whole surface, written as tests through the running app.

Key handling (constant-time compare, hashed at rest), session JWTs (algorithm
pinning, expiry, audience, issuer, clock skew), CORS, consent integrity,
isolation between apps, no secret or prompt in the logs, and safe headers on
the HTML pages.
"""

from __future__ import annotations

import hmac
import logging

import jwt
import pytest
from conftest import FUNDING_KEY

from wattgate import credentials
from wattgate.sessions import LEEWAY_SECONDS

PROMPT = "the confidential prompt: violet-otter-7781"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def grant_for(h, app, user: str, requests: int = 5) -> str:
    token = await h.session(app, user)
    async with h.http.post(h.api + "/grants", json={"requests": requests,
                                                    "fundingKey": FUNDING_KEY},
                           headers=bearer(token)) as r:
        assert r.status == 200, await r.text()
        return (await r.json())["grantToken"]


async def approve_in_popup(h, app, user: str) -> tuple[str, str]:
    """Connect as the consent page does; the session token and the presence cookie."""
    token = await h.session(app, user, monthly_usd=5)
    async with h.http.post(h.api + "/connections",
                           json={"monthlyUsd": 5, "fundingKey": FUNDING_KEY},
                           headers={**bearer(token), "Sec-Fetch-Site": "same-origin"}) as r:
        assert r.status == 200, await r.text()
        return token, r.cookies["wg_presence"].value


async def chat(h, app, payer: dict[str, str], **body) -> tuple[int, dict]:
    payload = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": PROMPT}]}
    payload.update(body)
    async with h.http.post(h.api + "/chat/completions", json=payload,
                           headers={**bearer(app.secret_key), **payer}) as r:
        if r.content_type == "application/json":
            return r.status, await r.json()
        return r.status, {"text": await r.text()}


# ---- keys: constant-time compare, hashed at rest -------------------------------------

async def test_secret_key_is_compared_in_constant_time(harness, monkeypatch):
    app = await harness.create_app()
    compared = []
    real = hmac.compare_digest

    def spy(a, b):  # type: ignore[no-untyped-def]
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(credentials.hmac, "compare_digest", spy)
    wrong = app.secret_key[:-4] + "AAAA"
    async with harness.http.get(harness.api + "/status", params={"appUserId": "u"},
                                headers=bearer(wrong)) as r:
        assert r.status == 401
    assert compared, "the secret key must go through hmac.compare_digest"
    # What is compared is the keyed hash, never the secret itself.
    assert all(wrong.encode() not in a and wrong.encode() not in b for a, b in compared)


async def test_no_secret_is_stored_in_clear(harness):
    app = await harness.create_app()
    token, presence = await approve_in_popup(harness, app, "ann")
    grant = await grant_for(harness, app, "ann")
    assert (await chat(harness, app, {"x-wattfare-user": "ann"}))[0] == 200
    assert (await chat(harness, app, {"x-wattfare-grant": grant}))[0] == 200
    await harness.gw.store.close()  # checkpoint the WAL so every byte is in the files
    raw = b"".join(p.read_bytes() for p in harness.tmp_path.glob("wattgate.db*"))
    secret = app.secret_key.split("_", 3)[3]
    for value in (app.secret_key, secret, FUNDING_KEY, FUNDING_KEY[9:], grant, grant[4:],
                  presence, token, PROMPT):
        assert value.encode() not in raw, f"{value[:12]}… found in the database"


# ---- session tokens (JWT) ------------------------------------------------------------

async def claims_of(h, app, user: str = "mallory") -> dict:
    """The claims of a token the gateway itself minted, to alter one at a time."""
    return jwt.decode(await h.session(app, user), options={"verify_signature": False})


def forge(h, base: dict, *, alg: str = "HS256", key: str | None = None, **claims) -> str:
    body = {**base, **claims}
    body = {k: v for k, v in body.items() if v is not ...}
    return jwt.encode(body, key if key is not None else h.gw.keys.jwt_secret, algorithm=alg)


async def connections_status(h, token: str) -> int:
    async with h.http.get(h.api + "/connections", headers=bearer(token)) as r:
        return r.status


async def test_session_token_claims_are_all_checked(harness):
    h = harness
    app = await h.create_app()
    base = await claims_of(h, app)
    assert await connections_status(h, forge(h, base)) == 200  # the control case
    refused = {
        "HS512 (algorithm not pinned)": forge(h, base, alg="HS512"),
        "wrong key": forge(h, base, key="not-the-gateway-secret-" + "k" * 20),
        "wrong audience": forge(h, base, aud="someone-else"),
        "wrong issuer": forge(h, base, iss="https://evil.example"),
        "no exp": forge(h, base, exp=...),
        "no iat": forge(h, base, iat=...),
        "no aud": forge(h, base, aud=...),
        "expired past the leeway": forge(h, base, exp=int(h.clock()) - LEEWAY_SECONDS - 2),
        "issued in the future": forge(h, base, iat=int(h.clock()) + LEEWAY_SECONDS + 60),
        "unknown app": forge(h, base, appId="app" + "0" * 16),
    }
    for name, token in refused.items():
        assert await connections_status(h, token) == 401, name


async def test_alg_none_and_key_confusion_are_refused(harness):
    h = harness
    app = await h.create_app()
    good = forge(h, await claims_of(h, app))
    header, payload, _ = good.split(".")
    none_header = jwt.utils.base64url_encode(b'{"alg":"none","typ":"JWT"}').decode()
    assert await connections_status(h, f"{none_header}.{payload}.") == 401
    assert await connections_status(h, f"{header}.{payload}.") == 401
    # A public-key algorithm "verified" with the HMAC secret as the key (confusion).
    rs_header = jwt.utils.base64url_encode(b'{"alg":"RS256","typ":"JWT"}').decode()
    assert await connections_status(h, f"{rs_header}.{payload}.{good.split('.')[2]}") == 401


async def test_clock_skew_within_the_leeway_is_tolerated(harness):
    h = harness
    app = await h.create_app()
    base = await claims_of(h, app)
    token = forge(h, base, exp=int(h.clock()) + 60)
    h.clock.advance(60 + LEEWAY_SECONDS - 1)
    assert await connections_status(h, token) == 200
    h.clock.advance(3)
    assert await connections_status(h, token) == 401
    # A token minted by a gateway whose clock runs a little ahead still works.
    assert await connections_status(h, forge(h, base, iat=int(h.clock()) + LEEWAY_SECONDS - 1)) \
        == 200


async def test_minted_token_expires_after_its_ttl(harness):
    app = await harness.create_app()
    token = await harness.session(app, "ann")
    assert await connections_status(harness, token) == 200
    harness.clock.advance(harness.gw.config.sessions_ttl_seconds + LEEWAY_SECONDS + 1)
    assert await connections_status(harness, token) == 401


# ---- CORS ----------------------------------------------------------------------------

async def test_cors_allows_only_the_apps_own_registered_origins(harness):
    a = await harness.create_app("A", origin="https://a.example")
    await harness.create_app("B", origin="https://b.example")
    token_a = await harness.session(a, "ann")
    async with harness.http.options(harness.api + "/connections",
                                    headers={"Origin": "https://evil.example",
                                             "Access-Control-Request-Method": "POST"}) as r:
        assert "Access-Control-Allow-Origin" not in r.headers
    async with harness.http.options(harness.api + "/connections",
                                    headers={"Origin": "https://a.example",
                                             "Access-Control-Request-Method": "POST"}) as r:
        assert r.headers["Access-Control-Allow-Origin"] == "https://a.example"
        assert "Access-Control-Allow-Credentials" not in r.headers
    # App B's page cannot read app A's user's status, though B's origin is registered.
    async with harness.http.get(harness.api + "/connections",
                                headers={**bearer(token_a), "Origin": "https://b.example"}) as r:
        assert "Access-Control-Allow-Origin" not in r.headers
        assert r.headers["Vary"] == "Origin"
    async with harness.http.get(harness.api + "/connections",
                                headers={**bearer(token_a), "Origin": "https://a.example"}) as r:
        assert r.headers["Access-Control-Allow-Origin"] == "https://a.example"
    # Server-only endpoints never answer a browser cross-origin.
    for method, path in (("GET", "/status?appUserId=ann"), ("POST", "/sessions"),
                         ("POST", "/chat/completions"), ("GET", "/models")):
        async with harness.http.request(method, harness.api + path,
                                        headers={**bearer(a.secret_key),
                                                 "Origin": "https://a.example"}) as r:
            assert "Access-Control-Allow-Origin" not in r.headers, path


# ---- consent integrity ---------------------------------------------------------------

async def test_secret_key_alone_cannot_fund_or_raise_a_cap(harness):
    app = await harness.create_app()
    await harness.connect(app, "ann", monthly_usd=5)
    # The app mints a token asking for more and posts it itself: refused.
    token = await harness.session(app, "ann", monthly_usd=500)
    async with harness.http.post(harness.api + "/connections", json={"monthlyUsd": 500},
                                 headers=bearer(token)) as r:
        assert (r.status, (await r.json())["error"]["code"]) == (403, "consent_required")
    # Forged browser headers do not help without the HttpOnly presence cookie.
    async with harness.http.post(harness.api + "/connections", json={"monthlyUsd": 500},
                                 headers={**bearer(token), "Sec-Fetch-Site": "same-origin",
                                          "Origin": harness.gw.config.public_origin}) as r:
        assert r.status == 403
    # A connection with no funding key cannot be created from a token alone.
    token = await harness.session(app, "bob", monthly_usd=5)
    async with harness.http.post(harness.api + "/connections", json={"monthlyUsd": 5},
                                 headers=bearer(token)) as r:
        assert r.status in (402, 403)
    assert (await harness.status(app, "ann"))["limits"] == {"monthlyUsd": 5}
    assert (await harness.status(app, "bob"))["connected"] is False


# ---- isolation between apps ----------------------------------------------------------

async def test_apps_cannot_reach_each_others_users_or_grants(harness):
    a = await harness.create_app("A")
    b = await harness.create_app("B")
    await harness.connect(a, "ann", monthly_usd=5)
    grant = await grant_for(harness, a, "ann")
    # B names A's user: B has no such user; nothing is spent on A's ann.
    assert (await chat(harness, b, {"x-wattfare-user": "ann"}))[1]["error"]["code"] \
        == "not_connected"
    assert (await harness.status(b, "ann"))["connected"] is False
    # B redeems or inspects A's grant: refused.
    assert (await chat(harness, b, {"x-wattfare-grant": grant}))[1]["error"]["code"] \
        == "grant_invalid"
    async with harness.http.get(harness.api + "/grants/current",
                                headers={**bearer(b.secret_key), "x-wattfare-grant": grant}) as r:
        assert (await r.json())["error"]["code"] == "grant_invalid"
    # A session token of app B cannot read or revoke A's user of the same id.
    token_b = await harness.session(b, "ann")
    async with harness.http.delete(harness.api + "/connections", headers=bearer(token_b)) as r:
        assert r.status == 204
    assert (await harness.status(a, "ann"))["connected"] is True
    assert (await harness.status(a, "ann"))["usage"]["monthlyUsd"] == 0
    assert harness.fake.calls == [] or all(c.body["messages"][0]["content"] != PROMPT
                                           for c in harness.fake.calls)
    # The grant still works for the app that minted it.
    status, _ = await chat(harness, a, {"x-wattfare-grant": grant})
    assert status == 200


# ---- logs ----------------------------------------------------------------------------

async def test_no_secret_or_prompt_reaches_the_logs(harness, caplog):
    caplog.set_level(logging.DEBUG)
    h = harness
    app = await h.create_app()
    token, presence = await approve_in_popup(h, app, "ann")
    grant = await grant_for(h, app, "ann")
    cookie = {"Cookie": f"wg_presence={presence}", "Sec-Fetch-Site": "same-origin"}
    calls = [
        ("GET", "/connections", bearer(token), None),
        ("GET", "/status?appUserId=ann", bearer(app.secret_key), None),
        ("GET", "/models", bearer(app.secret_key), None),
        ("GET", "/grants/current", {**bearer(app.secret_key), "x-wattfare-grant": grant}, None),
        ("GET", "/grants/current", {**bearer(app.secret_key), "x-wattfare-grant": grant + "x"},
         None),
        ("GET", "/openapi.json", {}, None),
        ("GET", "/consent/session", {**bearer(token), **cookie}, None),
        ("GET", "/account", cookie, None),
        ("POST", "/sessions", bearer(app.secret_key[:-3] + "bad"), {"appUserId": "x"}),
        ("GET", "/connections", bearer(token[:-4] + "AAAA"), None),
    ]
    for method, path, headers, body in calls:
        async with h.http.request(method, h.api + path, headers=headers, json=body) as r:
            await r.read()
    for model, stream in (("openai/gpt-4o-mini", False), ("openai/gpt-4o-mini", True),
                          ("fake/fail-500", False), ("fake/cut", True),
                          ("fake/midstream-error", True), ("no/such-model", False)):
        await chat(h, app, {"x-wattfare-user": "ann"}, model=model, stream=stream)
    await chat(h, app, {"x-wattfare-grant": grant})
    await chat(h, app, {"x-wattfare-grant": grant + "x"})
    h.fake.broke_keys.add(FUNDING_KEY)
    await chat(h, app, {"x-wattfare-user": "ann"})  # funding_invalid path
    async with h.http.delete(h.api + "/connections", headers=bearer(token)) as r:
        assert r.status == 204
    async with h.http.get(h.url + "/healthz") as r:
        assert r.status == 200
    text = "\n".join(
        f"{rec.name} {rec.getMessage()} {rec.exc_text or ''} {getattr(rec, '__dict__', '')}"
        for rec in caplog.records)
    assert len(caplog.records) > 0
    secret = app.secret_key.split("_", 3)[3]
    for name, value in (("secret key", secret), ("session token", token.split(".")[2]),
                        ("grant token", grant[4:]), ("funding key", FUNDING_KEY[9:]),
                        ("presence cookie", presence), ("prompt", "violet-otter")):
        assert value not in text, f"the {name} appears in the logs"


# ---- HTML pages ----------------------------------------------------------------------

PAGES = {"/connect": "?pk={pk}", "/grant": "?pk={pk}&requests=2", "/account": ""}


@pytest.mark.parametrize("path", sorted(PAGES))
async def test_html_pages_cannot_be_framed_or_leak_the_referrer(harness, path):
    app = await harness.create_app()
    for query, status in ((PAGES[path].format(pk=app.publishable_key), 200),
                          ("?pk=pk_live_app0000000000000000", None)):  # its error page too
        async with harness.http.get(harness.url + path + query) as r:
            assert r.content_type == "text/html", f"{path} is not served as a page"
            assert status is None or r.status == status
            assert r.content_type == "text/html"
            csp = r.headers.get("Content-Security-Policy", "")
            directives = {d.strip().split(" ")[0]: d.strip() for d in csp.split(";")
                          if d.strip()}
            assert directives.get("frame-ancestors") == "frame-ancestors 'none'", path
            assert "'unsafe-inline'" not in directives.get("script-src", "")
            assert r.headers.get("Referrer-Policy") == "no-referrer"
            assert r.headers.get("X-Content-Type-Options") == "nosniff"
            assert "Access-Control-Allow-Origin" not in r.headers


async def test_error_bodies_never_echo_the_credential(harness):
    app = await harness.create_app()
    for token in (app.secret_key[:-2] + "zz", "sk_live_" + "x" * 40, "eyJhbGciOi.bad.token"):
        async with harness.http.get(harness.api + "/status", params={"appUserId": "u"},
                                    headers=bearer(token)) as r:
            assert token not in await r.text()


async def test_popup_endpoints_answer_only_the_gateways_own_pages(harness):
    """Another site's page (or a server forging no browser headers) gets nothing."""
    app = await harness.create_app()
    token, presence = await approve_in_popup(harness, app, "ann")
    cookie = {"Cookie": f"wg_presence={presence}"}
    checks = [("GET", "/consent/session", {**bearer(token)}, None),
              ("POST", "/consent/oauth", {}, {"code": "c", "codeVerifier": "v" * 43}),
              ("GET", "/account", cookie, None),
              ("DELETE", "/account/connections/1", cookie, None)]
    for site in ("cross-site", "same-site", None):
        browser = {"Sec-Fetch-Site": site, "Origin": "https://evil.example"} if site \
            else {"Origin": "https://evil.example"}
        for method, path, headers, body in checks:
            async with harness.http.request(method, harness.api + path, json=body,
                                            headers={**headers, **browser}) as r:
                assert r.status == 401, (site, path, r.status)
                assert "Access-Control-Allow-Origin" not in r.headers
    assert (await harness.status(app, "ann"))["connected"] is True
