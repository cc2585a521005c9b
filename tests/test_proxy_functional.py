"""The metered proxy through the running app, driven by the official openai client."""

from __future__ import annotations

import asyncio
import logging
import time
from decimal import Decimal

import aiohttp
import openai
import pytest

from conftest import FUNDING_KEY
from wattgate.money import usd_to_nanos
from wattgate.fakemodel import reply_words


def client(h, app, user: str, **kw) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=h.api, api_key=app.secret_key,
                              default_headers={"x-wattfare-user": user}, max_retries=0, **kw)


async def ledger_total(h) -> int:
    total = 0
    for c in await h.gw.store.connections_for_app(h.apps[0].app_id):
        total += sum(r.cost_nanos for r in await h.gw.store.recent_usage(c.connection_id, 10_000))
    return total


async def test_non_streaming_call_is_metered_exactly(harness):
    app = await harness.create_app()
    await harness.connect(app, "alice", monthly_usd=5)
    async with client(harness, app, "alice") as oa:
        reply = await oa.chat.completions.create(
            model="openai/gpt-4o-mini", messages=[{"role": "user", "content": "Say hi"}])
    # The fake model answers the prompt, and bills one token per word it sent.
    assert reply.choices[0].message.content == "".join(reply_words("Say hi"))
    assert reply.choices[0].message.content.startswith("You wrote 2 words: “Say hi”.")
    assert reply.usage.completion_tokens == len(reply.choices[0].message.content.split())
    charged = harness.fake.charged
    assert charged > 0
    status = await harness.status(app, "alice")
    assert usd_to_nanos(Decimal(str(status["usage"]["monthlyUsd"]))) == usd_to_nanos(charged)
    assert await harness.gw.store.open_holds() == 0


async def test_streaming_call_is_metered_exactly(harness):
    app = await harness.create_app()
    await harness.connect(app, "bob", monthly_usd=5)
    async with client(harness, app, "bob") as oa:
        stream = await oa.chat.completions.create(
            model="anthropic/claude-sonnet-4", stream=True,
            messages=[{"role": "user", "content": "Tell me about metering"}])
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == "".join(reply_words("Tell me about metering"))  # the whole answer
    total = await ledger_total(harness)
    assert total == usd_to_nanos(harness.fake.charged) > 0
    status = await harness.status(app, "bob")
    assert status["remainingUsd"] == pytest.approx(5 - float(harness.fake.charged))
    assert await harness.gw.store.open_holds() == 0


async def test_chunks_reach_client_before_upstream_finishes(harness):
    app = await harness.create_app()
    await harness.connect(app, "carol")
    harness.fake.chunk_delay = 0.25
    harness.fake.pieces = 6
    t0 = time.monotonic()
    async with harness.http.post(
            harness.api + "/chat/completions",
            json={"model": "openai/gpt-4o-mini", "stream": True,
                  "messages": [{"role": "user", "content": "hi"}]},
            headers={"Authorization": f"Bearer {app.secret_key}",
                     "x-wattfare-user": "carol"}) as r:
        assert r.status == 200
        first = None
        async for chunk in r.content.iter_any():
            if b'"content"' in chunk and first is None:
                first = time.monotonic() - t0
        last = time.monotonic() - t0
    # The first words arrive after one chunk delay, the stream ends after six.
    assert first is not None and first < 0.25 * 3
    assert last >= 0.25 * 6
    assert await ledger_total(harness) == usd_to_nanos(harness.fake.charged)


async def test_upstream_gets_funding_key_never_secret_or_wattfare_headers(harness):
    app = await harness.create_app()
    await harness.connect(app, "dan")
    async with client(harness, app, "dan") as oa:
        await oa.chat.completions.create(
            model="openai/gpt-4o-mini",
            messages=[{"role": "user", "content": "the secret prompt zebra-42"}])
    call = harness.fake.calls[-1]
    assert call.authorization == f"Bearer {FUNDING_KEY}"
    sent = " ".join(f"{k}: {v}" for k, v in call.headers.items())
    assert app.secret_key not in sent
    assert "x-wattfare" not in sent.lower()
    assert "cookie" not in sent.lower()
    await harness.gw.store.close()  # flush WAL into the file before grepping it
    raw = b"".join(p.read_bytes() for p in harness.tmp_path.glob("wattgate.db*"))
    assert b"zebra-42" not in raw
    assert FUNDING_KEY.encode() not in raw


async def post_chat(h, app, headers=None, **body):
    payload = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    payload.update(body)
    hdrs = {"Authorization": f"Bearer {app.secret_key}"}
    hdrs.update(headers or {})
    async with h.http.post(h.api + "/chat/completions", json=payload, headers=hdrs) as r:
        if r.content_type == "text/event-stream":
            return r.status, await r.text(), r.headers
        return r.status, await r.json(), r.headers


async def test_error_rows(harness):
    app = await harness.create_app()
    status, body, _ = await post_chat(harness, app)
    assert (status, body["error"]["code"]) == (400, "invalid_request")
    status, body, headers = await post_chat(harness, app, {"x-wattfare-user": "nobody"})
    assert (status, body["error"]["code"]) == (402, "not_connected")
    assert headers["x-should-retry"] == "false"
    await harness.connect(app, "erin", monthly_usd=1)
    status, body, _ = await post_chat(harness, app, {"x-wattfare-user": "erin"},
                                      model="no/such-model")
    assert (status, body["error"]["code"]) == (400, "invalid_request")
    assert "no known price" in body["error"]["message"]
    status, body, _ = await post_chat(harness, app, {"x-wattfare-user": "erin"},
                                      model="fake/fail-500")
    assert (status, body["error"]["code"]) == (502, "upstream")
    assert "Internal Server Error" in body["error"]["message"]
    status, body, _ = await post_chat(harness, app, {"x-wattfare-user": "erin"},
                                      max_tokens=5_000_000)  # worst case $3 > $1 cap
    assert (status, body["error"]["code"]) == (402, "budget_exceeded")
    status, body, _ = await post_chat(harness, app, {"x-wattfare-user": "erin",
                                                     "Authorization": "Bearer sk_live_bad"})
    assert (status, body["error"]["code"]) == (401, "auth")
    assert await harness.gw.store.open_holds() == 0
    assert (await harness.status(app, "erin"))["usage"]["monthlyUsd"] == 0


@pytest.mark.parametrize("kind,code", [("revoked", 401), ("broke", 402)])
async def test_funding_refused_upstream_marks_reconnect(harness, kind, code):
    app = await harness.create_app()
    await harness.connect(app, "fay")
    target = harness.fake.revoked_keys if kind == "revoked" else harness.fake.broke_keys
    target.add(FUNDING_KEY)
    status, body, _ = await post_chat(harness, app, {"x-wattfare-user": "fay"})
    assert (status, body["error"]["code"]) == (402, "funding_invalid")
    assert (await harness.status(app, "fay"))["connected"] is False
    status, body, _ = await post_chat(harness, app, {"x-wattfare-user": "fay"})
    assert (status, body["error"]["code"]) == (402, "not_connected")
    assert await harness.gw.store.open_holds() == 0


async def test_rate_limited_with_retry_after(make_harness):
    h = await make_harness({"WATTGATE_LIMITS__CHAT_PER_MINUTE": "2"})
    app = await h.create_app()
    await h.connect(app, "gus")
    for _ in range(2):
        assert (await post_chat(h, app, {"x-wattfare-user": "gus"}))[0] == 200
    status, body, headers = await post_chat(h, app, {"x-wattfare-user": "gus"})
    assert (status, body["error"]["code"]) == (429, "rate_limited")
    assert int(headers["Retry-After"]) >= 1
    h.clock.advance(60)
    assert (await post_chat(h, app, {"x-wattfare-user": "gus"}))[0] == 200


async def test_concurrent_calls_never_pass_the_cap(make_harness):
    h = await make_harness({"WATTGATE_LIMITS__CHAT_PER_MINUTE": "1000"})
    app = await h.create_app()
    await h.connect(app, "hal", monthly_usd=1)
    h.fake.chunk_delay = 0.01
    results = await asyncio.gather(*[
        post_chat(h, app, {"x-wattfare-user": "hal"}, model="fake/flat-3c", stream=(i % 2 == 0))
        for i in range(50)])
    ok = [r for r in results if r[0] == 200]
    refused = [r for r in results if r[0] == 402]
    assert len(ok) + len(refused) == 50
    assert all(r[1]["error"]["code"] == "budget_exceeded" for r in refused)
    assert len(ok) <= 33
    total = await ledger_total(h)
    assert total <= usd_to_nanos(1)
    assert total == len(ok) * usd_to_nanos(Decimal("0.03"))
    assert await h.gw.store.open_holds() == 0


async def test_client_disconnect_mid_stream_keeps_usage(harness):
    app = await harness.create_app()
    await harness.connect(app, "ivy")
    harness.fake.chunk_delay = 0.05
    harness.fake.pieces = 20
    async with aiohttp.ClientSession() as s:
        async with s.post(harness.api + "/chat/completions",
                          json={"model": "openai/gpt-4o-mini", "stream": True,
                                "messages": [{"role": "user", "content": "hi"}]},
                          headers={"Authorization": f"Bearer {app.secret_key}",
                                   "x-wattfare-user": "ivy"}) as r:
            async for chunk in r.content.iter_any():
                if b'"content"' in chunk:
                    break
        # leaving the context closes the connection mid-stream
    for _ in range(100):
        if await ledger_total(harness) > 0:
            break
        await asyncio.sleep(0.05)
    assert await ledger_total(harness) == usd_to_nanos(harness.fake.charged) > 0
    assert await harness.gw.store.open_holds() == 0


async def test_client_gone_before_the_stream_starts_is_billed_quietly(harness, caplog):
    """The client leaves while the model is still queued: when its answer starts, the
    gateway cannot send headers; it reads the answer for its cost, with no traceback."""
    app = await harness.create_app()
    await harness.connect(app, "ida")
    harness.fake.header_delay = 0.3
    async with aiohttp.ClientSession() as s:
        with pytest.raises(asyncio.TimeoutError):
            await s.post(harness.api + "/chat/completions",
                         json={"model": "openai/gpt-4o-mini", "stream": True,
                               "messages": [{"role": "user", "content": "hi"}]},
                         headers={"Authorization": f"Bearer {app.secret_key}",
                                  "x-wattfare-user": "ida"},
                         timeout=aiohttp.ClientTimeout(total=0.1))
    for _ in range(100):
        if await ledger_total(harness) > 0 and await harness.gw.store.open_holds() == 0:
            break
        await asyncio.sleep(0.05)
    assert await ledger_total(harness) == usd_to_nanos(harness.fake.charged) > 0
    assert await harness.gw.store.open_holds() == 0
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], \
        [r.getMessage() for r in caplog.records]


async def test_models_list_is_proxied(harness):
    app = await harness.create_app()
    async with openai.AsyncOpenAI(base_url=harness.api, api_key=app.secret_key) as oa:
        models = await oa.models.list()
    assert "openai/gpt-4o-mini" in [m.id for m in models.data]


async def test_worst_case_is_bounded_before_the_call_leaves(harness):
    """No max_tokens: the default is injected; a stream always asks for its usage event."""
    app = await harness.create_app()
    await harness.connect(app, "kim")
    assert (await post_chat(harness, app, {"x-wattfare-user": "kim"}))[0] == 200
    sent = harness.fake.calls[-1].body
    # (a whole answer is streamed upstream: see test_a_whole_answer_is_assembled_…)
    assert sent["max_tokens"] == 4096 and sent["stream_options"] == {"include_usage": True}
    assert (await post_chat(harness, app, {"x-wattfare-user": "kim"}, stream=True, max_tokens=50,
                            stream_options={"include_usage": False}))[0] == 200
    sent = harness.fake.calls[-1].body
    assert sent["max_tokens"] == 50 and sent["stream_options"] == {"include_usage": True}
    assert await ledger_total(harness) == usd_to_nanos(harness.fake.charged)


async def direct_answer(h, body: dict) -> dict:
    """What the upstream itself answers a non-streamed call (the bytes a bare hop forwards)."""
    async with h.http.post(h.fake.base_url + "/chat/completions", json=body,
                           headers={"Authorization": f"Bearer {FUNDING_KEY}"}) as r:
        assert r.status == 200
        return await r.json()


async def test_a_whole_answer_is_assembled_from_the_upstream_stream(harness):
    """Non-streamed calls go upstream as streams (the generation id reaches the ledger
    while the model works); the client gets the same chat.completion as a direct call."""
    app = await harness.create_app()
    await harness.connect(app, "nia", monthly_usd=5)
    body = {"model": "openai/gpt-4o-mini", "max_tokens": 64,
            "messages": [{"role": "user", "content": "Say hi"}]}
    status, got, headers = await post_chat(harness, app, {"x-wattfare-user": "nia"}, **body)
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    sent = harness.fake.calls[-1].body
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    want = await direct_answer(harness, body)
    for answer in (got, want):  # one generation each: only these differ
        answer.pop("id"), answer.pop("created")
        answer["usage"].pop("cost"), answer["usage"]["cost_details"].pop("upstream_inference_cost")
    assert got == want
    assert headers["X-Generation-Id"] == harness.fake.calls[-2].generation_id
    total = await ledger_total(harness)
    assert total == usd_to_nanos(harness.fake.calls[-2].cost) > 0
    assert await harness.gw.store.open_holds() == 0


async def test_a_whole_answer_names_its_generation_in_the_ledger_while_the_model_works(
        harness):
    import sqlite3

    app = await harness.create_app()
    await harness.connect(app, "oz", monthly_usd=5)
    harness.fake.chunk_delay = 0.1
    call = asyncio.ensure_future(post_chat(harness, app, {"x-wattfare-user": "oz"}))
    for _ in range(50):
        await asyncio.sleep(0.02)
        if harness.fake.calls:
            break
    await asyncio.sleep(0.2)  # mid-answer: what a crash now would leave behind
    db = sqlite3.connect(harness.gw.store.path)
    rows = db.execute("SELECT generation_id FROM holds").fetchall()
    db.close()
    assert rows == [(harness.fake.calls[0].generation_id,)]
    status, body, _ = await call
    assert status == 200 and body["choices"][0]["finish_reason"] == "stop"
    assert await harness.gw.store.open_holds() == 0


async def test_a_whole_answer_that_fails_midway_is_an_error_and_is_recorded(harness):
    app = await harness.create_app()
    await harness.connect(app, "pia", monthly_usd=5)
    status, body, _ = await post_chat(harness, app, {"x-wattfare-user": "pia"},
                                      model="fake/midstream-error")
    assert status == 502 and body["error"]["code"] == "upstream"
    assert "Provider disconnected" in body["error"]["message"]
    rows = [u for c in await harness.gw.store.connections_for_app(app.app_id)
            for u in await harness.gw.store.recent_usage(c.connection_id)]
    assert [(u.status, u.generation_id) for u in rows] == \
        [("upstream_error", harness.fake.calls[0].generation_id)]
    assert await harness.gw.store.open_holds() == 0


async def test_whole_answers_can_be_forwarded_as_they_are(make_harness):
    h = await make_harness({"WATTGATE_UPSTREAM__STREAM_WHOLE_ANSWERS": "false"})
    app = await h.create_app()
    await h.connect(app, "quin", monthly_usd=5)
    status, body, _ = await post_chat(h, app, {"x-wattfare-user": "quin"}, max_tokens=32)
    assert status == 200 and body["object"] == "chat.completion"
    assert "stream" not in h.fake.calls[-1].body
    assert await ledger_total(h) == usd_to_nanos(h.fake.charged) > 0


async def test_a_whole_answer_cut_off_upstream_is_an_error_and_is_recorded(harness):
    import gc

    app = await harness.create_app()
    await harness.connect(app, "rex", monthly_usd=5)
    status, body, _ = await post_chat(harness, app, {"x-wattfare-user": "rex"}, model="fake/cut")
    assert status == 502 and "broke off" in body["error"]["message"]
    rows = [u for c in await harness.gw.store.connections_for_app(app.app_id)
            for u in await harness.gw.store.recent_usage(c.connection_id)]
    assert [(u.status, u.provisional) for u in rows] == [("upstream_cut", True)]
    assert await harness.gw.store.open_holds() == 0
    gc.collect()  # an upstream response left open would warn here (warnings are errors)
