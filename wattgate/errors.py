"""The one error hierarchy of wattgate, and the body every error renders to.

Every error a client can see is a ``WattgateError`` subclass carrying its HTTP
status and the reference API's ``code``; the error middleware in
``wattgate.middleware`` renders it as ``{"error": {"code", "message"}}``.

    WattgateError (500 internal)
    ├── InvalidRequest       400 invalid_request
    ├── AuthError            401 auth
    ├── ConsentRequired      403 consent_required   (wattgate addition)
    ├── MetricsForbidden     403 forbidden          (wattgate addition, /metrics only)
    ├── PolicyRefused        403 policy_violation   (wattgate addition, the app's policy)
    ├── NotFound             404 not_found          (wattgate addition)
    ├── MethodNotAllowed     405 method_not_allowed (wattgate addition)
    ├── RequestTimeout       408 request_timeout    (wattgate addition)
    ├── PayloadTooLarge      413 payload_too_large  (wattgate addition)
    ├── PaymentError         402 (abstract)
    │   ├── NotConnected     402 not_connected
    │   ├── BudgetExceeded   402 budget_exceeded
    │   ├── GrantInvalid     402 grant_invalid
    │   └── FundingInvalid   402 funding_invalid
    ├── RateLimited          429 rate_limited (carries retry_after seconds)
    ├── UpstreamError        502 upstream
    ├── UpstreamTimeout      504 upstream_timeout   (wattgate addition)
    └── Unavailable          503 unavailable        (wattgate addition)

This module imports nothing from aiohttp: domain code raises these errors and
only the web layer knows how to turn them into responses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class WattgateError(Exception):
    status = 500
    code = "internal"
    default_message = "Internal error."

    def __init__(self, message: str | None = None) -> None:
        self.message = message or self.default_message
        super().__init__(self.message)

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message}}

    def headers(self) -> dict[str, str]:
        return {}


class InvalidRequest(WattgateError):
    status = 400
    code = "invalid_request"
    default_message = "Malformed body or parameters."


class AuthError(WattgateError):
    status = 401
    code = "auth"
    default_message = "Missing or invalid secret key or session token."


class ConsentRequired(WattgateError):
    status = 403
    code = "consent_required"
    default_message = (
        "This change needs the end user's consent: approve it in the consent popup."
    )


class MetricsForbidden(WattgateError):
    status = 403
    code = "forbidden"
    default_message = ("/metrics is served to loopback clients only; set [metrics] "
                       "allow_remote or token_file to scrape it from elsewhere.")


class PolicyRefused(WattgateError):
    """The app's own policy (``wattgate.policy``) forbids this model, length or cap."""

    status = 403
    code = "policy_violation"
    default_message = "Not allowed by this app's policy."


class NotFound(WattgateError):
    status = 404
    code = "not_found"
    default_message = "No such endpoint."


class MethodNotAllowed(WattgateError):
    status = 405
    code = "method_not_allowed"
    default_message = "Method not allowed on this endpoint."

    def __init__(self, message: str | None = None, *, allow: str = "") -> None:
        super().__init__(message)
        self.allow = allow

    def headers(self) -> dict[str, str]:
        return {"Allow": self.allow} if self.allow else {}


class RequestTimeout(WattgateError):
    status = 408
    code = "request_timeout"
    default_message = "The request body did not arrive in time."


class PayloadTooLarge(WattgateError):
    status = 413
    code = "payload_too_large"
    default_message = "Request body too large."


class PaymentError(WattgateError):
    status = 402

    def headers(self) -> dict[str, str]:
        # The openai clients obey this header: retrying a 402 never helps.
        return {"x-should-retry": "false"}


@dataclass(frozen=True)
class Shortfall:
    """Why a hold did not fit, in nano-dollars: what the call could cost at most
    (``worst``) against what its cap (a month's or a grant's ``maxUsd``) had left
    (``left`` = ``cap`` − ``spent`` − ``held`` by calls in flight, at least 0)."""

    worst: int
    cap: int
    spent: int
    held: int

    @property
    def left(self) -> int:
        return max(0, self.cap - self.spent - self.held)


class NotConnected(PaymentError):
    code = "not_connected"
    default_message = "User hasn't connected a budget."


class BudgetExceeded(PaymentError):
    code = "budget_exceeded"
    default_message = "Spending cap reached for this period."

    def __init__(self, message: str | None = None, *,
                 shortfall: Shortfall | None = None) -> None:
        super().__init__(message)
        self.shortfall = shortfall  # the numbers behind a refused hold (headroom.py words them)


class GrantInvalid(PaymentError):
    code = "grant_invalid"
    default_message = "The grant token is unknown, expired, fully used, or over its dollar cap."

    def __init__(self, message: str | None = None, *,
                 shortfall: Shortfall | None = None) -> None:
        super().__init__(message)
        self.shortfall = shortfall  # set when the hold would pass the grant's maxUsd


class FundingInvalid(PaymentError):
    code = "funding_invalid"
    default_message = "The user's funding source was rejected upstream; reconnect needed."


class RateLimited(WattgateError):
    status = 429
    code = "rate_limited"
    default_message = "Too many requests."

    def __init__(self, message: str | None = None, *, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = max(1, int(retry_after))

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class UpstreamError(WattgateError):
    status = 502
    code = "upstream"
    default_message = "The model provider returned an error."


class UpstreamTimeout(WattgateError):
    status = 504
    code = "upstream_timeout"
    default_message = "The model provider did not answer in time."


class Unavailable(WattgateError):
    status = 503
    code = "unavailable"
    default_message = "The gateway is shutting down or overloaded."


class ConfigError(Exception):
    """Bad configuration, found at start; the CLI prints it as one line."""


class KeysMismatch(ConfigError):
    """The keys file differs from the one this ledger was first used with."""
