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


def allow_origin(request: web.Request, response: web.StreamResponse, app: App | None) -> None:
    origin = request.headers.get("Origin")
    response.headers["Vary"] = "Origin"
    if origin and app is not None and origin in app.origins:
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
