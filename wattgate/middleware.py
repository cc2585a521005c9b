"""The web layer's error rendering: every failure leaves as the reference body.

``WattgateError`` renders as its status and ``{"error": {"code", "message"}}``;
aiohttp's own HTTP errors (404, 405, 413) are mapped onto the same body; any
other exception is logged (without request content) and answers a generic
500. Once a streamed response has started, no error body is ever written into
it: the exception is re-raised and the connection ends.
"""

from __future__ import annotations

import json
import logging
from typing import Awaitable, Callable

from aiohttp import web

from .errors import InvalidRequest, MethodNotAllowed, NotFound, PayloadTooLarge, WattgateError

log = logging.getLogger("wattgate.http")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(error: WattgateError) -> web.Response:
    return web.Response(status=error.status, text=json.dumps(error.body()),
                        content_type="application/json", headers=error.headers())


def response_started(request: web.Request) -> bool:
    """Whether bytes of a response already left: then no error body may follow."""
    writer = request.writer
    return writer is not None and writer.output_size > 0


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except WattgateError as e:
        if response_started(request):
            raise
        return error_response(e)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return error_response(_from_http_exception(request, e))
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        if response_started(request):
            raise
        return error_response(WattgateError())


API_PREFIX = "/api/v1/"


def supported_endpoints(app: web.Application) -> str:
    """Every method and path the router serves under /api/v1/, from the router itself."""
    seen: dict[str, list[str]] = {}
    for route in app.router.routes():
        path = route.resource.canonical if route.resource is not None else ""
        if path.startswith(API_PREFIX) and route.method not in ("OPTIONS", "HEAD"):
            seen.setdefault(path, []).append(route.method)
    return ", ".join(f"{'/'.join(methods)} {path}" for path, methods in seen.items())


def _from_http_exception(request: web.Request, e: web.HTTPException) -> WattgateError:
    """aiohttp's own refusals (routing, body size, parsing) in the one error body."""
    if e.status == 404:
        if request.path.startswith(API_PREFIX):
            return NotFound(f"No such endpoint: {request.path[:100]}. The gateway serves "
                            f"{supported_endpoints(request.app)}.")
        return NotFound()
    if e.status == 405:
        allow = e.headers.get("Allow", "")
        return MethodNotAllowed(f"{request.method} is not allowed here; use {allow}.",
                                allow=allow)
    if e.status == 413:
        return PayloadTooLarge()
    err = InvalidRequest(e.text or e.reason) if e.status < 500 else WattgateError()
    err.status = e.status
    return err
