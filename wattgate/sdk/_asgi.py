"""The token route for ASGI frameworks built on Starlette (Starlette itself, FastAPI).

The handler is an ordinary endpoint taking a ``starlette.requests.Request``:
``Route("/api/wattfare-token", handler, methods=["POST"])`` in Starlette,
``app.post("/api/wattfare-token")(handler)`` in FastAPI (which injects the
request because of the annotation). Imported only when asked for, so the SDK
does not need Starlette otherwise. Behaviour lives in ``_handlers.mint_answer``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

try:
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
except ImportError:  # pragma: no cover - exercised only without starlette
    raise ImportError("asgi_session_handler needs Starlette (FastAPI installs it): "
                      "pip install starlette") from None

from ._handlers import mint_answer

if TYPE_CHECKING:
    from ._client import SessionRequestSource, Wattfare


def asgi_session_handler(wf: Wattfare, resolve_user: Callable[[Request], Any],
                         session_request: SessionRequestSource,
                         ) -> Callable[[Request], Awaitable[Response]]:
    async def session_handler(request: Request) -> Response:
        status, body, headers = await mint_answer(wf, request, resolve_user, session_request)
        return JSONResponse(body, status_code=status,
                            headers={"Cache-Control": "no-store", **headers})
    # FastAPI reads the annotation to inject the request; give it the class, not a string.
    session_handler.__annotations__ = {"request": Request, "return": Response}
    return session_handler
