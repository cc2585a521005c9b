"""The metered call: admit → forward → tee → settle, release or drain, exactly once.

``CallService.serve`` carries one call of chat completions, responses or
embeddings (``estimate.Endpoint``), streamed or whole, from the app's secret
key to the ledger row. It owns the call's hold from admission until it is
settled or released, exactly once, on every way out (cancellation included),
and the background drains of calls whose client left. It never imports
aiohttp's web layer: it speaks to the client through ``ClientSink``, which
``views/proxy.py`` implements over ``web.StreamResponse``, and to the
provider through ``upstream.Upstream.open_call``.

The path of one call (each step's module in brackets):

1. authenticate the app's secret key [gateway]; identify the payer from
   ``x-wattfare-user`` / ``x-wattfare-grant`` [admission]; RL_CHAT [ratelimit];
2. read the body (only now: an unknown app or payer never makes us read it):
   every model it may be billed at and its output bound judged by the app's
   policy [policy]; every field that can raise the bill is priced into the
   worst case or refused, ``max_tokens`` injected when absent, OpenRouter's
   ``provider.max_price`` set to the rates the hold assumed [estimate,
   pricing, headroom];
3. admit: one atomic hold against the cap or grant, or the call fitted to
   what is left [admission, headroom, store];
4. forward with the funding key, unsealed for this call only [upstream];
5. stream the answer back chunk by chunk as it arrives while ``StreamReader``
   reads the usage from the same bytes [sse]; the hold's row, naming the
   generation, is committed before the first body byte [store]. A call that
   wants one JSON answer is streamed upstream too and assembled [assemble];
   embeddings are never streamed, and their hold's row names the generation as
   soon as the answer's headers do;
6. settle: usage row + period aggregate + hold release in one transaction,
   idempotent on the generation id [metering, store].

When the client leaves mid-stream (or stops reading: ``server.write_timeout``
in ``wattgate.server`` then aborts its connection and the sink's write fails
as on a disconnect) the service keeps reading the upstream in the background
(``metering.drain_seconds``, at most ``metering.max_drains`` at once) to learn
the real cost; past those bounds the call is recorded at its estimate, marked
provisional. Once the first byte is sent, an error is never written into the
stream as a JSON body: errors raised before ``ClientSink.start`` are the web
layer's to render.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from . import admission, attribution, headroom, policy
from .assemble import Assembler, ResponseAssembler, encode
from .errors import BudgetExceeded, FundingInvalid, GrantInvalid, UpstreamError
from .estimate import RESPONSES, ChatRequest, Endpoint, Plan, read_request
from .gateway import Gateway
from .metering import bill, refused_row, usage_row
from .sse import Outcome, StreamReader, parse_json_body
from .store import NEEDS_RECONNECT, Connection
from .upstream import BROKE_OFF, Answer, Upstream

# The name operators (and tests) know the metered path's log lines by.
log = logging.getLogger("wattgate.proxy")

# Only these upstream answer headers reach the client.
FORWARD_RESPONSE_HEADERS = ("Content-Type", "X-Generation-Id", "Cache-Control")


class ClientSink(Protocol):
    """The client's end of one call, as the web layer holds it.

    Each method raises ``ConnectionError`` once the client has left (it
    disconnected, or stopped reading and was cut off): that is how the service
    learns it, at no cost per chunk. ``write`` is only called after ``start``.
    """

    async def start(self, status: int, headers: Mapping[str, str]) -> None:
        """Send the status line and headers (a whole answer's carry its Content-Length)."""

    def write(self, data: bytes) -> Awaitable[None]:
        """Send body bytes as they are, at once (never buffered). Declared as returning
        an awaitable so a sink may bind its transport's own ``write`` here."""

    async def finish(self) -> None:
        """End the body."""


@dataclass(frozen=True)
class Ask:
    """What the client sent, as the web layer read it."""

    secret_key: str
    headers: Mapping[str, str]  # the request's headers (case-insensitive in the server)
    # Reads (and checks) the body; awaited only once the app and payer are known.
    read_body: Callable[[], Awaitable[bytes]]


class CallService:
    """Serves metered calls for one gateway and owns their background drains."""

    def __init__(self, gw: Gateway, upstream: Upstream) -> None:
        self.gw, self.upstream = gw, upstream
        self.drains: set[asyncio.Future[Any]] = set()  # bounded by metering.max_drains
        self.owed: set[asyncio.Future[Any]] = set()  # releases of cancelled admissions

    async def serve(self, endpoint: Endpoint, ask: Ask, sink: ClientSink) -> None:
        """One metered call, answered into ``sink``; a ``WattgateError`` raised before
        ``sink.start`` is the client's answer instead."""
        gw = self.gw
        started = gw.clock()
        app = await gw.app_for_secret(ask.secret_key)
        payer = admission.identify(ask.headers.get("x-wattfare-user"),
                                   ask.headers.get("x-wattfare-grant"))
        connection = await admission.precheck(gw, app.app_id, payer)
        await gw.limit("RL_CHAT", f"{app.app_id}:{payer.rate_key}")
        raw = await ask.read_body()
        config = gw.config
        # The app's policy, from the app already in hand: no ledger read, no lock.
        default_max = policy.default_max_tokens(app.policy, config.metering_default_max_tokens)
        req = read_request(raw, default_max_tokens=default_max,
                           max_price=config.upstream_send_max_price, endpoint=endpoint)
        req = policy.check_request(app.policy, req)
        pricing = headroom.Pricing(await self.upstream.price_list(), default_max,
                                   config.upstream_stream_whole_answers,
                                   config.upstream_send_max_price)
        req, plan, admitted, fitted = await self.admit_within_budget(
            app.app_id, payer, connection, req, pricing)
        # From here the hold is the call's: no await before run's own try.
        call = Call(self, admitted, plan.worst_nanos, req.model, started, endpoint)
        call.fitted_max_tokens = fitted
        credit = attribution.attribution_headers(app, ask.headers,
                                                 enabled=config.upstream_attribution)
        await call.run(sink, plan.payload, req.stream, ask.headers, credit)

    async def admit_within_budget(
            self, app_id: str, payer: admission.PayerRef, connection: Connection | None,
            req: ChatRequest, pricing: headroom.Pricing,
    ) -> tuple[ChatRequest, Plan, admission.Admitted, int | None]:
        """Admit the call, or the call fitted to what is left (metering.fit_to_budget), or
        refuse saying what it could cost, what is left and what would fit.

        Returns the request and plan actually admitted, and the max_tokens it was fitted to.
        """
        gw = self.gw
        config = gw.config
        plan = pricing.plan(req)
        try:
            return req, plan, await self._admit(app_id, payer, plan.worst_nanos,
                                                connection), None
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
            return fit.req, fit.plan, await self._admit(
                app_id, payer, fit.plan.worst_nanos, connection), fit.max_tokens
        except (BudgetExceeded, GrantInvalid) as again:
            raise headroom.explained(again, fit.req, None, pricing, grant=grant) from None

    async def _admit(self, app_id: str, payer: admission.PayerRef, amount: int,
                     connection: Connection | None) -> admission.Admitted:
        """``admission.admit``, owned whatever happens to this call: cancelled while the
        ledger admits (a grant's commit; on a shared database, every admission's round
        trip), the admission runs on and the hold it got is released, a grant's request
        given back. Without this the hold stayed until the sweep took it, narrowing the
        cap and using a request of the grant for nothing."""
        # SQLite admits a user's call in one synchronous check-and-add in memory: no
        # await, nothing to cancel in, so the hot path pays no task.
        if payer.grant_token is None and self.gw.store.kind == "sqlite":
            return await admission.admit(self.gw, app_id, payer, amount,
                                         now=self.gw.clock(), connection=connection)
        admitting = asyncio.ensure_future(admission.admit(
            self.gw, app_id, payer, amount, now=self.gw.clock(), connection=connection))
        try:
            return await asyncio.shield(admitting)
        except asyncio.CancelledError:
            self.owed.add(admitting)  # close() waits for it and for its release
            admitting.add_done_callback(self._release_orphan)
            admitting.add_done_callback(self.owed.discard)
            raise

    def _release_orphan(self, admitting: "asyncio.Future[admission.Admitted]") -> None:
        if admitting.cancelled() or admitting.exception() is not None:
            return  # nothing was held
        admitted = admitting.result()
        release = asyncio.ensure_future(self.gw.store.release(
            admitted.hold, refund_request=admitted.grant_id is not None))
        self.owed.add(release)
        release.add_done_callback(self.owed.discard)

    async def close(self) -> None:
        """Let running drains (and releases of cancelled admissions) settle, bounded,
        before the store closes."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.gw.config.metering_drain_seconds + 5
        while (pending := self.drains | self.owed) and (left := deadline - loop.time()) > 0:
            await asyncio.wait(pending, timeout=left)


class Call:
    """One admitted call: owns its hold until settled or released, exactly once."""

    def __init__(self, service: CallService, admitted: admission.Admitted, estimate: int,
                 model: str, started: float, endpoint: Endpoint) -> None:
        self.service, self.gw, self.admitted = service, service.gw, admitted
        self.endpoint = endpoint
        self.estimate, self.model, self.started = estimate, model, started
        self.closed = False
        self.handed_off = False  # a background drain owns the settle now
        self.reader: StreamReader | None = None
        self.sent: float | None = None  # when the call left for the upstream (metrics)
        self.fitted_max_tokens: int | None = None  # lowered to fit the budget (headroom)

    async def release(self, *, refused: int | None = None) -> None:
        """``refused``: the HTTP code of a non-200 answer before any byte; the call is
        then recorded at $0 for the request log, in the release's own write."""
        if not self.closed:
            self.closed = True
            a = self.admitted
            row = refused_row(app_id=a.app_id, connection_id=a.connection_id,
                              grant_id=a.grant_id, model=self.model, code=refused,
                              started=self.started, now=self.gw.clock(),
                              admitted_at=a.admitted_at) if refused is not None else None
            await self.gw.store.release(  # the write survives cancellation
                a.hold, refund_request=a.grant_id is not None, record=row)

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

    async def run(self, sink: ClientSink, payload: bytes, stream: bool,
                  client_headers: Mapping[str, str], credit: Mapping[str, str]) -> None:
        """``credit``: the app's attribution headers the client did not set itself."""
        self.sent = self.gw.observer.clock()
        try:
            answer = await self.service.upstream.open_call(
                self.endpoint.path, payload, funding_key=self.admitted.funding_key,
                client_headers=client_headers, credit=credit)
        except BaseException:
            await self.release()
            raise
        self.gw.observer.answered(self.sent, answer.status)
        try:
            if answer.status != 200:
                await self._refuse(answer)
            if stream:
                return await self._stream(sink, answer)
            # A whole answer is settled (one commit) before a byte of it is sent.
            if answer.content_type == "text/event-stream":
                return await self._assembled(sink, answer)
            return await self._whole(sink, answer)
        finally:
            if not self.closed and not self.handed_off:
                if answer.status == 200:
                    # Cancelled or failed after the model started answering: it may
                    # bill, so the call is recorded, never just released.
                    self._hand_off(answer, self.reader)
                else:
                    answer.close()
                    await self.release()
            if not self.handed_off:
                answer.done()  # a drain reads on under its own watchdog

    async def _refuse(self, answer: Answer) -> None:
        error = await answer.failure(now=self.gw.clock())
        await self.release(refused=answer.status)
        if isinstance(error, FundingInvalid) and self.admitted.grant_id is None \
                and self.admitted.connection_id is not None:
            await self.gw.store.set_connection_state(self.admitted.connection_id,
                                                     NEEDS_RECONNECT, now=self.gw.clock())
        raise error

    def _response_headers(self, answer: Answer) -> dict[str, str]:
        headers = {k: answer.headers[k] for k in FORWARD_RESPONSE_HEADERS
                   if k in answer.headers}
        if self.admitted.grant_remaining is not None:
            headers["x-wattfare-grant-remaining"] = str(self.admitted.grant_remaining)
        if self.fitted_max_tokens is not None:
            headers["x-wattfare-max-tokens"] = str(self.fitted_max_tokens)
        return headers

    def _note(self, generation: str | None) -> "asyncio.Future[Any] | None":
        """Name the generation in the hold's row (committed before the settle, which is
        queued after it): from here a crash leaves a provisional row, not lost spend.
        The write runs whether or not anyone awaits it (a future, whatever the backend)."""
        if not generation:
            return None
        note = self.gw.store.note_generation(
            self.admitted.hold, generation, self.admitted.app_id, self.model)
        return asyncio.ensure_future(note) if note is not None else None

    @staticmethod
    async def _send_whole(sink: ClientSink, body: bytes, headers: dict[str, str]) -> None:
        """A whole answer, already settled: a client gone by now changes nothing."""
        headers["Content-Length"] = str(len(body))
        try:
            await sink.start(200, headers)
            await sink.write(body)
            await sink.finish()
        except ConnectionError:
            pass

    async def _whole(self, sink: ClientSink, answer: Answer) -> None:
        generation = answer.generation
        self._note(generation)  # the headers came before the body
        try:
            body = await answer.read()
        except BROKE_OFF as e:
            await self.settle(Outcome(generation), "upstream_cut")
            raise UpstreamError(f"The model provider's answer broke off "
                                f"({type(e).__name__}).") from None
        outcome = parse_json_body(body, generation)
        await self.settle(outcome, "ok" if outcome.error is None else "upstream_error")
        await self._send_whole(sink, body, self._response_headers(answer))

    async def _assembled(self, sink: ClientSink, answer: Answer) -> None:
        """A non-streamed call the upstream streamed: one JSON answer, built from it."""
        generation = answer.generation
        self._note(generation)
        # Both read the usage too (the StreamReader's rules).
        assembler = ResponseAssembler() if self.endpoint is RESPONSES else Assembler()
        try:
            async for chunk in answer.chunks():
                assembler.feed(chunk)
        except BROKE_OFF as e:
            answer.close()
            await self.settle(assembler.outcome(generation), "upstream_cut")
            raise UpstreamError(f"The model provider's answer broke off "
                                f"({type(e).__name__}).") from None
        outcome = assembler.outcome(generation)
        if outcome.error is not None:
            answer.close()
            await self.settle(outcome, "upstream_error")
            raise UpstreamError(f"The model provider failed while answering: {outcome.error}")
        whole = assembler.answer()
        if whole is None:  # a Responses stream that ended before its final response
            await self.settle(outcome, "upstream_cut")
            raise UpstreamError("The model provider's answer ended without a final response.")
        await self.settle(outcome, "ok")
        headers = self._response_headers(answer)
        headers.pop("Cache-Control", None)
        headers["Content-Type"] = "application/json"
        await self._send_whole(sink, encode(whole), headers)

    async def _stream(self, sink: ClientSink, answer: Answer) -> None:
        generation = answer.generation
        reader = self.reader = StreamReader(generation)
        # The hold's row names the generation before any body byte leaves.
        noted = self._note(generation)
        headers = self._response_headers(answer)
        # Whatever the upstream called it, the client is sent an event stream (the
        # upstream's parameters, a charset, kept).
        _, has_params, params = headers.get("Content-Type", "").partition(";")
        headers["Content-Type"] = "text/event-stream" + (";" + params if has_params else "")
        try:
            await sink.start(200, headers)
        except ConnectionError:
            # The client left before the headers: the model answers all the same.
            self._hand_off(answer, reader)
            return
        if noted is not None and not noted.done():
            await asyncio.wait([noted])  # a failed write is logged; the call goes on
        read, feed = answer.reader(), reader.feed
        write = sink.write  # bound once started: the hot loop looks nothing else up
        while True:
            try:
                chunk = await read()
            except BROKE_OFF:
                # Upstream cut or went silent: keep what was sent, settle what is known.
                await self.settle(reader.close(), "upstream_cut")
                answer.close()
                return
            if not chunk:
                break
            if feed(chunk) and not self.closed:
                # The debit commits before the client sees [DONE]: a status read
                # right after the stream already includes this call.
                outcome = reader.close()
                await self.settle(outcome, "ok" if outcome.error is None else "upstream_error")
            try:
                await write(chunk)
            except ConnectionError:
                if not self.closed:
                    self._hand_off(answer, reader)
                return
        outcome = reader.close()
        await self.settle(outcome, "ok" if outcome.error is None else "upstream_error")
        try:
            await sink.finish()
        except ConnectionError:
            pass

    def _hand_off(self, answer: Answer, reader: StreamReader | None) -> None:
        """The client left: learn the real cost from the rest of the upstream answer.

        Bounded in time (drain_seconds) and in number (max_drains); past the
        bound, or for a non-streamed answer, the call is recorded at its
        estimate, marked provisional, for reconciliation.
        """
        self.handed_off = True
        drains = self.service.drains
        if reader is None or len(drains) >= self.gw.config.metering_max_drains:
            answer.close()
            outcome = reader.close() if reader is not None else Outcome(answer.generation)
            task = asyncio.ensure_future(self.settle(outcome, "client_gone"))
        else:
            task = asyncio.ensure_future(self._drain(answer, reader))
        drains.add(task)
        task.add_done_callback(drains.discard)

    async def _drain(self, answer: Answer, reader: StreamReader) -> None:
        async def read_rest() -> None:
            async for chunk in answer.chunks():
                reader.feed(chunk)
        try:
            await asyncio.wait_for(read_rest(), self.gw.config.metering_drain_seconds)
        except BROKE_OFF:
            pass
        except asyncio.CancelledError:
            await self.settle(reader.close(), "client_gone")
            raise
        finally:
            answer.close()
        await self.settle(reader.close(), "client_gone")


__all__ = ["Ask", "Call", "CallService", "ClientSink", "FORWARD_RESPONSE_HEADERS"]
