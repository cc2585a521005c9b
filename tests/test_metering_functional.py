"""Through a real gateway: what a call cost is the same from the stream and from
GET /generation (BYOK included), and hostile or broken usage from the upstream never
crashes the stream, never leaks a hold, and is recorded provisional with one log line."""

from __future__ import annotations

import logging

import openai
import pytest
from conftest import FUNDING_KEY

from wattgate.money import usd_to_nanos
from wattgate.reconcile import Reconciler
from wattgate.views.state import upstream_key
from wattgate.fakemodel import reply_words

PROMPT = [{"role": "user", "content": "the same question, twice"}]


def client(h, app, user: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=h.api, api_key=app.secret_key,
                              default_headers={"x-wattfare-user": user}, max_retries=0)


async def streamed(h, app, user) -> str:
    async with client(h, app, user) as oa:
        stream = await oa.chat.completions.create(model="openai/gpt-4o-mini", messages=PROMPT,
                                                  stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])


async def test_a_reconciled_byok_call_costs_what_the_stream_billed(harness):
    app = await harness.create_app()
    await harness.connect(app, "bo", monthly_usd=5)
    harness.fake.byok_keys.add(FUNDING_KEY)
    await streamed(harness, app, "bo")  # billed from the stream: fee + provider's cost
    first = harness.fake.calls[-1]
    assert first.byok_fee is not None and 0 < first.byok_fee < first.cost
    harness.fake.usage_text = "null"  # the same call, its usage cut off: provisional
    await streamed(harness, app, "bo")
    second = harness.fake.calls[-1]
    assert second.cost == first.cost
    before = await harness.billed()
    assert before[first.generation_id] == (usd_to_nanos(first.cost), False)
    assert before[second.generation_id][1] is True
    report = await Reconciler(harness.gw, harness.app[upstream_key]).run_once()
    assert report.corrected == 1
    after = await harness.billed()
    assert after[second.generation_id] == (usd_to_nanos(first.cost), False)
    spent = (await harness.status(app, "bo"))["usage"]["monthlyUsd"]
    assert usd_to_nanos(str(spent)) == 2 * usd_to_nanos(first.cost) == \
        usd_to_nanos(harness.fake.charged)


HOSTILE = ['{"cost":1e999999,"prompt_tokens":5,"completion_tokens":8}', '{"cost":1e20}',
           '{}', 'null', '{"cost":"0.001"}', '{"cost":NaN}', '{"cost":Infinity}',
           '{"cost":-3}', '{"cost":true}', '{"cost":1000000}',
           '{"cost":null,"prompt_tokens":1e30,"completion_tokens":-4}',
           '{"cost":0.001,"is_byok":true}']


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
@pytest.mark.parametrize("usage_text", HOSTILE)
async def test_hostile_usage_is_provisional_then_reconciled(harness, caplog, usage_text,
                                                            stream):
    caplog.set_level(logging.INFO)
    app = await harness.create_app()
    await harness.connect(app, "hu", monthly_usd=5)
    harness.fake.usage_text = usage_text
    if stream:
        text = await streamed(harness, app, "hu")
    else:
        async with client(harness, app, "hu") as oa:
            reply = await oa.chat.completions.create(model="openai/gpt-4o-mini",
                                                     messages=PROMPT)
        text = reply.choices[0].message.content
    assert text == "".join(reply_words(PROMPT[0]["content"]))  # the whole answer
    call = harness.fake.calls[-1]
    assert await harness.gw.store.open_holds() == 0
    cost, provisional = (await harness.billed())[call.generation_id]
    assert provisional and cost > 0
    lines = [r for r in caplog.records if r.name == "wattgate.proxy"
             and r.levelno == logging.WARNING]
    if usage_text != "null":  # no usage at all is the ordinary cut-off case, no warning
        assert len(lines) == 1, [r.getMessage() for r in lines]
        message = lines[0].getMessage()
        assert call.generation_id in message and FUNDING_KEY not in message
        assert PROMPT[0]["content"] not in message
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    report = await Reconciler(harness.gw, harness.app[upstream_key]).run_once()
    assert report.corrected == 1
    assert (await harness.billed())[call.generation_id] == (usd_to_nanos(call.cost), False)
    assert await harness.gw.store.check(now=harness.clock(), hold_ttl=900) == []


@pytest.mark.parametrize("data", ['{"total_cost":1e999999}', '{"total_cost":NaN}',
                                  '{"total_cost":1e20}', '{"total_cost":"0.01"}', 'null',
                                  '{"total_cost":0.01,"is_byok":true}'])
async def test_a_hostile_generation_answer_leaves_the_row_provisional(harness, caplog, data):
    app = await harness.create_app()
    await harness.connect(app, "hg", monthly_usd=5)
    harness.fake.usage_text = "{}"
    await streamed(harness, app, "hg")
    call = harness.fake.calls[-1]
    estimate = (await harness.billed())[call.generation_id]
    harness.fake.generation_text = data
    caplog.clear()
    reconciler = Reconciler(harness.gw, harness.app[upstream_key])
    report = await reconciler.run_once()
    assert (report.corrected, report.waiting) == (0, 1)
    assert (await harness.billed())[call.generation_id] == estimate
    lines = [r.getMessage() for r in caplog.records if r.name == "wattgate.reconcile"]
    assert len(lines) == 1 and call.generation_id in lines[0]
    harness.fake.generation_text = None  # the upstream comes to its senses: corrected
    assert (await reconciler.run_once(force=True)).corrected == 1
    assert (await harness.billed())[call.generation_id] == (usd_to_nanos(call.cost), False)


@pytest.mark.parametrize("usage_text", ['{"cost":1e999999}', '{}', '{"cost":NaN}'])
async def test_hostile_usage_in_a_forwarded_whole_answer(make_harness, caplog, usage_text):
    h = await make_harness({"WATTGATE_UPSTREAM__STREAM_WHOLE_ANSWERS": "false"})
    app = await h.create_app()
    await h.connect(app, "fw", monthly_usd=5)
    h.fake.usage_text = usage_text
    async with h.http.post(h.api + "/chat/completions",
                           json={"model": "openai/gpt-4o-mini", "messages": PROMPT},
                           headers={"Authorization": f"Bearer {app.secret_key}",
                                    "x-wattfare-user": "fw"}) as r:
        assert r.status == 200
        assert "You wrote 4 words" in await r.text()  # forwarded as the upstream sent it
    call = h.fake.calls[-1]
    assert await h.gw.store.open_holds() == 0
    assert (await h.billed())[call.generation_id][1] is True
    assert len([r for r in caplog.records if r.name == "wattgate.proxy"]) == 1
