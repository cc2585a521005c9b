"""A fake OpenRouter on loopback, for tests, the benchmark and ``wattgate demo``.

It speaks OpenRouter's wire format as documented in upstream-notes.md: SSE
with ``: OPENROUTER PROCESSING`` keep-alive comments before data, one chunk
per piece of text, a finish chunk, a final usage event with ``choices: []``
and ``usage.cost``, then ``data: [DONE]``; ``X-Generation-Id`` before any body
byte; errors before streaming as JSON with 4xx/5xx, errors after streaming
started inside the 200 stream; ``GET /models``, ``GET /key``,
``GET /generation`` and the OAuth PKCE endpoints. ``POST /responses`` (the
Responses API, beta) answers a ``response`` object, or streams
``response.created``, ``response.in_progress``, ``response.output_item.added``,
``response.content_part.added``, ``response.output_text.delta`` …, the
``….done`` events and ``response.completed`` carrying the final response with
its usage (``input_tokens``, ``output_tokens``, ``cost``); a midstream failure
is ``response.failed``. ``POST /embeddings`` answers ``{"object": "list",
"data": [{"embedding": …}], "usage": {prompt_tokens, total_tokens, cost}}``
(base64 vectors when asked, as the ``openai`` SDK does by default). Every
metered answer names its generation in ``X-Generation-Id`` and in its ``id``,
and ``GET /generation`` knows it. Keys may carry a credit
``limit`` (USD) that resets ``daily``/``weekly``/``monthly`` or never, as
OpenRouter's keys do: ``GET /key`` reports it, and a call with a key whose
usage has reached its limit is refused with 403 "Key limit exceeded". The
``/auth`` page takes ``limit``, ``usage_limit_type`` and ``key_label``, the
fields of OpenRouter's ``POST /auth/keys/code`` (which its own auth page calls
for the signed-in user), and the key the code is exchanged for carries them. A ``response_format`` (JSON
mode, structured outputs) is answered with a JSON document, a JSON schema with
an instance of it.

Behaviour is chosen by the model id (``fake/…`` models below) so one fake
serves mixed traffic. Knobs on ``FakeOpenRouter`` reproduce the rest of the real
wire (all off by default): bring-your-own-key billing, hostile usage and
``/generation`` answers, compression as a CDN does it, SSE cut at any byte,
CRLF or lone CR line endings, comments between events, keep-alive
connections dropped after each answer, and ``Retry-After`` on a 429.

Every charge is added to ``charged`` (exact Decimal): tests compare it with
wattgate's ledger. Like many real providers, a stream
the client abandons is billed in full.

It bills the request fields OpenRouter bills, the way OpenRouter does: the
``models`` fallbacks are tried in order when a model is down (``down`` names
models, or ``model@Provider`` endpoints) and the call is billed at the model
and provider actually used, named in the answer's ``model`` and
``provider``; a model may be served by several providers at different prices
(``FakeModel.providers``; ``GET /models`` lists the first), chosen by
``provider.order`` / ``only`` / ``ignore`` and filtered by
``provider.max_price`` (nothing left: 404, nothing billed); ``n`` choices are
each billed; the ``web`` plugin bills ``max_results`` results (default 5) at
$0.004 plus their text as prompt tokens; every ``image_url`` part bills
``IMAGE_TOKENS`` prompt tokens plus the image price; ``reasoning.max_tokens``
is spent in full on top of the answer; the answer's length follows
``max_completion_tokens`` when given, else ``max_tokens``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import secrets
import struct
import time
import zlib
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from aiohttp import web

from . import fakemodel



IMAGE_TOKENS = 1_000        # prompt tokens billed per input image
WEB_RESULT_USD = Decimal("0.004")
WEB_RESULT_TOKENS = 300     # prompt tokens each web result adds


@dataclass(frozen=True)
class FakeProvider:
    name: str
    prompt: Decimal
    completion: Decimal
    request: Decimal = Decimal("0")
    image: Decimal = Decimal("0")


@dataclass(frozen=True)
class FakeModel:
    prompt: Decimal = Decimal("0.00000015")
    completion: Decimal = Decimal("0.0000006")
    request: Decimal = Decimal("0")
    behaviour: str = "ok"  # ok | cut | midstream_error | fail_500 | fail_429 | no_usage
    delay: float | None = None  # seconds between chunks for this model (else chunk_delay)
    image: Decimal = Decimal("0")  # per input image
    # Further endpoints serving this model, dearer or cheaper (the listed price is ours).
    others: tuple[FakeProvider, ...] = ()

    def providers(self) -> tuple[FakeProvider, ...]:
        return (FakeProvider("Fake", self.prompt, self.completion, self.request, self.image),
                *self.others)


MODELS: dict[str, FakeModel] = {
    "openai/gpt-4o-mini": FakeModel(),
    "anthropic/claude-sonnet-4": FakeModel(Decimal("0.000003"), Decimal("0.000015")),
    "fake/flat-3c": FakeModel(Decimal("0"), Decimal("0"), Decimal("0.03")),
    "fake/flat-2c": FakeModel(Decimal("0"), Decimal("0"), Decimal("0.02")),
    "fake/cut": FakeModel(behaviour="cut"),
    "fake/midstream-error": FakeModel(behaviour="midstream_error"),
    "fake/fail-500": FakeModel(behaviour="fail_500"),
    "fake/fail-429": FakeModel(behaviour="fail_429"),
    "fake/no-usage": FakeModel(behaviour="no_usage"),
    # For the request fields that change the bill (tests/test_request_fields_functional.py).
    "fake/flat-half-c": FakeModel(Decimal("0"), Decimal("0"), Decimal("0.005")),
    "fake/free:free": FakeModel(Decimal("0"), Decimal("0"), Decimal("0")),
    "fake/out-1m": FakeModel(Decimal("0"), Decimal("0.001"), Decimal("0")),
    "fake/vision": FakeModel(Decimal("0.000001"), Decimal("0"), Decimal("0"),
                             image=Decimal("0.01")),
    "openai/text-embedding-3-small": FakeModel(Decimal("0.00000002"), Decimal("0")),
    "fake/embed-flat-1c": FakeModel(Decimal("0"), Decimal("0"), Decimal("0.01")),
    "fake/routed": FakeModel(Decimal("0"), Decimal("0"), Decimal("0.005"), others=(
        FakeProvider("Dear", Decimal("0"), Decimal("0"), Decimal("0.03")),)),
}


@dataclass
class Call:
    generation_id: str
    model: str
    authorization: str
    headers: dict[str, str]
    body: dict[str, Any]
    cost: Decimal = Decimal(0)        # all the user paid: for BYOK, the fee + the provider's
    byok_fee: Decimal | None = None   # BYOK: OpenRouter's fee (``usage.cost``); else None
    finished: bool = False
    answered_at: float | None = None  # time.monotonic() when the response headers left


@dataclass
class FakeKey:
    """A key's own spending limit, as OpenRouter keeps it (``GET /key``)."""

    label: str
    limit: Decimal | None = None        # USD; None: no limit of its own
    usage_limit_type: str | None = None  # daily | weekly | monthly; None: never resets
    usage: Decimal = Decimal(0)         # spent since the limit last reset (the fake never
                                        # resets it: tests run within one period)

    def remaining(self) -> Decimal | None:
        return None if self.limit is None else max(Decimal(0), self.limit - self.usage)


LIMIT_TYPES = ("daily", "weekly", "monthly")


@dataclass
class FakeOpenRouter:
    """State and knobs of the fake; tests read and set these."""

    models: dict[str, FakeModel] = field(default_factory=lambda: dict(MODELS))
    chunk_delay: float = 0.0          # seconds between content chunks
    header_delay: float = 0.0         # seconds before a stream's response headers
    pieces: int | None = None         # content chunks per answer; None: the reply's words
                                      # (fakemodel: the prompt restated and counted)
    piece_bytes: int | None = None    # pad each piece to this size (benchmark, big answers)
    keepalives: int = 1               # ": OPENROUTER PROCESSING" comments before data
    broke_keys: set[str] = field(default_factory=set)    # answer 402 (out of credits)
    revoked_keys: set[str] = field(default_factory=set)  # answer 401
    generation_404s: int = 0          # GET /generation answers 404 this many times first
    # Bring-your-own-provider-key: calls with these funding keys are billed by the provider
    # on the user's own account (``upstream_inference_cost``) plus OpenRouter's fee
    # (``cost``, ``byok_fee_rate`` of it), ``is_byok: true``, in the stream and /generation.
    byok_keys: set[str] = field(default_factory=set)
    byok_fee_rate: Decimal = Decimal("0.05")
    # Hostile or broken upstreams: the raw JSON text sent as the final event's ``usage``
    # (e.g. '{"cost":1e999999}', '{}', 'null'), and as /generation's ``data``.
    usage_text: str | None = None
    generation_text: str | None = None
    # The wire around the API (a CDN in front, TCP in between):
    compress: str | None = None       # gzip | deflate | br: every answer compressed, when
                                      # the request's Accept-Encoding allows it
    newline: str = "\n"               # SSE line ending: "\n", "\r\n" or a lone "\r"
    split_bytes: int | None = None    # a stream's bytes sent in pieces of this many bytes
    comments_between: bool = False    # ": OPENROUTER PROCESSING" between every two events
    close_after_response: bool = False  # drop the keep-alive connection after each answer
    retry_after: str | None = None    # Retry-After of a 429 (None: no header)
    empty_generation_header: bool = False  # X-Generation-Id sent empty (the id is in the body)
    words: tuple[str, ...] | None = None  # the answer's words instead of the reply's
    down: set[str] = field(default_factory=set)  # model ids or "model@Provider" endpoints
    charged: Decimal = Decimal(0)
    calls: list[Call] = field(default_factory=list)
    generations: dict[str, Call] = field(default_factory=dict)
    oauth_codes: dict[str, tuple[str, str]] = field(default_factory=dict)
    keys: dict[str, FakeKey] = field(default_factory=dict)  # keys with their own limit
    record_calls: bool = True

    def usage(self, prompt: int, completion: int, call: Call) -> str:
        return self.usage_text if self.usage_text is not None else \
            _usage_json(prompt, completion, call)

    def generation_header(self, gen: str) -> str:
        return "" if self.empty_generation_header else gen

    def coding_for(self, request: web.Request) -> str | None:
        accepted = [c.split(";")[0].strip().lower()
                    for c in request.headers.get("Accept-Encoding", "").split(",")]
        return self.compress if self.compress and self.compress in accepted else None

    def key_status(self, authorization: str) -> int:
        key = authorization.removeprefix("Bearer ").strip()
        if not key.startswith("sk-or-") or key in self.revoked_keys:
            return 401
        if key in self.broke_keys:
            return 402
        return 200

    def key_of(self, authorization: str) -> FakeKey | None:
        return self.keys.get(authorization.removeprefix("Bearer ").strip())


def _compressor(coding: str) -> Any:
    if coding == "br":
        import brotli  # optional: only when a test asks the fake for br

        return brotli.Compressor()
    if coding not in ("gzip", "deflate"):
        raise ValueError(f"the fake cannot compress with {coding!r}")
    # HTTP's "deflate" is the zlib format (RFC 9110), "gzip" the gzip one.
    return zlib.compressobj(wbits=31 if coding == "gzip" else 15)


def _compress(compressor: Any, data: bytes, *, final: bool = False) -> bytes:
    """Compressed bytes for ``data``, flushed so the reader can decode them now."""
    if hasattr(compressor, "process"):  # brotli
        return compressor.process(data) + (compressor.finish() if final
                                           else compressor.flush())
    return compressor.compress(data) + compressor.flush(zlib.Z_FINISH if final
                                                         else zlib.Z_SYNC_FLUSH)


class _Wire:
    """How one stream's bytes leave the fake: line endings, pieces, compression."""

    def __init__(self, fake: FakeOpenRouter, request: web.Request) -> None:
        self.fake = fake
        coding = fake.coding_for(request)
        self.compressor = _compressor(coding) if coding else None
        self.headers = {"Content-Encoding": coding} if coding else {}

    async def write(self, resp: web.StreamResponse, data: bytes) -> None:
        if self.fake.newline != "\n":
            data = data.replace(b"\n", self.fake.newline.encode())
        size = self.fake.split_bytes or len(data)
        for i in range(0, len(data), size):
            piece = data[i:i + size]
            if self.compressor is not None:
                piece = _compress(self.compressor, piece)
            await resp.write(piece)
            if self.fake.split_bytes:
                await asyncio.sleep(0.001)  # its own TCP segment, most of the time

    async def end(self, resp: web.StreamResponse) -> None:
        if self.compressor is not None:
            await resp.write(_compress(self.compressor, b"", final=True))


def _error(status: int, message: str, code: Any = None) -> web.Response:
    return web.json_response({"error": {"code": code if code is not None else status,
                                        "message": message}}, status=status)


def _num(d: Decimal) -> str:
    return format(d.normalize(), "f") if d else "0"


def _billing_json(call: Call) -> str:
    """The billing fields every usage object carries; for BYOK ``cost`` is only the fee."""
    fee = call.byok_fee
    inference = call.cost - fee if fee is not None else call.cost
    return '"cost":%s,"is_byok":%s,"cost_details":{"upstream_inference_cost":%s}' % (
        _num(call.cost if fee is None else fee), "false" if fee is None else "true",
        _num(inference))


def _usage_json(prompt: int, completion: int, call: Call) -> str:
    """The usage object as OpenRouter sends it."""
    return ('{"prompt_tokens":%d,"completion_tokens":%d,"total_tokens":%d,%s,'
            '"prompt_tokens_details":{"cached_tokens":0},'
            '"completion_tokens_details":{"reasoning_tokens":0}}'
            % (prompt, completion, prompt + completion, _billing_json(call)))


def _generation_json(call: Call) -> str:
    """GET /generation's ``data`` (snake_case on the wire): ``total_cost`` is what the
    key's credits paid (for BYOK only the fee), ``upstream_inference_cost`` the provider's."""
    fee = call.byok_fee
    inference = call.cost - fee if fee is not None else call.cost
    return ('{"id":%s,"model":%s,"total_cost":%s,"upstream_inference_cost":%s,'
            '"is_byok":%s,"usage":%s,"streamed":true,"cancelled":false,'
            '"provider_name":"Fake"}'
            % (json.dumps(call.generation_id), json.dumps(call.model),
               _num(call.cost if fee is None else fee), _num(inference),
               "false" if fee is None else "true", _num(call.cost if fee is None else fee)))


def _json_answer(body: dict[str, Any]) -> str | None:
    """The answer to a request for JSON (`response_format`), else None: an instance of the
    JSON schema for `json_schema` (structured outputs), an object for `json_object`."""
    fmt = body.get("response_format")
    if not isinstance(fmt, dict):
        return None
    if fmt.get("type") == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        return json.dumps(_instance(schema if isinstance(schema, dict) else {}))
    if fmt.get("type") == "json_object":
        return json.dumps({"text": "".join(fakemodel.reply_words(fakemodel.chat_prompt(body)))})
    return None


def _instance(schema: dict[str, Any]) -> Any:
    """A small value that satisfies `schema` (the subset structured outputs use)."""
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    for key in ("anyOf", "oneOf", "allOf"):
        if schema.get(key):
            return _instance(schema[key][0])
    kind = schema.get("type", "object")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object":
        props = schema.get("properties") or {}
        return {name: _instance(sub) for name, sub in props.items()}
    if kind == "array":
        raw = schema.get("items")
        items = raw if isinstance(raw, dict) else {}
        return [_instance(items) for _ in range(max(1, schema.get("minItems", 1)))]
    if kind == "string":
        return "the fake model"
    if kind in ("integer", "number"):
        return schema.get("minimum", 1)
    if kind == "boolean":
        return True
    return None


def _ordered(providers: tuple[FakeProvider, ...], prefs: dict[str, Any]
             ) -> list[FakeProvider]:
    """provider.only / ignore filter, provider.order first (then the default order)."""
    only, ignore = prefs.get("only"), prefs.get("ignore") or ()
    chosen = [p for p in providers if (not only or p.name in only) and p.name not in ignore]
    order = list(prefs.get("order") or ())
    return sorted(chosen, key=lambda p: order.index(p.name) if p.name in order else len(order))


def _within(p: FakeProvider, max_price: Any) -> bool:
    """provider.max_price: USD per million tokens (prompt, completion), per request, image."""
    if not isinstance(max_price, dict):
        return True
    mine = {"prompt": p.prompt * 1_000_000, "completion": p.completion * 1_000_000,
            "request": p.request, "image": p.image}
    return all(mine[k] <= Decimal(str(v)) for k, v in max_price.items() if k in mine)


def _responses_usage_json(prompt: int, completion: int, reasoning: int, call: Call) -> str:
    """The Responses API's usage (``input_tokens``/``output_tokens``) with OpenRouter's cost."""
    return ('{"input_tokens":%d,"input_tokens_details":{"cached_tokens":0},'
            '"output_tokens":%d,"output_tokens_details":{"reasoning_tokens":%d},'
            '"total_tokens":%d,%s}'
            % (prompt, completion, reasoning, prompt + completion, _billing_json(call)))


def _embeddings_usage_json(prompt: int, call: Call) -> str:
    """An embeddings usage: prompt tokens only."""
    return '{"prompt_tokens":%d,"total_tokens":%d,%s}' % (prompt, prompt, _billing_json(call))


class _Response:
    """One Responses API ``response`` object, at each stage of its stream."""

    def __init__(self, call: Call, provider: str, body: dict[str, Any], created: int) -> None:
        self.call, self.provider, self.body, self.created = call, provider, body, created
        self.item_id = "msg_" + call.generation_id.removeprefix("gen-")

    def message(self, status: str, text: str | None) -> str:
        content = [] if text is None else [{"type": "output_text", "text": text,
                                            "annotations": [], "logprobs": []}]
        return json.dumps({"type": "message", "id": self.item_id, "status": status,
                           "role": "assistant", "content": content})

    def json(self, status: str, text: str | None, usage: str, error: str = "null") -> str:
        body = self.body
        output = "[]" if text is None else "[%s]" % self.message("completed", text)
        fields = {"id": self.call.generation_id, "object": "response",
                  "created_at": self.created, "model": self.call.model,
                  "provider": self.provider, "status": status,
                  "incomplete_details": None, "instructions": body.get("instructions"),
                  "max_output_tokens": body.get("max_output_tokens"),
                  "metadata": body.get("metadata") or {},
                  "parallel_tool_calls": body.get("parallel_tool_calls", True),
                  "temperature": body.get("temperature"), "top_p": body.get("top_p"),
                  "tool_choice": body.get("tool_choice", "auto"),
                  "tools": body.get("tools") or [], "text": {"format": {"type": "text"}}}
        head = json.dumps(fields)[:-1]
        return '%s,"output":%s,"error":%s,"usage":%s}' % (head, output, error, usage)


fake_key = web.AppKey("fake", FakeOpenRouter)


def create_fake_openrouter(fake: FakeOpenRouter | None = None) -> web.Application:
    fake = fake or FakeOpenRouter()

    @web.middleware
    async def wire(request: web.Request, handler: Any) -> web.StreamResponse:
        """Whole answers (JSON, errors) compressed as a CDN would; the keep-alive
        connection dropped after the answer when asked (as an idle timeout would)."""
        resp = await handler(request)
        coding = fake.coding_for(request)
        if coding and isinstance(resp, web.Response) and isinstance(resp.body, bytes):
            resp.body = _compress(_compressor(coding), resp.body, final=True)
            resp.headers["Content-Encoding"] = coding
        if fake.close_after_response and request.transport is not None:
            transport = request.transport
            # After the answer has left, without "Connection: close": the client learns
            # it only when it next uses the connection, or when the FIN arrives.
            asyncio.get_running_loop().call_later(0.05, transport.close)
        return resp

    app = web.Application(middlewares=[wire])
    app[fake_key] = fake

    async def models(request: web.Request) -> web.Response:
        data = [{"id": mid, "name": mid, "context_length": 128000,
                 "pricing": {"prompt": _num(m.prompt), "completion": _num(m.completion),
                             "request": _num(m.request), "image": _num(m.image)}}
                for mid, m in fake.models.items()]
        return web.json_response({"data": data})

    async def key(request: web.Request) -> web.Response:
        status = fake.key_status(request.headers.get("Authorization", ""))
        if status == 401:
            return _error(401, "No auth credentials found")
        own = fake.key_of(request.headers.get("Authorization", ""))
        if own is None:
            return web.json_response({"data": {"label": "sk-or-v1-…", "limit": None,
                                               "limit_remaining": None, "limit_reset": None,
                                               "usage": 0, "is_free_tier": False}})
        remaining = own.remaining()
        return web.Response(content_type="application/json", text=json.dumps({"data": {
            "label": own.label,
            "limit": None if own.limit is None else float(own.limit),
            "limit_remaining": None if remaining is None else float(remaining),
            "limit_reset": own.usage_limit_type, "usage": float(own.usage),
            "is_free_tier": False}}))

    async def generation(request: web.Request) -> web.Response:
        if fake.key_status(request.headers.get("Authorization", "")) == 401:
            return _error(401, "No auth credentials found")
        call = fake.generations.get(request.query.get("id", ""))
        if fake.generation_404s > 0 or call is None or not call.finished:
            fake.generation_404s = max(0, fake.generation_404s - 1)
            return _error(404, "Generation not found")
        data = fake.generation_text if fake.generation_text is not None \
            else _generation_json(call)
        return web.Response(text='{"data":%s}' % data, content_type="application/json")

    async def oauth_page(request: web.Request) -> web.Response:
        callback = request.query.get("callback_url", "")
        challenge = request.query.get("code_challenge", "")
        if request.query.get("code_challenge_method") != "S256" or not callback:
            return web.Response(status=400, text="bad request")
        limit_type = request.query.get("usage_limit_type")
        label = request.query.get("key_label", "")
        try:
            limit = Decimal(request.query["limit"]) if "limit" in request.query else None
        except ArithmeticError:
            limit = Decimal("NaN")
        if (limit is not None and not (limit.is_finite() and limit >= 0)) \
                or (limit_type is not None and limit_type not in LIMIT_TYPES) \
                or len(label) > 100:
            return web.Response(status=400, text="bad request")
        code = secrets.token_urlsafe(16)
        key = "sk-or-v1-oauth-" + secrets.token_hex(16)
        fake.oauth_codes[code] = (challenge, key)
        fake.keys[key] = FakeKey(label or "Fake app", limit, limit_type)
        sep = "&" if "?" in callback else "?"
        raise web.HTTPFound(f"{callback}{sep}code={code}")

    async def oauth_exchange(request: web.Request) -> web.Response:
        body = await request.json()
        entry = fake.oauth_codes.pop(body.get("code", ""), None)
        verifier = body.get("code_verifier", "")
        digest = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
        if entry is None or digest.decode().rstrip("=") != entry[0]:
            return _error(403, "Invalid code or verifier")
        return web.json_response({"key": entry[1], "user_id": "user_fake"})

    async def begin(request: web.Request
                    ) -> tuple[dict[str, Any], FakeModel, FakeProvider, Call] | web.Response:
        """Key, body and routing, as every metered endpoint checks them; the call recorded."""
        status = fake.key_status(request.headers.get("Authorization", ""))
        if status == 401:
            return _error(401, "User not found.")
        if status == 402:
            return _error(402, "Insufficient credits. Add more using https://openrouter.ai/credits")
        own = fake.key_of(request.headers.get("Authorization", ""))
        if own is not None and own.limit is not None and own.usage >= own.limit:
            return _error(403, f"Key limit exceeded ({own.usage_limit_type or 'total'} limit)."
                          " Manage it using https://openrouter.ai/settings/keys")
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "Invalid JSON")
        if not isinstance(body, dict):
            return _error(400, "Invalid JSON")
        routed = route(body)
        if isinstance(routed, web.Response):
            return routed
        model_id, model, provider = routed
        gen = "gen-" + secrets.token_hex(12)
        call = Call(gen, model_id, request.headers.get("Authorization", ""),
                    dict(request.headers), body)
        if fake.record_calls:
            fake.calls.append(call)
            fake.generations[gen] = call
        return body, model, provider, call

    def charge(request: web.Request, call: Call, provider: FakeProvider, *, prompt: int,
               completion: int, images: int = 0, web_results: int = 0) -> None:
        """Bill the call (once the model starts answering, whatever the client does next)."""
        cost = (provider.prompt * prompt + provider.completion * completion
                + provider.request + provider.image * images + WEB_RESULT_USD * web_results)
        if request.headers.get("Authorization", "").removeprefix("Bearer ").strip() \
                in fake.byok_keys:
            fee = (cost * fake.byok_fee_rate).quantize(Decimal("1e-12"))
            call.byok_fee, cost = fee, cost + fee
        call.cost = cost
        fake.charged += cost
        own = fake.key_of(request.headers.get("Authorization", ""))
        if own is not None:  # the key's own usage, against its own limit
            own.usage += cost

    def output_plan(body: dict[str, Any], limit: Any, prompt: str) -> tuple[list[str], bool,
                                                                           int]:
        """(text pieces, cut by the limit, reasoning tokens): the answer is the fake model's
        reply cut at its limit, and a reasoning budget is spent in full on top of it."""
        reasoning = body.get("reasoning")
        if not isinstance(reasoning, dict):
            reasoning = {}
        pieces, cut = fakemodel.pieces_for(prompt, int(limit) if limit else None,
                                           length=fake.pieces, words=fake.words)
        return pieces, cut, int(reasoning.get("max_tokens") or 0)

    def web_results_of(body: dict[str, Any]) -> int:
        return sum(int(p.get("max_results", 5)) for p in body.get("plugins") or ()
                   if isinstance(p, dict) and p.get("id") == "web"
                   and p.get("enabled") is not False)

    async def chat(request: web.Request) -> web.StreamResponse:
        started = await begin(request)
        if isinstance(started, web.Response):
            return started
        body, model, provider, call = started
        gen, model_id = call.generation_id, call.model
        images = sum(1 for m in body.get("messages") or () if isinstance(m, dict)
                     and isinstance(m.get("content"), list)
                     for p in m["content"] if isinstance(p, dict) and p.get("type") == "image_url")
        web_results = web_results_of(body)
        prompt_tokens = max(1, len(json.dumps(body.get("messages", ""))) // 4) \
            + IMAGE_TOKENS * images + WEB_RESULT_TOKENS * web_results
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        pieces, cut, thought = output_plan(body, limit, fakemodel.chat_prompt(body))
        choices = max(1, int(body.get("n") or 1))
        json_answer = _json_answer(body)
        if json_answer is not None:  # the whole document, in n pieces, like a real model
            n = max(1, min(fake.pieces or 8, int(limit or 10**9)))
            step = -(-len(json_answer) // n)
            pieces = [json_answer[i:i + step] for i in range(0, len(json_answer), step)]
            cut = False
        n = len(pieces)
        finish = "length" if cut else "stop"
        if fake.piece_bytes:
            pieces = [(p * (fake.piece_bytes // len(p) + 1))[:fake.piece_bytes] for p in pieces]
        completion_tokens = n * choices + thought
        charge(request, call, provider, prompt=prompt_tokens, completion=completion_tokens,
                images=images, web_results=web_results)
        created = int(time.time())
        delay = model.delay if model.delay is not None else fake.chunk_delay
        usage = fake.usage(prompt_tokens, completion_tokens, call)
        if not body.get("stream"):
            if delay:
                await asyncio.sleep(delay * n)
            call.finished = True
            call.answered_at = time.monotonic()
            text = json.dumps("".join(pieces))
            payload = ('{"id":"%s","object":"chat.completion","created":%d,"model":%s,'
                       '"provider":%s,"choices":[%s],"usage":%s}'
                       % (gen, created, json.dumps(model_id), json.dumps(provider.name),
                          ",".join('{"index":%d,"logprobs":null,"finish_reason":"%s",'
                                   '"native_finish_reason":"%s","message":{"role":'
                                   '"assistant","content":%s}}' % (c, finish, finish, text)
                                   for c in range(choices)), usage))
            return web.Response(text=payload, content_type="application/json",
                                headers={"X-Generation-Id": fake.generation_header(gen)})
        wire = _Wire(fake, request)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache",
                                           "X-Generation-Id": fake.generation_header(gen),
                                           **wire.headers})
        head = '{"id":"%s","provider":%s,"model":%s,"object":"chat.completion.chunk",' \
               '"created":%d,' % (gen, json.dumps(provider.name), json.dumps(model_id), created)
        try:
            return await stream(request, resp, wire, call, model, head=head, pieces=pieces,
                                choices=choices, delay=delay, usage=usage, finish=finish)
        except ConnectionError:  # the client (a gateway killed mid-stream) is gone
            return resp
        finally:
            # The provider knows the generation once it ends, whether or not the
            # client stayed to the end (a gateway killed mid-stream included).
            call.finished = True

    def route(body: dict[str, Any]) -> tuple[str, FakeModel, FakeProvider] | web.Response:
        """The model and provider OpenRouter would bill, or the error it would answer."""
        wanted = [body.get("model")] + [m for m in body.get("models") or ()
                                        if m != body.get("model")]
        prefs: dict[str, Any] = body["provider"] if isinstance(body.get("provider"), dict) \
            else {}
        failure = _error(400, f"{body.get('model')} is not a valid model ID")
        for model_id in wanted:
            model = fake.models.get(model_id) if isinstance(model_id, str) else None
            if model is None or not isinstance(model_id, str):
                failure = _error(400, f"{model_id} is not a valid model ID")
                continue
            if model.behaviour == "fail_500":
                failure = _error(500, "Internal Server Error")
                continue
            if model.behaviour == "fail_429":
                failure = _error(429, "Rate limit exceeded", code=429)
                if fake.retry_after is not None:
                    failure.headers["Retry-After"] = fake.retry_after
                continue
            if model_id in fake.down:
                failure = _error(502, f"{model_id} is down", code=502)
                continue
            endpoints = [p for p in _ordered(model.providers(), prefs)
                         if _within(p, prefs.get("max_price"))]
            if not endpoints:
                failure = _error(404, "No endpoints found matching your data policy, "
                                      "price and provider preferences.", code=404)
                continue
            if prefs.get("allow_fallbacks") is False:
                endpoints = endpoints[:1]
            for p in endpoints:
                if f"{model_id}@{p.name}" not in fake.down:
                    return model_id, model, p
            failure = _error(502, f"every provider of {model_id} is down", code=502)
        return failure

    async def stream(request: web.Request, resp: web.StreamResponse, wire: _Wire, call: Call,
                     model: FakeModel, *, head: str, pieces: list[str], choices: int,
                     delay: float, usage: str, finish: str = "stop") -> web.StreamResponse:
        n = len(pieces)
        if fake.header_delay:
            await asyncio.sleep(fake.header_delay)
        await resp.prepare(request)
        call.answered_at = time.monotonic()
        for _ in range(fake.keepalives):
            await wire.write(resp, b": OPENROUTER PROCESSING\n\n")
        for i, piece in enumerate(pieces):
            if delay:
                await asyncio.sleep(delay)
            delta = {"role": "assistant", "content": piece} if i == 0 else {"content": piece}
            for c in range(choices):
                await wire.write(resp, ("data: " + head + '"choices":[{"index":%d,"delta":%s,'
                                        '"finish_reason":null,"logprobs":null}]}\n\n'
                                        % (c, json.dumps(delta))).encode())
            if fake.comments_between:
                await wire.write(resp, b": OPENROUTER PROCESSING\n\n")
            if model.behaviour == "cut" and i == n // 2:
                call.finished = True
                request.transport.close() if request.transport else None
                return resp
            if model.behaviour == "midstream_error" and i == n // 2:
                call.finished = True
                await wire.write(resp, ("data: " + head + '"error":{"code":502,"message":'
                                        '"Provider disconnected"},"choices":[{"index":0,"delta":'
                                        '{"content":""},"finish_reason":"error"}]}\n\n').encode())
                await wire.end(resp)
                return resp
        for c in range(choices):
            await wire.write(resp, ("data: " + head + '"choices":[{"index":%d,"delta":'
                                    '{"content":""},"finish_reason":"%s",'
                                    '"native_finish_reason":"%s","logprobs":null}]}\n\n'
                                    % (c, finish, finish)).encode())
        call.finished = True
        if model.behaviour != "no_usage":
            await wire.write(resp, ("data: " + head + '"choices":[],"usage":%s}\n\n'
                                    % usage).encode())
        await wire.write(resp, b"data: [DONE]\n\n")
        await wire.end(resp)
        return resp

    async def responses(request: web.Request) -> web.StreamResponse:
        """POST /responses (the Responses API, beta): a ``response`` object, or its events
        (``response.created`` … ``response.output_text.delta`` … ``response.completed``
        carrying the final response and its usage with ``cost``)."""
        started = await begin(request)
        if isinstance(started, web.Response):
            return started
        body, model, provider, call = started
        items = body.get("input")
        if not isinstance(items, list):
            items = []
        images = sum(1 for item in items if isinstance(item, dict)
                     and isinstance(item.get("content"), list)
                     for p in item["content"]
                     if isinstance(p, dict) and p.get("type") == "input_image")
        web_results = web_results_of(body)
        prompt_tokens = max(1, len(json.dumps([body.get("instructions"), body.get("input"),
                                               body.get("tools")])) // 4) \
            + IMAGE_TOKENS * images + WEB_RESULT_TOKENS * web_results
        pieces, _, thought = output_plan(body, body.get("max_output_tokens"),
                                         fakemodel.responses_prompt(body))
        n = len(pieces)
        charge(request, call, provider, prompt=prompt_tokens, completion=n + thought,
               images=images, web_results=web_results)
        usage = fake.usage_text if fake.usage_text is not None else \
            _responses_usage_json(prompt_tokens, n + thought, thought, call)
        answer = _Response(call, provider.name, body, int(time.time()))
        delay = model.delay if model.delay is not None else fake.chunk_delay
        if not body.get("stream"):
            if delay:
                await asyncio.sleep(delay * n)
            call.finished = True
            call.answered_at = time.monotonic()
            return web.Response(text=answer.json("completed", "".join(pieces), usage),
                                content_type="application/json",
                                headers={"X-Generation-Id": fake.generation_header(
                                    call.generation_id)})
        wire = _Wire(fake, request)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache",
                                           "X-Generation-Id": fake.generation_header(
                                               call.generation_id),
                                           **wire.headers})
        try:
            return await response_events(request, resp, wire, call, model, answer, pieces,
                                         delay, usage)
        except ConnectionError:
            return resp
        finally:
            call.finished = True

    async def response_events(request: web.Request, resp: web.StreamResponse, wire: _Wire,
                              call: Call, model: FakeModel, answer: _Response,
                              pieces: list[str], delay: float, usage: str
                              ) -> web.StreamResponse:
        if fake.header_delay:
            await asyncio.sleep(fake.header_delay)
        await resp.prepare(request)
        call.answered_at = time.monotonic()
        seq = iter(range(1_000_000))

        async def event(kind: str, fields: str) -> None:
            await wire.write(resp, ('event: %s\ndata: {"type":"%s","sequence_number":%d,%s}'
                                    '\n\n' % (kind, kind, next(seq), fields)).encode())

        for _ in range(fake.keepalives):
            await wire.write(resp, b": OPENROUTER PROCESSING\n\n")
        await event("response.created", '"response":' + answer.json("in_progress", None, "null"))
        await event("response.in_progress",
                    '"response":' + answer.json("in_progress", None, "null"))
        where = '"item_id":"%s","output_index":0' % answer.item_id
        await event("response.output_item.added", '"output_index":0,"item":'
                    + answer.message("in_progress", None))
        await event("response.content_part.added", where + ',"content_index":0,"part":'
                    '{"type":"output_text","text":"","annotations":[]}')
        for i, piece in enumerate(pieces):
            if delay:
                await asyncio.sleep(delay)
            await event("response.output_text.delta", where + ',"content_index":0,'
                        '"delta":%s,"logprobs":[]' % json.dumps(piece))
            if fake.comments_between:
                await wire.write(resp, b": OPENROUTER PROCESSING\n\n")
            if model.behaviour == "cut" and i == len(pieces) // 2:
                call.finished = True
                request.transport.close() if request.transport else None
                return resp
            if model.behaviour == "midstream_error" and i == len(pieces) // 2:
                call.finished = True
                await event("response.failed", '"response":' + answer.json(
                    "failed", None, "null",
                    error='{"code":"server_error","message":"Provider disconnected"}'))
                await wire.end(resp)
                return resp
        text = "".join(pieces)
        await event("response.output_text.done", where + ',"content_index":0,"text":%s,'
                    '"logprobs":[]' % json.dumps(text))
        await event("response.content_part.done", where + ',"content_index":0,"part":'
                    '{"type":"output_text","text":%s,"annotations":[]}' % json.dumps(text))
        await event("response.output_item.done", '"output_index":0,"item":'
                    + answer.message("completed", text))
        call.finished = True
        final = usage if model.behaviour != "no_usage" else "null"
        await event("response.completed", '"response":' + answer.json("completed", text, final))
        await wire.end(resp)
        return resp

    async def embeddings(request: web.Request) -> web.Response:
        """POST /embeddings: ``{"object":"list","data":[{"embedding":[...]}],"usage":
        {prompt_tokens, total_tokens, cost}}``; base64 vectors when asked, as OpenAI's."""
        started = await begin(request)
        if isinstance(started, web.Response):
            return started
        body, model, provider, call = started
        data = body.get("input")
        texts = data if isinstance(data, list) and data and not isinstance(data[0], int) \
            else [data]
        tokens = sum(len(t) if isinstance(t, list) else max(1, len(str(t)) // 4)
                     for t in texts)
        charge(request, call, provider, prompt=tokens, completion=0)
        call.finished = True
        call.answered_at = time.monotonic()
        dims = int(body.get("dimensions") or 8)
        vectors = []
        for i, text in enumerate(texts):
            seed = hashlib.sha256(json.dumps(text).encode()).digest()
            vector = [round(seed[k % 32] / 255 - 0.5, 6) for k in range(dims)]
            encoded: Any = vector
            if body.get("encoding_format") == "base64":
                encoded = base64.b64encode(struct.pack("<%df" % dims, *vector)).decode()
            vectors.append({"object": "embedding", "index": i, "embedding": encoded})
        usage = fake.usage_text if fake.usage_text is not None else \
            _embeddings_usage_json(tokens, call)
        text = ('{"id":%s,"object":"list","data":%s,"model":%s,"provider":%s,"usage":%s}'
                % (json.dumps(call.generation_id), json.dumps(vectors), json.dumps(call.model),
                   json.dumps(provider.name), usage))
        return web.Response(text=text, content_type="application/json",
                            headers={"X-Generation-Id": fake.generation_header(
                                call.generation_id)})

    app.router.add_get("/api/v1/models", models)
    app.router.add_post("/api/v1/responses", responses)
    app.router.add_post("/api/v1/embeddings", embeddings)
    app.router.add_get("/api/v1/key", key)
    app.router.add_get("/api/v1/generation", generation)
    app.router.add_post("/api/v1/chat/completions", chat)
    app.router.add_post("/api/v1/auth/keys", oauth_exchange)
    app.router.add_get("/auth", oauth_page)
    return app


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Run the fake OpenRouter on loopback.")
    parser.add_argument("--port", type=int, default=8788)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--pieces", type=int, default=None,
                        help="chunks per answer (default: the reply to the prompt)")
    parser.add_argument("--piece-bytes", type=int, default=None)
    args = parser.parse_args()
    fake = FakeOpenRouter(chunk_delay=args.delay, pieces=args.pieces,
                          piece_bytes=args.piece_bytes, record_calls=False)
    web.run_app(create_fake_openrouter(fake), host="127.0.0.1", port=args.port, print=None,
                access_log=None)


if __name__ == "__main__":
    main()
