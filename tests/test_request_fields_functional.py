"""Request fields that change the bill, through the running gateway and the fake OpenRouter.

Each racing test sends 20 calls at once on a $0.10 cap, with a field that makes
the upstream bill more than the model named in ``model`` alone would: neither
the ledger nor what the upstream charged may pass the cap
(docs/request-fields.md has the table).
"""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any

import openai
import pytest

from wattgate.money import usd_to_nanos

CAP = Decimal("0.10")
RACERS = 20
IMAGE = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}


async def ledger_total(h, app) -> int:  # type: ignore[no-untyped-def]
    total = 0
    for c in await h.gw.store.connections_for_app(app.app_id):
        total += sum(r.cost_nanos for r in await h.gw.store.recent_usage(c.connection_id, 10_000))
    return total


async def post(h, app, user: str,  # type: ignore[no-untyped-def]
               body: dict[str, Any]) -> tuple[int, Any]:
    payload = {"messages": [{"role": "user", "content": "hi"}], **body}
    async with h.http.post(h.api + "/chat/completions", json=payload,
                           headers={"Authorization": f"Bearer {app.secret_key}",
                                    "x-wattfare-user": user}) as r:
        if r.content_type == "text/event-stream":
            return r.status, await r.text()
        return r.status, await r.json()


# (what the call asks, endpoints down at the fake): each bills up to 6x what `model` alone would.
CASES = {
    # The case: a fallback list billed at the model actually used.
    "models fallback": ({"model": "fake/flat-half-c", "models": ["fake/flat-3c"]},
                        {"fake/flat-half-c"}),
    "free primary, paid fallback": ({"model": "fake/free:free", "models": ["fake/flat-3c"]},
                                    {"fake/free:free"}),
    "provider fallback (default routing)": ({"model": "fake/routed"}, {"fake/routed@Fake"}),
    "provider.order": ({"model": "fake/routed", "provider": {"order": ["Dear"]}}, set()),
    "n choices": ({"model": "fake/out-1m", "max_tokens": 8, "n": 5}, set()),
    "max_completion_tokens beside max_tokens": (
        {"model": "fake/out-1m", "max_tokens": 1, "max_completion_tokens": 8}, set()),
    "reasoning.max_tokens": ({"model": "fake/out-1m", "max_tokens": 8,
                              "reasoning": {"max_tokens": 20}}, set()),
    "web plugin": ({"model": "fake/flat-half-c", "plugins": [{"id": "web"}]}, set()),
    "image input": ({"model": "fake/vision", "max_tokens": 8, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "what is it?"}, IMAGE]}]}, set()),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_racing_calls_with_a_field_that_raises_the_bill_never_pass_the_cap(
        make_harness, case):
    body, down = CASES[case]
    h = await make_harness({"WATTGATE_LIMITS__CHAT_PER_MINUTE": "1000"})
    app = await h.create_app()
    await h.connect(app, "ann", monthly_usd=float(CAP))
    h.fake.down |= down
    h.fake.chunk_delay = 0.01
    results = await asyncio.gather(*[post(h, app, "ann", {**body, "stream": i % 2 == 0})
                                     for i in range(RACERS)])
    statuses = [status for status, _ in results]
    assert set(statuses) <= {200, 402, 502}, results
    assert all(answer["error"]["code"] == "budget_exceeded"
               for status, answer in results if status == 402)
    total = await ledger_total(h, app)
    assert total <= usd_to_nanos(CAP), f"{case}: ${total / 1e9} spent on a ${CAP} cap"
    assert h.fake.charged <= CAP
    assert total == usd_to_nanos(h.fake.charged)
    assert await h.gw.store.open_holds() == 0


async def test_a_fallback_is_billed_and_reported_at_the_model_used(harness):
    app = await harness.create_app()
    await harness.connect(app, "bo", monthly_usd=5)
    harness.fake.down.add("fake/free:free")
    async with openai.AsyncOpenAI(base_url=harness.api, api_key=app.secret_key,
                                  default_headers={"x-wattfare-user": "bo"},
                                  max_retries=0) as oa:
        reply = await oa.chat.completions.create(
            model="fake/free:free", messages=[{"role": "user", "content": "hi"}],
            extra_body={"models": ["fake/flat-3c"]})
        stream = await oa.chat.completions.create(
            model="fake/free:free", messages=[{"role": "user", "content": "hi"}], stream=True,
            extra_body={"models": ["fake/flat-3c"]})
        assert {chunk.model async for chunk in stream} == {"fake/flat-3c"}
    assert reply.model == "fake/flat-3c"
    assert await ledger_total(harness, app) == usd_to_nanos(Decimal("0.06"))
    status = await harness.status(app, "bo")
    assert Decimal(str(status["usage"]["monthlyUsd"])) == Decimal("0.06")
    # The ledger (console, exports) names the model that billed, not the one asked for.
    rows = [r for c in await harness.gw.store.connections_for_app(app.app_id)
            for r in await harness.gw.store.recent_usage(c.connection_id)]
    assert [r.model for r in rows] == ["fake/flat-3c", "fake/flat-3c"]


async def test_a_dearer_provider_is_never_routed_to_and_the_listed_one_still_answers(harness):
    """provider.max_price carries the rates the hold assumed: OpenRouter skips the dearer
    provider the client put first and answers from the listed one, at the listed price."""
    app = await harness.create_app()
    await harness.connect(app, "cy", monthly_usd=5)
    status, answer = await post(harness, app, "cy", {"model": "fake/routed",
                                                     "provider": {"order": ["Dear"]}})
    assert status == 200 and answer["provider"] == "Fake"
    sent = harness.fake.calls[-1].body["provider"]
    assert sent["order"] == ["Dear"] and Decimal(sent["max_price"]["request"]) < Decimal("0.03")
    assert await ledger_total(harness, app) == usd_to_nanos(Decimal("0.005"))
    # Only the dearer provider is up: refused upstream, nothing charged, the hold released.
    harness.fake.down.add("fake/routed@Fake")
    status, answer = await post(harness, app, "cy", {"model": "fake/routed"})
    assert (status, answer["error"]["code"]) == (502, "upstream")
    assert harness.fake.charged == Decimal("0.005")
    assert await ledger_total(harness, app) == usd_to_nanos(Decimal("0.005"))
    assert await harness.gw.store.open_holds() == 0


@pytest.mark.parametrize("fields,named", [
    ({"frobnicate": True}, "frobnicate"),
    ({"plugins": [{"id": "file-parser"}]}, "plugins[0].id"),
    ({"plugins": [{"id": "web", "engine": "native"}]}, "plugins[0].engine"),
    ({"tools": [{"type": "openrouter:web_search"}]}, "tools[0].type"),
    ({"modalities": ["image", "text"]}, "modalities"),
    ({"service_tier": "priority"}, "service_tier"),
    ({"web_search_options": {"search_context_size": "high"}}, "web_search_options"),
    ({"messages": [{"role": "user", "content": [
        {"type": "file", "file": {"filename": "a.pdf", "file_data": "data:…"}}]}]},
     "messages[0].content[0].type"),
    ({"models": ["fake/flat-3c", "no/such-model"]}, "no known price"),
])
async def test_a_field_that_cannot_be_priced_is_refused_by_name(harness, fields, named):
    app = await harness.create_app()
    await harness.connect(app, "di", monthly_usd=5)
    status, answer = await post(harness, app, "di", {"model": "fake/flat-3c", **fields})
    assert (status, answer["error"]["code"]) == (400, "invalid_request")
    assert named in answer["error"]["message"]
    assert harness.fake.calls == [] and harness.fake.charged == 0
    assert await harness.gw.store.open_holds() == 0


async def test_fields_that_cannot_change_the_bill_reach_the_upstream_unchanged(harness):
    app = await harness.create_app()
    await harness.connect(app, "ed", monthly_usd=5)
    fields = {"temperature": 0.3, "seed": 7, "stop": ["\n\n"], "user": "ed-hash",
              "response_format": {"type": "json_object"}, "tool_choice": "auto",
              "tools": [{"type": "function", "function": {"name": "lookup",
                                                          "parameters": {"type": "object"}}}],
              "plugins": [{"id": "context-compression"}], "max_tokens": 16}
    status, _ = await post(harness, app, "ed", {"model": "openai/gpt-4o-mini", **fields})
    assert status == 200
    sent = harness.fake.calls[-1].body
    assert {k: sent[k] for k in fields} == fields
