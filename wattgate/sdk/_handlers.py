"""The token route: what a session handler answers, and its aiohttp form.

``mint_answer`` holds the behaviour the reference defines for
``sessionHandler`` whatever the framework: resolve the signed-in user (None:
401), work out the cap to request (a value or a function of the request),
mint a session, answer ``{"token", "expiresAt"}``; a ``WattfareError`` answers
its own body and status, anything else a generic 500 (logged here, never shown
to the browser). Framework adapters only turn the (status, body, headers)
triple into their response type: aiohttp here, Starlette/FastAPI in ``_asgi``.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from ._errors import WattfareError

if TYPE_CHECKING:
    from ._client import SessionRequestSource, Wattfare

log = logging.getLogger("wattgate.sdk")

Answer = tuple[int, dict[str, Any], dict[str, str]]

NOT_SIGNED_IN: Answer = (401, {"error": {"code": "auth", "message": "Not signed in."}}, {})
INTERNAL: Answer = (500, {"error": {"code": "internal", "message": "Internal error."}}, {})


async def _resolved(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


async def mint_answer(wf: Wattfare, request: Any, resolve_user: Callable[[Any], Any],
                      session_request: SessionRequestSource) -> Answer:
    try:
        user = await _resolved(resolve_user(request))
        if user is None:
            return NOT_SIGNED_IN
        wanted = session_request(request) if callable(session_request) else session_request
        created = await wf.create_session(user, await _resolved(wanted))
        return 200, created.to_dict(), {}
    except WattfareError as e:
        headers = {"Retry-After": str(e.retry_after)} if e.retry_after is not None else {}
        return e.status, e.to_dict(), headers
    except Exception:
        log.exception("the session handler failed")
        return INTERNAL


def aiohttp_session_handler(wf: Wattfare, resolve_user: Callable[[web.Request], Any],
                            session_request: SessionRequestSource,
                            ) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def session_handler(request: web.Request) -> web.Response:
        status, body, headers = await mint_answer(wf, request, resolve_user, session_request)
        # Tokens are per-user and short-lived: no cache may keep or share one.
        return web.json_response(body, status=status,
                                 headers={"Cache-Control": "no-store", **headers})
    return session_handler
