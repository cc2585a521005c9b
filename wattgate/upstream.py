"""The upstream model provider (OpenRouter or any OpenAI-compatible API).

Owns the process's one ``aiohttp.ClientSession`` (with a ``DummyCookieJar``,
so upstream cookies never pass between users) and translates every upstream
failure into wattgate's errors in one place, ``map_failure``. The price list
from ``GET /models`` is cached and refreshed in the background.
"""

from __future__ import annotations

import asyncio
import json
import logging
from decimal import Decimal
from typing import Any, Callable

import aiohttp

from .errors import FundingInvalid, UpstreamError, UpstreamTimeout, WattgateError
from .pricing import PriceList

log = logging.getLogger("wattgate.upstream")


def upstream_message(status: int, body: bytes) -> str:
    try:
        data = json.loads(body)
        message = data["error"]["message"]
        if isinstance(message, str) and message:
            return message[:500]
    except (ValueError, KeyError, TypeError):
        pass
    return f"The model provider answered HTTP {status}."


def map_failure(status: int, body: bytes) -> WattgateError:
    """The one mapping from an upstream HTTP error to the error our client sees."""
    message = upstream_message(status, body)
    if status in (401, 402):
        return FundingInvalid(f"The user's funding key was refused upstream: {message}")
    if status == 408:
        return UpstreamTimeout(message)
    return UpstreamError(message)


class Upstream:
    def __init__(self, base_url: str, *, key_check_path: str = "/key",
                 connect_timeout: float = 10.0, first_byte_timeout: float = 120.0,
                 idle_timeout: float = 120.0, models_ttl: float = 600.0,
                 clock: Callable[[], float]) -> None:
        self.base_url = base_url.rstrip("/")
        self.key_check_path = key_check_path
        self.timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout,
                                             sock_read=idle_timeout)
        self.first_byte_timeout = first_byte_timeout
        self.session: aiohttp.ClientSession | None = None
        self.prices = PriceList(ttl=models_ttl)
        self._clock = clock
        self._refreshing: asyncio.Task[None] | None = None

    @classmethod
    def from_config(cls, config: Any, *, clock: Callable[[], float]) -> "Upstream":
        return cls(config.upstream_base_url, key_check_path=config.upstream_key_check_path,
                   connect_timeout=config.upstream_connect_timeout,
                   first_byte_timeout=config.upstream_first_byte_timeout,
                   idle_timeout=config.upstream_idle_timeout,
                   models_ttl=config.upstream_models_ttl, clock=clock)

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
        self.session = aiohttp.ClientSession(
            connector=connector, cookie_jar=aiohttp.DummyCookieJar(), timeout=self.timeout,
            auto_decompress=False, skip_auto_headers=("User-Agent",))

    async def close(self) -> None:
        if self._refreshing is not None:
            self._refreshing.cancel()
        if self.session is not None:
            await self.session.close()

    def url(self, path: str) -> str:
        return self.base_url + path

    async def check_key(self, funding_key: str) -> None:
        """Raise FundingInvalid if the upstream refuses this key, UpstreamError if unreachable."""
        assert self.session is not None
        path = self.key_check_path or "/models"
        try:
            async with self.session.get(
                    self.url(path), headers={"Authorization": f"Bearer {funding_key}"},
                    timeout=aiohttp.ClientTimeout(total=self.first_byte_timeout)) as resp:
                body = await resp.read()
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            raise UpstreamError(f"Could not reach the model provider to check the key "
                                f"({type(e).__name__}).") from None
        if resp.status in (401, 402, 403):
            raise FundingInvalid("The model provider refused this funding key.")
        if resp.status >= 400:
            raise map_failure(resp.status, body)

    async def fetch_models(self) -> tuple[int, bytes, str]:
        assert self.session is not None
        try:
            async with self.session.get(
                    self.url("/models"),
                    timeout=aiohttp.ClientTimeout(total=self.first_byte_timeout)) as resp:
                body = await resp.read()
                return resp.status, body, resp.headers.get("Content-Type", "application/json")
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            raise UpstreamError(f"Could not reach the model provider ({type(e).__name__}).") \
                from None

    async def generation_cost(self, generation_id: str, funding_key: str) -> Decimal | None:
        """The final cost of a generation, or None while the upstream does not know it yet."""
        assert self.session is not None
        try:
            async with self.session.get(
                    self.url("/generation"), params={"id": generation_id},
                    headers={"Authorization": f"Bearer {funding_key}"},
                    timeout=aiohttp.ClientTimeout(total=self.first_byte_timeout)) as resp:
                if resp.status != 200:
                    return None
                body = await resp.read()
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return None
        try:
            cost = json.loads(body, parse_float=Decimal)["data"]["total_cost"]
        except (ValueError, KeyError, TypeError):
            return None
        if isinstance(cost, bool) or not isinstance(cost, (int, Decimal)) or cost < 0:
            return None
        return Decimal(cost)

    async def refresh_prices(self) -> None:
        status, body, _ = await self.fetch_models()
        if status != 200:
            raise map_failure(status, body)
        try:
            data = json.loads(body, parse_float=Decimal)
        except ValueError:
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
