"""The SDK's typed errors, and the one place other libraries' errors become them.

Every error the gateway answers has the body ``{"error": {"code", "message"}}``
and a status; the SDK turns it into the class named after its code:

    WattfareError (code, status, message)
    ├── WattfareInvalidRequestError   400 invalid_request
    ├── WattfareAuthError             401 auth
    ├── WattfarePaymentError          402 (any code below)
    │   ├── WattfareNotConnectedError 402 not_connected
    │   ├── WattfareBudgetError       402 budget_exceeded
    │   ├── WattfareGrantError        402 grant_invalid
    │   └── WattfareFundingError      402 funding_invalid
    ├── WattfareRateLimitError        429 rate_limited   (retry_after, seconds)
    └── WattfareUpstreamError         502 upstream, 504 upstream_timeout

A code this SDK does not know (a newer gateway's) still arrives as a plain
``WattfareError`` carrying that code and status, so callers can always branch
on ``err.code``.

``to_wattfare_error(err)`` is the single translation point: it sees through
the ``openai`` package's ``APIStatusError`` (and a provider error raised mid
stream as ``APIError``) and through ``__cause__`` chains, without importing
``openai`` unless the caller already has.
"""

from __future__ import annotations

import sys
from typing import Any

_CAUSE_DEPTH = 8


class WattfareError(Exception):
    """An error answered by the gateway (or refused by the SDK before sending)."""

    def __init__(self, code: str, status: int, message: str, *,
                 retry_after: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.status = status
        self.message = message
        self.retry_after = retry_after

    def to_dict(self) -> dict[str, Any]:
        """The reference error body, ready to send back as JSON."""
        return {"error": {"code": self.code, "message": self.message}}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, status={self.status}, " \
               f"message={self.message!r})"


class WattfareInvalidRequestError(WattfareError):
    pass


class WattfareAuthError(WattfareError):
    pass


class WattfarePaymentError(WattfareError):
    """A 402: retrying the same call cannot help until the user acts."""


class WattfareNotConnectedError(WattfarePaymentError):
    pass


class WattfareBudgetError(WattfarePaymentError):
    pass


class WattfareGrantError(WattfarePaymentError):
    pass


class WattfareFundingError(WattfarePaymentError):
    pass


class WattfareRateLimitError(WattfareError):
    pass


class WattfareUpstreamError(WattfareError):
    pass


CLASS_BY_CODE: dict[str, type[WattfareError]] = {
    "invalid_request": WattfareInvalidRequestError,
    "auth": WattfareAuthError,
    "not_connected": WattfareNotConnectedError,
    "budget_exceeded": WattfareBudgetError,
    "grant_invalid": WattfareGrantError,
    "funding_invalid": WattfareFundingError,
    "rate_limited": WattfareRateLimitError,
    "upstream": WattfareUpstreamError,
    "upstream_timeout": WattfareUpstreamError,
}


def error_for(code: str, status: int, message: str, *,
              retry_after: int | None = None) -> WattfareError:
    """The typed error for a code; an unknown code keeps its status as a plain one."""
    cls = CLASS_BY_CODE.get(code)
    if cls is None and status == 402:
        cls = WattfarePaymentError
    return (cls or WattfareError)(code, status, message, retry_after=retry_after)


def auth_error(message: str) -> WattfareAuthError:
    return WattfareAuthError("auth", 401, message)


def error_from_body(status: int, body: Any, *, retry_after: Any = None) -> WattfareError | None:
    """The gateway's error from a parsed body (the whole body or its ``error`` member).

    None when the body is not the gateway's shape (a reverse proxy's HTML page,
    a body from some other service): the caller decides what that means.
    """
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        body = body["error"]
    if not isinstance(body, dict) or not isinstance(body.get("code"), str):
        return None
    message = body.get("message")
    return error_for(body["code"], status, message if isinstance(message, str) else body["code"],
                     retry_after=_seconds(retry_after))


def _seconds(value: Any) -> int | None:
    try:
        return max(0, int(value)) if value is not None else None
    except (TypeError, ValueError):
        return None


def to_wattfare_error(err: BaseException | None) -> WattfareError | None:
    """The ``WattfareError`` behind ``err``, or None when it is not one.

    Sees through ``openai.APIStatusError`` (status and body of the gateway's
    answer) and ``openai.APIError`` raised inside a stream (a provider failure
    after the first byte: code ``upstream``, status 502), following
    ``__cause__`` links a few levels deep.
    """
    seen = 0
    while err is not None and seen < _CAUSE_DEPTH:
        found = _translate(err)
        if found is not None:
            return found
        err = err.__cause__
        seen += 1
    return None


def _translate(err: BaseException) -> WattfareError | None:
    if isinstance(err, WattfareError):
        return err
    openai = sys.modules.get("openai")
    if openai is None or not isinstance(err, openai.APIError):
        return None
    if isinstance(err, openai.APIStatusError):
        headers = err.response.headers
        return error_from_body(err.status_code, err.body,
                               retry_after=headers.get("retry-after"))
    if isinstance(err, openai.APIConnectionError):
        return None
    # An error event inside a 200 stream: the provider failed mid-answer.
    body = err.body if isinstance(err.body, dict) else {}
    code = body.get("code")
    message = body["message"] if isinstance(body.get("message"), str) else str(err.message)
    if isinstance(code, str) and code in CLASS_BY_CODE:
        return error_for(code, 502, message)
    return WattfareUpstreamError("upstream", 502, message)
