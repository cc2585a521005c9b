"""The Python SDK and the official openai package against a running gateway and fake upstream.

Three parts: the openai clients (sync and async, streaming and not) pointed at
the gateway by ``wattgate.sdk`` and what their errors look like; the SDK's own
calls (status, sessions, token route) against the real gateway; and the Python
translation of every server-side example in the reference docs, each served as
the app route it is in the docs.
"""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any

import openai
import pytest
from aiohttp import web
from conftest import FUNDING_KEY

from wattgate.fakemodel import reply_words
from wattgate.sdk import (
    Wattfare,
    WattfareAuthError,
    WattfareBudgetError,
    WattfareFundingError,
    WattfareGrantError,
    WattfareInvalidRequestError,
    WattfareNotConnectedError,
    WattfareUpstreamError,
    to_wattfare_error,
)

HELLO = [{"role": "user", "content": "Say hello."}]


@pytest.fixture
async def gw(harness):  # type: ignore[no-untyped-def]
    """A gateway with one app and user_123 connected with a $10 cap."""
    harness.app_creds = await harness.create_app()
    await harness.connect(harness.app_creds, "user_123", monthly_usd=10)
    harness.wf = Wattfare(harness.app_creds.secret_key, base_url=harness.url)
    return harness


async def grant_token(h: Any, requests: int, max_usd: Any = None) -> str:
    """What the grant popup does on approval: POST /grants with a session token."""
    token = await h.session(h.app_creds, "grant_user")
    body: dict[str, Any] = {"requests": requests, "fundingKey": FUNDING_KEY}
    if max_usd is not None:
        body["maxUsd"] = max_usd
    async with h.http.post(h.api + "/grants", json=body,
                           headers={"Authorization": f"Bearer {token}"}) as r:
        assert r.status == 200, await r.text()
        return (await r.json())["grantToken"]


async def settled_usage(user: Any, expected: Decimal) -> Decimal:
    """The user's usage once it reaches ``expected``: a stream is settled just after
    its last byte, so a status read straight after the stream may come first."""
    for _ in range(100):
        usage = (await user.status()).usage.monthly_usd
        if usage >= expected:
            return usage
        await asyncio.sleep(0.02)
    return usage


class Sent:
    """Counts the HTTP requests an openai client really sends (retries included)."""

    def __init__(self) -> None:
        self.count = 0

    async def hook(self, request: Any) -> None:
        self.count += 1

    def client(self) -> Any:
        return openai.DefaultAsyncHttpxClient(event_hooks={"request": [self.hook]})


# -- the official openai package -----------------------------------------------------------

async def test_async_client_plain_and_streaming_are_billed_to_the_user(gw):
    async with gw.wf.user("user_123").openai() as client:
        reply = await client.chat.completions.create(model="openai/gpt-4o-mini", messages=HELLO)
        text = reply.choices[0].message.content
        assert text == "".join(reply_words("Say hello."))
        assert reply.usage.completion_tokens == len(text.split()) and reply.usage.prompt_tokens > 0
        stream = await client.chat.completions.create(model="openai/gpt-4o-mini",
                                                      messages=HELLO, stream=True)
        pieces = [chunk.choices[0].delta.content async for chunk in stream
                  if chunk.choices and chunk.choices[0].delta.content]
    assert "".join(pieces) == text
    user = gw.wf.user("user_123")
    assert await settled_usage(user, gw.fake.charged) == gw.fake.charged > 0
    assert (await user.status()).remaining_usd == Decimal(10) - gw.fake.charged
    assert [c.headers.get("Authorization") for c in gw.fake.calls] == [f"Bearer {FUNDING_KEY}"] * 2


async def test_sync_client_plain_and_streaming(gw):
    user = gw.wf.user("user_123")

    def blocking() -> tuple[str, str]:  # the gateway runs on this test's loop: use a thread
        with user.openai_sync() as client:
            reply = client.chat.completions.create(model="fake/flat-2c", messages=HELLO)
            with client.chat.completions.create(model="fake/flat-2c", messages=HELLO,
                                                stream=True) as stream:
                streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        return reply.choices[0].message.content, streamed

    text, streamed = await asyncio.to_thread(blocking)
    assert text and streamed == text
    assert await settled_usage(user, Decimal("0.04")) == Decimal("0.04")


async def test_gateway_errors_are_api_status_errors_that_map_back_to_codes(gw):
    cases = [
        (gw.wf.user("nobody"), {}, 402, WattfareNotConnectedError),
        (Wattfare("sk_live_" + gw.app_creds.app_id + "_wrong", base_url=gw.url).user("user_123"),
         {}, 401, WattfareAuthError),
        (gw.wf.user("user_123"), {"max_tokens": 0}, 400, WattfareInvalidRequestError),
        (gw.wf.user("user_123"), {"stream": True, "model": "fake/fail-500"}, 502,
         WattfareUpstreamError),
    ]
    for user, extra, status, cls in cases:
        async with user.openai(max_retries=0) as client:
            with pytest.raises(openai.APIStatusError) as e:
                await client.chat.completions.create(
                    **{"model": "openai/gpt-4o-mini", "messages": HELLO, **extra})
        assert e.value.status_code == status
        err = to_wattfare_error(e.value)
        assert type(err) is cls and err.status == status and err.message


async def test_payment_errors_are_sent_once_even_when_the_client_would_retry(gw):
    """openai retries 408/409/429/5xx; a 402 carries x-should-retry: false as well."""
    await gw.connect(gw.app_creds, "small", monthly_usd=0.05)
    sent = Sent()
    async with gw.wf.user("small").openai(max_retries=3, http_client=sent.client()) as client:
        await client.chat.completions.create(model="fake/flat-3c", messages=HELLO)
        for stream in (False, True):
            with pytest.raises(openai.APIStatusError) as e:
                await client.chat.completions.create(model="fake/flat-3c", messages=HELLO,
                                                     stream=stream)
            assert e.value.status_code == 402
            assert e.value.response.headers["x-should-retry"] == "false"
            assert isinstance(to_wattfare_error(e.value), WattfareBudgetError)
    assert sent.count == 3 and len(gw.fake.calls) == 1


async def test_a_refused_funding_key_is_a_funding_error_not_retried(gw):
    gw.fake.broke_keys.add(FUNDING_KEY)
    sent = Sent()
    async with gw.wf.user("user_123").openai(max_retries=3, http_client=sent.client()) as client:
        with pytest.raises(openai.APIStatusError) as e:
            await client.chat.completions.create(model="openai/gpt-4o-mini", messages=HELLO)
    assert isinstance(to_wattfare_error(e.value), WattfareFundingError)
    assert sent.count == 1
    assert not (await gw.wf.user("user_123").status()).connected  # reconnect needed


async def test_a_provider_failure_mid_stream_maps_to_upstream(gw):
    async with gw.wf.user("user_123").openai() as client:
        stream = await client.chat.completions.create(model="fake/midstream-error",
                                                      messages=HELLO, stream=True)
        got = []
        with pytest.raises(openai.APIError) as e:
            async for chunk in stream:
                got.append(chunk)
    assert got, "the answer had started before the provider failed"
    err = to_wattfare_error(e.value)
    assert isinstance(err, WattfareUpstreamError) and err.status == 502


async def test_a_grant_counts_down_then_is_refused_without_retry(gw):
    grant = gw.wf.grant(await grant_token(gw, requests=2))
    sent = Sent()
    async with grant.openai(max_retries=3, http_client=sent.client()) as client:
        remaining = []
        for stream in (False, True):
            raw = await client.chat.completions.with_raw_response.create(
                model="fake/flat-2c", messages=HELLO, stream=stream)
            remaining.append(raw.headers["x-wattfare-grant-remaining"])
            parsed = raw.parse()
            if stream:
                async for _ in parsed:
                    pass
        assert remaining == ["1", "0"]
        with pytest.raises(openai.APIStatusError) as e:
            await client.chat.completions.create(model="fake/flat-2c", messages=HELLO)
    assert isinstance(to_wattfare_error(e.value), WattfareGrantError)
    assert to_wattfare_error(e.value).code == "grant_invalid"
    assert sent.count == 3


async def test_the_gateway_lists_models_for_the_openai_client(gw):
    async with gw.wf.user("user_123").openai() as client:
        ids = [m.id async for m in client.models.list()]
    assert {"openai/gpt-4o-mini", "anthropic/claude-sonnet-4"} <= set(ids)


# -- the SDK's own calls, for real ---------------------------------------------------------

async def test_status_before_and_after_connecting(gw):
    user = gw.wf.user("newcomer")
    status = await user.status()
    assert not status.connected and status.limits is None
    await gw.connect(gw.app_creds, "newcomer", monthly_usd=12.5)
    status = await user.status()
    assert status.connected and status.limits.monthly_usd == Decimal("12.5")
    assert status.to_dict() == await gw.status(gw.app_creds, "newcomer")


async def test_a_minted_session_token_opens_the_users_connection(gw):
    created = await gw.wf.create_session("user_123", {"requestLimit": {"monthlyUsd": 20}})
    assert created.expires_at > gw.clock()
    async with gw.http.get(gw.api + "/connections",
                           headers={"Authorization": f"Bearer {created.token}"}) as r:
        assert r.status == 200 and (await r.json())["connected"] is True
    with pytest.raises(WattfareInvalidRequestError, match="monthlyUsd"):
        await gw.wf.create_session("user_123", {"requestLimit": {"monthlyUsd": -1}})


# -- the reference docs' server-side examples, in Python -----------------------------------

async def serve(aiohttp_client: Any, routes: dict[str, Any]) -> Any:
    app = web.Application()
    for path, handler in routes.items():
        app.router.add_post(path, handler)
    return await aiohttp_client(app)


async def test_overview_at_a_glance(gw):
    # overview.md: generateText({ model: ai.model("openai/gpt-4o-mini"), prompt: "Say hello." })
    wf = Wattfare(gw.app_creds.secret_key, base_url=gw.url)
    ai = wf.user("user_123")
    client = ai.openai()
    reply = await client.chat.completions.create(
        model="openai/gpt-4o-mini", messages=[{"role": "user", "content": "Say hello."}])
    text = reply.choices[0].message.content
    await client.close()
    assert text and (await ai.status()).usage.monthly_usd > 0


async def test_server_sdk_per_user_operations(gw):
    # server-sdk.md "wf.user(appUserId)": inference with claude-sonnet-4, then status().
    ai = gw.wf.user("user_123")
    async with ai.openai() as client:
        reply = await client.chat.completions.create(
            model="anthropic/claude-sonnet-4",
            messages=[{"role": "user", "content": "Summarise this in one line."}])
    assert reply.choices[0].message.content
    status = await ai.status()
    assert status.connected
    first_run = await gw.wf.user("user_456").status()  # never throws on first run
    assert not first_run.connected


async def test_server_sdk_session_handler_fixed_and_per_plan_caps(gw, aiohttp_client):
    # server-sdk.md "wf.sessionHandler": a fixed cap, and a cap computed from the request.
    wf = gw.wf

    async def get_user_id(request: web.Request) -> str | None:
        return request.headers.get("x-signed-in-as")  # your auth, e.g. a session cookie

    async def cap_for(request: web.Request) -> int:
        return 50 if request.headers.get("x-plan") == "pro" else 5

    async def plan_cap(request: web.Request) -> dict[str, Any]:
        return {"requestLimit": {"monthlyUsd": await cap_for(request)}}

    client = await serve(aiohttp_client, {
        "/api/wattfare-token": wf.session_handler(get_user_id, {"requestLimit": {"monthlyUsd": 20}}),
        "/api/wattfare-token-plan": wf.session_handler(lambda req: get_user_id(req), plan_cap),
    })
    r = await client.post("/api/wattfare-token")
    assert r.status == 401
    caps = {}
    for path, plan in (("/api/wattfare-token", None), ("/api/wattfare-token-plan", "pro")):
        headers = {"x-signed-in-as": "user_789", **({"x-plan": plan} if plan else {})}
        r = await client.post(path, headers=headers)
        assert r.status == 200
        token = (await r.json())["token"]
        # The browser opens the consent popup with this token; the cap it asks for is the app's.
        async with gw.http.post(gw.api + "/connections", json={"fundingKey": FUNDING_KEY},
                                headers={"Authorization": f"Bearer {token}"}) as c:
            caps[path] = (await c.json())["limits"]["monthlyUsd"]
        async with gw.http.delete(gw.api + "/connections",
                                  headers={"Authorization": f"Bearer {token}"}):
            pass
    assert caps == {"/api/wattfare-token": 20, "/api/wattfare-token-plan": 50}


async def test_server_sdk_create_session(gw, aiohttp_client):
    # server-sdk.md "wf.createSession": shape the token route's answer yourself.
    async def token_route(request: web.Request) -> web.Response:
        session = await gw.wf.create_session("user_123", {"requestLimit": {"monthlyUsd": 20}})
        return web.json_response({"token": session.token, "expiresAt": session.expires_at})

    client = await serve(aiohttp_client, {"/api/token": token_route})
    body = await (await client.post("/api/token")).json()
    assert set(body) == {"token", "expiresAt"} and body["token"].count(".") == 2


async def test_grants_server_convert_route_and_error_handling(gw, aiohttp_client):
    # grants.md "Server: wf.grant()" with its "Error handling" block around the model call.
    wf = gw.wf

    async def convert(request: web.Request) -> web.Response:
        body = await request.json()
        ai = wf.grant(body["grantToken"])  # redeem the grant: no user id needed
        try:
            async with ai.openai() as client:
                reply = await client.chat.completions.create(
                    model="anthropic/claude-sonnet-4",
                    messages=[{"role": "user",
                               "content": f"Convert this document to markdown: {body['file']}"}])
        except Exception as err:
            wf_err = to_wattfare_error(err)
            if wf_err is not None and wf_err.code == "grant_invalid":
                return web.json_response({"error": "grant_used"}, status=402)
            raise
        return web.json_response({"result": reply.choices[0].message.content})

    client = await serve(aiohttp_client, {"/api/convert": convert})
    token = await grant_token(gw, requests=1)
    r = await client.post("/api/convert", json={"grantToken": token, "file": "# doc"})
    assert r.status == 200 and (await r.json())["result"]
    async with gw.http.get(gw.api + "/grants/current",
                           headers={"Authorization": f"Bearer {gw.app_creds.secret_key}",
                                    "x-wattfare-grant": token}) as cur:
        assert (await cur.json())["remaining"] == 0  # decremented by 1
    r = await client.post("/api/convert", json={"grantToken": token, "file": "# doc"})
    assert r.status == 402 and await r.json() == {"error": "grant_used"}


async def test_http_api_raw_calls(gw):
    # http-api.md: the curl example for /chat/completions and GET /status, as raw HTTP.
    headers = {"Authorization": f"Bearer {gw.app_creds.secret_key}",
               "x-wattfare-user": "user_123"}
    async with gw.http.post(gw.api + "/chat/completions", headers=headers, json={
            "model": "openai/gpt-4o-mini",
            "messages": [{"role": "user", "content": "Say hi"}]}) as r:
        assert r.status == 200 and (await r.json())["object"] == "chat.completion"
    async with gw.http.get(gw.api + "/status", params={"appUserId": "user_123"},
                           headers={"Authorization": headers["Authorization"]}) as r:
        body = await r.json()
    assert body["connected"] is True and body["usage"]["monthlyUsd"] > 0
