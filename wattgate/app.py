"""The app factory: the one place the parts of wattgate are wired together.

``create_app(config)`` opens the keys file, the store, the upstream session,
the call service (``calls.CallService``, whose drains it awaits on the way out),
the reconciler and the webhook deliverer (``delivery.Deliverer``) in ``cleanup_ctx`` (teardown runs only if setup did), sweeps holds left by a
previous process, and mounts the routes. Tests pass a config pointing
``upstream.base_url`` at a fake OpenRouter and, where time matters, a clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import AsyncIterator, Callable

from aiohttp import web

from .calls import CallService
from .config import Config
from .delivery import Deliverer
from .errors import ConfigError
from .gateway import open_gateway
from .logs import add_request_id, request_log_middleware
from .middleware import error_middleware
from .reconcile import LEAD_TASK, Reconciler
from .store import StoreInUse
from .upstream import Upstream
from .views import control, grants, health, pages, proxy
from .views.apidoc import openapi_json
from .views import admin
from .views.state import calls_key, gateway_key, upstream_key

log = logging.getLogger("wattgate")


def create_app(config: Config, *, clock: Callable[[], float] = time.time) -> web.Application:
    # Long request lines and headers reach the handlers (which answer JSON 400s)
    # instead of aiohttp's plain-text parser error.
    # The request log is outermost, so each line and count see the status really answered.
    app = web.Application(middlewares=[request_log_middleware, error_middleware],
                          client_max_size=config.server_max_body_bytes,
                          handler_args={"max_line_size": 65536, "max_field_size": 65536})

    async def gateway_ctx(app: web.Application) -> AsyncIterator[None]:
        gw = await open_gateway(config, clock=clock, serving=True)
        try:
            gw.store.claim()  # the contract's step; SQLite took it before opening the file
        except StoreInUse as e:
            gw.store.close_now()
            raise ConfigError(str(e)) from None
        app[gateway_key] = gw
        # Holds no living process will settle (SQLite: all of them; PostgreSQL: those
        # of dead processes).
        swept = await gw.store.sweep_holds(now=gw.clock())
        if swept:
            log.warning("released %d budget holds left by a previous process", swept)
        # A revocation cut short by a crash: erase what nothing can correct any more
        # (the holds swept just now are provisional rows: their keys wait for them).
        # Background work, so only by the process leading it.
        now = gw.clock()
        if await gw.store.lead(LEAD_TASK) and await gw.store.erase_revoked_keys(
                since=now - config.metering_reconcile_give_up, now=now):
            log.warning("erased the funding keys of revoked connections and ended grants")
        yield
        await gw.store.close()

    async def upstream_ctx(app: web.Application) -> AsyncIterator[None]:
        upstream = Upstream.from_config(config, clock=clock)
        await upstream.start()
        app[upstream_key] = upstream
        yield
        await upstream.close()

    app.on_response_prepare.append(add_request_id)
    app.cleanup_ctx.append(gateway_ctx)
    app.cleanup_ctx.append(upstream_ctx)

    async def calls_ctx(app: web.Application) -> AsyncIterator[None]:
        calls = CallService(app[gateway_key], app[upstream_key])
        app[calls_key] = calls
        yield
        await calls.close()  # running drains settle before the upstream and store close

    app.cleanup_ctx.append(calls_ctx)

    async def reconcile_ctx(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.get_running_loop().create_task(
            Reconciler(app[gateway_key], app[upstream_key]).loop())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    app.cleanup_ctx.append(reconcile_ctx)

    async def webhooks_ctx(app: web.Application) -> AsyncIterator[None]:
        deliverer = Deliverer(app[gateway_key])
        await deliverer.start()
        task = asyncio.get_running_loop().create_task(deliverer.loop())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await deliverer.close()

    app.cleanup_ctx.append(webhooks_ctx)

    r = app.router
    r.add_get("/healthz", control.healthz)
    r.add_get("/readyz", health.readyz)
    r.add_post("/api/v1/sessions", control.create_session)
    r.add_get("/api/v1/status", control.get_status)
    for method in ("GET", "POST", "DELETE", "OPTIONS"):  # others: 405 JSON
        r.add_route(method, "/api/v1/connections", control.connections)
    r.add_post("/api/v1/chat/completions", proxy.chat_completions)
    r.add_post("/api/v1/responses", proxy.responses)
    r.add_post("/api/v1/embeddings", proxy.embeddings)
    r.add_get("/api/v1/models", proxy.models)
    for method in ("POST", "OPTIONS"):
        r.add_route(method, "/api/v1/grants", grants.grants)
    r.add_get("/api/v1/grants/current", grants.current)
    r.add_get("/api/v1/openapi.json", openapi_json)
    pages.add_routes(app)  # consent popup, dashboard, /sdk/client.js
    admin.add_routes(app)  # admin console, /metrics, one log line per request
    return app
