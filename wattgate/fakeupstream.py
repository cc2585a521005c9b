"""A fake OpenRouter on loopback, for tests, the benchmark and ``wattgate demo``.

It speaks OpenRouter's wire format as documented in upstream-notes.md: SSE
with ``: OPENROUTER PROCESSING`` keep-alive comments before data, one chunk
per piece of text, a finish chunk, a final usage event with ``choices: []``
and ``usage.cost``, then ``data: [DONE]``; ``X-Generation-Id`` before any body
byte; errors before streaming as JSON with 4xx/5xx, errors after streaming
started inside the 200 stream; ``GET /models``, ``GET /key``,
``GET /generation`` and the OAuth PKCE endpoints.

Behaviour is chosen by the model id (``fake/…`` models below) so one fake
serves mixed traffic. Every charge is added to ``charged`` (exact Decimal):
tests compare it with wattgate's ledger. Like many real providers, a stream
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
import time
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from aiohttp import web

WORDS = ("Metering is the quiet part of every AI feature: each token has a price, "
         "and somebody pays it. Here the user does, within a cap they chose, and "
         "the app never holds their key.").split(" ")


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
    cost: Decimal = Decimal(0)
    finished: bool = False
    answered_at: float | None = None  # time.monotonic() when the response headers left


@dataclass
class FakeOpenRouter:
    """State and knobs of the fake; tests read and set these."""

    models: dict[str, FakeModel] = field(default_factory=lambda: dict(MODELS))
    chunk_delay: float = 0.0          # seconds between content chunks
    header_delay: float = 0.0         # seconds before a stream's response headers
    pieces: int = 8                   # content chunks per answer
    piece_bytes: int | None = None    # pad each piece to this size (benchmark, big answers)
    keepalives: int = 1               # ": OPENROUTER PROCESSING" comments before data
    broke_keys: set[str] = field(default_factory=set)    # answer 402 (out of credits)
    revoked_keys: set[str] = field(default_factory=set)  # answer 401
    generation_404s: int = 0          # GET /generation answers 404 this many times first
    down: set[str] = field(default_factory=set)  # model ids or "model@Provider" endpoints
    charged: Decimal = Decimal(0)
    calls: list[Call] = field(default_factory=list)
    generations: dict[str, Call] = field(default_factory=dict)
    oauth_codes: dict[str, tuple[str, str]] = field(default_factory=dict)
    record_calls: bool = True

    def key_status(self, authorization: str) -> int:
        key = authorization.removeprefix("Bearer ").strip()
        if not key.startswith("sk-or-") or key in self.revoked_keys:
            return 401
        if key in self.broke_keys:
            return 402
        return 200


def _error(status: int, message: str, code: Any = None) -> web.Response:
    return web.json_response({"error": {"code": code if code is not None else status,
                                        "message": message}}, status=status)


def _num(d: Decimal) -> str:
    return format(d.normalize(), "f") if d else "0"


def _usage_json(prompt: int, completion: int, cost: Decimal) -> str:
    return ('{"prompt_tokens":%d,"completion_tokens":%d,"total_tokens":%d,"cost":%s,'
            '"is_byok":false,"prompt_tokens_details":{"cached_tokens":0},'
            '"cost_details":{"upstream_inference_cost":%s},'
            '"completion_tokens_details":{"reasoning_tokens":0}}'
            % (prompt, completion, prompt + completion, _num(cost), _num(cost)))


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


fake_key = web.AppKey("fake", FakeOpenRouter)


def create_fake_openrouter(fake: FakeOpenRouter | None = None) -> web.Application:
    fake = fake or FakeOpenRouter()
    app = web.Application()
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
        return web.json_response({"data": {"label": "sk-or-v1-…", "limit": None,
                                           "limit_remaining": None, "usage": 0,
                                           "is_free_tier": False}})

    async def generation(request: web.Request) -> web.Response:
        if fake.key_status(request.headers.get("Authorization", "")) == 401:
            return _error(401, "No auth credentials found")
        call = fake.generations.get(request.query.get("id", ""))
        if fake.generation_404s > 0 or call is None or not call.finished:
            fake.generation_404s = max(0, fake.generation_404s - 1)
            return _error(404, "Generation not found")
        return web.json_response({"data": {"id": call.generation_id, "model": call.model,
                                           "total_cost": float(call.cost), "streamed": True,
                                           "cancelled": False}})

    async def oauth_page(request: web.Request) -> web.Response:
        callback = request.query.get("callback_url", "")
        challenge = request.query.get("code_challenge", "")
        if request.query.get("code_challenge_method") != "S256" or not callback:
            return web.Response(status=400, text="bad request")
        code = secrets.token_urlsafe(16)
        fake.oauth_codes[code] = (challenge, "sk-or-v1-oauth-" + secrets.token_hex(16))
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

    async def chat(request: web.Request) -> web.StreamResponse:
        status = fake.key_status(request.headers.get("Authorization", ""))
        if status == 401:
            return _error(401, "User not found.")
        if status == 402:
            return _error(402, "Insufficient credits. Add more using https://openrouter.ai/credits")
        try:
            body = await request.json()
        except ValueError:
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
        if fake.record_calls:
            fake.generations[gen] = call
        images = sum(1 for m in body.get("messages") or () if isinstance(m, dict)
                     and isinstance(m.get("content"), list)
                     for p in m["content"] if isinstance(p, dict) and p.get("type") == "image_url")
        web_results = sum(int(p.get("max_results", 5)) for p in body.get("plugins") or ()
                          if isinstance(p, dict) and p.get("id") == "web")
        prompt_tokens = max(1, len(json.dumps(body.get("messages", ""))) // 4) \
            + IMAGE_TOKENS * images + WEB_RESULT_TOKENS * web_results
        limit = body.get("max_completion_tokens") or body.get("max_tokens") or 10**9
        n = max(1, min(fake.pieces, int(limit)))
        choices = max(1, int(body.get("n") or 1))
        reasoning = body.get("reasoning") if isinstance(body.get("reasoning"), dict) else {}
        thought = int(reasoning.get("max_tokens") or 0)
        pieces = [WORDS[i % len(WORDS)] + " " for i in range(n)]
        if fake.piece_bytes:
            pieces = [(p * (fake.piece_bytes // len(p) + 1))[:fake.piece_bytes] for p in pieces]
        completion_tokens = n * choices + thought
        cost = (provider.prompt * prompt_tokens + provider.completion * completion_tokens
                + provider.request + provider.image * images + WEB_RESULT_USD * web_results)
        # Billed once the model starts answering, whatever the client does next.
        call.cost = cost
        fake.charged += cost
        created = int(time.time())
        delay = model.delay if model.delay is not None else fake.chunk_delay
        usage = _usage_json(prompt_tokens, completion_tokens, cost)
        if not body.get("stream"):
            if delay:
                await asyncio.sleep(delay * n)
            call.finished = True
            call.answered_at = time.monotonic()
            text = json.dumps("".join(pieces))
            payload = ('{"id":"%s","object":"chat.completion","created":%d,"model":%s,'
                       '"provider":%s,"choices":[%s],"usage":%s}'
                       % (gen, created, json.dumps(model_id), json.dumps(provider.name),
                          ",".join('{"index":%d,"logprobs":null,"finish_reason":"stop",'
                                   '"native_finish_reason":"stop","message":{"role":'
                                   '"assistant","content":%s}}' % (c, text)
                                   for c in range(choices)), usage))
            return web.Response(text=payload, content_type="application/json",
                                headers={"X-Generation-Id": gen})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache",
                                           "X-Generation-Id": gen})
        head = '{"id":"%s","provider":%s,"model":%s,"object":"chat.completion.chunk",' \
               '"created":%d,' % (gen, json.dumps(provider.name), json.dumps(model_id), created)
        try:
            return await stream(request, resp, call, model, head=head, pieces=pieces,
                                choices=choices, delay=delay, usage=usage)
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

    async def stream(request: web.Request, resp: web.StreamResponse, call: Call,
                     model: FakeModel, *, head: str, pieces: list[str], choices: int,
                     delay: float, usage: str) -> web.StreamResponse:
        n = len(pieces)
        if fake.header_delay:
            await asyncio.sleep(fake.header_delay)
        await resp.prepare(request)
        call.answered_at = time.monotonic()
        for _ in range(fake.keepalives):
            await resp.write(b": OPENROUTER PROCESSING\n\n")
        for i, piece in enumerate(pieces):
            if delay:
                await asyncio.sleep(delay)
            delta = {"role": "assistant", "content": piece} if i == 0 else {"content": piece}
            for c in range(choices):
                await resp.write(("data: " + head + '"choices":[{"index":%d,"delta":%s,'
                                  '"finish_reason":null,"logprobs":null}]}\n\n'
                                  % (c, json.dumps(delta))).encode())
            if model.behaviour == "cut" and i == n // 2:
                call.finished = True
                request.transport.close() if request.transport else None
                return resp
            if model.behaviour == "midstream_error" and i == n // 2:
                call.finished = True
                await resp.write(("data: " + head + '"error":{"code":502,"message":'
                                  '"Provider disconnected"},"choices":[{"index":0,"delta":'
                                  '{"content":""},"finish_reason":"error"}]}\n\n').encode())
                return resp
        for c in range(choices):
            await resp.write(("data: " + head + '"choices":[{"index":%d,"delta":{"content":""},'
                              '"finish_reason":"stop","native_finish_reason":"stop",'
                              '"logprobs":null}]}\n\n' % c).encode())
        call.finished = True
        if model.behaviour != "no_usage":
            await resp.write(("data: " + head + '"choices":[],"usage":%s}\n\n'
                              % usage).encode())
        await resp.write(b"data: [DONE]\n\n")
        return resp

    app.router.add_get("/api/v1/models", models)
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
    parser.add_argument("--pieces", type=int, default=8)
    parser.add_argument("--piece-bytes", type=int, default=None)
    args = parser.parse_args()
    fake = FakeOpenRouter(chunk_delay=args.delay, pieces=args.pieces,
                          piece_bytes=args.piece_bytes, record_calls=False)
    web.run_app(create_fake_openrouter(fake), host="127.0.0.1", port=args.port, print=None,
                access_log=None)


if __name__ == "__main__":
    main()
