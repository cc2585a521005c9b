"""A fake OpenRouter on loopback, for tests, the benchmark and ``wattgate demo``.

It speaks OpenRouter's wire format as documented in upstream-notes.md: SSE
with ``: OPENROUTER PROCESSING`` keep-alive comments before data, one chunk
per piece of text, a finish chunk, a final usage event with ``choices: []``
and ``usage.cost``, then ``data: [DONE]``; ``X-Generation-Id`` before any body
byte; errors before streaming as JSON with 4xx/5xx, errors after streaming
started inside the 200 stream; ``GET /models``, ``GET /key``,
``GET /generation`` and the OAuth PKCE endpoints. A ``response_format`` (JSON
mode, structured outputs) is answered with a JSON document, a JSON schema with
an instance of it.

Behaviour is chosen by the model id (``fake/…`` models below) so one fake
serves mixed traffic. Every charge is added to ``charged`` (exact Decimal):
tests compare it with wattgate's ledger. Like many real providers, a stream
the client abandons is billed in full.
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


@dataclass(frozen=True)
class FakeModel:
    prompt: Decimal = Decimal("0.00000015")
    completion: Decimal = Decimal("0.0000006")
    request: Decimal = Decimal("0")
    behaviour: str = "ok"  # ok | cut | midstream_error | fail_500 | fail_429 | no_usage
    delay: float | None = None  # seconds between chunks for this model (else chunk_delay)


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
        return json.dumps({"text": " ".join(WORDS[:8])})
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
        items = schema.get("items") if isinstance(schema.get("items"), dict) else {}
        return [_instance(items) for _ in range(max(1, schema.get("minItems", 1)))]
    if kind == "string":
        return " ".join(WORDS[:3])
    if kind in ("integer", "number"):
        return schema.get("minimum", 1)
    if kind == "boolean":
        return True
    return None


fake_key = web.AppKey("fake", FakeOpenRouter)


def create_fake_openrouter(fake: FakeOpenRouter | None = None) -> web.Application:
    fake = fake or FakeOpenRouter()
    app = web.Application()
    app[fake_key] = fake

    async def models(request: web.Request) -> web.Response:
        data = [{"id": mid, "name": mid, "context_length": 128000,
                 "pricing": {"prompt": _num(m.prompt), "completion": _num(m.completion),
                             "request": _num(m.request), "image": "0"}}
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
        model_id = body.get("model")
        model = fake.models.get(model_id)
        if model is None:
            return _error(400, f"{model_id} is not a valid model ID")
        if model.behaviour == "fail_500":
            return _error(500, "Internal Server Error")
        if model.behaviour == "fail_429":
            return _error(429, "Rate limit exceeded", code=429)
        gen = "gen-" + secrets.token_hex(12)
        call = Call(gen, model_id, request.headers.get("Authorization", ""),
                    dict(request.headers), body)
        if fake.record_calls:
            fake.calls.append(call)
        if fake.record_calls:
            fake.generations[gen] = call
        prompt_tokens = max(1, len(json.dumps(body.get("messages", ""))) // 4)
        max_tokens = body.get("max_tokens") or body.get("max_completion_tokens") or 10**9
        n = max(1, min(fake.pieces, int(max_tokens)))
        json_answer = _json_answer(body)
        if json_answer is not None:  # the whole document, in n pieces, like a real model
            step = -(-len(json_answer) // n)
            pieces = [json_answer[i:i + step] for i in range(0, len(json_answer), step)]
            n = len(pieces)
        else:
            pieces = [WORDS[i % len(WORDS)] + " " for i in range(n)]
        if fake.piece_bytes:
            pieces = [(p * (fake.piece_bytes // len(p) + 1))[:fake.piece_bytes] for p in pieces]
        cost = model.prompt * prompt_tokens + model.completion * n + model.request
        # Billed once the model starts answering, whatever the client does next.
        call.cost = cost
        fake.charged += cost
        created = int(time.time())
        delay = model.delay if model.delay is not None else fake.chunk_delay
        if not body.get("stream"):
            if delay:
                await asyncio.sleep(delay * n)
            call.finished = True
            call.answered_at = time.monotonic()
            text = "".join(pieces)
            payload = ('{"id":"%s","object":"chat.completion","created":%d,"model":%s,'
                       '"provider":"Fake","choices":[{"index":0,"logprobs":null,'
                       '"finish_reason":"stop","native_finish_reason":"stop",'
                       '"message":{"role":"assistant","content":%s}}],'
                       '"usage":%s}' % (gen, created, json.dumps(model_id), json.dumps(text),
                                        _usage_json(prompt_tokens, n, cost)))
            return web.Response(text=payload, content_type="application/json",
                                headers={"X-Generation-Id": gen})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache",
                                           "X-Generation-Id": gen})
        try:
            return await stream(request, resp, call, model, head_args=(gen, model_id, created),
                                pieces=pieces, delay=delay, cost=cost,
                                prompt_tokens=prompt_tokens)
        except ConnectionError:  # the client (a gateway killed mid-stream) is gone
            return resp
        finally:
            # The provider knows the generation once it ends, whether or not the
            # client stayed to the end (a gateway killed mid-stream included).
            call.finished = True

    async def stream(request: web.Request, resp: web.StreamResponse, call: Call,
                     model: FakeModel, *, head_args: tuple[str, str, int], pieces: list[str],
                     delay: float, cost: Decimal, prompt_tokens: int) -> web.StreamResponse:
        gen, model_id, created = head_args
        n = len(pieces)
        if fake.header_delay:
            await asyncio.sleep(fake.header_delay)
        await resp.prepare(request)
        call.answered_at = time.monotonic()
        for _ in range(fake.keepalives):
            await resp.write(b": OPENROUTER PROCESSING\n\n")
        head = '{"id":"%s","provider":"Fake","model":%s,"object":"chat.completion.chunk",' \
               '"created":%d,' % (gen, json.dumps(model_id), created)
        for i, piece in enumerate(pieces):
            if delay:
                await asyncio.sleep(delay)
            delta = {"role": "assistant", "content": piece} if i == 0 else {"content": piece}
            await resp.write(("data: " + head + '"choices":[{"index":0,"delta":%s,'
                              '"finish_reason":null,"logprobs":null}]}\n\n'
                              % json.dumps(delta)).encode())
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
        await resp.write(("data: " + head + '"choices":[{"index":0,"delta":{"content":""},'
                          '"finish_reason":"stop","native_finish_reason":"stop",'
                          '"logprobs":null}]}\n\n').encode())
        call.finished = True
        if model.behaviour != "no_usage":
            await resp.write(("data: " + head + '"choices":[],"usage":%s}\n\n'
                              % _usage_json(prompt_tokens, n, cost)).encode())
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
