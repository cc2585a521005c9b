"""The upstream model provider (OpenRouter or any OpenAI-compatible API).

Owns the process's one ``aiohttp.ClientSession`` (with a ``DummyCookieJar``,
so upstream cookies never pass between users) and translates every upstream
failure into wattgate's errors in one place, ``map_failure``. The price list
from ``GET /models`` is cached and refreshed in the background.

A metered call's upstream leg is ``Upstream.open_call``: it builds the request
(the funding key, and only the whitelisted client headers), POSTs it within
``first_byte_timeout`` and hands back an ``Answer`` (status, headers, the body
as an async byte iterator read under the idle timeout). What the call does
with the answer (tee, settle, drain) is ``calls.CallService``'s; this module
never touches the ledger.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import select
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp

from . import attribution
from .errors import BudgetExceeded, FundingInvalid, RateLimited, UpstreamError, UpstreamTimeout, WattgateError
from .jsonread import loads_exact
from .metering import generation_charge
from .money import usd_to_nanos
from .pricing import PriceList

log = logging.getLogger("wattgate.upstream")

# Only these request headers reach the upstream: never the app's secret key,
# x-wattfare-*, cookies or hop-by-hop headers. The client's attribution headers win
# over the app's (attribution.py); each is made one safe line.
FORWARD_REQUEST_HEADERS = ("Accept",)
FORWARD_ATTRIBUTION_HEADERS = (attribution.REFERER, *attribution.TITLE_NAMES)
MAX_ERROR_BODY = 64 * 1024

# What reading an answer's body raises when the upstream cut it or went silent past
# the idle timeout: the answer broke off (callers need not import aiohttp to catch it).
BROKE_OFF: tuple[type[BaseException], ...] = (aiohttp.ClientError, asyncio.TimeoutError)


@dataclass(frozen=True)
class KeyLimit:
    """A funding key's own credit limit at OpenRouter (``GET /key``): what the upstream
    itself refuses past, whatever this gateway does."""

    limit_nanos: int | None  # None: the key has no limit of its own
    reset: str | None        # daily | weekly | monthly; None: the limit never resets
    label: str | None


def key_limit_of(body: bytes) -> KeyLimit | None:
    """Read ``GET /key``'s answer; None when it is not the documented shape."""
    try:
        data = loads_exact(body).get("data")
        limit = data.get("limit")
        nanos = None if limit is None else usd_to_nanos(limit)
    except (ValueError, AttributeError, RecursionError):
        return None
    if nanos is not None and nanos < 0:
        return None
    reset = data.get("limit_reset")
    label = data.get("label")
    return KeyLimit(nanos, reset if isinstance(reset, str) else None,
                    label if isinstance(label, str) else None)


def upstream_message(status: int, body: bytes) -> str:
    try:
        data = json.loads(body)
        message = data["error"]["message"]
        if isinstance(message, str) and message:
            return message[:500]
    except (ValueError, KeyError, TypeError, RecursionError):
        pass
    return f"The model provider answered HTTP {status}."


# Decoded sizes past which an answer is refused: a compressed answer can decode to
# a thousand times its bytes. The model list is ~2 MB; a key or generation ~1 kB.
MAX_MODELS_BODY = 64 * 1024 * 1024
MAX_SMALL_BODY = 1024 * 1024


class TooLarge(Exception):
    pass


async def read_bounded(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """The (decoded) body, or ``TooLarge`` as soon as it passes ``limit`` bytes."""
    parts: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise TooLarge
        parts.append(chunk)
    return b"".join(parts)


# A Retry-After beyond a day is not a rate limit we pass on as such.
MAX_RETRY_AFTER = 86_400


def retry_after_seconds(value: str | None, now: float) -> int:
    """Seconds from a Retry-After header (delta-seconds or an HTTP-date), at least 1."""
    if not value:
        return 1
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - now
        except (TypeError, ValueError, IndexError, OverflowError):
            return 1
    if not math.isfinite(seconds):
        return 1
    return int(min(max(1.0, math.ceil(seconds)), MAX_RETRY_AFTER))


def map_failure(status: int, body: bytes, headers: Mapping[str, str] | None = None, *,
                now: float = 0.0) -> WattgateError:
    """The one mapping from an upstream HTTP error to the error our client sees.

    A 429 stays a 429 (``rate_limited``) with the upstream's ``Retry-After`` (1 s when
    it sent none), so clients back off as the provider asks instead of seeing a 502.
    """
    message = upstream_message(status, body)
    if status in (401, 402):
        return FundingInvalid(f"The user's funding key was refused upstream: {message}")
    if status == 403 and "key limit exceeded" in message.lower():
        # The key's own credit limit at OpenRouter (set to the cap by Connect with
        # OpenRouter, or by the user on a pasted key): spent, not broken; no reconnect.
        return BudgetExceeded("The user's OpenRouter key reached its own credit limit "
                              f"at OpenRouter: {message}")
    if status == 408:
        return UpstreamTimeout(message)
    if status == 429:
        return RateLimited(f"The model provider is rate limiting: {message}",
                           retry_after=retry_after_seconds(
                               (headers or {}).get("Retry-After"), now))
    return UpstreamError(message)


def _closed_by_peer(connection: Any) -> bool:
    """Whether an idle pooled connection is readable: the upstream closed it (EOF) or
    sent something unasked, which an idle HTTP/1.1 connection never gets. One poll(0)."""
    transport = connection.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None:
        return False
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN | select.POLLPRI)
    return bool(poller.poll(0))


class FreshConnector(aiohttp.TCPConnector):
    """Never hands out a pooled connection the upstream has already closed.

    An upstream (or the CDN before it) closes idle keep-alive connections. When its
    close reaches our socket while the loop is busy, aiohttp still believes the
    connection is open, writes the next request on it and fails with
    ``ServerDisconnectedError``; it retries only GETs, and a POST must not be retried
    blindly (it may have reached the provider and be billed). So the check happens
    before anything is written: a pooled connection with its close (or any byte)
    already waiting is dropped and another one taken. Nothing was sent on it, so
    nothing can have been billed. A close racing with our write (still on the wire)
    remains possible and ends as ``502 upstream`` with the hold released; it is not
    retried. Costs one ``poll`` per reused connection; relies on aiohttp's
    ``TCPConnector._get`` (tested in tests/test_wire_functional.py).
    """

    async def _get(self, *args: Any, **kwargs: Any) -> Any:
        while True:
            connection = await super()._get(*args, **kwargs)  # type: ignore[misc]
            if connection is None or not _closed_by_peer(connection):
                return connection
            connection.close()  # dropped, never returned to the pool


# The idle watchdog looks at an answer this many times per upstream.idle_timeout: an
# upstream silent for idle_timeout is cut within 1¼ × idle_timeout.
IDLE_TICKS = 4


class Answer:
    """The upstream's answer to one metered call, once its status and headers came.

    The body is read once, by ``chunks`` (as it arrives) or ``read`` (whole); either
    raises one of ``BROKE_OFF`` when the answer breaks off. ``close`` drops the
    connection (safe to repeat); ``done`` says the call no longer reads it.

    ``idle_timeout``: the answer is cut (``aiohttp.SocketTimeoutError``, as aiohttp's
    own ``sock_read`` would) once no byte of it came for that long. aiohttp's bound
    re-arms a timer at every chunk received, the largest cost a long stream's events
    paid beyond their bytes; this watchdog instead looks at the bytes received so far
    ``IDLE_TICKS`` times per ``idle_timeout``: one timer per tick, none per chunk.
    """

    __slots__ = ("status", "headers", "generation", "_resp", "_idle", "_seen", "_quiet",
                 "_timer")

    def __init__(self, resp: aiohttp.ClientResponse, idle_timeout: float | None = None) -> None:
        self._resp = resp
        self.status = resp.status
        self.headers: Mapping[str, str] = resp.headers
        # The id the upstream named the call by, as the ledger keeps it (an empty
        # header is none: the id is then taken from the answer's own events).
        self.generation: str | None = resp.headers.get("X-Generation-Id", "")[:200] or None
        self._idle = idle_timeout or 0.0
        self._seen = -1
        self._quiet = 0.0
        self._timer: asyncio.TimerHandle | None = None
        if self._idle > 0:
            self._timer = asyncio.get_running_loop().call_later(self._idle / IDLE_TICKS,
                                                                self._watch)

    def _watch(self) -> None:
        self._timer = None
        content = self._resp.content
        if self._resp.closed or content.is_eof():
            return
        tick = self._idle / IDLE_TICKS
        if content.total_bytes != self._seen:
            self._seen, self._quiet = content.total_bytes, 0.0
        else:
            self._quiet += tick
            if self._quiet >= self._idle * (1 - 1e-9):
                content.set_exception(aiohttp.SocketTimeoutError(
                    "Timeout on reading data from socket"))
                self._resp.close()
                return
        self._timer = asyncio.get_running_loop().call_later(tick, self._watch)

    def done(self) -> None:
        """The call reads no more of this answer: its watchdog stops."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    @property
    def content_type(self) -> str:
        return self._resp.content_type

    def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives, never buffered (aiohttp's own iterator: no extra
        frame per chunk)."""
        return self._resp.content.iter_any()

    def reader(self) -> Callable[[], Awaitable[bytes]]:
        """What ``chunks`` iterates, bare: each await is the next piece of the body as it
        arrived, ``b""`` at its end (aiohttp's ``readany``: not even the iterator's frame
        per chunk, for a stream's hot loop)."""
        return self._resp.content.readany

    async def read(self) -> bytes:
        return await self._resp.read()

    async def failure(self, *, now: float) -> WattgateError:
        """A non-200 answer as the error our client sees (``map_failure``); the error
        body is read (bounded) and the connection closed."""
        try:
            body = await self._resp.content.read(MAX_ERROR_BODY)
        except BROKE_OFF:
            body = b""
        self._resp.close()
        return map_failure(self.status, body, self.headers, now=now)

    def close(self) -> None:
        self.done()
        self._resp.close()


class Upstream:
    def __init__(self, base_url: str, *, key_check_path: str = "/key",
                 connect_timeout: float = 10.0, first_byte_timeout: float = 120.0,
                 idle_timeout: float = 120.0, models_ttl: float = 600.0,
                 clock: Callable[[], float]) -> None:
        self.base_url = base_url.rstrip("/")
        self.key_check_path = key_check_path
        self.timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout,
                                             sock_read=idle_timeout)
        # A metered call's answer is bounded by its own watchdog (``Answer``), not by
        # aiohttp's sock_read, which costs a timer per chunk of a long stream.
        self.call_timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout)
        self.idle_timeout = idle_timeout
        self.first_byte_timeout = first_byte_timeout
        self.session: aiohttp.ClientSession | None = None
        self.prices = PriceList(ttl=models_ttl)
        self._clock = clock
        self._refreshing: asyncio.Task[None] | None = None

    @classmethod
    def from_config(cls, config: Any, *, clock: Callable[[], float]) -> Upstream:
        return cls(config.upstream_base_url, key_check_path=config.upstream_key_check_path,
                   connect_timeout=config.upstream_connect_timeout,
                   first_byte_timeout=config.upstream_first_byte_timeout,
                   idle_timeout=config.upstream_idle_timeout,
                   models_ttl=config.upstream_models_ttl, clock=clock)

    async def start(self) -> None:
        connector = FreshConnector(limit=0, ttl_dns_cache=300)
        self.session = aiohttp.ClientSession(
            connector=connector, cookie_jar=aiohttp.DummyCookieJar(), timeout=self.timeout,
            # aiohttp asks for gzip and deflate (br with Brotli installed); an upstream
            # behind a CDN honours it. Decoded only when a Content-Encoding came: a plain
            # answer costs nothing more, and the client always gets plain bytes.
            auto_decompress=True, skip_auto_headers=("User-Agent",))

    async def close(self) -> None:
        if self._refreshing is not None:
            self._refreshing.cancel()
        if self.session is not None:
            await self.session.close()

    def url(self, path: str) -> str:
        return self.base_url + path

    async def open_call(self, path: str, payload: bytes, *, funding_key: str,
                        client_headers: Mapping[str, str],
                        credit: Mapping[str, str]) -> Answer:
        """POST one metered call with the user's funding key; the answer once its status
        and headers came, within ``first_byte_timeout`` (``UpstreamTimeout``), or
        ``UpstreamError`` when the provider could not be reached.

        ``client_headers``: the client's request headers, of which only the whitelisted
        ones pass; ``credit``: the app's attribution headers the client did not set.
        """
        headers = {"Authorization": f"Bearer {funding_key}",
                   "Content-Type": "application/json"}
        for name in FORWARD_REQUEST_HEADERS:
            if name in client_headers:
                headers[name] = client_headers[name]
        for name in FORWARD_ATTRIBUTION_HEADERS:
            value = attribution.safe_value(client_headers.get(name, ""))
            if value:
                headers[name] = value
        headers.update(credit)
        assert self.session is not None
        try:
            async with asyncio.timeout(self.first_byte_timeout):
                resp = await self.session.post(self.url(path), data=payload, headers=headers,
                                               timeout=self.call_timeout)
        except asyncio.TimeoutError:
            raise UpstreamTimeout() from None
        except aiohttp.ClientError as e:
            raise UpstreamError(f"Could not reach the model provider "
                                f"({type(e).__name__}).") from None
        return Answer(resp, self.idle_timeout)

    async def check_key(self, funding_key: str) -> None:
        """Raise FundingInvalid if the upstream refuses this key, UpstreamError if unreachable."""
        assert self.session is not None
        path = self.key_check_path or "/models"
        try:
            async with self.session.get(
                    self.url(path), headers={"Authorization": f"Bearer {funding_key}"},
                    timeout=aiohttp.ClientTimeout(total=self.first_byte_timeout)) as resp:
                body = await read_bounded(resp, MAX_SMALL_BODY)
        except TooLarge:
            body = b""  # its status still says whether the key is good
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            raise UpstreamError(f"Could not reach the model provider to check the key "
                                f"({type(e).__name__}).") from None
        if resp.status in (401, 402, 403):
            raise FundingInvalid("The model provider refused this funding key.")
        if resp.status >= 400:
            raise map_failure(resp.status, body, resp.headers, now=self._clock())

    async def key_limit(self, funding_key: str) -> KeyLimit | None:
        """The key's own limit at the upstream, or None when it cannot be read (an
        upstream without ``GET /key``, unreachable, or an answer of another shape)."""
        assert self.session is not None
        try:
            async with self.session.get(
                    self.url("/key"), headers={"Authorization": f"Bearer {funding_key}"},
                    timeout=aiohttp.ClientTimeout(total=self.first_byte_timeout)) as resp:
                body = await read_bounded(resp, MAX_SMALL_BODY)
                status = resp.status
        except (TooLarge, aiohttp.ClientError, asyncio.TimeoutError):
            return None
        return key_limit_of(body) if status == 200 else None

    async def fetch_models(self) -> tuple[int, bytes, Mapping[str, str]]:
        assert self.session is not None
        try:
            async with self.session.get(
                    self.url("/models"),
                    timeout=aiohttp.ClientTimeout(total=self.first_byte_timeout)) as resp:
                body = await read_bounded(resp, MAX_MODELS_BODY)
                return resp.status, body, resp.headers
        except TooLarge:
            raise UpstreamError("The model provider's model list is too large.") from None
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            raise UpstreamError(f"Could not reach the model provider ({type(e).__name__}).") \
                from None

    async def generation_cost(self, generation_id: str,
                              funding_key: str) -> tuple[int | None, str | None]:
        """The final cost of a generation in nano-dollars, by the same rule as the stream's
        usage (``metering.generation_charge``: BYOK calls count the provider's cost too).

        (None, None) while the upstream does not know it yet; (None, why) when its
        answer cannot be believed (no cost, not a number, out of range).
        """
        assert self.session is not None
        try:
            async with self.session.get(
                    self.url("/generation"), params={"id": generation_id},
                    headers={"Authorization": f"Bearer {funding_key}"},
                    timeout=aiohttp.ClientTimeout(total=self.first_byte_timeout)) as resp:
                if resp.status != 200:
                    return None, None
                body = await read_bounded(resp, MAX_SMALL_BODY)
        except TooLarge:
            return None, "the answer is too large"
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return None, None
        try:
            data = loads_exact(body)
        except (ValueError, RecursionError):
            return None, "the answer is not JSON"
        return generation_charge(data.get("data") if isinstance(data, dict) else None)

    async def refresh_prices(self) -> None:
        status, body, headers = await self.fetch_models()
        if status != 200:
            raise map_failure(status, body, headers, now=self._clock())
        try:
            data = loads_exact(body)
        except (ValueError, RecursionError):
            raise UpstreamError("The model provider's model list is not JSON.") from None
        self.prices.load(data, now=self._clock())

    async def price_list(self) -> PriceList:
        """The model prices; fetched when missing, refreshed in the background when stale."""
        now = self._clock()
        if self.prices.loaded_at is None:
            await self.refresh_prices()
        elif self.prices.stale(now) and self._refreshing is None:
            self._refreshing = asyncio.get_running_loop().create_task(self._refresh_quietly())
        return self.prices

    async def _refresh_quietly(self) -> None:
        try:
            await self.refresh_prices()
        except WattgateError as e:
            log.warning("model price refresh failed: %s", e.message)
        finally:
            self._refreshing = None
