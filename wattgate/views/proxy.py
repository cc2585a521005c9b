"""The metered proxy: POST /api/v1/chat/completions, /responses and /embeddings,
and GET /api/v1/models.

The three metered endpoints share one lifecycle (``_Call``), parametrised by
``estimate.Endpoint``: the upstream path, the table of fields, the output limit
injected. The same ``StreamReader`` reads chat's final ``usage`` and the
Responses stream's ``response.completed``; a whole Responses answer is streamed
upstream too and is the response its terminal event carries
(``assemble.ResponseAssembler``); embeddings are never streamed, and their
hold's row names the generation as soon as the answer's headers do.

The path of one call (each step's module in brackets):

1. authenticate the app's secret key [gateway]; identify the payer from
   ``x-wattfare-user`` / ``x-wattfare-grant`` [admission]; RL_CHAT [ratelimit];
2. read the body: every field that can raise the bill is priced into the
   worst case or refused, ``max_tokens`` injected when absent, OpenRouter's
   ``provider.max_price`` set to the rates the hold assumed [estimate,
   pricing, upstream];
3. admit: one atomic hold against the cap or grant, in the gateway's memory
   [admission, store.meter];
4. unseal the funding key for this call only, forward with it [upstream];
5. stream the answer back chunk by chunk as it arrives while ``StreamReader``
   reads the usage from the same bytes [sse]; the hold's row, naming the
   generation, is committed before the first body byte [store]. A call that
   wants one JSON answer is streamed upstream too and assembled [assemble];
6. settle: usage row + period aggregate + hold release in one transaction,
   idempotent on the generation id [metering, store].

The hold is released or settled on every way out, including cancellation.
When the client leaves mid-stream (or stops reading: ``server.write_timeout``
in ``wattgate.server`` then aborts its connection and the write here fails as
on a disconnect) the gateway keeps reading the upstream in
the background (``metering.drain_seconds``, at most ``metering.max_drains`` at
once) to learn the real cost; past those bounds the call is recorded at its
estimate, marked provisional. Once the first byte is sent, an error is never
written into the stream as a JSON body.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable

import aiohttp
from aiohttp import web

from .. import admission, attribution, estimate, headroom
from ..assemble import Assembler, ResponseAssembler
from ..errors import (BudgetExceeded, FundingInvalid, GrantInvalid, UpstreamError,
                      UpstreamTimeout, WattgateError)
from ..estimate import CHAT, EMBEDDINGS, RESPONSES, Endpoint, read_request
from ..gateway import Gateway
from ..metering import bill, usage_row
from ..sse import Outcome, StreamReader, parse_json_body
from ..store import NEEDS_RECONNECT, Connection
from ..upstream import Upstream, map_failure
from .inputs import check_json_depth, secret_key_of
from .state import gateway_key, upstream_key

log = logging.getLogger("wattgate.proxy")

# Only these request headers reach the upstream: never the app's secret key,
# x-wattfare-*, cookies or hop-by-hop headers. The client's attribution headers win
# over the app's (attribution.py); each is made one safe line.
FORWARD_REQUEST_HEADERS = ("Accept",)
FORWARD_ATTRIBUTION_HEADERS = (attribution.REFERER, *attribution.TITLE_NAMES)
FORWARD_RESPONSE_HEADERS = ("Content-Type", "X-Generation-Id", "Cache-Control")
MAX_ERROR_BODY = 64 * 1024



def _generation_of(resp: aiohttp.ClientResponse) -> str | None:
    """The id the upstream named the call by, as the ledger keeps it (an empty header is
    none: the id is then taken from the answer's own events)."""
    return resp.headers.get("X-Generation-Id", "")[:200] or None


drains_key = web.AppKey("drains", set[asyncio.Task[None]])


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _metered(request, CHAT)


async def responses(request: web.Request) -> web.StreamResponse:
    return await _metered(request, RESPONSES)


async def embeddings(request: web.Request) -> web.StreamResponse:
    return await _metered(request, EMBEDDINGS)


async def _metered(request: web.Request, endpoint: Endpoint) -> web.StreamResponse:
    gw = request.app[gateway_key]
    upstream = request.app[upstream_key]
    started = gw.clock()
    app = await gw.app_for_secret(secret_key_of(request))
    payer = admission.identify(request.headers.get("x-wattfare-user"),
                               request.headers.get("x-wattfare-grant"))
    connection = await admission.precheck(gw, app.app_id, payer)
    gw.rl_chat.take(f"{app.app_id}:{payer.rate_key}", now=started)
    raw = await request.read()
    check_json_depth(raw)
    config = gw.config
    req = read_request(raw, default_max_tokens=config.metering_default_max_tokens,
                       max_price=config.upstream_send_max_price, endpoint=endpoint)
    pricing = headroom.Pricing(await upstream.price_list(), config.metering_default_max_tokens,
                               config.upstream_stream_whole_answers,
                               config.upstream_send_max_price)
    req, plan, admitted, fitted = await _admit_within_budget(gw, app.app_id, payer,
                                                             connection, req, pricing)
    call = _Call(gw, upstream, admitted, plan.worst_nanos, req.model, started, endpoint)
    call.fitted_max_tokens = fitted
    credit = attribution.attribution_headers(app, request.headers,
                                             enabled=config.upstream_attribution)
    return await call.run(request, plan.payload, req.stream, credit)


async def _admit_within_budget(
        gw: Gateway, app_id: str, payer: admission.PayerRef, connection: Connection | None,
        req: estimate.ChatRequest, pricing: headroom.Pricing,
) -> tuple[estimate.ChatRequest, estimate.Plan, admission.Admitted, int | None]:
    """Admit the call, or the call fitted to what is left (metering.fit_to_budget), or
    refuse saying what it could cost, what is left and what would fit.

    Returns the request and plan actually admitted, and the max_tokens it was fitted to.
    """
    config = gw.config
    plan = pricing.plan(req)
    try:
        return req, plan, await admission.admit(gw, app_id, payer, plan.worst_nanos,
                                                now=gw.clock(), connection=connection), None
    except (BudgetExceeded, GrantInvalid) as refused:
        if refused.shortfall is None:
            raise
        fit = headroom.largest_fit(req, plan.worst_nanos, refused.shortfall.left, pricing)
        grant = payer.grant_token is not None
        mode = config.metering_fit_to_budget
        may_fit = mode == "always" or (mode == "unset" and not headroom.client_set_limit(req))
        if fit is None or fit.max_tokens < config.metering_fit_min_tokens or not may_fit:
            raise headroom.explained(refused, req, fit, pricing, grant=grant) from None
    try:  # another call may have taken the room meanwhile: then refused, explained
        return fit.req, fit.plan, await admission.admit(
            gw, app_id, payer, fit.plan.worst_nanos, now=gw.clock(),
            connection=connection), fit.max_tokens
    except (BudgetExceeded, GrantInvalid) as again:
        raise headroom.explained(again, fit.req, None, pricing, grant=grant) from None


class _Call:
    """One admitted call: owns its hold until settled or released, exactly once."""

    def __init__(self, gw: Gateway, upstream: Upstream, admitted: admission.Admitted,
                 estimate: int, model: str, started: float, endpoint: Endpoint = CHAT) -> None:
        self.gw, self.upstream, self.admitted = gw, upstream, admitted
        self.endpoint = endpoint
        self.estimate, self.model, self.started = estimate, model, started
        self.closed = False
        self.handed_off = False  # a background drain owns the settle now
        self.reader: StreamReader | None = None
        self.sent: float | None = None  # when the call left for the upstream (metrics)
        self.fitted_max_tokens: int | None = None  # lowered to fit the budget (headroom)

    async def release(self) -> None:
        if not self.closed:
            self.closed = True
            await self.gw.store.release(  # the write survives cancellation
                self.admitted.hold, refund_request=self.admitted.grant_id is not None)

    async def settle(self, outcome: Outcome, status: str) -> None:
        if self.closed:
            return
        self.closed = True
        a = self.admitted
        charge = bill(outcome, self.estimate)
        row = usage_row(outcome, charge, app_id=a.app_id,
                        connection_id=a.connection_id, grant_id=a.grant_id, model=self.model,
                        status=status, started=self.started, now=self.gw.clock(),
                        admitted_at=a.admitted_at)
        if charge.problem is not None:  # never the key, the prompt or the usage's text
            log.warning("usage of generation %s (%s) not taken as sent: %s",
                        row.generation_id, self.model[:100], charge.problem)
        self.gw.observer.settled(row, self.sent)
        await self.gw.store.settle(a.hold, row, a.period)  # the write survives cancellation

    def _headers(self) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {self.admitted.funding_key}",
                   "Content-Type": "application/json"}
        return headers

    async def run(self, request: web.Request, payload: bytes, stream: bool,
                  credit: dict[str, str]) -> web.StreamResponse:
        """``credit``: the app's attribution headers the client did not set itself."""
        headers = self._headers()
        for name in FORWARD_REQUEST_HEADERS:
            if name in request.headers:
                headers[name] = request.headers[name]
        for name in FORWARD_ATTRIBUTION_HEADERS:
            value = attribution.safe_value(request.headers.get(name, ""))
            if value:
                headers[name] = value
        headers.update(credit)
        assert self.upstream.session is not None
        self.sent = self.gw.observer.clock()
        try:
            async with asyncio.timeout(self.upstream.first_byte_timeout):
                upstream_resp = await self.upstream.session.post(
                    self.upstream.url(self.endpoint.path), data=payload, headers=headers)
        except BaseException as e:
            await self.release()
            if isinstance(e, asyncio.TimeoutError):
                raise UpstreamTimeout() from None
            if isinstance(e, aiohttp.ClientError):
                raise UpstreamError(f"Could not reach the model provider "
                                    f"({type(e).__name__}).") from None
            raise
        self.gw.observer.answered(self.sent, upstream_resp.status)
        try:
            if upstream_resp.status != 200:
                await self._refuse(upstream_resp)
            if stream:
                return await self._stream(request, upstream_resp)
            # A whole answer is settled (one commit) before a byte of it is sent.
            if upstream_resp.content_type == "text/event-stream":
                return await self._assembled(upstream_resp)
            return await self._whole(upstream_resp)
        finally:
            if not self.closed and not self.handed_off:
                if upstream_resp.status == 200:
                    # Cancelled or failed after the model started answering: it may
                    # bill, so the call is recorded, never just released.
                    self._hand_off(request, upstream_resp, self.reader)
                else:
                    upstream_resp.close()
                    await self.release()

    async def _refuse(self, resp: aiohttp.ClientResponse) -> None:
        try:
            body = await resp.content.read(MAX_ERROR_BODY)
        except (aiohttp.ClientError, asyncio.TimeoutError):
            body = b""
        resp.close()
        await self.release()
        error = map_failure(resp.status, body, resp.headers, now=self.gw.clock())
        if isinstance(error, FundingInvalid) and self.admitted.grant_id is None \
                and self.admitted.connection_id is not None:
            await self.gw.store.set_connection_state(self.admitted.connection_id,
                                                     NEEDS_RECONNECT, now=self.gw.clock())
        raise error

    def _response_headers(self, resp: aiohttp.ClientResponse) -> dict[str, str]:
        headers = {k: resp.headers[k] for k in FORWARD_RESPONSE_HEADERS if k in resp.headers}
        if self.admitted.grant_remaining is not None:
            headers["x-wattfare-grant-remaining"] = str(self.admitted.grant_remaining)
        if self.fitted_max_tokens is not None:
            headers["x-wattfare-max-tokens"] = str(self.fitted_max_tokens)
        return headers

    def _note(self, generation: str | None) -> Awaitable[None] | None:
        """Name the generation in the hold's row (committed before the settle, which is
        queued after it): from here a crash leaves a provisional row, not lost spend."""
        if not generation:
            return None
        return self.gw.store.note_generation(self.admitted.hold, generation,
                                             self.admitted.app_id, self.model)

    async def _whole(self, resp: aiohttp.ClientResponse) -> web.Response:
        self._note(_generation_of(resp))  # the headers came before the body
        try:
            body = await resp.read()
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            await self.settle(Outcome(_generation_of(resp)), "upstream_cut")
            raise UpstreamError(f"The model provider's answer broke off "
                                f"({type(e).__name__}).") from None
        outcome = parse_json_body(body, _generation_of(resp))
        await self.settle(outcome, "ok" if outcome.error is None else "upstream_error")
        return web.Response(body=body, status=200, headers=self._response_headers(resp))

    async def _assembled(self, resp: aiohttp.ClientResponse) -> web.Response:
        """A non-streamed call the upstream streamed: one JSON answer, built from it."""
        generation = _generation_of(resp)
        self._note(generation)
        # Both read the usage too (the StreamReader's rules).
        assembler = ResponseAssembler() if self.endpoint is RESPONSES else Assembler()
        try:
            async for chunk in resp.content.iter_any():
                assembler.feed(chunk)
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            resp.close()
            await self.settle(assembler.outcome(generation), "upstream_cut")
            raise UpstreamError(f"The model provider's answer broke off "
                                f"({type(e).__name__}).") from None
        outcome = assembler.outcome(generation)
        if outcome.error is not None:
            resp.close()
            await self.settle(outcome, "upstream_error")
            raise UpstreamError(f"The model provider failed while answering: {outcome.error}")
        answer = assembler.answer()
        if answer is None:  # a Responses stream that ended before its final response
            await self.settle(outcome, "upstream_cut")
            raise UpstreamError("The model provider's answer ended without a final response.")
        await self.settle(outcome, "ok")
        headers = self._response_headers(resp)
        headers.pop("Cache-Control", None)
        headers["Content-Type"] = "application/json"
        return web.Response(body=json.dumps(answer).encode(), status=200, headers=headers)

    async def _stream(self, request: web.Request,
                      resp: aiohttp.ClientResponse) -> web.StreamResponse:
        generation = _generation_of(resp)
        reader = self.reader = StreamReader(generation)
        # The hold's row names the generation before any body byte leaves.
        note = self._note(generation)  # a future of the ledger's write, whatever the backend
        noted = asyncio.ensure_future(note) if note is not None else None
        out = web.StreamResponse(status=200, headers=self._response_headers(resp))
        out.content_type = "text/event-stream"
        try:
            await out.prepare(request)
        except (ConnectionError, aiohttp.ClientConnectionResetError):
            # The client left before the headers: the model answers all the same.
            self._hand_off(request, resp, reader)
            return out
        if noted is not None and not noted.done():
            await asyncio.wait([noted])  # a failed write is logged; the call goes on
        chunks = resp.content.iter_any()
        while True:
            try:
                chunk = await chunks.__anext__()
            except StopAsyncIteration:
                break
            except (aiohttp.ClientError, asyncio.TimeoutError):
                # Upstream cut or went silent: keep what was sent, settle what is known.
                await self.settle(reader.close(), "upstream_cut")
                resp.close()
                return out
            reader.feed(chunk)
            if reader.outcome.done and not self.closed:
                # The debit commits before the client sees [DONE]: a status read
                # right after the stream already includes this call.
                outcome = reader.close()
                await self.settle(outcome, "ok" if outcome.error is None else "upstream_error")
            try:
                await out.write(chunk)
            except (ConnectionError, aiohttp.ClientConnectionResetError):
                if not self.closed:
                    self._hand_off(request, resp, reader)
                return out
        outcome = reader.close()
        await self.settle(outcome, "ok" if outcome.error is None else "upstream_error")
        try:
            await out.write_eof()
        except (ConnectionError, aiohttp.ClientConnectionResetError):
            pass
        return out

    def _hand_off(self, request: web.Request, resp: aiohttp.ClientResponse,
                  reader: StreamReader | None) -> None:
        """The client left: learn the real cost from the rest of the upstream answer.

        Bounded in time (drain_seconds) and in number (max_drains); past the
        bound, or for a non-streamed answer, the call is recorded at its
        estimate, marked provisional, for reconciliation.
        """
        self.handed_off = True
        drains: set[asyncio.Task[None]] = request.app[drains_key]
        if reader is None or len(drains) >= self.gw.config.metering_max_drains:
            resp.close()
            outcome = reader.close() if reader is not None else \
                Outcome(_generation_of(resp))
            task = asyncio.ensure_future(self.settle(outcome, "client_gone"))
        else:
            task = asyncio.ensure_future(self._drain(resp, reader))
        drains.add(task)
        task.add_done_callback(drains.discard)

    async def _drain(self, resp: aiohttp.ClientResponse, reader: StreamReader) -> None:
        async def read_rest() -> None:
            async for chunk in resp.content.iter_any():
                reader.feed(chunk)
        try:
            await asyncio.wait_for(read_rest(), self.gw.config.metering_drain_seconds)
        except (aiohttp.ClientError, asyncio.TimeoutError):
            pass
        except asyncio.CancelledError:
            await self.settle(reader.close(), "client_gone")
            raise
        finally:
            resp.close()
        await self.settle(reader.close(), "client_gone")


async def models(request: web.Request) -> web.Response:
    gw = request.app[gateway_key]
    await gw.app_for_secret(secret_key_of(request))
    status, body, headers = await request.app[upstream_key].fetch_models()
    if status != 200:
        raise map_failure(status, body, headers, now=gw.clock())
    content_type = headers.get("Content-Type", "application/json")
    return web.Response(body=body, content_type=content_type.split(";")[0].strip() or
                        "application/json")


async def drains_ctx(app: web.Application):  # type: ignore[no-untyped-def]
    drains: set[asyncio.Task[None]] = set()
    app[drains_key] = drains
    yield
    tasks = list(drains)
    if tasks:  # let running drains settle before the store closes
        await asyncio.wait(tasks, timeout=app[gateway_key].config.metering_drain_seconds + 5)


__all__ = ["chat_completions", "responses", "embeddings", "models", "drains_ctx",
           "WattgateError"]
