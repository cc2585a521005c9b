"""What a metered request can cost at most, and the body that keeps it so.

One rule for the three metered endpoints (``ENDPOINTS``): chat completions,
the Responses API (``input``, ``max_output_tokens``) and embeddings (no
output at all). Each has its own table of fields; the classes, the worst case
and the body sent follow the same rule.

The budget hold is this module's worst case, so every field of a request body
that can raise the bill is either priced into it or refused with ``400
invalid_request`` naming the field; fields that cannot change the bill pass
through untouched. The table, field by field and why: docs/request-fields.md.
Top-level fields not in that table are refused (an allow-list): OpenRouter
keeps adding billable fields (plugins, server tools, service tiers), and a
field we have not read must fail loudly, not spend silently.

For a body of B bytes as sent (a token is never less than a byte of text),
with every rate the dearest of the models the call may be billed at
(``model`` and its ``models`` fallbacks, ``pricing.Price.max``):

    n × ( prompt × (B + IMAGE_TOKENS × images)
        + completion × (max(max_tokens, max_completion_tokens) + reasoning.max_tokens)
        + completion × B                 when a ``prediction`` is given
        + image × images + request )
    + web results × (web_search price + prompt × WEB_RESULT_TOKENS)

With ``send_max_price`` the body also carries OpenRouter's
``provider.max_price`` set to those rates, so no provider routing (fallback
providers, ``provider.order``, ``sort``) can bill a dearer endpoint: OpenRouter
refuses the call instead. The body is re-serialised only when the gateway
must merge into what the client sent; otherwise its changes are spliced in.
Nothing here imports aiohttp.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from typing import Any

from .errors import InvalidRequest
from .money import usd_to_nanos
from .pricing import Price, PriceList

# No model answers more; past it a worst-case hold would overflow the ledger's int64.
MAX_TOKENS = 10_000_000
MAX_CHOICES = 128
MAX_FALLBACKS = 8
# An input image is billed in tokens that do not follow its bytes (a URL is a few
# dozen bytes). The dearest tokenizer we know, OpenAI's for gpt-4o-mini, counts
# at most 48,169 tokens for one high-detail image; each image holds this many.
IMAGE_TOKENS = 50_000
# The web plugin: $4 per 1000 results (OpenRouter's price when the model lists no
# web_search price), max_results 5 by default; each result's text is added to
# the prompt, held at this many tokens.
WEB_RESULT_USD = Decimal("0.004")
WEB_DEFAULT_RESULTS = 5
WEB_MAX_RESULTS = 10
WEB_RESULT_TOKENS = 2_000
# provider.max_price sits a hair above the listed rate (0.01 % + $0.000001 per
# million), so a provider billing exactly that rate, a free one included, is never
# filtered out by a rounding or a strict comparison; the hold uses the padded rates.
_PAD = Decimal("1.0001")
_MILLION = Decimal(1_000_000)
_MICRO = Decimal("0.000001")
_PICO = Decimal("0.000000000001")

# Fields that cannot raise the bill once the output tokens and the prices are
# bounded: they pass through untouched.
PASS_THROUGH = frozenset((
    "messages", "model", "stream", "stream_options", "temperature", "top_p", "top_k",
    "top_a", "min_p", "frequency_penalty", "presence_penalty", "repetition_penalty",
    "seed", "stop", "logit_bias", "logprobs", "top_logprobs", "response_format",
    "structured_outputs", "tool_choice", "parallel_tool_calls", "functions",
    "function_call", "user", "safety_identifier", "metadata", "store", "session_id", "trace",
    "usage", "transforms",
    "route", "include_reasoning", "reasoning_effort", "verbosity", "prompt_cache_key",
    "cache_control",
))
# Fields this module prices (read below).
PRICED = frozenset(("models", "n", "max_tokens", "max_completion_tokens", "reasoning",
                    "plugins", "provider", "prediction", "tools", "service_tier",
                    "modalities"))
# The Responses API (POST /responses): the same rule with its own names. Its output
# limit is ``max_output_tokens``; ``previous_response_id``, ``conversation`` and
# ``prompt`` pull in text the body does not show, ``background`` outlives the call:
# unknown, so refused.
RESPONSES_PASS_THROUGH = frozenset((
    "input", "instructions", "model", "stream", "temperature", "top_p", "top_k",
    "frequency_penalty", "presence_penalty", "repetition_penalty", "seed", "text",
    "tool_choice", "parallel_tool_calls", "max_tool_calls", "user", "safety_identifier",
    "metadata", "store", "session_id", "trace", "truncation", "include",
    "prompt_cache_key", "top_logprobs", "transforms", "usage",
))
RESPONSES_PRICED = frozenset(("models", "max_output_tokens", "reasoning", "plugins",
                              "provider", "tools", "service_tier"))
# Embeddings (POST /embeddings): billed on the input alone.
EMBEDDINGS_PASS_THROUGH = frozenset(("model", "input", "encoding_format", "dimensions",
                                     "user", "input_type"))
EMBEDDINGS_PRICED = frozenset(("provider",))
_REASONING_KEYS = frozenset(("effort", "max_tokens", "exclude", "enabled", "summary"))
_PROVIDER_KEYS = frozenset((
    "order", "only", "ignore", "allow_fallbacks", "data_collection", "zdr",
    "require_parameters", "quantizations", "sort", "preferred_max_latency",
    "preferred_min_throughput", "enforce_distillable_text", "max_price"))
_MAX_PRICE_KEYS = ("prompt", "completion", "request", "image")
_WEB_KEYS = frozenset(("id", "enabled", "max_results", "search_prompt", "engine",
                       "include_domains", "exclude_domains"))
_FREE_PLUGINS = frozenset(("context-compression", "middle-out"))
_TEXT_PARTS = frozenset(("text", "refusal"))
_RESPONSES_TEXT_PARTS = frozenset(("input_text", "output_text", "refusal",
                                   "summary_text", "reasoning_text"))
_CHEAP_TIERS = frozenset(("auto", "default", "flex"))


@dataclass(frozen=True)
class Endpoint:
    """A metered endpoint: its upstream path and its table of fields."""

    name: str                 # "chat", "responses", "embeddings"
    path: str                 # upstream path, under the base URL
    passes: frozenset[str]
    priced: frozenset[str]
    output_limit: str | None  # the field injected when absent (None: no output)
    streams: bool             # a stream is possible (and whole answers may be streamed)


CHAT = Endpoint("chat", "/chat/completions", PASS_THROUGH, PRICED, "max_tokens", True)
RESPONSES = Endpoint("responses", "/responses", RESPONSES_PASS_THROUGH, RESPONSES_PRICED,
                     "max_output_tokens", True)
EMBEDDINGS = Endpoint("embeddings", "/embeddings", EMBEDDINGS_PASS_THROUGH,
                      EMBEDDINGS_PRICED, None, False)
ENDPOINTS = {e.name: e for e in (CHAT, RESPONSES, EMBEDDINGS)}


@dataclass(frozen=True)
class ChatRequest:
    """A parsed body and every quantity its worst case depends on."""

    body: dict[str, Any]
    raw: bytes
    model: str
    models: tuple[str, ...]  # every model the call may be billed at, primary first
    stream: bool
    output_tokens: int       # per choice: visible answer bound + reasoning budget
    choices: int
    images: int
    web_results: int
    prediction: bool
    inject_max_tokens: int | None  # set the output limit to this (the request set none)
    endpoint: Endpoint = CHAT


@dataclass(frozen=True)
class Plan:
    payload: bytes   # what to send upstream
    price: Price     # the rates the hold assumed (padded, the dearest of the models)
    worst_nanos: int


def _refuse(field: str, why: str) -> InvalidRequest:
    return InvalidRequest(f"{field[:80]}: {why}")  # a name, never a whole value


def _count(body: dict[str, Any], name: str, field: str, *, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise _refuse(field, f"must be a whole number of at least {low}.")
    if value > high:
        raise _refuse(field, f"must be at most {high}.")
    return value


def read_request(raw: bytes, *, default_max_tokens: int, max_price: bool = True,
                 endpoint: Endpoint = CHAT) -> ChatRequest:
    """Parse a body and apply the endpoint's field table; raises InvalidRequest naming
    the field.

    ``max_price``: the body will carry ``provider.max_price`` (an OpenRouter
    upstream); without it, ``provider`` preferences cannot be bounded and are refused.
    """
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        raise InvalidRequest("The body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise InvalidRequest("The body must be a JSON object.")
    for name in body:
        if name not in endpoint.passes and name not in endpoint.priced:
            raise _refuse(name, "this field is not one the gateway can price, so it is "
                                "refused (see docs/request-fields.md).")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("model must be a model id string, e.g. \"openai/gpt-4o-mini\".")
    if endpoint is RESPONSES:
        return _read_responses(body, raw, model, default_max_tokens, max_price)
    if endpoint is EMBEDDINGS:
        return _read_embeddings(body, raw, model, max_price)
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise InvalidRequest("messages must be a list of chat messages.")
    stream = _stream_flag(body)
    models = _models(body, model)
    limits = [v for v in (_count(body, n, n, low=1, high=MAX_TOKENS)
                          for n in ("max_tokens", "max_completion_tokens")) if v is not None]
    # Whichever limit the upstream honours, the answer stays within the larger.
    output = max(limits) if limits else default_max_tokens
    inject = None if "max_tokens" in body and body["max_tokens"] is not None else output
    output += _reasoning_budget(body.get("reasoning"))
    choices = _count(body, "n", "n", low=1, high=MAX_CHOICES) or 1
    _check_tools(body.get("tools"))
    _check_output(body)
    _check_provider(body, max_price)
    return ChatRequest(body, raw, model, models, stream, output, choices, _images(messages),
                       _web_results(body.get("plugins")),
                       body.get("prediction") is not None, inject)


def _stream_flag(body: dict[str, Any]) -> bool:
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise InvalidRequest("stream must be true or false.")
    return stream


def _read_responses(body: dict[str, Any], raw: bytes, model: str, default_max_tokens: int,
                    max_price: bool) -> ChatRequest:
    """A Responses API body: ``input`` (a string or a list of items), ``max_output_tokens``."""
    items = body.get("input")
    if isinstance(items, str):
        items = []
    elif not isinstance(items, list):
        raise InvalidRequest("input must be a string or a list of input items.")
    stream = _stream_flag(body)
    models = _models(body, model)
    limit = _count(body, "max_output_tokens", "max_output_tokens", low=1, high=MAX_TOKENS)
    output = limit if limit is not None else default_max_tokens
    inject = None if limit is not None else output
    output += _reasoning_budget(body.get("reasoning"))
    _check_tools(body.get("tools"))
    _check_output(body)
    _check_provider(body, max_price)
    images = _images(items, field="input", text_parts=_RESPONSES_TEXT_PARTS,
                     image_part="input_image")
    return ChatRequest(body, raw, model, models, stream, output, 1, images,
                       _web_results(body.get("plugins")), False, inject, RESPONSES)


def _read_embeddings(body: dict[str, Any], raw: bytes, model: str,
                     max_price: bool) -> ChatRequest:
    """An embeddings body: text (or token ids) in, vectors out; no output tokens."""
    data = body.get("input")
    texts = data if isinstance(data, list) else [data]
    for i, text in enumerate(texts):
        tokens = text if isinstance(text, list) else [text]
        if isinstance(text, str) or all(isinstance(t, int) and not isinstance(t, bool)
                                        for t in tokens):
            continue
        # Images and other media embed at a price nothing in the body bounds.
        raise _refuse(f"input[{i}]" if isinstance(data, list) else "input",
                      "must be text or token ids; other inputs cannot be priced before "
                      "the call.")
    _check_provider(body, max_price)
    return ChatRequest(body, raw, model, (model,), False, 0, 1, 0, 0, False, None, EMBEDDINGS)


def _models(body: dict[str, Any], model: str) -> tuple[str, ...]:
    fallbacks = body.get("models")
    if fallbacks is None:
        return (model,)
    if not isinstance(fallbacks, list) or not all(isinstance(m, str) and m for m in fallbacks):
        raise _refuse("models", "must be a list of model id strings.")
    if len(fallbacks) > MAX_FALLBACKS:
        raise _refuse("models", f"at most {MAX_FALLBACKS} fallback models.")
    return tuple(dict.fromkeys([model, *fallbacks]))


def _reasoning_budget(reasoning: Any) -> int:
    if reasoning is None:
        return 0
    if not isinstance(reasoning, dict):
        raise _refuse("reasoning", "must be an object.")
    for key in reasoning:
        if key not in _REASONING_KEYS:
            raise _refuse(f"reasoning.{key}", "not a reasoning setting the gateway can price.")
    # A budget may come on top of the answer's own limit: it is held on top of it.
    return _count(reasoning, "max_tokens", "reasoning.max_tokens", low=0, high=MAX_TOKENS) or 0


def _check_tools(tools: Any) -> None:
    if tools is None:
        return
    if not isinstance(tools, list):
        raise _refuse("tools", "must be a list.")
    for i, tool in enumerate(tools):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind != "function":
            # Server tools (openrouter:web_search, image generation, …) bill on their own.
            raise _refuse(f"tools[{i}].type", f"{str(kind)[:40]!r} tools run and bill "
                                              "upstream; only \"function\" tools can be "
                                              "metered.")


def _check_output(body: dict[str, Any]) -> None:
    modalities = body.get("modalities")
    if modalities is not None and (not isinstance(modalities, list)
                                   or any(m != "text" for m in modalities)):
        raise _refuse("modalities", "only text output can be metered (images and audio are "
                                    "billed per output, beyond max_tokens).")
    tier = body.get("service_tier")
    if tier is not None and not (isinstance(tier, str) and tier in _CHEAP_TIERS):
        raise _refuse("service_tier", f"{str(tier)[:40]!r} bills above the listed price; use "
                                      "\"auto\", \"default\" or \"flex\".")
    prediction = body.get("prediction")
    if prediction is not None and not isinstance(prediction, dict):
        raise _refuse("prediction", "must be an object.")


def _check_provider(body: dict[str, Any], bounded: bool) -> None:
    provider = body.get("provider")
    if provider is None:
        return
    if not bounded:
        raise _refuse("provider", "routing preferences cannot be bounded by this upstream.")
    if not isinstance(provider, dict):
        raise _refuse("provider", "must be an object.")
    for key in provider:
        if key not in _PROVIDER_KEYS:
            raise _refuse(f"provider.{key}", "not a routing preference the gateway can bound.")
    max_price = provider.get("max_price")
    if max_price is not None and not isinstance(max_price, dict):
        raise _refuse("provider.max_price", "must be an object.")


def _images(messages: list[Any], *, field: str = "messages",
            text_parts: frozenset[str] = _TEXT_PARTS, image_part: str = "image_url") -> int:
    images = 0
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            continue
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if not isinstance(kind, str):
                kind = None  # compared with sets below: only strings are hashable here
            if kind == image_part:
                images += 1
            elif kind not in text_parts:
                # Files, audio and video are billed by length (pages, seconds) that
                # nothing in the request bounds.
                raise _refuse(f"{field}[{i}].content[{j}].type",
                              f"{str(kind)[:40]!r} inputs cannot be priced before the call; send "
                              f"text or {image_part} parts.")
    return images


def _web_results(plugins: Any) -> int:
    if plugins is None:
        return 0
    if not isinstance(plugins, list):
        raise _refuse("plugins", "must be a list.")
    results = 0
    for i, plugin in enumerate(plugins):
        pid = plugin.get("id") if isinstance(plugin, dict) else None
        if isinstance(pid, str) and pid in _FREE_PLUGINS:
            continue
        if pid != "web":
            raise _refuse(f"plugins[{i}].id", f"the {str(pid)[:40]!r} plugin bills on its "
                                              "own; only \"web\" and \"context-compression\" "
                                              "are priced.")
        assert isinstance(plugin, dict)
        for key in plugin:
            if key not in _WEB_KEYS:
                raise _refuse(f"plugins[{i}].{key}", "not a web search setting the gateway "
                                                     "can price.")
        if plugin.get("engine") not in (None, "exa"):
            raise _refuse(f"plugins[{i}].engine", "only the \"exa\" engine has a known "
                                                  "price per result.")
        if plugin.get("enabled") is False:
            continue
        count = _count(plugin, "max_results", f"plugins[{i}].max_results", low=1,
                       high=WEB_MAX_RESULTS)
        results += WEB_DEFAULT_RESULTS if count is None else count
    return results


def ceiling(prices: PriceList, models: tuple[str, ...]) -> Price:
    """The dearest rates of every model the call may be billed at, padded for max_price."""
    price = prices.get(models[0])
    for model in models[1:]:
        price = price.max(prices.get(model))
    return Price(*(_padded(getattr(price, f)) for f in
                   ("prompt", "completion", "request", "image", "web_search")))


def _padded(usd: Decimal) -> Decimal:
    per_million = (usd * _MILLION * _PAD + _MICRO).quantize(_MICRO, rounding=ROUND_CEILING)
    return per_million / _MILLION


def worst_cost_nanos(req: ChatRequest, price: Price, body_bytes: int) -> int:
    prompt_tokens = body_bytes + IMAGE_TOKENS * req.images
    output_tokens = req.output_tokens + (body_bytes if req.prediction else 0)
    per_choice = (price.prompt * prompt_tokens + price.completion * output_tokens
                  + price.image * req.images + price.request)
    web = req.web_results * (max(price.web_search, WEB_RESULT_USD)
                             + price.prompt * WEB_RESULT_TOKENS)
    return usd_to_nanos(per_choice * req.choices + web, round_up=True)


def plan(req: ChatRequest, prices: PriceList, *, stream_upstream: bool,
         send_max_price: bool) -> Plan:
    """The body to send and the hold it needs.

    ``stream_upstream``: a non-streamed call is sent upstream as a stream
    (``upstream.stream_whole_answers``), its answer assembled for the client.
    """
    price = ceiling(prices, req.models)
    changes: dict[str, Any] = {}
    body = req.body
    endpoint = req.endpoint
    if req.inject_max_tokens is not None and endpoint.output_limit is not None:
        changes[endpoint.output_limit] = req.inject_max_tokens
    stream_upstream = stream_upstream and endpoint.streams
    if not req.stream and stream_upstream:
        changes["stream"] = True
    # The Responses stream carries its usage in response.completed, unasked.
    if endpoint is CHAT and (req.stream or stream_upstream):
        # The usage event is how the call is billed: ask for it even when the client
        # declined it (OpenRouter sends it regardless; other upstreams need asking).
        options = body.get("stream_options")
        if not isinstance(options, dict) or options.get("include_usage") is not True:
            changes["stream_options"] = {**(options if isinstance(options, dict) else {}),
                                         "include_usage": True}
    if send_max_price:
        changes["provider"] = _with_max_price(body.get("provider"), price)
    pinned = _pin_web_engine(body.get("plugins"))
    if pinned is not None:
        changes["plugins"] = pinned
    payload = _apply(req.raw, body, changes)
    return Plan(payload, price, worst_cost_nanos(req, price, len(payload)))


def _pin_web_engine(plugins: Any) -> list[Any] | None:
    """The plugins with ``engine: "exa"`` on each enabled web plugin that names none.

    The hold prices web search at Exa's price per result; with no engine OpenRouter
    picks native search for some providers' models, billed by context size instead.
    None when nothing needs pinning (read_request has already checked the list).
    """
    def unpinned(p: Any) -> bool:
        return isinstance(p, dict) and p.get("id") == "web" and p.get("enabled") is not False \
            and p.get("engine") is None

    if not isinstance(plugins, list) or not any(unpinned(p) for p in plugins):
        return None
    return [{**p, "engine": "exa"} if unpinned(p) else p for p in plugins]


def _with_max_price(provider: Any, price: Price) -> dict[str, Any]:
    """The client's routing preferences, with max_price no dearer than the hold's rates."""
    ours = {"prompt": price.prompt * _MILLION, "completion": price.completion * _MILLION,
            "request": price.request, "image": price.image}
    theirs = (provider or {}).get("max_price") or {}
    max_price = {}
    for key in _MAX_PRICE_KEYS:
        cap = ours[key]
        if theirs.get(key) is not None:
            try:
                value = Decimal(str(theirs[key]))
                if not value.is_finite() or value < 0:
                    raise ArithmeticError
            except ArithmeticError:
                raise _refuse(f"provider.max_price.{key}", "must be a number of USD, "
                                                           "at least 0.") from None
            if value < cap:  # theirs is lower: kept, to a bounded number of digits
                cap = value.quantize(_PICO, rounding=ROUND_FLOOR)
        max_price[key] = format(cap.normalize(), "f")
    return {**(provider or {}), "max_price": max_price}


def _apply(raw: bytes, body: dict[str, Any], changes: dict[str, Any]) -> bytes:
    """``raw`` with ``changes`` applied; re-serialised only to replace a field it has."""
    if not changes:
        return raw
    start = raw.lstrip()
    if any(name in body for name in changes) or not start.startswith(b"{"):
        body.update(changes)
        return json.dumps(body).encode()
    # New fields only: spliced in front of the client's (a non-empty object, it has
    # model and messages), so the body's bytes are not serialised again.
    head = json.dumps(changes)[1:-1].encode()
    return b"{" + head + b"," + start[1:]
