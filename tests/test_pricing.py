"""Model prices and the worst-case estimate behind every hold (wattgate.estimate)."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest

from wattgate import estimate
from wattgate.errors import InvalidRequest
from wattgate.estimate import read_request, worst_cost_nanos
from wattgate.pricing import Price, PriceList


def price_list(**pricing):  # type: ignore[no-untyped-def]
    prices = PriceList(ttl=60)
    prices.load({"data": [{"id": "m", "pricing": pricing},
                          {"id": "router", "pricing": {"prompt": "-1", "completion": "-1"}},
                          {"id": "broken"}]}, now=0)
    return prices


def body(**fields):  # type: ignore[no-untyped-def]
    return json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                       **fields}).encode()


def req(**fields):  # type: ignore[no-untyped-def]
    return read_request(body(**fields), default_max_tokens=4096)


PRICE = Price(prompt=Decimal("0.000001"), completion=Decimal("0.000002"),
              request=Decimal("0.01"), image=Decimal("0.005"), web_search=Decimal("0.01"))


def test_estimate_bounds_prompt_by_body_bytes_and_output_by_max_tokens():
    # 1000 bytes × $1e-6 + 500 tokens × $2e-6 + $0.01 = $0.012
    assert worst_cost_nanos(req(max_tokens=500), PRICE, 1000) == 12_000_000


def test_without_a_limit_the_default_is_held_and_injected():
    r = req()
    assert (r.output_tokens, r.inject_max_tokens) == (4096, 4096)


def test_the_larger_of_max_tokens_and_max_completion_tokens_is_held():
    """Whichever limit the upstream honours, the hold covers it (it once took the smaller)."""
    for fields in ({"max_tokens": 10, "max_completion_tokens": 900},
                   {"max_tokens": 900, "max_completion_tokens": 10}):
        assert req(**fields).output_tokens == 900
    # Only max_completion_tokens: max_tokens is set to it too, for an upstream that
    # honours only max_tokens.
    assert req(max_completion_tokens=900).inject_max_tokens == 900
    assert req(max_tokens=900).inject_max_tokens is None


def test_n_choices_multiply_the_call():
    one = worst_cost_nanos(req(max_tokens=500), PRICE, 1000)
    assert worst_cost_nanos(req(max_tokens=500, n=3), PRICE, 1000) == 3 * one


def test_a_reasoning_budget_is_held_on_top_of_the_answer():
    r = req(max_tokens=500, reasoning={"max_tokens": 2000, "exclude": True})
    assert r.output_tokens == 2500
    with pytest.raises(InvalidRequest, match=r"reasoning\.budget"):
        req(reasoning={"budget": 5})


def test_images_are_held_at_a_token_bound_plus_their_price():
    content = [{"type": "text", "text": "what is this?"},
               {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]
    r = req(max_tokens=1, messages=[{"role": "user", "content": content}])
    assert r.images == 1
    usd = Decimal("0.000001") * (100 + estimate.IMAGE_TOKENS) + Decimal("0.000002") \
        + Decimal("0.005") + Decimal("0.01")
    assert worst_cost_nanos(r, PRICE, 100) == int(usd * 10**9)


@pytest.mark.parametrize("part", [{"type": "file", "file": {"file_data": "x"}},
                                  {"type": "input_audio", "input_audio": {"data": "x"}},
                                  {"type": "video_url", "video_url": {"url": "x"}}])
def test_inputs_billed_by_length_are_refused_naming_the_part(part):
    with pytest.raises(InvalidRequest, match=r"messages\[0\]\.content\[1\]\.type"):
        req(messages=[{"role": "user", "content": [{"type": "text", "text": "a"}, part]}])


def test_the_web_plugin_holds_its_results():
    r = req(max_tokens=1, plugins=[{"id": "web", "max_results": 3}])
    assert r.web_results == 3
    assert req(plugins=[{"id": "web"}]).web_results == estimate.WEB_DEFAULT_RESULTS
    assert req(plugins=[{"id": "web", "enabled": False}]).web_results == 0
    base = worst_cost_nanos(req(max_tokens=1), PRICE, 100)
    # Each result: the dearer of the model's web_search price and $0.004, plus its text.
    per_result = Decimal("0.01") + Decimal("0.000001") * estimate.WEB_RESULT_TOKENS
    assert worst_cost_nanos(r, PRICE, 100) == base + int(3 * per_result * 10**9)


@pytest.mark.parametrize("fields,named", [
    ({"plugins": [{"id": "file-parser"}]}, r"plugins\[0\]\.id"),
    ({"plugins": [{"id": "web", "engine": "native"}]}, r"plugins\[0\]\.engine"),
    ({"plugins": [{"id": "web", "max_uses": 9}]}, r"plugins\[0\]\.max_uses"),
    ({"plugins": [{"id": "web", "max_results": 500}]}, r"plugins\[0\]\.max_results"),
    ({"tools": [{"type": "openrouter:web_search"}]}, r"tools\[0\]\.type"),
    ({"modalities": ["text", "image"]}, "modalities"),
    ({"service_tier": "priority"}, "service_tier"),
    ({"provider": {"bogus": 1}}, r"provider\.bogus"),
    ({"models": "m"}, "models"),
    ({"web_search_options": {}}, "web_search_options"),
    ({"best_of": 4}, "best_of"),
])
def test_fields_that_cannot_be_priced_are_refused_by_name(fields, named):
    with pytest.raises(InvalidRequest, match=named):
        req(**fields)


def test_fields_that_cannot_change_the_bill_pass():
    r = req(temperature=0.2, top_p=0.9, seed=1, stop=["x"], response_format={"type": "json_object"},
            tools=[{"type": "function", "function": {"name": "f"}}], tool_choice="auto",
            user="u", metadata={"a": "b"}, plugins=[{"id": "context-compression"}],
            service_tier="flex", logprobs=True, top_logprobs=2)
    assert (r.images, r.web_results, r.choices) == (0, 0, 1)


def test_the_hold_takes_the_dearest_of_the_fallback_models():
    prices = PriceList(ttl=60)
    prices.load({"data": [
        {"id": "cheap:free", "pricing": {"prompt": "0", "completion": "0"}},
        {"id": "dear", "pricing": {"prompt": "0.000003", "completion": "0.000001",
                                   "request": "0.02"}},
        {"id": "mid", "pricing": {"prompt": "0.000001", "completion": "0.000015"}}]}, now=0)
    r = read_request(json.dumps({"model": "cheap:free", "models": ["dear", "mid"],
                                 "messages": []}).encode(), default_max_tokens=10)
    assert r.models == ("cheap:free", "dear", "mid")
    price = estimate.ceiling(prices, r.models)

    def pad(usd: str) -> Decimal:  # 0.01 % + $0.000001 per million above the listed rate
        return (Decimal(usd) * 1_000_000 * Decimal("1.0001") + Decimal("0.000001")) / 1_000_000

    assert (price.prompt, price.completion, price.request) == (
        pad("0.000003"), pad("0.000015"), pad("0.02"))
    with pytest.raises(InvalidRequest, match="no known price"):
        estimate.ceiling(prices, ("cheap:free", "unknown/model"))


def test_the_body_carries_max_price_at_the_rates_held_and_is_spliced_not_reserialised():
    prices = PriceList(ttl=60)
    prices.load({"data": [{"id": "m", "pricing": {"prompt": "0.00000015",
                                                  "completion": "0.0000006"}}]}, now=0)
    raw = b'{"model": "m", "stream": true, "max_tokens": 9,  "stream_options": ' \
          b'{"include_usage": true}, "messages": [{"role": "user", "content": "hi"}]}'
    plan = estimate.plan(read_request(raw, default_max_tokens=10), prices,
                         stream_upstream=True, send_max_price=True)
    assert plan.payload.endswith(raw[1:])  # the client's bytes, untouched
    sent = json.loads(plan.payload)
    assert sent["provider"] == {"max_price": {"prompt": "0.150016", "completion": "0.600061",
                                              "request": "0.000000000001",
                                              "image": "0.000000000001"}}
    assert plan.price.prompt * 1_000_000 == Decimal("0.150016")
    assert plan.worst_nanos == worst_cost_nanos(read_request(raw, default_max_tokens=10),
                                                plan.price, len(plan.payload))
    # The client's own routing is kept; its max_price only ever lowers ours.
    raw = body(provider={"order": ["x"], "max_price": {"prompt": 0.1, "completion": 99}})
    sent = json.loads(estimate.plan(read_request(raw, default_max_tokens=10), prices,
                                    stream_upstream=True, send_max_price=True).payload)
    assert sent["provider"]["order"] == ["x"]
    assert sent["provider"]["max_price"]["prompt"] == "0.1"
    assert sent["provider"]["max_price"]["completion"] == "0.600061"
    # An upstream that is not OpenRouter gets no max_price, so routing is refused.
    with pytest.raises(InvalidRequest, match="provider"):
        read_request(raw, default_max_tokens=10, max_price=False)


def test_cache_writes_and_long_context_overrides_raise_the_ceiling():
    p = price_list(prompt="0.000003", completion="0.000015", input_cache_write="0.00000375",
                   overrides=[{"min_prompt_tokens": 200000, "prompt": "0.000006",
                               "completion": "0.0000225"}]).get("m")
    assert (p.prompt, p.completion) == (Decimal("0.000006"), Decimal("0.0000225"))


def test_reasoning_priced_apart_raises_the_output_bound():
    p = price_list(prompt="0", completion="0.000001", internal_reasoning="0.000004").get("m")
    assert p.completion == Decimal("0.000004")


def test_estimate_rounds_up_to_the_nano_dollar():
    p = Price(Decimal("0.0000000001"), Decimal(0), Decimal(0))
    assert worst_cost_nanos(req(max_tokens=1), p, 1) == 1


def test_unpriced_or_variable_models_are_refused():
    prices = price_list(prompt="0", completion="0")
    for model in ("router", "broken", "unknown/model"):
        with pytest.raises(InvalidRequest, match="no known price"):
            prices.get(model)


def test_stale_after_ttl():
    prices = price_list(prompt="0", completion="0")
    assert not prices.stale(59) and prices.stale(60)
    assert prices.get("m").request == Decimal(0)


def test_a_price_out_of_all_range_is_a_clear_upstream_error_not_an_overflow():
    """A model list pricing a token at 1e999999 USD (or 1e12) cannot be metered: the
    call is refused with 502 upstream, never a traceback or an int64 overflow."""
    import pytest

    from wattgate.errors import UpstreamError
    from wattgate.money import usd_to_nanos

    for absurd in ("1e999999", "1e12"):
        prices = PriceList(ttl=60)
        prices.load({"data": [{"id": "m/x", "pricing": {"prompt": absurd,
                                                        "completion": "0"}}]}, now=0)
        with pytest.raises(UpstreamError):
            prices.get("m/x").worst_cost_nanos(1000, 10)
    for amount in ("1e999999", "-1e999999", "1e20", "1000000000.000000001"):
        with pytest.raises(ValueError):
            usd_to_nanos(amount)
    assert usd_to_nanos("1000000000") == 10**18 < 2**63


def test_every_field_the_gateway_reads_or_passes_is_in_the_documented_table():
    from pathlib import Path

    doc = (Path(__file__).resolve().parent.parent / "docs" / "request-fields.md").read_text()
    fields = set()
    for endpoint in estimate.ENDPOINTS.values():
        fields |= endpoint.passes | endpoint.priced
    missing = [f for f in sorted(fields) if f"`{f}`" not in doc]
    assert missing == []


def responses(**fields):  # type: ignore[no-untyped-def]
    raw = json.dumps({"model": "m", "input": "hi", **fields}).encode()
    return read_request(raw, default_max_tokens=4096, endpoint=estimate.RESPONSES)


def test_a_responses_call_holds_max_output_tokens_reasoning_and_images():
    # 1000 bytes × $1e-6 + (300 + 200 reasoning) × $2e-6 + $0.01 = $0.012
    assert worst_cost_nanos(responses(max_output_tokens=300, reasoning={"max_tokens": 200}),
                            PRICE, 1000) == 12_000_000
    image = {"role": "user", "content": [{"type": "input_text", "text": "what is it?"},
                                         {"type": "input_image", "image_url": "https://x"}]}
    r = responses(input=[image, image], max_output_tokens=1)
    assert r.images == 2
    # Each image: 50,000 prompt tokens + the image price.
    assert worst_cost_nanos(r, PRICE, 0) == worst_cost_nanos(
        responses(max_output_tokens=1), PRICE, 0) + 2 * (50_000_000 + 5_000_000)


def test_a_responses_body_gets_the_output_limit_the_hold_priced():
    prices = price_list(prompt="0.000001", completion="0.000002")
    sent = json.loads(estimate.plan(responses(), prices, stream_upstream=True,
                                    send_max_price=True).payload)
    assert sent["max_output_tokens"] == 4096 and sent["stream"] is True
    assert "max_tokens" not in sent and "stream_options" not in sent
    assert sent["provider"]["max_price"]["completion"]
    kept = json.loads(estimate.plan(responses(max_output_tokens=7), prices,
                                    stream_upstream=False, send_max_price=True).payload)
    assert kept["max_output_tokens"] == 7 and "stream" not in kept


@pytest.mark.parametrize("fields, field", [
    ({"previous_response_id": "resp_1"}, "previous_response_id"),
    ({"conversation": "conv_1"}, "conversation"),
    ({"prompt": {"id": "pmpt_1"}}, "prompt"),
    ({"tools": [{"type": "web_search_preview"}]}, "tools[0].type"),
    ({"input": [{"role": "user", "content": [{"type": "input_audio"}]}]},
     "input[0].content[0].type"),
    ({"input": 3}, "input"),
    ({"max_tokens": 5}, "max_tokens"),  # chat's name is not the Responses API's
])
def test_a_responses_field_that_can_raise_the_bill_is_refused_by_name(fields, field):
    with pytest.raises(InvalidRequest) as refused:
        responses(**fields)
    assert refused.value.message.startswith(field)


def test_an_embeddings_call_holds_its_input_and_no_output():
    raw = json.dumps({"model": "m", "input": ["a", "b"], "dimensions": 4}).encode()
    r = read_request(raw, default_max_tokens=4096, endpoint=estimate.EMBEDDINGS)
    assert r.output_tokens == 0 and not r.stream
    prices = price_list(prompt="0.000001", completion="0.000002", request="0.01")
    plan = estimate.plan(r, prices, stream_upstream=True, send_max_price=True)
    sent = json.loads(plan.payload)
    assert "max_tokens" not in sent and "stream" not in sent
    # Padded rates: prompt × the body's bytes + the request price, nothing for output.
    assert plan.worst_nanos == worst_cost_nanos(r, plan.price, len(plan.payload))
    assert plan.worst_nanos < 10_100_000 + len(plan.payload) * 1_001
    for bad, field in (({"input": [{"image": "x"}]}, "input[0]"), ({"input": None}, "input"),
                       ({"input": "x", "stream": True}, "stream")):
        with pytest.raises(InvalidRequest) as refused:
            read_request(json.dumps({"model": "m", **bad}).encode(), default_max_tokens=1,
                         endpoint=estimate.EMBEDDINGS)
        assert refused.value.message.startswith(field)


@pytest.mark.parametrize("fields", [
    {"service_tier": [1]}, {"plugins": [{"id": {"a": 1}}]}, {"tools": [{"type": [1]}]},
    {"messages": [{"role": "user", "content": [{"type": ["image_url"]}]}]},
    {"provider": {"max_price": {"prompt": "-1e999999999"}}},
    {"provider": {"max_price": {"completion": "NaN"}}},
])
def test_odd_values_are_a_400_never_a_crash(fields):
    prices = price_list(prompt="0.000001", completion="0.000002")
    with pytest.raises(InvalidRequest):
        estimate.plan(req(**fields), prices, stream_upstream=True, send_max_price=True)


def test_a_tiny_max_price_of_the_clients_is_kept_in_bounded_digits():
    prices = price_list(prompt="0.000001", completion="0.000002")
    plan = estimate.plan(req(provider={"max_price": {"prompt": "1e-99999999"}}), prices,
                         stream_upstream=True, send_max_price=True)
    assert json.loads(plan.payload)["provider"]["max_price"]["prompt"] == "0"


def test_a_web_plugin_naming_no_engine_is_sent_with_the_engine_the_hold_priced():
    prices = price_list(prompt="0.000001", completion="0.000002")
    plugins = [{"id": "web", "max_results": 2}, {"id": "web", "enabled": False},
               {"id": "context-compression"}]
    sent = json.loads(estimate.plan(req(plugins=plugins), prices, stream_upstream=True,
                                    send_max_price=True).payload)["plugins"]
    assert sent == [{"id": "web", "max_results": 2, "engine": "exa"},
                    {"id": "web", "enabled": False}, {"id": "context-compression"}]
    named = [{"id": "web", "engine": "exa"}]
    assert json.loads(estimate.plan(req(plugins=named), prices, stream_upstream=True,
                                    send_max_price=True).payload)["plugins"] == named
