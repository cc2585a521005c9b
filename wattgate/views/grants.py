"""One-time grants: POST /api/v1/grants (session token) and GET /api/v1/grants/current.

A grant is funded either by a funding key typed in the grant popup (checked
upstream, sealed to the grant's row) or by the user's existing connection of
the same app, which needs the presence proof of the browser that approved that
connection (see ``wattgate.consent``): an app holding only its secret key can
mint session tokens but never a funded grant. The token (``wfg_…``) is shown
once and stored only as its keyed hash; it is bound to the app that minted it.
Redemption happens in the proxy (``x-wattfare-grant``); each admitted call
answers ``x-wattfare-grant-remaining``.
"""

from __future__ import annotations

from aiohttp import web

from .. import budget, policy
from ..credentials import new_grant_token
from ..errors import ConsentRequired, GrantInvalid, InvalidRequest, WattgateError
from ..middleware import error_response
from ..money import nanos_to_json
from ..sealing import grant_aad
from ..store import App
from . import cors
from .control import approved_here, json_response, presence_of
from .inputs import (funding_key, integer, json_body, secret_key_of, session_token_of,
                     usd_amount)
from .state import gateway_key, upstream_key


async def grants(request: web.Request) -> web.StreamResponse:
    gw = request.app[gateway_key]
    if request.method == "OPTIONS":
        return await cors.preflight(gw, request)
    app: App | None = None
    try:
        session, app = await gw.session_for_token(session_token_of(request))
        response: web.StreamResponse = await _create(request, session.app_user_id, app)
    except WattgateError as e:
        response = error_response(e)
    await cors.allow_origin(gw, request, response, app)
    return response


async def _create(request: web.Request, app_user_id: str, app: App) -> web.Response:
    gw = request.app[gateway_key]
    body = await json_body(request)
    requests = integer(body.get("requests"), "requests", minimum=1,
                       maximum=gw.config.grants_max_requests)
    max_nanos = usd_amount(body.get("maxUsd"), "maxUsd", allow_null=True, positive=True)
    key = funding_key(body.get("fundingKey"))
    policy.check_grant_cap(app.policy, max_nanos)
    now = gw.clock()
    expires_at = int(now) + gw.config.grants_ttl_seconds
    token = new_grant_token()
    token_hash = gw.hash(token)
    if key is not None:
        await request.app[upstream_key].check_key(key)
        await gw.store.create_grant(
            app.app_id, token_hash, requests, max_nanos, sealed_key=None, connection_id=None,
            now=now, expires_at=expires_at, seal=lambda gid: gw.sealer.seal(key, grant_aad(gid)))
    else:
        connection = await gw.store.get_connection(app.app_id, app_user_id)
        if connection is None or not connection.connected:
            raise ConsentRequired("A grant needs a funding key, or an existing connection "
                                  "approved in this browser.")
        if not approved_here(await presence_of(gw, request), connection):
            raise ConsentRequired("Funding a grant from a connection needs the user's "
                                  "approval in the consent popup.")
        await gw.store.create_grant(app.app_id, token_hash, requests, max_nanos,
                                    sealed_key=None, connection_id=connection.connection_id,
                                    now=now, expires_at=expires_at,
                                      approved_by=connection.browser_hash)
    return json_response({"grantToken": token, "expiresAt": expires_at, "requests": requests})


async def current(request: web.Request) -> web.Response:
    """The state of one grant, for the app to show "2 requests remaining"."""
    gw = request.app[gateway_key]
    app = await gw.app_for_secret(secret_key_of(request))
    token = (request.headers.get("x-wattfare-grant") or "").strip()
    if not token:
        raise InvalidRequest("Send the grant token in the x-wattfare-grant header.")
    grant = await gw.store.get_grant(gw.hash(token))
    if grant is None or grant.app_id != app.app_id:
        raise GrantInvalid()
    remaining = max(0, grant.requests - grant.used)
    return json_response({
        "requests": grant.requests, "used": grant.used, "remaining": remaining,
        "maxUsd": None if grant.max_nanos is None else nanos_to_json(grant.max_nanos),
        "spentUsd": nanos_to_json(grant.spent_nanos), "expiresAt": int(grant.expires_at),
        "valid": budget.grant_state(grant, gw.clock()) == "live",
    })
