"""The Responses API and embeddings through a real gateway, metered like chat.

The official ``openai`` client (``responses.create``, ``responses.stream``,
``embeddings.create``) and the OpenAI Agents SDK talk to a wattgate on
loopback, which forwards to the fake OpenRouter; the ledger must equal what
the fake billed, to the nano-dollar.
"""

from __future__ import annotations

import asyncio
import sqlite3

import openai
import pytest

from test_grants_functional import mint_grant
from wattgate.money import usd_to_nanos
from wattgate.reconcile import Reconciler
from wattgate.sdk import Wattfare
from wattgate.views.state import upstream_key
from wattgate.fakemodel import reply_words


_clients: list[openai.AsyncOpenAI] = []


@pytest.fixture(autouse=True)
async def close_clients():
    yield
    while _clients:
        await _clients.pop().close()


def client(h, app, user=None, grant=None):
    headers = {"x-wattfare-user": user} if user else {"x-wattfare-grant": grant}
    c = openai.AsyncOpenAI(base_url=h.api, api_key=app.secret_key, max_retries=0,
                           default_headers=headers)
    _clients.append(c)
    return c


async def ledger(h):
    rows = await h.billed()
    return sum(cost for cost, _ in rows.values()), rows


async def spent(h, app, user):
    return usd_to_nanos(str((await h.status(app, user))["usage"]["monthlyUsd"]))


async def test_responses_create_is_billed_what_the_upstream_charged(harness):
    app = await harness.create_app()
    await harness.connect(app, "ann")
    answer = await client(harness, app, "ann").responses.create(
        model="openai/gpt-4o-mini", input="Say hi", instructions="Be brief.")
    assert answer.status == "completed"
    assert answer.output_text == "".join(reply_words("Say hi"))
    assert answer.usage.output_tokens == len(answer.output_text.split())
    total, rows = await ledger(harness)
    assert total == usd_to_nanos(harness.fake.charged) > 0
    assert [p for _, p in rows.values()] == [False]
    assert list(rows) == [answer.id]  # the generation the upstream named
    assert await spent(harness, app, "ann") == total
    sent = harness.fake.calls[-1].body
    # Asked upstream as a stream (the generation is named before the answer ends),
    # with the output limit the hold priced.
    assert sent["stream"] is True and sent["max_output_tokens"] == 4096
    assert "stream_options" not in sent


async def test_responses_stream_tees_events_and_bills_the_completed_usage(harness):
    app = await harness.create_app()
    await harness.connect(app, "ben")
    harness.fake.split_bytes = 7  # events cut at any byte
    deltas = []
    async with client(harness, app, "ben").responses.stream(
            model="openai/gpt-4o-mini", input="Say hi", max_output_tokens=5) as stream:
        async for event in stream:
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
        final = await stream.get_final_response()
    assert len(deltas) == 5 and "".join(deltas) == final.output_text
    assert final.usage.output_tokens == 5
    total, rows = await ledger(harness)
    assert total == usd_to_nanos(harness.fake.charged) > 0
    assert list(rows) == [final.id] and not rows[final.id][1]
    assert harness.fake.calls[-1].body["max_output_tokens"] == 5


async def test_responses_stream_is_not_buffered(make_harness):
    h = await make_harness()
    h.fake.chunk_delay = 0.3
    app = await h.create_app()
    await h.connect(app, "cat")
    loop = asyncio.get_running_loop()
    start = loop.time()
    first = None
    async with client(h, app, "cat").responses.stream(model="openai/gpt-4o-mini",
                                                      input="hi") as stream:
        async for event in stream:
            if event.type == "response.output_text.delta" and first is None:
                first = loop.time() - start
    whole = loop.time() - start
    assert first is not None and first < whole - 1.0  # the first delta long before the end


async def test_embeddings_are_billed_what_the_upstream_charged(harness):
    app = await harness.create_app()
    await harness.connect(app, "dan")
    c = client(harness, app, "dan")
    one = await c.embeddings.create(model="openai/text-embedding-3-small",
                                    input=["a cat", "a kitten", "an airplane"])
    assert [len(d.embedding) for d in one.data] == [8, 8, 8]  # base64 decoded by the SDK
    floats = await c.embeddings.create(model="openai/text-embedding-3-small",
                                       input="a cat", encoding_format="float", dimensions=4)
    assert len(floats.data[0].embedding) == 4
    assert floats.data[0].embedding == pytest.approx(one.data[0].embedding[:4], abs=1e-6)
    total, rows = await ledger(harness)
    assert total == usd_to_nanos(harness.fake.charged) > 0
    assert len(rows) == 2 and not any(p for _, p in rows.values())
    assert await spent(harness, app, "dan") == total
    # Embeddings have no output: nothing injected, never streamed.
    sent = harness.fake.calls[-1].body
    assert "stream" not in sent and "max_tokens" not in sent


@pytest.mark.parametrize("endpoint", ["responses", "embeddings"])
async def test_racing_calls_never_pass_the_cap(make_harness, endpoint):
    h = await make_harness({"WATTGATE_LIMITS__CHAT_PER_MINUTE": "1000"})
    app = await h.create_app()
    await h.connect(app, "eve", monthly_usd=1)
    c = client(h, app, "eve")
    if endpoint == "responses":  # $0.03 a call, streamed or not
        h.fake.chunk_delay = 0.01
        calls = iter(range(1000))

        async def one():
            if next(calls) % 2:
                return await c.responses.create(model="fake/flat-3c", input="hi",
                                                max_output_tokens=8)
            async with c.responses.stream(model="fake/flat-3c", input="hi",
                                          max_output_tokens=8) as stream:
                return await stream.get_final_response()
        fits = 33
    else:  # $0.01 a call
        def one():
            return c.embeddings.create(model="fake/embed-flat-1c", input="hi")
        fits = 100
    results = await asyncio.gather(*(one() for _ in range(fits + 17)), return_exceptions=True)
    refused = [r for r in results if isinstance(r, openai.APIStatusError)]
    assert all(r.status_code == 402 and r.body["code"] == "budget_exceeded" for r in refused)
    ok = len(results) - len(refused)
    assert 0 < ok <= fits and len(refused) >= 17
    total, _ = await ledger(h)
    assert total == usd_to_nanos(h.fake.charged) <= usd_to_nanos(1)
    assert await h.gw.store.open_holds() == 0


async def test_rl_chat_counts_every_metered_endpoint(make_harness):
    h = await make_harness({"WATTGATE_LIMITS__CHAT_PER_MINUTE": "2"})
    app = await h.create_app()
    await h.connect(app, "max")
    c = client(h, app, "max")
    await c.responses.create(model="openai/gpt-4o-mini", input="hi")
    await c.embeddings.create(model="openai/text-embedding-3-small", input="hi")
    with pytest.raises(openai.RateLimitError) as limited:
        await c.responses.create(model="openai/gpt-4o-mini", input="hi")
    assert int(limited.value.response.headers["Retry-After"]) >= 1
    h.clock.advance(60)
    await c.embeddings.create(model="openai/text-embedding-3-small", input="hi")
    assert len(h.fake.calls) == 3


async def test_a_client_gone_mid_stream_still_pays_what_the_upstream_billed(harness):
    app = await harness.create_app()
    await harness.connect(app, "ned")
    harness.fake.chunk_delay = 0.05
    harness.fake.pieces = 20
    async with harness.http.post(harness.api + "/responses", json={
            "model": "openai/gpt-4o-mini", "input": "hi", "stream": True}, headers={
            "Authorization": f"Bearer {app.secret_key}", "x-wattfare-user": "ned"}) as r:
        async for chunk in r.content.iter_any():
            if b"response.output_text.delta" in chunk:
                break
        r.close()  # the client leaves mid-stream; the gateway drains the rest
    for _ in range(100):
        if (await ledger(harness))[0] > 0:
            break
        await asyncio.sleep(0.05)
    total, rows = await ledger(harness)
    assert total == usd_to_nanos(harness.fake.charged) > 0
    assert [p for _, p in rows.values()] == [False]  # the exact cost, from the drain
    assert await harness.gw.store.open_holds() == 0


@pytest.mark.parametrize("endpoint", ["responses", "embeddings"])
async def test_a_grant_serves_exactly_its_count(harness, endpoint):
    app = await harness.create_app()
    status, grant = await mint_grant(harness, app, requests=2)
    assert status == 200, grant
    c = client(harness, app, grant=grant["grantToken"])

    async def one():
        if endpoint == "responses":
            return await c.responses.create(model="openai/gpt-4o-mini", input="hi")
        return await c.embeddings.create(model="openai/text-embedding-3-small", input="hi")

    await one()
    await one()
    with pytest.raises(openai.APIStatusError) as refused:
        await one()
    assert refused.value.status_code == 402
    assert refused.value.body["code"] == "grant_invalid"
    assert len(harness.fake.calls) == 2
    db = sqlite3.connect(harness.tmp_path / "wattgate.db")
    try:
        rows = db.execute("SELECT COUNT(*), SUM(cost_nanos) FROM usage "
                          "WHERE grant_id IS NOT NULL").fetchone()
    finally:
        db.close()
    assert rows == (2, usd_to_nanos(harness.fake.charged))


@pytest.mark.parametrize("body, field", [
    ({"tools": [{"type": "web_search_preview"}]}, "tools[0].type"),
    ({"previous_response_id": "resp_1"}, "previous_response_id"),
    ({"background": True}, "background"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
     "input[0].content[0].type"),
    ({"service_tier": "priority"}, "service_tier"),
    ({"reasoning": {"effort": "high", "budget": 9}}, "reasoning.budget"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
])
async def test_a_responses_field_that_can_raise_the_bill_is_refused_by_name(
        harness, body, field):
    app = await harness.create_app()
    await harness.connect(app, "fay")
    request = {"model": "openai/gpt-4o-mini", "input": "hi", **body}
    async with harness.http.post(harness.api + "/responses", json=request, headers={
            "Authorization": f"Bearer {app.secret_key}", "x-wattfare-user": "fay"}) as r:
        error = (await r.json())["error"]
    assert (r.status, error["code"]) == (400, "invalid_request")
    assert error["message"].startswith(field + ":")
    assert harness.fake.calls == []


async def test_an_embeddings_input_that_cannot_be_priced_is_refused_by_name(harness):
    app = await harness.create_app()
    await harness.connect(app, "gus")
    with pytest.raises(openai.BadRequestError) as refused:
        await client(harness, app, "gus").embeddings.create(
            model="openai/text-embedding-3-small",
            input=[{"type": "image_url", "image_url": {"url": "https://x/y.png"}}])
    assert refused.value.body["message"].startswith("input[0]:")
    assert harness.fake.calls == []


async def test_max_output_tokens_and_reasoning_are_held(harness):
    """fake/out-1m: $0.001 per output token; a $4 cap fits under 4,000 tokens of output."""
    app = await harness.create_app()
    await harness.connect(app, "hal", monthly_usd=4)
    c = client(harness, app, "hal")
    # 4096 injected would hold $4.10: the call set no limit, so it is fitted to the cap
    # (metering.fit_to_budget = "unset"), and the lowered limit is what is sent and held.
    fitted = await c.responses.with_raw_response.create(model="fake/out-1m", input="hi")
    sent = harness.fake.calls[-1].body["max_output_tokens"]
    assert 256 <= sent < 4000 and fitted.headers["x-wattfare-max-tokens"] == str(sent)
    with pytest.raises(openai.APIStatusError) as refused:
        await c.responses.create(model="fake/out-1m", input="hi", max_output_tokens=100,
                                 reasoning={"max_tokens": 5000})
    assert refused.value.body["code"] == "budget_exceeded"
    await c.responses.create(model="fake/out-1m", input="hi", max_output_tokens=100,
                             reasoning={"max_tokens": 50})
    total, _ = await ledger(harness)
    assert total == usd_to_nanos(harness.fake.charged)


async def test_a_responses_call_without_usage_is_provisional_then_reconciled(harness):
    app = await harness.create_app()
    await harness.connect(app, "ivy")
    c = client(harness, app, "ivy")
    async with c.responses.stream(model="fake/no-usage", input="hi") as stream:
        async for _ in stream:
            pass
    rows = await harness.gw.store.provisional_usage()
    assert len(rows) == 1 and rows[0][0].cost_nanos > usd_to_nanos(harness.fake.charged)
    report = await Reconciler(harness.gw, harness.app[upstream_key]).run_once()
    assert report.corrected == 1
    total, _ = await ledger(harness)
    assert total == usd_to_nanos(harness.fake.charged)


async def test_a_failed_response_is_a_502_and_is_recorded(harness):
    app = await harness.create_app()
    await harness.connect(app, "jim")
    with pytest.raises(openai.APIStatusError) as failed:
        await client(harness, app, "jim").responses.create(model="fake/midstream-error",
                                                           input="hi")
    assert failed.value.status_code == 502
    assert "Provider disconnected" in failed.value.body["message"]
    rows = await harness.gw.store.provisional_usage()
    assert len(rows) == 1  # billed upstream; the reconciler will say how much
    assert await harness.gw.store.open_holds() == 0


async def test_a_whole_response_names_its_generation_before_it_ends(harness):
    """A crash mid-answer must leave the generation to reconcile: the hold's row names
    it while the model still works (the whole answer is streamed upstream)."""
    app = await harness.create_app()
    await harness.connect(app, "kim")
    harness.fake.chunk_delay = 0.2
    task = asyncio.ensure_future(client(harness, app, "kim").responses.create(
        model="openai/gpt-4o-mini", input="hi"))
    for _ in range(100):
        await asyncio.sleep(0.05)
        if harness.fake.calls and harness.fake.calls[-1].answered_at:
            break
    await asyncio.sleep(0.1)
    db = sqlite3.connect(harness.tmp_path / "wattgate.db")
    try:
        named = [r[0] for r in db.execute("SELECT generation_id FROM holds")]
    finally:
        db.close()
    assert not task.done()
    assert named == [harness.fake.calls[-1].generation_id]
    await task


async def test_the_agents_sdk_runs_through_the_gateway(harness):
    import agents  # openai-agents, in the test extras

    agents.set_tracing_disabled(True)  # tracing would send to api.openai.com
    app = await harness.create_app()
    await harness.connect(app, "leo")
    openai_client = Wattfare(app.secret_key, base_url=harness.url).user("leo").openai(
        max_retries=0)
    _clients.append(openai_client)
    model = agents.OpenAIResponsesModel(model="openai/gpt-4o-mini", openai_client=openai_client)
    agent = agents.Agent(name="Helper", instructions="Answer briefly.", model=model)
    result = await agents.Runner.run(agent, "What is metering?")
    assert result.final_output.startswith("You wrote 3 words: “What is metering?”.")
    total, rows = await ledger(harness)
    assert len(rows) == 1 and total == usd_to_nanos(harness.fake.charged) > 0


@pytest.mark.parametrize("method, path", [("POST", "/completions"), ("GET", "/credits"),
                                          ("POST", "/audio/speech")])
async def test_any_other_api_path_is_a_404_naming_what_is_supported(harness, method, path):
    async with harness.http.request(method, harness.api + path) as r:
        error = (await r.json())["error"]
    assert (r.status, error["code"]) == (404, "not_found")
    for served in ("POST /api/v1/chat/completions", "POST /api/v1/responses",
                   "POST /api/v1/embeddings", "GET /api/v1/models"):
        assert served in error["message"]


@pytest.mark.parametrize("endpoint", ["responses", "embeddings"])
async def test_a_bring_your_own_key_call_counts_the_providers_cost(harness, endpoint):
    """For BYOK, usage.cost is only OpenRouter's fee; the provider's cost counts too."""
    byok = "sk-or-v1-" + "b" * 48
    harness.fake.byok_keys.add(byok)
    app = await harness.create_app()
    await harness.connect(app, "olga", funding_key=byok)
    c = client(harness, app, "olga")
    if endpoint == "responses":
        async with c.responses.stream(model="openai/gpt-4o-mini", input="hi") as stream:
            final = await stream.get_final_response()
        assert final.usage.model_extra["is_byok"] is True
    else:
        await c.embeddings.create(model="openai/text-embedding-3-small", input="hi")
    total, rows = await ledger(harness)
    assert total == usd_to_nanos(harness.fake.charged) > 0
    assert [p for _, p in rows.values()] == [False]


async def test_usage_that_cannot_be_believed_is_provisional_never_free(harness):
    app = await harness.create_app()
    await harness.connect(app, "pam")
    harness.fake.usage_text = '{"input_tokens":3,"output_tokens":8,"cost":"NaN"}'
    async with client(harness, app, "pam").responses.stream(
            model="openai/gpt-4o-mini", input="hi") as stream:
        final = await stream.get_final_response()
    assert final.output_text  # the client's stream is whole
    rows = await harness.gw.store.provisional_usage()
    assert len(rows) == 1 and rows[0][0].cost_nanos >= usd_to_nanos(harness.fake.charged)
    await Reconciler(harness.gw, harness.app[upstream_key]).run_once()
    total, _ = await ledger(harness)
    assert total == usd_to_nanos(harness.fake.charged)


async def test_with_whole_answers_forwarded_a_response_is_billed_from_its_json(make_harness):
    """upstream.stream_whole_answers = false: the upstream's response object, as it came
    (its "error": null is no error), billed from its usage."""
    h = await make_harness({"WATTGATE_UPSTREAM__STREAM_WHOLE_ANSWERS": "false"})
    app = await h.create_app()
    await h.connect(app, "quin")
    answer = await client(h, app, "quin").responses.create(model="openai/gpt-4o-mini",
                                                           input="hi")
    assert answer.status == "completed" and answer.output_text
    assert "stream" not in h.fake.calls[-1].body
    total, rows = await ledger(h)
    assert total == usd_to_nanos(h.fake.charged) > 0
    assert list(rows) == [answer.id] and not rows[answer.id][1]
    conn = await h.gw.store.get_connection(app.app_id, "quin")
    assert [u.status for u in await h.gw.store.recent_usage(conn.connection_id)] == ["ok"]


async def test_a_refused_response_names_the_limit_of_its_own_endpoint(harness):
    """The refusal says what the call could cost and the max_output_tokens that fits (the
    Responses API has no max_tokens); a limit the client chose itself is not lowered."""
    app = await harness.create_app()
    await harness.connect(app, "ivy", monthly_usd=4)
    with pytest.raises(openai.APIStatusError) as refused:
        await client(harness, app, "ivy").responses.create(
            model="fake/out-1m", input="hi", max_output_tokens=4050)
    message = refused.value.body["message"]
    assert refused.value.body["code"] == "budget_exceeded"
    assert "an answer of max_output_tokens 4050" in message, message
    assert "To fit, lower max_output_tokens to " in message and "max_tokens " not in \
        message.replace("max_output_tokens", ""), message
    assert harness.fake.calls == []
