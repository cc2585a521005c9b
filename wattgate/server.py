"""The HTTP server runner: how ``wattgate serve`` holds client connections.

aiohttp bounds an idle connection (``keepalive_timeout``) but not a client
that trickles its request: a head sent a byte a second, or a body slower than
any real upload, would hold the connection (and the handler waiting on it)
for ever. ``GuardedRequestHandler`` adds the two missing bounds:

- ``server.header_timeout``: from the first byte of a request's line and
  headers until the last; past it the client gets a 408 with the error body
  and is disconnected (after the answer under way, if a pipelining client
  stalled behind one).
- ``server.body_timeout``: from the end of the headers until the body's last
  byte; past it the handler's read fails with ``RequestTimeout`` (408, the
  error body) and the connection closes after that answer. Handlers read the
  body before they admit a call, so a slow body never holds a budget hold.

(A head's clock starts with the first packet that carries part of it without
completing it; a partial head that came in one packet with the request before
it, and nothing after, is an idle connection: ``keepalive_timeout`` ends it.)
Both bound what the client sends. The third bounds what the client takes:

- ``server.write_timeout``: once the connection's buffers are full (asyncio's
  ``pause_writing``: the kernel holds all it will and 64 KiB more wait), the
  client has that long to take a byte of them; one that takes none is taken
  for gone and the transport aborted. The write waiting on it fails as on a
  disconnect, so a streamed call is handed to the background drain and
  billed, and its hold, its upstream stream and the connection are freed.
  Progress is what the client acknowledged: our buffer plus the kernel's
  unacknowledged bytes (``SIOCOUTQ``, where the platform has it), since on a
  fast link the kernel alone may hold megabytes a steady reader takes for
  seconds before our buffer moves. It bounds each wait, never the whole
  answer: a client that keeps reading gets a stream as long as the upstream
  sends.

The hot path stays cheap: a head or body that arrives whole with its first
packet arms no timer at all, nor does an answer the client takes as it comes.

It also keeps aiohttp's HTTP parser errors out of the log as raw bytes: a
malformed or over-long request line or header is answered with the JSON
error body and logged as one line naming the kind of error, never quoting
what the client sent (which may be a secret key or a cookie).

``run(app, config, ready)`` serves an app the way ``web.run_app`` would (signals,
graceful shutdown), with this handler, on the loop ``new_event_loop`` makes for
``server.event_loop`` (uvloop where installed); tests use ``ServerRunner`` directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import gc
import json
import logging
import signal
import socket
import struct
import termios
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import ClientConnectionResetError, web
from aiohttp.http_exceptions import BadHttpMethod, HttpProcessingError, LineTooLong
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler

from .config import Config
from .errors import ConfigError, InvalidRequest, RequestTimeout, WattgateError
from .supervisor import LISTEN_BACKLOG

log = logging.getLogger("wattgate.http")

# Linux's SIOCOUTQ (bytes the peer has not acknowledged) is TIOCOUTQ on a socket.
_SIOCOUTQ: int | None = getattr(termios, "TIOCOUTQ", None)


@dataclass(frozen=True)
class ClientLimits:
    header_timeout: float
    body_timeout: float
    keepalive_timeout: float
    write_timeout: float = 60.0

    @classmethod
    def from_config(cls, config: Config) -> ClientLimits:
        return cls(config.server_header_timeout, config.server_body_timeout,
                   config.server_keepalive_timeout, config.server_write_timeout)


class _BodyTimeout(RequestTimeout, TimeoutError):
    """The body deadline, as the payload's error: a handler reading the body gets the 408
    body (``RequestTimeout``); aiohttp's own read of a body nobody wanted (its lingering
    close) takes it for the timeout it already expects, not an unhandled error."""


def _raw_response(error: WattgateError, reason: str) -> bytes:
    body = json.dumps(error.body()).encode()
    head = (f"HTTP/1.1 {error.status} {reason}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    return head.encode() + body


class GuardedRequestHandler(RequestHandler):
    """aiohttp's connection protocol, with header and body read deadlines and a write
    deadline."""

    def __init__(self, manager: web.Server, *, limits: ClientLimits, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._limits = limits
        self._head_timer: asyncio.TimerHandle | None = None
        self._body: StreamReader | None = None  # a request body still arriving
        self._body_timer: asyncio.TimerHandle | None = None
        self._write_timer: asyncio.TimerHandle | None = None
        self._write_pending = 0  # bytes the client had not taken when the timer was armed

    def data_received(self, data: bytes) -> None:
        count = self._request_count
        super().data_received(data)
        if self._force_close or self._close:
            self._disarm()
            return
        if self._request_count != count:  # a head is complete (maybe several, pipelined)
            self._disarm()
            payload = self._messages[-1][1] if self._messages else None
            if isinstance(payload, StreamReader) and not payload.is_eof():
                self._body = payload
                self._body_timer = self._loop.call_later(self._limits.body_timeout,
                                                         self._body_timed_out)
        elif self._body is not None:
            if self._body.is_eof():
                self._disarm()
        elif data and self._head_timer is None and self._payload_parser is None \
                and not self._upgraded:
            # Part of a head, not all of it: from now on it has header_timeout to finish.
            self._head_timer = self._loop.call_later(self._limits.header_timeout,
                                                     self._head_timed_out)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm()
        self._disarm_write()
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        super().pause_writing()
        # The client has stopped taking bytes, at least for now: it has write_timeout to
        # take some of them.
        self._arm_write()

    def _arm_write(self) -> None:
        self._disarm_write()
        if self.transport is not None:
            self._write_pending = _unacknowledged(self.transport)
            self._write_timer = self._loop.call_later(self._limits.write_timeout,
                                                      self._write_timed_out)

    def resume_writing(self) -> None:
        self._disarm_write()
        super().resume_writing()

    def _disarm_write(self) -> None:
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def _write_timed_out(self) -> None:
        self._write_timer = None
        transport = self.transport
        if transport is None:
            return
        if _unacknowledged(transport) < self._write_pending:
            self._arm_write()  # slow but taking bytes: a new deadline from here
            return
        log.info("closing a connection to %s: it took no answer bytes for %gs",
                 _peer(transport), self._limits.write_timeout)
        # The write waiting on this client fails now, as on a disconnect (the handler
        # hands its call off at once, not at its next write).
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(ClientConnectionResetError("The client stopped reading."))
        # abort, not close: close would wait to flush the bytes this client never takes.
        transport.abort()

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        self._body = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        transport = self.transport
        if transport is None or self._force_close:
            return
        log.info("closing a connection from %s: request headers took longer than %gs",
                 _peer(transport), self._limits.header_timeout)
        if self._current_request is not None:
            # A pipelined head stalled behind an answer still streaming: let that answer
            # finish (what we send is not bounded here), read nothing more, then close.
            self.close()
            return
        transport.write(_raw_response(
            RequestTimeout("The request headers did not arrive in time."), "Request Timeout"))
        self.force_close()

    def _body_timed_out(self) -> None:
        payload, self._body, self._body_timer = self._body, None, None
        if payload is None or payload.is_eof():
            return
        if self.transport is not None:
            log.info("gave up on a request body from %s: slower than %gs",
                     _peer(self.transport), self._limits.body_timeout)
        payload.set_exception(_BodyTimeout())
        payload.feed_eof()  # nothing more is read: no lingering wait for the rest
        self.close()  # answer this request, then close: the unread rest is not a request

    def handle_error(self, request: web.BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if not isinstance(exc, HttpProcessingError):
            return super().handle_error(request, status, exc, message)
        # aiohttp would log (and answer) the parser's message, which quotes the bytes it
        # choked on: a header value, so maybe a secret. Name the kind of error only.
        level = logging.DEBUG if isinstance(exc, BadHttpMethod) else logging.INFO
        log.log(level, "refused a malformed HTTP request from %s: %s", request.remote,
                type(exc).__name__)
        error = InvalidRequest("A request line or header is too long."
                               if isinstance(exc, LineTooLong) else "Malformed HTTP request.")
        response = web.Response(status=status if 400 <= status < 500 else 400,
                                text=json.dumps(error.body()), content_type="application/json")
        response.force_close()
        return response


def _unacknowledged(transport: asyncio.Transport) -> int:
    """Bytes written to the client that it has not acknowledged: ours, and the kernel's."""
    pending = transport.get_write_buffer_size()
    sock = transport.get_extra_info("socket")
    if _SIOCOUTQ is not None and sock is not None:
        try:
            pending += struct.unpack("i", fcntl.ioctl(sock.fileno(), _SIOCOUTQ, b"\0" * 4))[0]
        except OSError:  # not a TCP socket (a Unix one under a proxy): our buffer alone
            pass
    return pending


def _peer(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    return str(peer[0]) if isinstance(peer, tuple) and peer else "?"


class GuardedServer(web.Server):
    """aiohttp's Server whose connections are ``GuardedRequestHandler``."""

    def __init__(self, *args: Any, limits: ClientLimits, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._limits = limits

    def __call__(self) -> RequestHandler:
        return GuardedRequestHandler(self, loop=self._loop, limits=self._limits, **self._kwargs)


class ServerRunner(web.AppRunner):
    """``web.AppRunner`` serving with ``GuardedServer``; limits from the config."""

    def __init__(self, app: web.Application, *, limits: ClientLimits, **kwargs: Any) -> None:
        super().__init__(app, keepalive_timeout=limits.keepalive_timeout, **kwargs)
        self._limits = limits

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()  # runs the app's startup
        return GuardedServer(plain.request_handler, request_factory=plain.request_factory,
                             handler_cancellation=plain.handler_cancellation,
                             loop=plain._loop, limits=self._limits, **plain._kwargs)


async def _serve(app: web.Application, config: Config, ready: Callable[[], None],
                 sockets: Sequence[socket.socket] | None) -> None:
    worker = sockets is not None
    stop = asyncio.Event()
    if worker:
        # A worker of ``serve --workers``: the first SIGTERM drains it; more (the parent's
        # and a service manager's) change nothing, so none cuts the drain short.
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    runner = ServerRunner(app, limits=ClientLimits.from_config(config),
                          handle_signals=not worker, access_log=None,
                          shutdown_timeout=config.server_shutdown_timeout)
    await runner.setup()
    try:
        if sockets is None:
            await web.TCPSite(runner, config.server_host, config.server_port,
                              backlog=LISTEN_BACKLOG).start()
        else:
            for sock in sockets:
                await web.SockSite(runner, sock).start()
        # What exists now (modules, the app, its caches and templates) lives as long as
        # the process: frozen, the collector never walks it again (a full collection
        # walked all of it, ~2–3 % of a busy gateway's CPU in the profile).
        gc.collect()
        gc.freeze()
        ready()
        if not worker:
            while True:
                await asyncio.sleep(3600)
        await stop.wait()
    finally:
        await runner.cleanup()


def new_event_loop(choice: str = "auto") -> asyncio.AbstractEventLoop:
    """The loop ``server.event_loop`` names: ``uvloop``, ``asyncio`` or ``auto`` (uvloop
    where it is installed, else asyncio's). The benchmark's bare hop runs on the same."""
    if choice != "asyncio":
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise ConfigError("server.event_loop: uvloop is not installed "
                                  "(pip install uvloop), or set it to asyncio") from None
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def run(app: web.Application, config: Config, ready: Callable[[], None], *,
        sockets: Sequence[socket.socket] | None = None) -> None:
    """Serve until SIGINT/SIGTERM, then shut down gracefully (as ``web.run_app``).

    ``sockets``: serve these listening sockets (a worker of ``serve --workers``,
    which inherits them from its supervisor) instead of binding
    ``server.host:server.port``.
    """
    loop = new_event_loop(config.server_event_loop)
    log.debug("event loop: %s (server.event_loop = %s)", type(loop).__module__.split(".")[0],
              config.server_event_loop)
    main = loop.create_task(_serve(app, config, ready, sockets))
    try:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(main)
    except (web.GracefulExit, KeyboardInterrupt):
        pass
    finally:
        try:
            if not main.done():
                main.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    loop.run_until_complete(main)
        finally:
            rest = asyncio.all_tasks(loop)
            for task in rest:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*rest, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
