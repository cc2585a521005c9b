"""The Python server SDK on its own: its surface, errors, calls and token routes,
against a stub gateway that records what the SDK sends (no upstream, no proxy)."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import httpx2
import openai
import pytest
from aiohttp import web

import wattgate.errors
import wattgate.sdk
from wattgate.sdk import (
    ConnectionStatus,
    Wattfare,
    WattfareAuthError,
    WattfareBudgetError,
    WattfareError,
    WattfareFundingError,
    WattfareGrantError,
    WattfareInvalidRequestError,
    WattfareNotConnectedError,
    WattfarePaymentError,
    WattfareRateLimitError,
    WattfareUpstreamError,
    to_wattfare_error,
)
from wattgate.sdk._errors import error_from_body

SECRET = "sk_live_app0000000000000001_secret"

# The error table of the reference HTTP API (http-api.md), row by row.
REFERENCE_ERRORS = [
    (400, "invalid_request", WattfareInvalidRequestError),
    (401, "auth", WattfareAuthError),
    (402, "not_connected", WattfareNotConnectedError),
    (402, "budget_exceeded", WattfareBudgetError),
    (402, "grant_invalid", WattfareGrantError),
    (402, "funding_invalid", WattfareFundingError),
    (429, "rate_limited", WattfareRateLimitError),
    (502, "upstream", WattfareUpstreamError),
]


@dataclass
class StubGateway:
    """Answers like the gateway; ``answers[path]`` overrides with (status, body, headers)."""

    url: str = ""
    seen: list[tuple[str, str, dict[str, str], Any]] = field(default_factory=list)
    answers: dict[str, tuple[int, Any, dict[str, str]]] = field(default_factory=dict)

    def last(self, path: str) -> tuple[dict[str, str], Any]:
        for method, p, headers, body in reversed(self.seen):
            if p == path:
                return headers, body
        raise AssertionError(f"no request to {path}")


@pytest.fixture
async def stub(aiohttp_server) -> StubGateway:  # type: ignore[no-untyped-def]
    gw = StubGateway()

    async def handle(request: web.Request) -> web.Response:
        raw = await request.read()
        body = json.loads(raw) if raw else None
        path = request.path.removeprefix("/api/v1")
        gw.seen.append((request.method, path, dict(request.headers), body))
        if path in gw.answers:
            status, answer, headers = gw.answers[path]
            text = answer if isinstance(answer, str) else json.dumps(answer)
            return web.Response(status=status, text=text, headers=headers,
                                content_type="application/json")
        if path == "/sessions":
            return web.json_response({"token": "eyJ.session", "expiresAt": 1718400000})
        if path == "/status":
            return web.json_response({"connected": True, "limits": {"monthlyUsd": 10},
                                      "usage": {"monthlyUsd": 3.2}, "remainingUsd": 6.8,
                                      "heldUsd": 0.25})
        if path == "/chat/completions":
            return web.json_response({
                "id": "gen-1", "object": "chat.completion", "created": 1, "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": "hi"}}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})
        return web.json_response({"error": {"code": "not_found", "message": "No such endpoint."}},
                                 status=404)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    server = await aiohttp_server(app)
    gw.url = str(server.make_url("")).rstrip("/")
    return gw


# -- the public surface ------------------------------------------------------------------------

def test_all_lists_exactly_the_public_names():
    public = {n for n in dir(wattgate.sdk) if not n.startswith("_")}
    assert set(wattgate.sdk.__all__) == public
    assert len(wattgate.sdk.__all__) == len(set(wattgate.sdk.__all__))
    for name in wattgate.sdk.__all__:
        assert getattr(wattgate.sdk, name) is not None


def test_import_starts_nothing_and_needs_neither_openai_nor_starlette():
    code = ("import sys, wattgate.sdk; "
            "print(sorted(m for m in ('openai', 'starlette', 'wattgate.app', 'wattgate.store',"
            " 'wattgate.views') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("key", ["", "pk_live_app_x", "live_secret", None])
def test_a_key_that_is_not_a_secret_key_is_refused(key):
    with pytest.raises(WattfareAuthError) as e:
        Wattfare(key)  # type: ignore[arg-type]
    assert (e.value.code, e.value.status) == ("auth", 401)


def test_the_secret_key_never_shows_in_repr():
    wf = Wattfare(SECRET, base_url="http://gw.test")
    assert "secret" not in repr(wf) and "sk_" not in repr(wf)
    assert "sk_" not in repr(wf.user("u1")) and "sk_" not in repr(wf.grant("wfg_abcdefghijkl"))


@pytest.mark.parametrize("url", ["http://gw.test", "http://gw.test/", "http://gw.test/api/v1",
                                 "http://gw.test/api/v1/"])
def test_base_url_takes_the_site_root_or_the_api_root(url):
    assert Wattfare(SECRET, base_url=url).api_url == "http://gw.test/api/v1"


@pytest.mark.parametrize("token", ["", "   ", None])
def test_an_empty_grant_token_is_refused(token):
    with pytest.raises(WattfareAuthError):
        Wattfare(SECRET).grant(token)  # type: ignore[arg-type]


@pytest.mark.parametrize("user_id", ["", None, True, 4.5])
def test_a_user_id_that_is_no_id_is_refused_before_any_call(user_id):
    with pytest.raises(WattfareInvalidRequestError):
        Wattfare(SECRET).user(user_id)  # type: ignore[arg-type]


async def test_an_integer_user_id_names_the_same_user_as_its_string(stub):
    wf = Wattfare(SECRET, base_url=stub.url)
    assert wf.user(42).openai_options() == wf.user("42").openai_options()
    await wf.create_session(42)
    assert stub.last("/sessions")[1] == {"appUserId": "42"}


# -- errors ------------------------------------------------------------------------------------

@pytest.mark.parametrize("status,code,cls", REFERENCE_ERRORS)
def test_each_reference_error_becomes_its_class(status, code, cls):
    err = error_from_body(status, {"error": {"code": code, "message": "m"}})
    assert type(err) is cls
    assert (err.code, err.status, err.message) == (code, status, "m")
    assert err.to_dict() == {"error": {"code": code, "message": "m"}}
    assert isinstance(err, WattfareError)
    assert isinstance(err, WattfarePaymentError) == (status == 402)


def test_every_error_the_gateway_can_send_keeps_its_code_and_status():
    classes = [c for c in vars(wattgate.errors).values() if isinstance(c, type)
               and issubclass(c, wattgate.errors.WattgateError) and "code" in vars(c)]
    assert len(classes) > 10
    for cls in classes:
        err = error_from_body(cls.status, cls().body())
        assert (err.code, err.status, err.message) == (cls.code, cls.status, cls.default_message)
        if cls.status == 402:
            assert isinstance(err, WattfarePaymentError)


def test_an_unknown_code_from_a_newer_gateway_is_still_a_wattfare_error():
    err = error_from_body(402, {"error": {"code": "grant_paused", "message": "later"}})
    assert type(err) is WattfarePaymentError and err.code == "grant_paused"
    err = error_from_body(409, {"error": {"code": "conflict", "message": "x"}})
    assert type(err) is WattfareError and err.status == 409


@pytest.mark.parametrize("body", ["<html>Bad gateway</html>", None, {"error": "x"},
                                  {"detail": "Not Found"}, {"error": {"code": 502}}])
def test_a_body_that_is_not_the_gateways_is_not_mistaken_for_one(body):
    assert error_from_body(502, body) is None


def _openai_status_error(status: int, body: Any, headers: dict[str, str] | None = None
                         ) -> openai.APIStatusError:
    client = openai.OpenAI(api_key=SECRET, base_url="http://gw.test/api/v1")
    request = httpx2.Request("POST", "http://gw.test/api/v1/chat/completions")
    response = httpx2.Response(status, json=body, headers=headers or {}, request=request)
    return client._make_status_error_from_response(response)


@pytest.mark.parametrize("status,code,cls", REFERENCE_ERRORS)
def test_to_wattfare_error_sees_through_openai_status_errors(status, code, cls):
    wrapped = _openai_status_error(status, {"error": {"code": code, "message": "nope"}},
                                   {"retry-after": "7"} if status == 429 else None)
    assert isinstance(wrapped, openai.APIStatusError) and wrapped.status_code == status
    err = to_wattfare_error(wrapped)
    assert type(err) is cls and (err.code, err.status, err.message) == (code, status, "nope")
    assert err.retry_after == (7 if status == 429 else None)


def test_to_wattfare_error_follows_the_cause_chain():
    inner = _openai_status_error(402, {"error": {"code": "budget_exceeded", "message": "cap"}})
    try:
        try:
            raise inner
        except openai.APIStatusError as e:
            raise RuntimeError("chat failed") from e
    except RuntimeError as outer:
        assert to_wattfare_error(outer).code == "budget_exceeded"


def test_a_provider_error_inside_a_stream_is_an_upstream_error():
    request = httpx2.Request("POST", "http://gw.test/api/v1/chat/completions")
    err = to_wattfare_error(openai.APIError("Provider disconnected", request,
                                            body={"code": 502, "message": "Provider disconnected"}))
    assert type(err) is WattfareUpstreamError and err.status == 502
    assert err.message == "Provider disconnected"


def test_errors_that_are_not_the_gateways_answer_are_left_alone():
    request = httpx2.Request("POST", "http://gw.test/api/v1/chat/completions")
    assert to_wattfare_error(openai.APIConnectionError(request=request)) is None
    assert to_wattfare_error(_openai_status_error(404, {"detail": "Not Found"})) is None
    assert to_wattfare_error(ValueError("x")) is None
    assert to_wattfare_error(None) is None
    own = WattfareGrantError("grant_invalid", 402, "used")
    assert to_wattfare_error(own) is own


# -- the SDK's own calls -----------------------------------------------------------------------

async def test_create_session_sends_the_reference_body(stub):
    wf = Wattfare(SECRET, base_url=stub.url)
    created = await wf.create_session("user_123", {"requestLimit": {"monthlyUsd": Decimal("20.5")}})
    assert created.to_dict() == {"token": "eyJ.session", "expiresAt": 1718400000}
    headers, body = stub.last("/sessions")
    assert headers["Authorization"] == f"Bearer {SECRET}"
    assert body == {"appUserId": "user_123", "requestLimit": {"monthlyUsd": 20.5}}
    await wf.create_session("user_123")
    assert stub.last("/sessions")[1] == {"appUserId": "user_123"}


async def test_a_misspelt_session_request_fails_loudly_instead_of_asking_for_no_cap(stub):
    wf = Wattfare(SECRET, base_url=stub.url)
    with pytest.raises(ValueError, match="requestLimit"):
        await wf.create_session("u", {"request_limit": {"monthlyUsd": 20}})
    assert stub.seen == []


async def test_gateway_errors_raise_typed_errors(stub):
    wf = Wattfare(SECRET, base_url=stub.url)
    stub.answers["/sessions"] = (429, {"error": {"code": "rate_limited", "message": "slow"}},
                                 {"Retry-After": "12"})
    with pytest.raises(WattfareRateLimitError) as e:
        await wf.create_session("u")
    assert (e.value.status, e.value.retry_after) == (429, 12)
    stub.answers["/sessions"] = (401, {"error": {"code": "auth", "message": "bad key"}}, {})
    with pytest.raises(WattfareAuthError, match="bad key"):
        await wf.create_session("u")


async def test_a_base_url_that_is_not_a_gateway_says_so(stub):
    stub.answers["/status"] = (502, "<html>bad gateway</html>", {})
    with pytest.raises(WattfareError, match="is base_url the gateway") as e:
        await Wattfare(SECRET, base_url=stub.url).user("u").status()
    assert e.value.status == 502 and e.value.code == "unexpected_response"


async def test_status_is_exact_and_round_trips_to_the_reference_shape(stub):
    status = await Wattfare(SECRET, base_url=stub.url).user("user 1/2").status()
    assert status.connected and status.limits.monthly_usd == 10
    assert status.usage.monthly_usd == Decimal("3.2") and status.remaining_usd == Decimal("6.8")
    assert status.held_usd == Decimal("0.25")
    assert status.to_dict() == {"connected": True, "limits": {"monthlyUsd": 10},
                                "usage": {"monthlyUsd": 3.2}, "remainingUsd": 6.8,
                                "heldUsd": 0.25}
    assert stub.seen[-1][0:2] == ("GET", "/status")
    # A server that does not report holds (the reference API) reads as none held.
    stub.answers["/status"] = (200, {"connected": True, "limits": {"monthlyUsd": 10},
                                     "usage": {"monthlyUsd": 3.2}, "remainingUsd": 6.8}, {})
    assert (await Wattfare(SECRET, base_url=stub.url).user("u").status()).held_usd == 0


async def test_status_of_a_user_who_never_connected_is_a_value_not_an_error(stub):
    stub.answers["/status"] = (402, {"error": {"code": "not_connected", "message": "no"}}, {})
    status = await Wattfare(SECRET, base_url=stub.url).user("new").status()
    assert status == ConnectionStatus.from_dict({"connected": False, "limits": None,
                                                 "usage": {"monthlyUsd": 0}, "remainingUsd": 0})
    stub.answers["/status"] = (401, {"error": {"code": "auth", "message": "bad key"}}, {})
    with pytest.raises(WattfareAuthError):
        await Wattfare(SECRET, base_url=stub.url).user("new").status()


async def test_an_injected_session_is_used_and_left_open(stub):
    async with aiohttp.ClientSession(headers={"x-trace": "t1"}) as session:
        wf = Wattfare(SECRET, base_url=stub.url, session=session)
        await wf.user("u").status()
        await wf.create_session("u")
        assert not session.closed
    assert all(headers.get("x-trace") == "t1" for _, _, headers, _ in stub.seen)


# -- model access ------------------------------------------------------------------------------

async def test_openai_clients_carry_the_key_and_the_user_header(stub):
    wf = Wattfare(SECRET, base_url=stub.url)
    async with wf.user("user_123").openai(max_retries=0) as client:
        reply = await client.chat.completions.create(
            model="openai/gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content == "hi"
    headers, body = stub.last("/chat/completions")
    assert headers["Authorization"] == f"Bearer {SECRET}"
    assert headers["x-wattfare-user"] == "user_123" and "x-wattfare-grant" not in headers

    def blocking_call() -> None:  # the stub shares this event loop: block another thread
        with wf.grant("wfg_token").openai_sync() as sync_client:
            sync_client.chat.completions.create(model="fake/flat-2c",
                                                messages=[{"role": "user", "content": "hi"}])
    await asyncio.to_thread(blocking_call)
    headers, body = stub.last("/chat/completions")
    assert headers["x-wattfare-grant"] == "wfg_token" and "x-wattfare-user" not in headers
    assert body["model"] == "fake/flat-2c"


def test_openai_options_fit_other_openai_based_libraries():
    options = Wattfare(SECRET, base_url="http://gw.test").user("u1").openai_options()
    assert options == {"api_key": SECRET, "base_url": "http://gw.test/api/v1",
                       "default_headers": {"x-wattfare-user": "u1"}}


# -- token routes ------------------------------------------------------------------------------

def _session_route(wf: Wattfare, **kwargs: Any) -> web.Application:
    app = web.Application()
    app.router.add_post("/api/wattfare-token", wf.session_handler(**kwargs))
    return app


async def test_aiohttp_session_handler(stub, aiohttp_client):
    wf = Wattfare(SECRET, base_url=stub.url)

    async def resolve_user(request: web.Request) -> str | None:
        return request.headers.get("x-demo-user")

    async def cap_for(request: web.Request) -> dict[str, Any]:
        return {"requestLimit": {"monthlyUsd": 5 if request.query.get("plan") == "free" else 50}}

    client = await aiohttp_client(_session_route(wf, resolve_user=resolve_user, request=cap_for))
    r = await client.post("/api/wattfare-token?plan=free", headers={"x-demo-user": "user_123"})
    assert r.status == 200 and r.headers["Cache-Control"] == "no-store"
    assert await r.json() == {"token": "eyJ.session", "expiresAt": 1718400000}
    assert stub.last("/sessions")[1] == {"appUserId": "user_123",
                                         "requestLimit": {"monthlyUsd": 5}}

    r = await client.post("/api/wattfare-token")
    assert r.status == 401 and (await r.json())["error"]["code"] == "auth"
    assert len([s for s in stub.seen if s[1] == "/sessions"]) == 1  # nothing minted for nobody


async def test_session_handler_passes_gateway_errors_through_and_hides_others(
        stub, aiohttp_client, caplog):
    wf = Wattfare(SECRET, base_url=stub.url)
    client = await aiohttp_client(_session_route(wf, resolve_user=lambda r: "u1",
                                                 request={"requestLimit": {"monthlyUsd": 20}}))
    stub.answers["/sessions"] = (429, {"error": {"code": "rate_limited", "message": "slow"}},
                                 {"Retry-After": "30"})
    r = await client.post("/api/wattfare-token")
    assert r.status == 429 and r.headers["Retry-After"] == "30"
    assert await r.json() == {"error": {"code": "rate_limited", "message": "slow"}}

    def broken(request: web.Request) -> str:
        raise RuntimeError("db password is hunter2")

    client = await aiohttp_client(_session_route(wf, resolve_user=broken))
    r = await client.post("/api/wattfare-token")
    assert r.status == 500
    assert await r.json() == {"error": {"code": "internal", "message": "Internal error."}}
    assert "hunter2" in caplog.text  # logged for the operator, never sent to the browser


async def test_asgi_session_handler_in_fastapi_and_starlette(stub):
    from fastapi import FastAPI
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.routing import Route

    wf = Wattfare(SECRET, base_url=stub.url)

    def resolve_user(request: Request) -> str | None:
        return request.headers.get("x-demo-user")

    handler = wf.asgi_session_handler(resolve_user, {"requestLimit": {"monthlyUsd": 20}})
    fastapi_app = FastAPI()
    fastapi_app.post("/api/wattfare-token")(handler)
    starlette_app = Starlette(routes=[Route("/api/wattfare-token", handler, methods=["POST"])])
    for asgi_app in (fastapi_app, starlette_app):
        transport = httpx.ASGITransport(app=asgi_app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app.test") as client:
            r = await client.post("/api/wattfare-token", headers={"x-demo-user": "user_123"})
            assert r.status_code == 200 and r.json()["token"] == "eyJ.session"
            assert r.headers["cache-control"] == "no-store"
            r = await client.post("/api/wattfare-token")
            assert r.status_code == 401 and r.json()["error"]["code"] == "auth"
    assert stub.last("/sessions")[1] == {"appUserId": "user_123",
                                         "requestLimit": {"monthlyUsd": 20}}


# -- the documentation -------------------------------------------------------------------------

def test_every_python_example_in_the_sdk_docs_parses():
    text = (Path(__file__).parent.parent / "docs" / "sdk.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.DOTALL)
    assert len(blocks) >= 8
    for block in blocks:
        try:
            compile(block, "docs/sdk.md", "exec")
        except SyntaxError:  # a fragment from inside a handler: parse it as one
            body = "".join(f"    {line}\n" for line in block.splitlines())
            compile(f"async def example(request):\n{body}", "docs/sdk.md", "exec")
