"""The floor: a bare pass-through proxy written with aiohttp, and nothing else.

It forwards ``POST /api/v1/chat/completions`` to the upstream with the
caller's Authorization header and body, and streams the answer back chunk by
chunk as it arrives. No auth, no metering, no parsing: whatever an aiohttp
gateway does costs at least this much, so wattgate is measured against it.

The client session is set up exactly as wattgate's ``Upstream`` sets up its
own (one session per process, unlimited pool, no cookies, no decompression),
so the two differ only by what wattgate does on top. It runs on the event loop
wattgate's ``serve`` runs on (``wattgate.server.new_event_loop``: uvloop where
installed; ``--loop asyncio`` for the standard one), so a faster loop lowers
both sides of every ratio alike.

    python bench/bare_proxy.py --port 18782 --upstream http://127.0.0.1:18781/api/v1
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from wattgate.server import new_event_loop
from wattgate.supervisor import LISTEN_BACKLOG

session_key = web.AppKey("session", aiohttp.ClientSession)

# Hop-by-hop and length headers aiohttp sets itself on the way out.
_DROP = frozenset(("connection", "keep-alive", "transfer-encoding", "content-length",
                   "content-encoding", "date", "server"))


def create_bare_proxy(upstream: str) -> web.Application:
    app = web.Application()
    base = upstream.rstrip("/")

    async def session_ctx(app: web.Application) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
        app[session_key] = aiohttp.ClientSession(
            connector=connector, cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False, skip_auto_headers=("User-Agent",))
        yield
        await app[session_key].close()

    async def forward(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {"Content-Type": request.headers.get("Content-Type", "application/json")}
        if "Authorization" in request.headers:
            headers["Authorization"] = request.headers["Authorization"]
        async with request.app[session_key].post(base + "/chat/completions", data=body,
                                                 headers=headers) as up:
            out = web.StreamResponse(status=up.status, headers={
                k: v for k, v in up.headers.items() if k.lower() not in _DROP})
            await out.prepare(request)
            async for chunk in up.content.iter_any():
                await out.write(chunk)
            await out.write_eof()
            return out

    app.cleanup_ctx.append(session_ctx)
    app.router.add_post("/api/v1/chat/completions", forward)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="base URL, e.g. http://h:p/api/v1")
    parser.add_argument("--loop", default="auto", choices=("auto", "uvloop", "asyncio"),
                        help="as wattgate's server.event_loop")
    args = parser.parse_args()
    web.run_app(create_bare_proxy(args.upstream), host="127.0.0.1", port=args.port,
                print=None, access_log=None, loop=new_event_loop(args.loop),
                backlog=LISTEN_BACKLOG)  # as wattgate serve listens


if __name__ == "__main__":
    main()
