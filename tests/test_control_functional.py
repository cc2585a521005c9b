"""Sessions, connections, status and health through the running app: every answer a client sees."""

from __future__ import annotations

import calendar
import json
from typing import Any

import jwt
import pytest
from conftest import FUNDING_KEY, free_port

from wattgate.credentials import mint_credentials, parse_secret_key
from wattgate.ledger import period_of
from wattgate.sessions import AUDIENCE
from wattgate.store import Usage

NOT_CONNECTED = {"connected": False, "limits": None, "usage": {"monthlyUsd": 0},
                 "remainingUsd": 0, "heldUsd": 0}


async def call(h, method: str, path: str, auth: str | None = None, *,  # type: ignore[no-untyped-def]
               headers: dict[str, str] | None = None, **kw: Any) -> tuple[int, Any, Any]:
    """One request; answers (status, headers, parsed JSON or None). Every body must be JSON."""
    hdrs = {"Accept": "text/html,application/json"} | (headers or {})
    if auth is not None:
        hdrs["Authorization"] = f"Bearer {auth}"
    async with h.http.request(method, h.url + path, headers=hdrs, **kw) as r:
        raw = await r.read()
        if not raw:
            return r.status, r.headers, None
        assert r.content_type == "application/json", (r.status, raw[:200])
        assert b"Traceback" not in raw and b"<html" not in raw.lower()
        return r.status, r.headers, json.loads(raw)


def assert_error(result: tuple[int, Any, Any], status: int, code: str) -> None:
    got_status, _, body = result
    assert (got_status, body["error"]["code"]) == (status, code), body
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    assert body["error"]["message"]


def forged_token(h, **changes: Any) -> str:  # type: ignore[no-untyped-def]
    """A token signed like the gateway's own (unless ``changes`` say otherwise)."""
    now = int(h.clock())
    app = h.apps[0]
    secret_hash = h.gw.hash(parse_secret_key(app.secret_key)[1])
    claims = {"iss": h.url, "aud": AUDIENCE, "iat": now, "exp": now + 600, "jti": "x",
              "appId": app.app_id, "appUserId": "user_1", "limits": None,
              "sv": h.gw.secret_tag(secret_hash)}
    claims.update(changes)
    key = changes.pop("_key", None) or h.gw.keys.jwt_secret
    claims.pop("_key", None)
    return jwt.encode(claims, key, algorithm="HS256")


# ---- the happy path ---------------------------------------------------------

async def test_connect_then_status(harness):
    app = await harness.create_app()
    assert await harness.status(app, "user_123") == NOT_CONNECTED
    body = await harness.connect(app, "user_123", monthly_usd=10)
    assert body == {"connected": True, "limits": {"monthlyUsd": 10}, "usage": {"monthlyUsd": 0},
                    "remainingUsd": 10, "heldUsd": 0}
    assert await harness.status(app, "user_123") == body
    token = await harness.session(app, "user_123")
    assert (await call(harness, "GET", "/api/v1/connections", token))[2] == body


async def test_session_shape_and_expiry(harness, clock):
    app = await harness.create_app()
    status, _, body = await call(harness, "POST", "/api/v1/sessions", app.secret_key,
                                 json={"appUserId": "u", "requestLimit": {"monthlyUsd": 20}})
    assert status == 200 and set(body) == {"token", "expiresAt"}
    assert body["expiresAt"] == int(clock()) + 600
    claims = jwt.decode(body["token"], options={"verify_signature": False})
    assert (claims["appId"], claims["appUserId"], claims["limits"]) == \
        (app.app_id, "u", {"monthlyUsd": "20"})
    assert jwt.get_unverified_header(body["token"])["alg"] == "HS256"


async def test_session_ttl_is_configurable(make_harness, clock):
    h = await make_harness({"WATTGATE_SESSIONS__TTL_SECONDS": "60"})
    app = await h.create_app()
    _, _, body = await call(h, "POST", "/api/v1/sessions", app.secret_key, json={"appUserId": "u"})
    assert body["expiresAt"] == int(clock()) + 60


async def test_token_cap_is_used_when_the_body_names_none(harness):
    app = await harness.create_app()
    token = await harness.session(app, "u", monthly_usd=7.5)
    status, _, body = await call(harness, "POST", "/api/v1/connections", token,
                                 json={"fundingKey": FUNDING_KEY})
    assert status == 200 and body["limits"] == {"monthlyUsd": 7.5}


async def test_usage_and_remaining_are_exact(harness):
    app = await harness.create_app()
    await harness.connect(app, "u", monthly_usd=10)
    conn = await harness.gw.store.get_connection(app.app_id, "u")
    now = harness.clock()
    await harness.gw.store.settle(None, Usage("gen-1", app.app_id, conn.connection_id, None,
                                              "m", 1, 1, 3_200_000_000, False, "ok", 1, now),
                                  period_of(now))
    assert await harness.status(app, "u") == {"connected": True, "limits": {"monthlyUsd": 10},
                                              "usage": {"monthlyUsd": 3.2}, "remainingUsd": 6.8,
                                              "heldUsd": 0}


async def test_usage_resets_at_the_utc_month_boundary(make_harness):
    from conftest import Clock

    clock = Clock(calendar.timegm((2027, 3, 1, 0, 0, 0)) - 1.0)  # Feb 28, 23:59:59 UTC
    h = await make_harness(clock_fn=clock)
    app = await h.create_app()
    await h.connect(app, "u", monthly_usd=10)
    conn = await h.gw.store.get_connection(app.app_id, "u")
    await h.gw.store.settle(None, Usage("g", app.app_id, conn.connection_id, None, "m", 1, 1,
                                        USD(4), False, "ok", 1, clock()), period_of(clock()))
    assert (await h.status(app, "u"))["remainingUsd"] == 6
    clock.advance(1)  # 2027-03-01 00:00:00 UTC
    assert (await h.status(app, "u"))["usage"] == {"monthlyUsd": 0}
    assert (await h.status(app, "u"))["remainingUsd"] == 10


def USD(n: int) -> int:
    return n * 1_000_000_000


async def test_healthz(harness):
    status, _, body = await call(harness, "GET", "/healthz")
    assert (status, body) == (200, {"ok": True})


# ---- authentication ---------------------------------------------------------

async def test_expired_session_token_is_refused(harness, clock):
    app = await harness.create_app()
    token = await harness.session(app, "u")
    assert (await call(harness, "GET", "/api/v1/connections", token))[0] == 200
    clock.advance(600 + 6)
    result = await call(harness, "GET", "/api/v1/connections", token)
    assert_error(result, 401, "auth")
    assert "expired" in result[2]["error"]["message"]


@pytest.mark.parametrize("forge", [
    lambda h: jwt.encode(jwt.decode(forged_token(h), options={"verify_signature": False}),
                         None, algorithm="none"),
    lambda h: forged_token(h, _key="another-gateway-key-" * 4),
    lambda h: forged_token(h, iss="https://other-gateway.example"),
    lambda h: forged_token(h, aud="someone-else"),
    lambda h: forged_token(h, appId="app" + "0" * 16),  # an app that does not exist
    lambda h: forged_token(h, sv="0" * 16),  # minted under another secret
    lambda h: "not-a-jwt",
], ids=["alg-none", "other-key", "wrong-iss", "wrong-aud", "unknown-app", "old-secret",
        "garbage"])
async def test_forged_session_tokens_are_refused(harness, forge):
    await harness.create_app()
    assert (await call(harness, "GET", "/api/v1/connections", forged_token(harness)))[0] == 200
    token = forge(harness)
    for method in ("GET", "POST", "DELETE"):
        assert_error(await call(harness, method, "/api/v1/connections", token,
                                json={"monthlyUsd": 1}), 401, "auth")


async def test_secret_key_is_refused_where_a_session_token_is_needed(harness):
    app = await harness.create_app()
    for key in (app.secret_key, app.publishable_key):
        assert_error(await call(harness, "GET", "/api/v1/connections", key), 401, "auth")


async def test_session_token_is_refused_where_the_secret_key_is_needed(harness):
    app = await harness.create_app()
    token = await harness.session(app, "u")
    assert_error(await call(harness, "GET", "/api/v1/status?appUserId=u", token), 401, "auth")
    assert_error(await call(harness, "POST", "/api/v1/sessions", token, json={"appUserId": "u"}),
                 401, "auth")
    assert_error(await call(harness, "POST", "/api/v1/sessions", app.publishable_key,
                            json={"appUserId": "u"}), 401, "auth")


@pytest.mark.parametrize("header", [None, "Bearer", "Basic abc", "Bearer sk_live_nope",
                                    "Bearer sk_live_app0123456789abcdef_wrong"])
async def test_missing_or_bad_secret_key(harness, header):
    await harness.create_app()
    headers = {"Authorization": header} if header else {}
    assert_error(await call(harness, "GET", "/api/v1/status?appUserId=u", headers=headers),
                 401, "auth")


async def test_secret_key_of_one_app_cannot_read_another_apps_user(harness):
    a = await harness.create_app("A")
    b = await harness.create_app("B")
    await harness.connect(b, "shared_user", monthly_usd=10)
    assert await harness.status(a, "shared_user") == NOT_CONNECTED
    assert (await harness.status(b, "shared_user"))["connected"] is True
    token_a = await harness.session(a, "shared_user")
    assert (await call(harness, "GET", "/api/v1/connections", token_a))[2] == NOT_CONNECTED
    # Revoking through app A leaves app B's connection alone.
    assert (await call(harness, "DELETE", "/api/v1/connections", token_a))[0] == 204
    assert (await harness.status(b, "shared_user"))["connected"] is True


async def test_rotated_secret_is_refused_at_once(harness):
    app = await harness.create_app()
    new = mint_credentials(app.app_id)
    assert await harness.gw.store.set_app_secret(app.app_id, harness.gw.hash(new.secret))
    assert_error(await call(harness, "GET", "/api/v1/status?appUserId=u", app.secret_key),
                 401, "auth")
    assert (await call(harness, "GET", "/api/v1/status?appUserId=u", new.secret_key))[0] == 200


async def test_rotating_the_secret_ends_the_session_tokens_it_minted(harness):
    app = await harness.create_app()
    await harness.connect(app, "u", monthly_usd=10)
    token = await harness.session(app, "u")
    new = mint_credentials(app.app_id)
    await harness.gw.store.set_app_secret(app.app_id, harness.gw.hash(new.secret))
    for method in ("GET", "POST", "DELETE"):
        assert_error(await call(harness, method, "/api/v1/connections", token,
                                json={"monthlyUsd": 1}), 401, "auth")
    _, _, fresh = await call(harness, "POST", "/api/v1/sessions", new.secret_key,
                             json={"appUserId": "u"})
    _, _, body = await call(harness, "GET", "/api/v1/connections", fresh["token"])
    assert body["limits"] == {"monthlyUsd": 10}  # the connection itself is untouched


async def test_deleted_app_tokens_stop_working(harness):
    app = await harness.create_app()
    token = await harness.session(app, "u")
    await harness.gw.store.delete_app(app.app_id, now=harness.clock())
    assert_error(await call(harness, "GET", "/api/v1/connections", token), 401, "auth")


# ---- validation -------------------------------------------------------------

@pytest.mark.parametrize("body", [
    b"{not json", b"[1, 2]", b'"u"', b"", b"\xff\xfe", b"[" * 100_000,
    json.dumps({}).encode(), json.dumps({"appUserId": 42}).encode(),
    json.dumps({"appUserId": ""}).encode(), json.dumps({"appUserId": None}).encode(),
    json.dumps({"appUserId": "x" * 10_240}).encode(),
    json.dumps({"appUserId": "user\n1"}).encode(), json.dumps({"appUserId": "u\x00"}).encode(),
    json.dumps({"appUserId": "u", "requestLimit": 20}).encode(),
    json.dumps({"appUserId": "u", "requestLimit": {"monthlyUsd": "20"}}).encode(),
    json.dumps({"appUserId": "u", "requestLimit": {"monthlyUsd": -1}}).encode(),
    json.dumps({"appUserId": "u", "requestLimit": {"monthlyUsd": True}}).encode(),
    json.dumps({"appUserId": "u", "requestLimit": {"monthlyUsd": None}}).encode(),
    b'{"appUserId": "u", "requestLimit": {"monthlyUsd": NaN}}',
    b'{"appUserId": "u", "requestLimit": {"monthlyUsd": 1e999}}',
], ids=lambda b: b[:30].decode("latin-1"))
async def test_bad_session_requests_are_400(harness, body):
    app = await harness.create_app()
    assert_error(await call(harness, "POST", "/api/v1/sessions", app.secret_key, data=body,
                            headers={"Content-Type": "application/json"}),
                 400, "invalid_request")


@pytest.mark.parametrize("user", ["", "x" * 10_240, "a\tb", "a\x7fb"])
async def test_bad_app_user_id_in_status_is_400(harness, user):
    app = await harness.create_app()
    assert_error(await call(harness, "GET", "/api/v1/status", app.secret_key,
                            params={"appUserId": user}), 400, "invalid_request")
    assert_error(await call(harness, "GET", "/api/v1/status", app.secret_key), 400,
                 "invalid_request")


async def test_unicode_app_user_id_is_fine(harness):
    app = await harness.create_app()
    await harness.connect(app, "usér-✓ 42", monthly_usd=1)
    assert (await harness.status(app, "usér-✓ 42"))["connected"] is True


@pytest.mark.parametrize("body", [
    b"{not json", b"[]", json.dumps({"monthlyUsd": "10", "fundingKey": FUNDING_KEY}).encode(),
    json.dumps({"monthlyUsd": -5, "fundingKey": FUNDING_KEY}).encode(),
    json.dumps({"monthlyUsd": 10_000_001, "fundingKey": FUNDING_KEY}).encode(),
    json.dumps({"monthlyUsd": [10], "fundingKey": FUNDING_KEY}).encode(),
    json.dumps({"monthlyUsd": 10, "fundingKey": 12345}).encode(),
    json.dumps({"monthlyUsd": 10, "fundingKey": "has space inside"}).encode(),
    json.dumps({"monthlyUsd": 10, "fundingKey": "k" * 600}).encode(),
], ids=lambda b: b[:30].decode("latin-1"))
async def test_bad_connection_requests_are_400(harness, body):
    app = await harness.create_app()
    token = await harness.session(app, "u")
    assert_error(await call(harness, "POST", "/api/v1/connections", token, data=body,
                            headers={"Content-Type": "application/json"}), 400, "invalid_request")
    assert await harness.gw.store.get_connection(app.app_id, "u") is None


async def test_body_over_the_limit_is_413(make_harness):
    h = await make_harness({"WATTGATE_SERVER__MAX_BODY_BYTES": "2048"})
    app = await h.create_app()
    big = json.dumps({"appUserId": "u", "pad": "x" * 4096})
    assert_error(await call(h, "POST", "/api/v1/sessions", app.secret_key, data=big,
                            headers={"Content-Type": "application/json"}),
                 413, "payload_too_large")


# ---- routing: 404 and 405 are JSON too --------------------------------------

@pytest.mark.parametrize("method, path, status, code", [
    ("GET", "/", 404, "not_found"),
    ("GET", "/api/v1/nope", 404, "not_found"),
    ("GET", "/api/v2/sessions", 404, "not_found"),
    ("PUT", "/api/v1/connections", 405, "method_not_allowed"),
    ("PATCH", "/api/v1/connections", 405, "method_not_allowed"),
    ("GET", "/api/v1/sessions", 405, "method_not_allowed"),
    ("DELETE", "/api/v1/status", 405, "method_not_allowed"),
    ("POST", "/healthz", 405, "method_not_allowed"),
])
async def test_unknown_paths_and_methods_answer_json(harness, method, path, status, code):
    result = await call(harness, method, path)
    assert_error(result, status, code)
    if status == 405:
        assert result[1]["Allow"]


# ---- rate limit -------------------------------------------------------------

async def test_session_mints_are_rate_limited_per_app(make_harness, clock):
    h = await make_harness({"WATTGATE_LIMITS__SESSIONS_PER_MINUTE": "3"})
    a, b = await h.create_app("A"), await h.create_app("B")
    for _ in range(3):
        await h.session(a, "u")
    result = await call(h, "POST", "/api/v1/sessions", a.secret_key, json={"appUserId": "u"})
    assert_error(result, 429, "rate_limited")
    assert 1 <= int(result[1]["Retry-After"]) <= 20
    await h.session(b, "u")  # another app has its own bucket
    clock.advance(int(result[1]["Retry-After"]))
    await h.session(a, "u")


# ---- the dev switch ---------------------------------------------------------

async def test_unlimited_needs_the_dev_switch(harness):
    app = await harness.create_app()
    token = await harness.session(app, "u")
    assert_error(await call(harness, "POST", "/api/v1/connections", token,
                            json={"monthlyUsd": None, "fundingKey": FUNDING_KEY}),
                 400, "invalid_request")


async def test_dev_switch_allows_unlimited(make_harness):
    h = await make_harness({"WATTGATE_DEV__ALLOW_UNLIMITED": "true"})
    app = await h.create_app()
    _, _, s = await call(h, "POST", "/api/v1/sessions", app.secret_key,
                         json={"appUserId": "u", "requestLimit": {"monthlyUsd": None}})
    status, _, body = await call(h, "POST", "/api/v1/connections", s["token"],
                                 json={"fundingKey": FUNDING_KEY})
    assert status == 200
    assert body == {"connected": True, "limits": {"monthlyUsd": None},
                    "usage": {"monthlyUsd": 0}, "remainingUsd": None, "heldUsd": 0}
    assert await h.status(app, "u") == body


# ---- revoke -----------------------------------------------------------------

async def test_delete_revokes(harness):
    app = await harness.create_app()
    await harness.connect(app, "u", monthly_usd=10)
    token = await harness.session(app, "u")
    status, _, body = await call(harness, "DELETE", "/api/v1/connections", token)
    assert (status, body) == (204, None)
    assert await harness.status(app, "u") == NOT_CONNECTED
    assert (await call(harness, "GET", "/api/v1/connections", token))[2] == NOT_CONNECTED
    conn = await harness.gw.store.get_connection(app.app_id, "u")
    assert conn.sealed_key is None  # the funding key is gone, not just flagged
    # Idempotent, and fine for a user who never connected.
    assert (await call(harness, "DELETE", "/api/v1/connections", token))[0] == 204
    other = await harness.session(app, "never")
    assert (await call(harness, "DELETE", "/api/v1/connections", other))[0] == 204


# ---- the funding key --------------------------------------------------------

async def test_funding_key_refused_upstream_is_402(harness):
    app = await harness.create_app()
    token = await harness.session(app, "u")
    result = await call(harness, "POST", "/api/v1/connections", token,
                        json={"monthlyUsd": 10, "fundingKey": "not-an-openrouter-key"})
    assert_error(result, 402, "funding_invalid")
    assert await harness.gw.store.get_connection(app.app_id, "u") is None
    assert await harness.status(app, "u") == NOT_CONNECTED


async def test_unreachable_upstream_is_502(make_harness):
    h = await make_harness({"WATTGATE_UPSTREAM__BASE_URL": f"http://127.0.0.1:{free_port()}/v1",
                            "WATTGATE_UPSTREAM__CONNECT_TIMEOUT": "2"})
    app = await h.create_app()
    token = await h.session(app, "u")
    assert_error(await call(h, "POST", "/api/v1/connections", token,
                            json={"monthlyUsd": 10, "fundingKey": FUNDING_KEY}), 502, "upstream")
    assert await h.gw.store.get_connection(app.app_id, "u") is None


async def test_funding_keys_are_not_in_the_database(harness):
    """Not in the SQLite file (nor its WAL), nor in any row of any PostgreSQL table."""
    app = await harness.create_app()
    keys = [FUNDING_KEY, "sk-or-v1-" + "9" * 48]
    await harness.connect(app, "u1", funding_key=keys[0])
    await harness.connect(app, "u2", funding_key=keys[1])
    raw = await harness.db.stored_bytes()
    sealed = (await harness.gw.store.get_connection(app.app_id, "u1")).sealed_key
    assert sealed and sealed.encode() in raw  # the search reaches where the key is kept
    for key in keys:
        assert key.encode() not in raw and key[9:].encode() not in raw
    for route in ("/api/v1/connections",):
        token = await harness.session(app, "u1")
        _, _, body = await call(harness, "GET", route, token)
        assert keys[0] not in json.dumps(body)


async def test_the_funding_key_is_checked_with_the_upstream(harness):
    app = await harness.create_app()
    harness.fake.revoked_keys.add(FUNDING_KEY)
    token = await harness.session(app, "u")
    assert_error(await call(harness, "POST", "/api/v1/connections", token,
                            json={"monthlyUsd": 10, "fundingKey": FUNDING_KEY}),
                 402, "funding_invalid")


# ---- CORS ---------------------------------------------------------------------

async def test_registered_origin_gets_cors_and_others_do_not(harness):
    app = await harness.create_app(origin="http://localhost:3000")
    token = await harness.session(app, "u")
    for origin, allowed in (("http://localhost:3000", True), ("https://evil.example", False),
                            ("http://localhost:3001", False)):
        for method, kw in (("GET", {}), ("POST", {"json": {"monthlyUsd": 1}}),
                           ("DELETE", {})):
            _, headers, _ = await call(harness, method, "/api/v1/connections", token,
                                       headers={"Origin": origin}, **kw)
            assert headers.get("Access-Control-Allow-Origin") == (origin if allowed else None)
            assert "Access-Control-Allow-Credentials" not in headers
            assert "Origin" in headers.get("Vary", "")


async def test_origin_of_another_app_gets_no_cors(harness):
    a = await harness.create_app("A", origin="https://a.example")
    await harness.create_app("B", origin="https://b.example")
    token = await harness.session(a, "u")
    _, headers, _ = await call(harness, "GET", "/api/v1/connections", token,
                               headers={"Origin": "https://b.example"})
    assert "Access-Control-Allow-Origin" not in headers


async def test_auth_errors_are_readable_by_registered_origins(harness):
    """The browser SDK must see its 401 to mint a fresh token."""
    await harness.create_app(origin="https://a.example")
    for origin, allowed in (("https://a.example", True), ("https://evil.example", False)):
        result = await call(harness, "GET", "/api/v1/connections", "expired-or-bad",
                            headers={"Origin": origin})
        assert_error(result, 401, "auth")
        assert result[1].get("Access-Control-Allow-Origin") == (origin if allowed else None)


async def test_preflight(harness):
    await harness.create_app(origin="https://a.example")
    ask = {"Access-Control-Request-Method": "POST",
           "Access-Control-Request-Headers": "authorization, content-type"}
    status, headers, _ = await call(harness, "OPTIONS", "/api/v1/connections",
                                    headers={"Origin": "https://a.example"} | ask)
    assert status == 204
    assert headers["Access-Control-Allow-Origin"] == "https://a.example"
    assert "POST" in headers["Access-Control-Allow-Methods"]
    assert "DELETE" in headers["Access-Control-Allow-Methods"]
    assert "authorization" in headers["Access-Control-Allow-Headers"].lower()
    status, headers, _ = await call(harness, "OPTIONS", "/api/v1/connections",
                                    headers={"Origin": "https://evil.example"} | ask)
    assert status == 204 and "Access-Control-Allow-Origin" not in headers
    # Server-to-server endpoints never answer CORS.
    _, headers, _ = await call(harness, "POST", "/api/v1/sessions", "x",
                               headers={"Origin": "https://a.example"})
    assert "Access-Control-Allow-Origin" not in headers


async def test_funding_keys_are_never_logged(harness, caplog):
    import logging

    caplog.set_level(logging.DEBUG)
    app = await harness.create_app()
    await harness.connect(app, "u", funding_key=FUNDING_KEY)
    token = await harness.session(app, "u2")
    refused_key = "sk-or-v1-refused-" + "r" * 40
    harness.fake.revoked_keys.add(refused_key)
    await call(harness, "POST", "/api/v1/connections", token,
               json={"monthlyUsd": 1, "fundingKey": refused_key})
    await call(harness, "POST", "/api/v1/connections", token,
               json={"monthlyUsd": 1, "fundingKey": "x" * 600})
    logged = "\n".join(r.getMessage() + str(r.exc_info or "") for r in caplog.records)
    for key in (FUNDING_KEY, refused_key, "x" * 600):
        assert key not in logged
