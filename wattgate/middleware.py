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

from .errors import MethodNotAllowed, NotFound, PayloadTooLarge, WattgateError

log = logging.getLogger("wattgate.http")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(error: WattgateError) -> web.Response:
    return web.Response(status=error.status, text=json.dumps(error.body()),
                        content_type="application/json", headers=error.headers())


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except WattgateError as e:
        return error_response(e)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        if e.status == 404:
            return error_response(NotFound())
        if e.status == 405:
            response = error_response(MethodNotAllowed(
                f"{request.method} is not allowed here; use {e.headers.get('Allow', '')}."))
            response.headers["Allow"] = e.headers.get("Allow", "")
            return response
        if e.status == 413:
            return error_response(PayloadTooLarge())
        err = WattgateError(e.reason)
        err.status = e.status
        return error_response(err)
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(WattgateError())
