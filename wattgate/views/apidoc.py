"""GET /api/v1/openapi.json: the OpenAPI document of the whole API, no auth.

The document is data built by ``wattgate.openapi``; it is rendered once per
public origin, with that origin as its server.
"""

from __future__ import annotations

import functools
import json

from aiohttp import web

from ..openapi import document
from .state import gateway_key


@functools.lru_cache(maxsize=4)
def _rendered(origin: str) -> bytes:
    return json.dumps(document(origin), indent=1).encode()


async def openapi_json(request: web.Request) -> web.Response:
    body = _rendered(request.app[gateway_key].config.public_origin)
    return web.Response(body=body, content_type="application/json",
                        headers={"Cache-Control": "public, max-age=300"})
