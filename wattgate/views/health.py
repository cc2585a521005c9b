"""GET /readyz: whether this gateway can serve calls now, for load balancers and orchestrators.

``/healthz`` (in ``control``) says the process is alive; ``/readyz`` says it is
ready: the ledger answers (``store.ping()``) and the upstream's model price list
is loaded (fetched now if it was not yet, since no call can be priced without it).
200 ``{"ready": true, "checks": {...}}`` or 503 with the same body naming the
check that failed and why. No auth, no secrets in the body.
"""

from __future__ import annotations

from aiohttp import web

from ..errors import WattgateError
from .state import gateway_key, upstream_key


async def _ledger_ok(request: web.Request) -> bool:
    try:
        return await request.app[gateway_key].store.ping()
    except Exception:  # a health check reports, it never raises (ping should not either)
        return False


async def readyz(request: web.Request) -> web.Response:
    checks: dict[str, dict[str, object]] = {}
    ledger = await _ledger_ok(request)
    checks["ledger"] = {"ok": ledger} if ledger else \
        {"ok": False, "message": "The ledger database does not answer."}
    try:
        prices = await request.app[upstream_key].price_list()
        checks["prices"] = {"ok": True, "models": len(prices)} if len(prices) else \
            {"ok": False, "message": "The model provider listed no priced model."}
    except WattgateError as e:
        checks["prices"] = {"ok": False, "message": "The model price list is not loaded: "
                            + e.message}
    ready = all(c["ok"] for c in checks.values())
    response = web.json_response({"ready": ready, "checks": checks}, status=200 if ready else 503)
    response.headers["Cache-Control"] = "no-store"
    return response
