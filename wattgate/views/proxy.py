"""The metered proxy's HTTP side: POST /api/v1/chat/completions, /responses and
/embeddings, and GET /api/v1/models.

A metered call's lifecycle (admit → forward → tee → settle, release or drain)
is ``calls.CallService``'s; this module only adapts HTTP to it: it reads the
secret key and the headers, hands over a way to read the body (read only once
the app and payer are known, its JSON depth checked), and gives the service a
``ClientSink`` over ``web.StreamResponse``. A ``WattgateError`` the service
raises before the answer started is rendered by ``middleware.error_middleware``;
once the first byte is sent, nothing is written into the stream but the
upstream's bytes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping

from aiohttp import web

from ..calls import Ask
from ..errors import WattgateError
from ..estimate import CHAT, EMBEDDINGS, RESPONSES, Endpoint
from ..upstream import map_failure
from .inputs import check_json_depth, secret_key_of
from .state import calls_key, gateway_key, upstream_key


class ResponseSink:
    """``calls.ClientSink`` over a ``web.StreamResponse`` (made by ``start``).

    aiohttp's write errors on a closed or aborted connection are ``ConnectionError``
    (``ClientConnectionResetError`` is one), as the sink promises. Once started,
    ``write`` is the response's own ``write``: no extra frame per chunk. A whole
    answer's status line and headers wait for its body and leave in the same send
    (one system call instead of two: an eighth of a short call's CPU).
    """

    def __init__(self, request: web.Request) -> None:
        self.request = request
        self.response = web.StreamResponse()
        self.write: Callable[[bytes], Awaitable[None]] = self._not_started

    async def _not_started(self, data: bytes) -> None:
        raise RuntimeError("ClientSink.write before start")

    async def start(self, status: int, headers: Mapping[str, str]) -> None:
        # A whole answer (its Content-Length known) keeps its head until the body's
        # write, so both leave in one send: a stream's head leaves at once.
        kind = web.Response if "Content-Length" in headers else web.StreamResponse
        self.response = out = kind(status=status, headers=headers)
        await out.prepare(self.request)
        self.write = out.write

    async def finish(self) -> None:
        await self.response.write_eof()


async def _read_body(request: web.Request) -> bytes:
    raw = await request.read()
    check_json_depth(raw)
    return raw


async def _metered(request: web.Request, endpoint: Endpoint) -> web.StreamResponse:
    sink = ResponseSink(request)
    ask = Ask(secret_key_of(request), request.headers, lambda: _read_body(request))
    await request.app[calls_key].serve(endpoint, ask, sink)
    return sink.response


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _metered(request, CHAT)


async def responses(request: web.Request) -> web.StreamResponse:
    return await _metered(request, RESPONSES)


async def embeddings(request: web.Request) -> web.StreamResponse:
    return await _metered(request, EMBEDDINGS)


async def models(request: web.Request) -> web.Response:
    gw = request.app[gateway_key]
    await gw.app_for_secret(secret_key_of(request))
    status, body, headers = await request.app[upstream_key].fetch_models()
    if status != 200:
        raise map_failure(status, body, headers, now=gw.clock())
    content_type = headers.get("Content-Type", "application/json")
    return web.Response(body=body, content_type=content_type.split(";")[0].strip() or
                        "application/json")


__all__ = ["chat_completions", "responses", "embeddings", "models", "ResponseSink",
           "WattgateError"]
