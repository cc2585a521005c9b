"""Reading and validating what a request carries: bearer keys, JSON bodies, ids, amounts.

Every malformed input becomes ``InvalidRequest`` (400) or ``AuthError`` (401)
with a message naming the field, never a traceback.
"""

from __future__ import annotations

import json
from decimal import Decimal
from functools import lru_cache
from typing import Any

from aiohttp import web

from ..clientaddr import Client, ClientAddresses
from ..config import Config
from ..errors import AuthError, InvalidRequest
from ..jsonread import exact_number, too_deep
from ..money import usd_to_nanos

MAX_USER_ID = 256
MAX_USD = Decimal(1_000_000)
MAX_JSON_DEPTH = 64  # a chat request nests ~6 deep; a tool's JSON schema rarely 20



@lru_cache(maxsize=8)
def _client_addresses(trusted: tuple[str, ...]) -> ClientAddresses:
    return ClientAddresses(trusted)


def client_of(config: Config, request: web.Request) -> Client:
    """The request's client (address, scheme), believing forwarded headers only from
    ``server.trusted_proxies``: the one answer the limiter, /metrics and the log use."""
    return _client_addresses(tuple(config.server_trusted_proxies)).client_of(
        request.remote, request.headers)


def bearer(request: web.Request) -> str:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise AuthError("Missing Authorization: Bearer header.")
    return value.strip()


def secret_key_of(request: web.Request) -> str:
    token = bearer(request)
    if not token.startswith("sk_"):
        raise AuthError("This endpoint needs the app's secret key, not a session token.")
    return token


def session_token_of(request: web.Request) -> str:
    token = bearer(request)
    if token.startswith(("sk_", "pk_")):
        raise AuthError("This endpoint needs a session token, not an app key.")
    return token


def check_json_depth(raw: bytes, limit: int = MAX_JSON_DEPTH) -> None:
    """Refuse a body nested deeper than ``limit`` before any JSON parser sees it
    (``jsonread.too_deep``)."""
    if too_deep(raw, limit):
        raise InvalidRequest(f"The body nests deeper than {limit} levels.")


def _no_constants(name: str) -> Any:
    raise ValueError(name)


async def json_body(request: web.Request, *, optional: bool = False) -> dict[str, Any]:
    raw = await request.read()
    if not raw.strip():
        if optional:
            return {}
        raise InvalidRequest("A JSON object body is required.")
    check_json_depth(raw)
    try:
        data = json.loads(raw, parse_float=exact_number, parse_constant=_no_constants)
    except (ValueError, RecursionError):
        raise InvalidRequest("The body is not valid JSON.") from None
    if not isinstance(data, dict):
        raise InvalidRequest("The body must be a JSON object.")
    return data


def app_user_id(value: Any, field: str = "appUserId") -> str:
    if not isinstance(value, str) or not value:
        raise InvalidRequest(f"{field} must be a non-empty string.")
    if len(value) > MAX_USER_ID:
        raise InvalidRequest(f"{field} must be at most {MAX_USER_ID} characters.")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise InvalidRequest(f"{field} must not contain control characters.")
    return value


def usd_amount(value: Any, field: str, *, allow_null: bool = False,
               positive: bool = False) -> int | None:
    """A USD amount from JSON → nano-dollars; None only when allow_null."""
    if value is None:
        if allow_null:
            return None
        raise InvalidRequest(f"{field} must be a number.")
    if isinstance(value, bool) or not isinstance(value, (int, Decimal)):
        raise InvalidRequest(f"{field} must be a number.")
    if value < 0 or (positive and value == 0):
        raise InvalidRequest(f"{field} must be {'positive' if positive else 'zero or more'}.")
    if value > MAX_USD:
        raise InvalidRequest(f"{field} must be at most {MAX_USD}.")
    return usd_to_nanos(value)


def integer(value: Any, field: str, *, minimum: int, maximum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"{field} must be a whole number.")
    if not minimum <= value <= maximum:
        raise InvalidRequest(f"{field} must be between {minimum} and {maximum}.")
    return value


def funding_key(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip() or len(value) > 512 \
            or any(ord(c) < 33 or ord(c) == 127 for c in value.strip()):
        raise InvalidRequest("fundingKey must be an API key string.")
    return value.strip()
