"""The JSON the gateway's own pages call: the consent context, the OAuth code
exchange, and the end user's dashboard (``/api/v1/account``).

Every endpoint here answers only same-origin requests (the browser-set
``Sec-Fetch-Site``/``Origin``, see ``control.is_same_origin``), so another site
can neither read these answers nor ride the user's cookie: that and the
SameSite=Strict presence cookie are the CSRF defence. The dashboard is keyed
by the presence cookie alone (no account system); it lists, re-caps and
revokes the connections this browser approved. Funding keys never leave.

Not here: the pages themselves (``views.pages``), and the connection and grant
endpoints the popup posts its approval to (``views.control``, ``views.grants``).
"""

from __future__ import annotations

from typing import Any

import aiohttp
from aiohttp import web

from .. import consent, policy, reconcile
from ..credentials import parse_publishable_key
from ..errors import AuthError, InvalidRequest, NotFound, UpstreamError
from ..gateway import Gateway
from ..ledger import period_of, status_of
from ..money import nanos_to_json
from ..sealing import SealError, connection_aad
from ..store import ACTIVE, REVOKED, App, Connection
from ..upstream import KeyLimit, Upstream
from .control import approved_here, connection_status, is_same_origin, json_response, presence_of
from .inputs import json_body, session_token_of, usd_amount
from .state import gateway_key, upstream_key

RECENT_CALLS = 10


def _same_origin_gateway(request: web.Request) -> Gateway:
    gw = request.app[gateway_key]
    if not is_same_origin(gw, request):
        raise AuthError("This endpoint only answers the gateway's own pages.")
    return gw


def app_public(app: App) -> dict[str, Any]:
    return {"appId": app.app_id, "name": app.name, "origins": list(app.origins),
            "policy": policy.describe(app.policy)}


async def consent_session(request: web.Request) -> web.Response:
    """What the consent popup shows once it holds a session token.

    The popup names the app it was opened for (``?pk=``); a token minted by
    another app is refused, so a borrowed publishable key cannot dress one
    app's request up as another's.
    """
    gw = _same_origin_gateway(request)
    session, app = await gw.session_for_token(session_token_of(request))
    pk = request.query.get("pk")
    if pk is not None and parse_publishable_key(pk) != app.app_id:
        raise AuthError("This session token belongs to another app.")
    existing = await gw.store.get_connection(app.app_id, session.app_user_id)
    returning = existing is not None and existing.connected \
        and approved_here(await presence_of(gw, request), existing)
    requested: Any = None
    if session.has_limit:
        requested = None if session.limit_nanos is None else nanos_to_json(session.limit_nanos)
    return json_response({
        "app": app_public(app),
        "requestedLimit": {"monthlyUsd": requested} if session.has_limit else None,
        "status": await connection_status(gw, app.app_id, session.app_user_id),
        "returning": returning,
        "allowUnlimited": gw.config.dev_allow_unlimited,
    })


async def oauth_exchange(request: web.Request) -> web.Response:
    """Trade an OpenRouter PKCE code for the user's key, server to server.

    Done here rather than in the page so the exchange works with providers
    (and the fake) that send no CORS headers; the key goes back only to the
    same-origin popup, which then submits it like a pasted key.
    """
    gw = _same_origin_gateway(request)
    body = await json_body(request)
    code, verifier = body.get("code"), body.get("codeVerifier")
    if not isinstance(code, str) or not code or len(code) > 512:
        raise InvalidRequest("code must be the code OpenRouter returned.")
    if not isinstance(verifier, str) or not 43 <= len(verifier) <= 128:
        raise InvalidRequest("codeVerifier must be the PKCE verifier (43 to 128 characters).")
    base = (gw.config.oauth_api_base or gw.config.upstream_base_url).rstrip("/")
    session = request.app[upstream_key].session
    assert session is not None
    try:
        async with session.post(base + "/auth/keys", json={
                "code": code, "code_verifier": verifier, "code_challenge_method": "S256"},
                timeout=aiohttp.ClientTimeout(total=30)) as resp:
            data = await resp.json(content_type=None) if resp.status < 500 else None
            status = resp.status
    except (TimeoutError, aiohttp.ClientError, ValueError):
        raise UpstreamError("Could not reach OpenRouter to finish connecting.") from None
    key = data.get("key") if isinstance(data, dict) else None
    if status != 200 or not isinstance(key, str) or not key:
        raise InvalidRequest("OpenRouter did not accept this sign-in (the code may have "
                             "expired); try Connect with OpenRouter again.")
    # What OpenRouter itself will refuse past, read back rather than assumed: the popup
    # says what the user got (the /auth page may not have honoured the limit asked).
    limit = await request.app[upstream_key].key_limit(key)
    return json_response({"key": key, "keyLimit": _key_limit_json(limit)})


def _key_limit_json(limit: KeyLimit | None) -> dict[str, Any] | None:
    return None if limit is None else {
        "limitUsd": None if limit.limit_nanos is None else nanos_to_json(limit.limit_nanos),
        "reset": limit.reset, "label": limit.label}


async def _connection_key_limit(gw: Gateway, upstream: Upstream,
                                connection: Connection) -> KeyLimit | None:
    """The connection's key's own limit at OpenRouter, which a new cap here cannot change
    (that needs the user's provisioning key, PATCH /keys/{hash}); None if unknown."""
    if not connection.connected or not connection.sealed_key:
        return None
    try:
        key = gw.sealer.unseal(connection.sealed_key, connection_aad(connection.connection_id))
    except SealError:
        return None
    return await upstream.key_limit(key)


# ---- the dashboard ---------------------------------------------------------
async def _browser(request: web.Request) -> tuple[Gateway, frozenset[str]]:
    gw = _same_origin_gateway(request)
    return gw, await presence_of(gw, request)


async def _connection_body(gw: Gateway, connection: Connection,
                           apps: dict[str, App | None]) -> dict[str, Any]:
    if connection.app_id not in apps:
        apps[connection.app_id] = await gw.store.get_app(connection.app_id)
    app = apps[connection.app_id]
    calls = await gw.store.recent_usage(connection.connection_id, RECENT_CALLS)
    return {
        "id": connection.connection_id,
        "app": {"name": app.name if app else "(deleted app)",
                "origin": app.origins[0] if app and app.origins else None,
                "maxCapUsd": policy.describe(app.policy)["maxCapUsd"] if app else None},
        "state": connection.state,
        "connectedAt": int(connection.created_at),
        "status": await status_of(gw.store, connection, gw.clock()),
        "period": period_of(gw.clock()),
        "calls": [{"at": int(u.created_at), "model": u.model,
                   "costUsd": nanos_to_json(u.cost_nanos), "provisional": u.provisional,
                   "status": u.status} for u in calls],
    }


async def account(request: web.Request) -> web.Response:
    gw, browsers = await _browser(request)
    if not browsers:
        return json_response({"recognized": False, "connections": []})
    apps: dict[str, App | None] = {}
    rows = [await _connection_body(gw, c, apps) for browser in sorted(browsers)
            for c in await gw.store.connections_for_browser(browser)]
    rows.sort(key=lambda r: (r["state"] != ACTIVE, -r["connectedAt"]))
    return json_response({"recognized": True, "connections": rows})


async def _own_connection(request: web.Request) -> tuple[Gateway, Connection]:
    gw, browsers = await _browser(request)
    if not browsers:
        raise AuthError("This browser has not approved any connection.")
    try:
        connection_id = int(request.match_info["connection_id"])
    except ValueError:
        raise NotFound("No such connection.") from None
    connection = await gw.store.get_connection_by_id(connection_id)
    if connection is None or not approved_here(browsers, connection):
        raise NotFound("No such connection.")  # another browser's is not even confirmed
    return gw, connection


async def account_connection(request: web.Request) -> web.Response:
    """POST: change the cap (the cookie is the user's presence); DELETE: revoke."""
    gw, connection = await _own_connection(request)
    if request.method == "DELETE":
        if connection.state != REVOKED:
            await reconcile.revoke(gw, request.app[upstream_key], connection)
        return web.Response(status=204)
    if request.content_type != "application/json":
        raise InvalidRequest("Send the new cap as JSON.")
    body = await json_body(request)
    if "monthlyUsd" not in body:
        raise InvalidRequest("monthlyUsd is required.")
    cap = usd_amount(body["monthlyUsd"], "monthlyUsd", allow_null=True)
    change = consent.decide(connection, requested_cap=cap, token_cap=consent.UNSET,
                            has_funding_key=False, user_present=True,
                            allow_unlimited=gw.config.dev_allow_unlimited)
    app = await gw.store.get_app(connection.app_id)
    if app is not None:  # a deleted app's connection is revoked: update_cap refuses it
        policy.check_cap(app.policy, change.cap_nanos,
                         kept=change.cap_nanos == connection.cap_nanos)
    saved = await gw.store.update_cap(connection.connection_id, change.cap_nanos,
                                      expected_key=connection.sealed_key,
                                      expected_cap=connection.cap_nanos, now=gw.clock())
    if saved is None:  # revoked, re-funded or re-capped meanwhile: show what is true now
        saved = await gw.store.get_connection_by_id(connection.connection_id)
        assert saved is not None
    body = await _connection_body(gw, saved, {})
    # The dashboard warns when the key's own OpenRouter limit is below the new cap.
    body["keyLimit"] = _key_limit_json(
        await _connection_key_limit(gw, request.app[upstream_key], saved))
    return json_response(body)


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/api/v1/consent/session", consent_session)
    r.add_post("/api/v1/consent/oauth", oauth_exchange)
    r.add_get("/api/v1/account", account)
    r.add_route("POST", "/api/v1/account/connections/{connection_id}", account_connection)
    r.add_route("DELETE", "/api/v1/account/connections/{connection_id}", account_connection)
