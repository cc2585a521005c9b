"""The error middleware: one body for every failure, and never an error written into a started stream."""

from __future__ import annotations

import aiohttp
import pytest
from aiohttp import web

from wattgate.errors import BudgetExceeded, RateLimited
from wattgate.middleware import error_middleware


async def budget(request: web.Request) -> web.Response:
    raise BudgetExceeded()


async def limited(request: web.Request) -> web.Response:
    raise RateLimited(retry_after=7)


async def crash(request: web.Request) -> web.Response:
    raise RuntimeError("secret detail sk-or-v1-do-not-leak")


async def bad(request: web.Request) -> web.Response:
    raise web.HTTPBadRequest(text="header too odd")


async def stream_then_fail(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    await response.write(b"data: first\n\n")
    raise BudgetExceeded()


async def stream_then_crash(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    await response.write(b"data: first\n\n")
    raise RuntimeError("boom")


@pytest.fixture
async def client(aiohttp_client):  # type: ignore[no-untyped-def]
    app = web.Application(middlewares=[error_middleware])
    for path, handler in (("/budget", budget), ("/limited", limited), ("/crash", crash),
                          ("/bad", bad), ("/stream-fail", stream_then_fail),
                          ("/stream-crash", stream_then_crash)):
        app.router.add_get(path, handler)
    return await aiohttp_client(app)


@pytest.mark.parametrize("path, status, code", [
    ("/budget", 402, "budget_exceeded"), ("/limited", 429, "rate_limited"),
    ("/crash", 500, "internal"), ("/bad", 400, "invalid_request"), ("/nope", 404, "not_found"),
])
async def test_every_failure_has_the_one_body(client, path, status, code):
    r = await client.get(path, headers={"Accept": "text/html"})
    assert r.status == status and r.content_type == "application/json"
    body = await r.json()
    assert body["error"]["code"] == code and set(body["error"]) == {"code", "message"}
    assert "sk-or-v1" not in await r.text() and "Traceback" not in await r.text()


async def test_payment_errors_tell_clients_not_to_retry_and_429_says_when(client):
    assert (await client.get("/budget")).headers["x-should-retry"] == "false"
    assert (await client.get("/limited")).headers["Retry-After"] == "7"


async def test_405_lists_the_allowed_methods(client):
    r = await client.post("/budget")
    assert r.status == 405 and r.headers["Allow"] == "GET,HEAD"
    assert (await r.json())["error"]["code"] == "method_not_allowed"


@pytest.mark.parametrize("path", ["/stream-fail", "/stream-crash"])
async def test_no_error_body_is_written_into_a_started_stream(client, path):
    r = await client.get(path)
    assert r.status == 200
    try:
        received = await r.read()
    except aiohttp.ClientPayloadError:
        received = b""  # the connection was cut: exactly what a client must see
    assert b"error" not in received
