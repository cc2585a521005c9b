"""GET /metrics: the gateway's Prometheus metrics, for the operator's scraper only.

Who may read it (``[metrics]``): nobody when ``enabled = false`` (404); a
client on the loopback interface; anyone when ``allow_remote = true``; or a
client sending ``Authorization: Bearer`` with the token held in
``token_file``. Behind a proxy listed in ``server.trusted_proxies`` the client
is the one its ``X-Forwarded-For`` names (``clientaddr``); a request carrying
``Forwarded`` or ``X-Forwarded-For`` from any other peer came through a proxy
we were not told of, so its loopback peer address proves nothing: it needs
``allow_remote`` or the token. Refusals use the API's error body.

Values that need the database (holds open, reconciliation backlog) are read
here, at scrape time, with two indexed counts; nothing is read per request.
"""

from __future__ import annotations

import hmac
from functools import lru_cache
from pathlib import Path

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from ..config import Config
from ..errors import AuthError, ConfigError, MetricsForbidden, NotFound
from ..keyfile import check_strong
from .inputs import client_of
from .state import gateway_key


@lru_cache(maxsize=4)
def _token(path: str) -> str:
    try:
        token = Path(path).read_text().strip()
    except OSError as e:
        raise ConfigError(f"metrics.token_file {path}: {e.strerror}") from None
    # No limiter guards this comparison: the token's strength is what stops guessing.
    check_strong(token, f"metrics.token_file {path}: the token")
    return token


def check_token_file(config: Config) -> None:
    """Fail at start, not at the first scrape, when the token file is unusable."""
    if config.metrics_enabled and config.metrics_token_file:
        _token(config.metrics_token_file)


def _is_loopback(config: Config, request: web.Request) -> bool:
    client = client_of(config, request)
    if client.proxied:
        return client.is_loopback
    if "Forwarded" in request.headers or "X-Forwarded-For" in request.headers:
        return False
    return client.is_loopback


def _allowed(config: Config, request: web.Request) -> bool:
    if config.metrics_allow_remote or _is_loopback(config, request):
        return True
    if not config.metrics_token_file:
        return False
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise AuthError("/metrics needs Authorization: Bearer with the metrics token.")
    if not hmac.compare_digest(value.strip().encode(), _token(config.metrics_token_file).encode()):
        raise AuthError("Wrong metrics token.")
    return True


async def metrics(request: web.Request) -> web.Response:
    gw = request.app[gateway_key]
    if not gw.config.metrics_enabled:
        raise NotFound()
    if not _allowed(gw.config, request):
        raise MetricsForbidden()
    gw.observer.set_gauges(holds_open=await gw.store.open_holds(),
                           backlog=await gw.store.provisional_count())
    response = web.Response(body=gw.observer.exposition())
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    response.headers["Cache-Control"] = "no-store"
    return response
