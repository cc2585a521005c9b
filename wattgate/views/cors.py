"""CORS for the browser-facing endpoints (/connections, /grants).

Only an app's registered origins get ``Access-Control-Allow-Origin``; a page
on any other origin can send a request (browsers allow that) but cannot read
the answer. Credentials are never allowed cross-origin: the presence cookie
only travels on the gateway's own pages.
"""

from __future__ import annotations

from aiohttp import web

from ..gateway import Gateway
from ..store import App

ALLOW_HEADERS = "Authorization, Content-Type"
ALLOW_METHODS = "GET, POST, DELETE, OPTIONS"


async def allow_origin(gw: Gateway, request: web.Request, response: web.StreamResponse,
                       app: App | None) -> None:
    """Let the app's registered origins read this answer.

    When the request named no app we could trust (a bad or expired session
    token), any registered origin may read the error, as the preflight already
    allowed: the SDK must see its 401 to mint a fresh token.
    """
    origin = request.headers.get("Origin")
    response.headers["Vary"] = "Origin"
    if not origin:
        return
    allowed = origin in app.origins if app is not None \
        else await gw.store.origin_registered(origin)
    if allowed:
        response.headers["Access-Control-Allow-Origin"] = origin


async def preflight(gw: Gateway, request: web.Request) -> web.Response:
    origin = request.headers.get("Origin", "")
    response = web.Response(status=204, headers={"Vary": "Origin"})
    if origin and await gw.store.origin_registered(origin):
        response.headers.update({
            "Access-Control-Allow-Origin": origin,
            "Access-Control-Allow-Methods": ALLOW_METHODS,
            "Access-Control-Allow-Headers": ALLOW_HEADERS,
            "Access-Control-Max-Age": "600",
        })
    return response
