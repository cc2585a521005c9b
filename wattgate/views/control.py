"""The control plane of /api/v1: sessions, connections, status, health.

Each handler authenticates, validates, calls the store or domain code, and
answers the reference shapes. Consent rules live in ``wattgate.consent``.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from .. import consent, policy, reconcile
from ..credentials import new_presence_value
from ..errors import InvalidRequest, Unavailable, WattgateError
from ..gateway import Gateway
from ..ledger import status_of
from ..middleware import error_response
from ..money import nanos_to_usd
from ..sealing import connection_aad
from ..sessions import Session
from ..store import ACTIVE, REVOKED, App, Connection
from . import cors
from .inputs import app_user_id, funding_key, json_body, secret_key_of, session_token_of, usd_amount
from .state import gateway_key, upstream_key


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(data), status=status, content_type="application/json")


async def healthz(request: web.Request) -> web.Response:
    """For process supervisors: no auth, one trivial read, no upstream call."""
    if not await request.app[gateway_key].store.ping():
        raise Unavailable("The database does not answer.")
    return json_response({"ok": True})


async def create_session(request: web.Request) -> web.Response:
    gw = request.app[gateway_key]
    secret_key = secret_key_of(request)
    app = await gw.app_for_secret(secret_key)
    await gw.limit("RL_SESSIONS", app.app_id)
    body = await json_body(request)
    user = app_user_id(body.get("appUserId"))
    limit_usd, has_limit = None, False
    request_limit = body.get("requestLimit")
    if request_limit is not None:
        if not isinstance(request_limit, dict):
            raise InvalidRequest("requestLimit must be an object like {\"monthlyUsd\": 20}.")
        if "monthlyUsd" in request_limit:
            nanos = usd_amount(request_limit["monthlyUsd"], "requestLimit.monthlyUsd",
                               allow_null=True)
            if nanos is None and not gw.config.dev_allow_unlimited:
                raise InvalidRequest("requestLimit.monthlyUsd: null (unlimited) is only "
                                     "allowed in development mode.")
            has_limit = True
            limit_usd = None if nanos is None else nanos_to_usd(nanos)
    token, expires_at = gw.sessions.mint(app.app_id, user, limit_usd, has_limit, now=gw.clock(),
                                         secret_tag=gw.session_tag_of(secret_key))
    return json_response({"token": token, "expiresAt": expires_at})


async def get_status(request: web.Request) -> web.Response:
    gw = request.app[gateway_key]
    app = await gw.app_for_secret(secret_key_of(request))
    user = app_user_id(request.query.get("appUserId"))
    return json_response(await connection_status(gw, app.app_id, user))


async def connection_status(gw: Gateway, app_id: str, user: str) -> dict[str, Any]:
    connection = await gw.store.get_connection(app_id, user)
    return await status_of(gw.store, connection, gw.clock())


PAGE_HEADER = "X-Wattgate-Page"


def is_same_origin(gw: Gateway, request: web.Request) -> bool:
    """A request made by the gateway's own pages, as the browser itself attests.

    ``Sec-Fetch-Site`` when the browser sends it (https, or localhost). Browsers
    send no ``Sec-Fetch-*`` to a plain-http origin at another hostname (a LAN
    or staging host), and no ``Origin`` on a same-origin GET: there the pages'
    ``X-Wattgate-Page`` header is the proof, since a page on another origin
    can only send a custom header after a CORS preflight, and the gateway's
    preflight never allows it (``views.cors``).
    """
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None:
        return site == "same-origin"
    if request.headers.get(PAGE_HEADER) == "1":
        return True
    return request.headers.get("Origin") == gw.config.public_origin


def _cookie_values(request: web.Request, name: str) -> list[str]:
    """Every value sent under ``name``: a browser sends two cookies of one name when
    another host planted a ``Domain=`` one next to the gateway's own."""
    values = []
    for header in request.headers.getall("Cookie", []):
        for pair in header.split(";"):
            key, sep, value = pair.strip().partition("=")
            if sep and key == name and value:
                values.append(value.strip('"'))
    return values


def presence_values(gw: Gateway, request: web.Request) -> list[str]:
    """The presence cookies the browser sent, under their name for this gateway's scheme.

    On https a value set before the ``__Host-`` name was used (plain
    ``wg_presence``) is still read when no ``__Host-`` one exists; the next
    approval replaces it with a ``__Host-`` cookie.
    """
    name = consent.presence_cookie_name(gw.config.public_origin)
    values = _cookie_values(request, name)
    if not values and name != consent.PRESENCE_COOKIE:
        values = _cookie_values(request, consent.PRESENCE_COOKIE)
    return values


async def presence_of(gw: Gateway, request: web.Request) -> frozenset[str]:
    """The browser hashes proven by presence cookies on a same-origin request (often one).

    Every value the browser sent counts for what it proves, so a cookie planted
    next to the gateway's own hides none of the user's connections; it can only
    ever prove what its planter already had.
    """
    if not is_same_origin(gw, request):
        return frozenset()
    hashes = {gw.hash(v) for v in presence_values(gw, request)}
    return frozenset([h for h in hashes if await gw.store.has_presence(h)])


def approved_here(browsers: frozenset[str], connection: Connection | None) -> bool:
    """The connection was approved in this browser (one of its presence cookies)."""
    return connection is not None and connection.browser_hash in browsers


def set_presence_cookie(gw: Gateway, response: web.StreamResponse, value: str) -> None:
    name = consent.presence_cookie_name(gw.config.public_origin)
    secure = name != consent.PRESENCE_COOKIE
    response.set_cookie(name, value, max_age=400 * 24 * 3600, path="/", httponly=True,
                        samesite="Strict", secure=secure)
    if secure:  # the unprefixed cookie of an older version: replaced, never read again
        response.del_cookie(consent.PRESENCE_COOKIE, path="/")


async def _session(request: web.Request) -> tuple[Gateway, Session, App]:
    gw = request.app[gateway_key]
    session, app = await gw.session_for_token(session_token_of(request))
    return gw, session, app


async def connections(request: web.Request) -> web.StreamResponse:
    gw = request.app[gateway_key]
    if request.method == "OPTIONS":
        return await cors.preflight(gw, request)
    app: App | None = None
    try:
        gw, session, app = await _session(request)
        if request.method == "GET":
            response: web.StreamResponse = json_response(
                await connection_status(gw, app.app_id, session.app_user_id))
        elif request.method == "DELETE":
            response = await _revoke(gw, request, session, app)
        else:
            response = await _approve(gw, request, session, app)
    except WattgateError as e:
        response = error_response(e)
    await cors.allow_origin(gw, request, response, app)
    return response


async def _revoke(gw: Gateway, request: web.Request, session: Session,
                  app: App) -> web.Response:
    connection = await gw.store.get_connection(app.app_id, session.app_user_id)
    if connection is not None and connection.state != REVOKED:
        await reconcile.revoke(gw, request.app[upstream_key], connection)
    return web.Response(status=204)


async def _approve(gw: Gateway, request: web.Request, session: Session,
                   app: App) -> web.Response:
    body = await json_body(request, optional=True)
    requested: object = consent.UNSET
    if "monthlyUsd" in body:
        requested = usd_amount(body["monthlyUsd"], "monthlyUsd", allow_null=True)
    key = funding_key(body.get("fundingKey"))
    existing = await gw.store.get_connection(app.app_id, session.app_user_id)
    browsers = await presence_of(gw, request)
    user_present = approved_here(browsers, existing)
    token_cap: object = session.limit_nanos if session.has_limit else consent.UNSET
    change = consent.decide(existing, requested_cap=requested, token_cap=token_cap,
                            has_funding_key=key is not None, user_present=user_present,
                            allow_unlimited=gw.config.dev_allow_unlimited)
    # The app's largest cap, judged here whatever the page sent; a cap approved before
    # the bound was lowered stands while nothing changes.
    policy.check_cap(app.policy, change.cap_nanos, kept=change.keep_key and existing is not None
                     and change.cap_nanos == existing.cap_nanos)
    if change.needs_key_check:
        assert key is not None
        await request.app[upstream_key].check_key(key)
    # Only an approval carrying the funding key, made on the gateway's own page, binds a
    # browser to the connection; otherwise any browser holding some presence cookie (the
    # app operator's own, from approving their own connection) could bind itself by
    # lowering a cap, then raise. The binding is to a value minted now, never to the one
    # the browser brought.
    binds = key is not None and is_same_origin(gw, request)
    new_cookie = new_hash = None
    if binds:
        new_cookie = new_presence_value()
        new_hash = gw.hash(new_cookie)
    # Nor does a browser bound to a revoked connection come back with its re-funding
    # (the key sent by the app's backend): what it was trusted for ended with the revocation.
    browser_hash = new_hash if binds else \
        (existing.browser_hash if existing and existing.state != REVOKED else None)
    now = gw.clock()
    if change.needs_key_check:
        assert key is not None
        connection = await gw.store.save_connection(
            app.app_id, session.app_user_id, state=ACTIVE, cap_nanos=change.cap_nanos,
            sealed_key=None, browser_hash=browser_hash, now=now,
            seal=lambda cid: gw.sealer.seal(key, aad=connection_aad(cid)))
    else:
        assert existing is not None
        # Judged against the cap read above: if it moved meanwhile (the user lowered it),
        # this change is not written over it.
        updated = await gw.store.update_cap(existing.connection_id, change.cap_nanos,
                                            expected_key=existing.sealed_key,
                                            expected_cap=existing.cap_nanos, now=now)
        if updated is None:  # revoked, re-funded or re-capped meanwhile: answer what is true now
            return json_response(await connection_status(gw, app.app_id, session.app_user_id))
        connection = updated
    if new_cookie is not None:
        assert new_hash is not None
        # Earlier connections of this browser follow it; the brought value proves nothing now.
        await gw.store.rotate_presence(browsers, new_hash, now=now)
    response = json_response(await status_of(gw.store, connection, now))
    if new_cookie is not None:
        set_presence_cookie(gw, response, new_cookie)
    return response

