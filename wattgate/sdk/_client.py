"""The server SDK's client: the secret key, the calls it makes, and model access.

``Wattfare`` holds the app's secret key and makes the gateway calls the SDK
needs itself (``POST /sessions``, ``GET /status``) with aiohttp: a session
passed in is used and never closed; without one, each call opens and closes
its own, so nothing is left to clean up and nothing is tied to one event
loop. Inference goes through the official ``openai`` package, pointed at the
gateway with the user's (or grant's) header: ``openai()`` and
``openai_sync()`` return plain ``openai.AsyncOpenAI`` / ``openai.OpenAI``
clients, and ``openai_options()`` the constructor arguments for any library
that takes them (LangChain's ``ChatOpenAI``, for one).

This module does not own the token-route handlers (``_handlers``, ``_asgi``)
or the error classes (``_errors``).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import aiohttp

from ._errors import WattfareError, WattfareInvalidRequestError, auth_error, error_from_body


def _exact_number(text: str) -> Decimal:
    """``parse_float``: the number as Decimal, or ValueError (never InvalidOperation,
    which ``Decimal("1e9999999999999999999")`` raises)."""
    try:
        return Decimal(text)
    except ArithmeticError:
        raise ValueError(text[:40]) from None

if TYPE_CHECKING:
    from aiohttp import web
    from openai import AsyncOpenAI, OpenAI

DEFAULT_BASE_URL = "http://127.0.0.1:8787"
USER_HEADER = "x-wattfare-user"
GRANT_HEADER = "x-wattfare-grant"
GRANT_REMAINING_HEADER = "x-wattfare-grant-remaining"

SessionRequest = Mapping[str, Any]
# A session_handler's cap: a SessionRequest, or a function of the framework's request.
SessionRequestSource = SessionRequest | Callable[[Any], Any] | None


@dataclass(frozen=True)
class Limits:
    monthly_usd: Decimal | None  # None: unlimited (development gateways only)


@dataclass(frozen=True)
class Usage:
    monthly_usd: Decimal


@dataclass(frozen=True)
class ConnectionStatus:
    """A user's connection and budget snapshot; amounts are exact ``Decimal`` USD."""

    connected: bool
    limits: Limits | None
    usage: Usage
    remaining_usd: Decimal | None  # None: unlimited
    # wattgate extension: held at their worst case by this month's calls in flight; a new
    # call fits in remaining_usd - held_usd. 0 from a server that does not report it.
    held_usd: Decimal = Decimal(0)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ConnectionStatus:
        limits = data.get("limits")
        usage = data.get("usage") or {}
        return cls(connected=bool(data.get("connected")),
                   limits=None if limits is None else Limits(_usd(limits.get("monthlyUsd"))),
                   usage=Usage(_usd(usage.get("monthlyUsd")) or Decimal(0)),
                   remaining_usd=_usd(data.get("remainingUsd")),
                   held_usd=_usd(data.get("heldUsd")) or Decimal(0))

    def to_dict(self) -> dict[str, Any]:
        """The reference ``ConnectionStatus`` JSON, e.g. to hand to your frontend."""
        return {"connected": self.connected,
                "limits": None if self.limits is None
                else {"monthlyUsd": _number(self.limits.monthly_usd)},
                "usage": {"monthlyUsd": _number(self.usage.monthly_usd)},
                "remainingUsd": _number(self.remaining_usd),
                "heldUsd": _number(self.held_usd)}


@dataclass(frozen=True)
class CreatedSession:
    token: str
    expires_at: int  # unix seconds

    def to_dict(self) -> dict[str, Any]:
        """``{"token", "expiresAt"}``: what a token route answers."""
        return {"token": self.token, "expiresAt": self.expires_at}


def _usd(value: Any) -> Decimal | None:
    return None if value is None else Decimal(str(value))


def _number(value: Decimal | None) -> int | float | None:
    if value is None:
        return None
    return int(value) if value == value.to_integral_value() else float(value)


def _json_default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return _number(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _normalize_base_url(base_url: str) -> str:
    url = base_url.rstrip("/")
    # Accept the openai-style ".../api/v1" too: the reference's baseURL is the site root.
    return url.removesuffix("/api/v1")


def _user_id(value: Any) -> str:
    # Integer primary keys are common: 42 and "42" name the same user.
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str) or not value:
        raise WattfareInvalidRequestError("invalid_request", 400,
                                          "app_user_id must be a non-empty string (or an int).")
    return value


def _import_openai() -> Any:
    try:
        import openai
    except ImportError:
        raise ImportError("The openai package is needed for model access: "
                          "pip install 'wattgate[openai]'") from None
    return openai


class _ModelAccess:
    """Model access for one header: a user's id or a grant's token."""

    def __init__(self, wf: Wattfare, header: str, value: str) -> None:
        self._wf = wf
        self._header = header
        self._value = value

    def openai_options(self) -> dict[str, Any]:
        """Constructor arguments of ``openai.OpenAI``/``AsyncOpenAI`` pointed at the gateway."""
        return {"api_key": self._wf._secret_key, "base_url": self._wf.api_url,
                "default_headers": {self._header: self._value}}

    def openai(self, **options: Any) -> AsyncOpenAI:
        """An ``openai.AsyncOpenAI`` whose calls are billed here; ``options`` go to its
        constructor (``max_retries``, ``timeout``, a shared ``http_client``...)."""
        client: AsyncOpenAI = _import_openai().AsyncOpenAI(**{**self.openai_options(), **options})
        return client

    def openai_sync(self, **options: Any) -> OpenAI:
        """The blocking ``openai.OpenAI`` twin of ``openai()``."""
        client: OpenAI = _import_openai().OpenAI(**{**self.openai_options(), **options})
        return client


class WattfareUser(_ModelAccess):
    """One of your users: inference billed to their budget, and their status."""

    def __init__(self, wf: Wattfare, app_user_id: str) -> None:
        super().__init__(wf, USER_HEADER, app_user_id)
        self.app_user_id = app_user_id

    async def status(self) -> ConnectionStatus:
        """The user's connection and budget; ``connected=False`` (never an error)
        for a user who has not connected."""
        try:
            data = await self._wf._call("GET", "/status", params={"appUserId": self.app_user_id})
        except WattfareError as e:
            if e.code == "not_connected":
                return ConnectionStatus(False, None, Usage(Decimal(0)), Decimal(0))
            raise
        return ConnectionStatus.from_dict(data)

    def __repr__(self) -> str:
        return f"WattfareUser({self.app_user_id!r})"


class WattfareGrant(_ModelAccess):
    """A one-time grant redeemed by your backend: each call spends one of its requests.

    When it is used up the gateway answers 402 ``grant_invalid``
    (``WattfareGrantError`` through ``to_wattfare_error``). The number left is
    in each answer's ``x-wattfare-grant-remaining`` header.
    """

    def __init__(self, wf: Wattfare, grant_token: str) -> None:
        super().__init__(wf, GRANT_HEADER, grant_token)
        self.grant_token = grant_token

    def __repr__(self) -> str:
        return f"WattfareGrant({self.grant_token[:8]}…)"


class Wattfare:
    """The server entry point: construct once with your secret key and reuse it."""

    def __init__(self, secret_key: str, base_url: str = DEFAULT_BASE_URL,
                 session: aiohttp.ClientSession | None = None, *,
                 timeout: float = 30.0) -> None:
        if not isinstance(secret_key, str) or not secret_key.startswith("sk_"):
            raise auth_error("secret_key must be the app's secret key, starting with \"sk_\".")
        self._secret_key = secret_key
        self.base_url = _normalize_base_url(base_url)
        self._session = session
        self._timeout = aiohttp.ClientTimeout(total=timeout)

    @property
    def api_url(self) -> str:
        """``{base_url}/api/v1``: the ``base_url`` an OpenAI-compatible client needs."""
        return self.base_url + "/api/v1"

    def __repr__(self) -> str:
        return f"Wattfare(base_url={self.base_url!r})"  # never the key

    def user(self, app_user_id: str | int) -> WattfareUser:
        """Scope model access and status to one of your own user ids."""
        return WattfareUser(self, _user_id(app_user_id))

    def grant(self, grant_token: str) -> WattfareGrant:
        """Redeem a one-time grant token forwarded by the browser."""
        if not isinstance(grant_token, str) or not grant_token.strip():
            raise auth_error("The grant token is empty.")
        return WattfareGrant(self, grant_token.strip())

    async def create_session(self, app_user_id: str | int,
                             request: SessionRequest | None = None) -> CreatedSession:
        """Mint a short-lived session token for your frontend.

        ``request`` is the reference shape, e.g. ``{"requestLimit": {"monthlyUsd": 20}}``.
        """
        body: dict[str, Any] = {"appUserId": _user_id(app_user_id)}
        if request is not None:
            if not isinstance(request, Mapping):
                raise TypeError("request must be a dict like {\"requestLimit\": "
                                "{\"monthlyUsd\": 20}}")
            unknown = set(request) - {"requestLimit"}
            if unknown:
                raise ValueError(f"unknown session request field(s) {sorted(unknown)}; "
                                 "the only one is \"requestLimit\"")
            if request.get("requestLimit") is not None:
                body["requestLimit"] = dict(request["requestLimit"])
        data = await self._call("POST", "/sessions", body=body)
        return CreatedSession(token=data["token"], expires_at=int(data["expiresAt"]))

    def session_handler(self, resolve_user: Callable[[web.Request], Any],
                        request: SessionRequestSource = None,
                        ) -> Callable[[web.Request], Awaitable[web.Response]]:
        """An aiohttp handler for your token route (``app.router.add_post(path, handler)``).

        ``resolve_user(request)`` (sync or async) returns your user id, or None to
        answer 401; ``request`` is the cap to ask for, or a function of the request.
        """
        from ._handlers import aiohttp_session_handler
        return aiohttp_session_handler(self, resolve_user, request)

    def asgi_session_handler(self, resolve_user: Callable[[Any], Any],
                             request: SessionRequestSource = None) -> Callable[[Any], Any]:
        """The same token route as a Starlette/FastAPI endpoint (needs ``starlette``)."""
        from ._asgi import asgi_session_handler
        return asgi_session_handler(self, resolve_user, request)

    async def _call(self, method: str, path: str, *, params: dict[str, str] | None = None,
                    body: dict[str, Any] | None = None) -> dict[str, Any]:
        if self._session is not None:
            return await self._send(self._session, method, path, params, body)
        async with aiohttp.ClientSession(timeout=self._timeout,
                                         cookie_jar=aiohttp.DummyCookieJar()) as session:
            return await self._send(session, method, path, params, body)

    async def _send(self, session: aiohttp.ClientSession, method: str, path: str,
                    params: dict[str, str] | None, body: dict[str, Any] | None,
                    ) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {self._secret_key}"}
        data = None
        if body is not None:
            headers["Content-Type"] = "application/json"
            data = json.dumps(body, default=_json_default)
        async with session.request(method, self.api_url + path, params=params, data=data,
                                   headers=headers, timeout=self._timeout) as response:
            text = await response.text()
            try:
                parsed = json.loads(text, parse_float=_exact_number) if text else None
            except (ValueError, RecursionError):
                parsed = None
            if response.status < 400 and isinstance(parsed, dict):
                return parsed
            error = error_from_body(response.status, parsed,
                                    retry_after=response.headers.get("Retry-After"))
            if error is not None:
                raise error
            status = response.status if response.status >= 400 else 502
            raise WattfareError("unexpected_response", status,
                                f"{self.api_url + path} answered HTTP {response.status} "
                                "without a Wattfare body: is base_url the gateway?")
