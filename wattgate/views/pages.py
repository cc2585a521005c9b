"""The pages the gateway serves to end users' browsers, and the browser SDK file.

- ``/connect?pk=…``: the consent popup for a monthly budget connection.
- ``/grant?pk=…&requests=N[&maxUsd=X]``: the consent popup for a one-time grant.
- ``/connect/oauth-callback``: where "Connect with OpenRouter" returns; it
  hands the code to the popup that asked and closes.
- ``/account``: the end user's dashboard, keyed by the presence cookie.
- ``/sdk/client.js``: the client SDK, the same file as ``js/client.js``.
- ``/static/…``: the pages' CSS and scripts (no third-party assets).

Pages are server-rendered shells (Jinja2 templates, ``wattgate.templates``); their small scripts do the origin
handshake and call the JSON endpoints (``views.account``, ``views.control``).
The session token never travels in a URL the server sees: it arrives in the
fragment or by ``postMessage``. Every page is sent with a strict CSP, no
framing and no referrer. Not here: what the JSON endpoints decide.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from aiohttp import web

from .. import policy
from ..credentials import parse_publishable_key
from ..errors import AuthError
from ..gateway import Gateway
from ..store import App
from ..templates import render
from . import account
from .state import gateway_key

PACKAGE = Path(__file__).resolve().parent.parent
STATIC = PACKAGE / "static"

# Only these files are served from /static; the demo app's files are not the gateway's.
STATIC_FILES = {
    "wattgate.css": "text/css",
    "consent.js": "text/javascript",
    "account.js": "text/javascript",
    "oauth-callback.js": "text/javascript",
    "ui.js": "text/javascript",
}


def sdk_path() -> Path:
    """The client SDK: ``js/client.js`` in a source tree, the packaged copy otherwise.

    ``wattgate/static/client.js`` is a symlink to ``js/client.js`` in the
    repository; building a wheel copies the file, so there is one source.
    """
    return STATIC / "client.js"


def page_headers(gw: Gateway) -> dict[str, str]:
    csp = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
           "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return {
        "Content-Security-Policy": csp,
        "X-Frame-Options": "DENY",
        "Referrer-Policy": "no-referrer",
        "X-Content-Type-Options": "nosniff",
        "Cache-Control": "no-store",
        "Permissions-Policy": "camera=(), microphone=(), geolocation=(), payment=()",
    }


def _page(gw: Gateway, body: str, status: int = 200) -> web.Response:
    return web.Response(text=body, status=status, content_type="text/html",
                        charset="utf-8", headers=page_headers(gw))


def error_page(gw: Gateway, title: str, message: str, status: int) -> web.Response:
    return _page(gw, render("error.html", title=title, message=message), status)


async def _app_of(gw: Gateway, pk: str | None) -> App | None:
    if not pk:
        return None
    try:
        app_id = parse_publishable_key(pk)
    except AuthError:
        return None
    return await gw.store.get_app(app_id)


def _initials(name: str) -> str:
    words = [w for w in re.split(r"\W+", name) if w]
    return ("".join(w[0] for w in words[:2]) or "?").upper()


def _display_origin(origin: str) -> str:
    return origin.split("://", 1)[-1]


async def _consent_page(request: web.Request, flow: str) -> web.Response:
    gw = request.app[gateway_key]
    pk = request.query.get("pk")
    app = await _app_of(gw, pk)
    if app is None:
        return error_page(gw, "Unknown app", "The link that opened this window names no app "
                          "registered on this gateway. Close it and try again from the app.", 404)
    grant: dict[str, Any] | None = None
    if flow == "grant":
        grant = _grant_request(gw, request)
        if grant is None:
            return error_page(gw, "Invalid request", "This grant request is malformed. Close "
                              "this window and try again from the app.", 400)
    data = {
        "flow": flow,
        "pk": pk,
        "app": account.app_public(app),
        "grant": grant,
        "oauth": {"authBase": gw.config.oauth_auth_base.rstrip("/") or None},
        "publicOrigin": gw.config.public_origin,
    }
    if flow == "grant":
        assert grant is not None
        n = grant["requests"]
        ask = f"wants to make {n} AI request{'s' if n != 1 else ''} on your budget"
        title = "Approve a one-time grant"
    else:
        ask = "wants a monthly AI budget"
        title = "Connect your AI budget"
    origins = ", ".join(_display_origin(o) for o in app.origins) or "no registered site"
    return _page(gw, render("consent.html", title=title, flow=flow, app_name=app.name,
                            app_initials=_initials(app.name), app_origins=origins, ask=ask,
                            data=data, limits=policy.summary(app.policy, grant=flow == "grant")))


def _grant_request(gw: Gateway, request: web.Request) -> dict[str, Any] | None:
    try:
        requests = int(request.query.get("requests", ""))
    except ValueError:
        return None
    if not 1 <= requests <= gw.config.grants_max_requests:
        return None
    max_usd: Any = None
    raw = request.query.get("maxUsd")
    if raw:
        try:
            d = Decimal(raw)
        except InvalidOperation:
            return None
        if not d.is_finite() or d <= 0 or d > 1_000_000:
            return None
        max_usd = float(d) if d != d.to_integral_value() else int(d)
    return {"requests": requests, "maxUsd": max_usd}


async def connect_page(request: web.Request) -> web.Response:
    return await _consent_page(request, "connect")


async def grant_page(request: web.Request) -> web.Response:
    return await _consent_page(request, "grant")


async def oauth_callback_page(request: web.Request) -> web.Response:
    gw = request.app[gateway_key]
    return _page(gw, render("oauth-callback.html"))


async def account_page(request: web.Request) -> web.Response:
    gw = request.app[gateway_key]
    return _page(gw, render("account.html"))


async def sdk_client(request: web.Request) -> web.StreamResponse:
    # Apps import this module from their own origin: module scripts need CORS.
    return web.FileResponse(sdk_path(), headers={
        "Content-Type": "text/javascript; charset=utf-8",
        "Access-Control-Allow-Origin": "*",
        "Cross-Origin-Resource-Policy": "cross-origin",
        "X-Content-Type-Options": "nosniff",
        "Cache-Control": "no-cache",
    })


async def static_file(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    kind = STATIC_FILES.get(name)
    if kind is None:
        raise web.HTTPNotFound()
    return web.FileResponse(STATIC / name, headers={
        "Content-Type": f"{kind}; charset=utf-8", "X-Content-Type-Options": "nosniff",
        "Cache-Control": "no-cache"})


def add_routes(app: web.Application) -> None:
    """Mount the pages, the SDK file, and the JSON endpoints the pages call."""
    r = app.router
    r.add_get("/connect", connect_page)
    r.add_get("/grant", grant_page)
    r.add_get("/connect/oauth-callback", oauth_callback_page)
    r.add_get("/account", account_page)
    r.add_get("/sdk/client.js", sdk_client)
    r.add_get("/static/{name}", static_file)
    account.add_routes(app)
