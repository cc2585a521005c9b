"""Budget webhooks: the events, their bodies, their signatures (no I/O here).

What an app's backend receives when something it must react to happens to one
of its users: a connection made, its cap changed, revoked, 80 % and 100 % of
the cap reached (once per period each), the user's funding key refused
upstream (reconnect needed), a grant used up. Each event is a row of the
ledger's outbox written in the transaction of the change that caused it (see
``store/outbox.py``); ``delivery.py`` sends it.

A body is ``{"id", "type", "created", "data"}``; ``data`` names the app
(``appId``), the user (``appUserId``) and the amounts, as exact decimal strings
of US dollars (``"8.000012"``, never a binary float: a receiver's own ledger
adds them up). Each delivery is signed like the payment providers sign theirs::

    Wattgate-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<raw body>">

``verify`` is the receiver's side (the SDKs' ``verify_webhook`` call it):
constant-time, a timestamp outside ``tolerance`` seconds refused, so a
captured delivery cannot be replayed later.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Mapping
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from .sealing import Sealer
    from .store.contract import Ledger

__all__ = ["EVENT_TYPES", "SIGNATURE_HEADER", "TOLERANCE", "SignatureError", "body_of",
           "clear_endpoint", "crossed_thresholds", "grant_exhausted", "mint_secret", "new_event_id", "retry_delay", "set_endpoint", "sign", "usd",
           "validate_url", "verify"]

SIGNATURE_HEADER = "Wattgate-Signature"
TOLERANCE = 300  # seconds either way a receiver accepts a signature's timestamp
THRESHOLDS = (80, 100)  # percent of the cap, one event each per period

CONNECTION_CREATED = "connection.created"
CONNECTION_CAP_CHANGED = "connection.cap_changed"
CONNECTION_REVOKED = "connection.revoked"
BUDGET_THRESHOLD = "budget.threshold"
FUNDING_INVALID = "funding.invalid"
GRANT_EXHAUSTED = "grant.exhausted"
EVENT_TYPES = (CONNECTION_CREATED, CONNECTION_CAP_CHANGED, CONNECTION_REVOKED,
               BUDGET_THRESHOLD, FUNDING_INVALID, GRANT_EXHAUSTED)

_NANO = Decimal(1_000_000_000)
MAX_URL = 2000


class SignatureError(ValueError):
    """A delivery whose signature does not prove it came from the gateway now."""


def usd(nanos: int | None) -> str | None:
    """Nano-dollars as an exact decimal string of dollars: ``"10"``, ``"0.8"``, ``"0.000000001"``."""
    if nanos is None:
        return None
    text = format((Decimal(nanos) / _NANO).normalize(), "f")
    return text


def new_event_id() -> str:
    return "evt_" + secrets.token_hex(12)


def mint_secret() -> str:
    return "whsec_" + secrets.token_urlsafe(32)


def body_of(event_id: str, event_type: str, created: float,
            data: Mapping[str, Any]) -> str:
    """The body sent for an event, byte for byte the same on every attempt."""
    return json.dumps({"id": event_id, "type": event_type, "created": int(created),
                       "data": dict(data)}, separators=(",", ":"),
                      ensure_ascii=False)


def crossed_thresholds(cap_nanos: int | None, before: int, after: int) -> list[int]:
    """The percentages of ``cap_nanos`` that spend moving from ``before`` to ``after``
    reached, in exact integer arithmetic (80 % of a 10-dollar cap is 8 dollars, not
    a nano-dollar less)."""
    if cap_nanos is None or cap_nanos <= 0 or after <= before:
        return []
    return [p for p in THRESHOLDS if before * 100 < cap_nanos * p <= after * 100]


def grant_exhausted(used: int, requests: int, max_nanos: int | None, spent: int,
                    held: int) -> bool:
    """A grant used up, as ``grant.exhausted`` tells it: every request used with none
    of its calls still held (so its spend is final), or its dollar cap spent.
    Whatever change leaves a grant so (a settle, a release that keeps the request,
    the sweep, reconciliation's final figure) writes the event; its dedupe key
    (``grant:<id>``) makes it once per grant."""
    return (used >= requests and held == 0) or (max_nanos is not None and spent >= max_nanos)


def retry_delay(attempts: int, first: float, most: float) -> float:
    """Seconds before the next attempt after ``attempts`` failed ones (doubling)."""
    return float(min(most, first * 2 ** max(0, min(attempts - 1, 40))))


def validate_url(url: str) -> str:
    """The endpoint URL, or ValueError saying in one line why not."""
    url = url.strip()
    if not url:
        raise ValueError("the webhook URL is empty")
    if len(url) > MAX_URL:
        raise ValueError(f"the webhook URL is longer than {MAX_URL} characters")
    if any(ord(c) < 33 or ord(c) == 127 for c in url):
        raise ValueError("the webhook URL contains spaces or control characters")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises on a bad port)
    except ValueError:
        raise ValueError(f"not a URL: {url!r}") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"the webhook URL must start with http:// or https:// (got {url!r})")
    if not parts.hostname:
        raise ValueError(f"the webhook URL names no host: {url!r}")
    if parts.username or parts.password:
        raise ValueError("the webhook URL must not carry a user name or password")
    if parts.fragment:
        raise ValueError("the webhook URL must not have a #fragment")
    return url


def _mac(secret: str, timestamp: int, body: bytes) -> str:
    return hmac.new(secret.encode(), str(timestamp).encode() + b"." + body,
                    hashlib.sha256).hexdigest()


def sign(secret: str, body: bytes | str, timestamp: int) -> str:
    """The ``Wattgate-Signature`` header value for ``body`` sent at ``timestamp``."""
    raw = body.encode() if isinstance(body, str) else body
    return f"t={timestamp},v1={_mac(secret, timestamp, raw)}"


def verify(secret: str, body: bytes | str, header: str | None, *, now: float,
           tolerance: float = TOLERANCE) -> dict[str, Any]:
    """The event a delivery carries, once its signature proves it; else SignatureError.

    ``body`` must be the raw bytes received (not re-serialised JSON). Refused: no
    or garbled header, a timestamp more than ``tolerance`` seconds from ``now``,
    no ``v1`` matching ``secret`` (compared in constant time), a body that is not
    a JSON event.
    """
    if not secret:
        raise SignatureError("no webhook signing secret given")
    if not header or not isinstance(header, str):
        raise SignatureError(f"no {SIGNATURE_HEADER} header")
    raw = body.encode() if isinstance(body, str) else bytes(body)
    timestamp: int | None = None
    macs: list[str] = []
    for part in header.split(","):
        key, sep, value = part.strip().partition("=")
        if not sep:
            raise SignatureError(f"garbled {SIGNATURE_HEADER} header")
        if key == "t":
            if not value.isascii() or not value.isdigit() or len(value) > 12:
                raise SignatureError(f"garbled timestamp in {SIGNATURE_HEADER}")
            timestamp = int(value)
        elif key == "v1":
            macs.append(value)
    if timestamp is None or not macs:
        raise SignatureError(f"{SIGNATURE_HEADER} lacks t= or v1=")
    if abs(now - timestamp) > tolerance:
        raise SignatureError(f"signature timestamp is {int(now - timestamp)} s from now, "
                             f"outside the {int(tolerance)} s tolerance (replayed or a "
                             "clock is wrong)")
    expected = _mac(secret, timestamp, raw)
    # Every candidate compared, each in constant time: nothing learned from which failed.
    if not any([hmac.compare_digest(expected.encode(), m.encode("utf-8", "replace"))
                for m in macs]):
        raise SignatureError("signature does not match (wrong secret or altered body)")
    try:
        event = json.loads(raw)
    except ValueError:
        raise SignatureError("signed body is not JSON") from None
    if not isinstance(event, dict) or not {"id", "type", "created", "data"} <= event.keys():
        raise SignatureError("signed body is not a wattgate event")
    return event


async def set_endpoint(store: "Ledger", sealer: "Sealer", app_id: str, url: str) -> str | None:
    """Point an app's webhooks at ``url`` with a new signing secret, returned (shown
    once; stored sealed). None when no such live app; ValueError for a bad URL."""
    from .sealing import webhook_aad

    url = validate_url(url)
    secret = mint_secret()
    if not await store.set_webhook(app_id, url, sealer.seal(secret, aad=webhook_aad(app_id))):
        return None
    return secret


async def clear_endpoint(store: "Ledger", app_id: str) -> bool:
    """Stop an app's webhooks (events still pending then fail); False: no such app."""
    return await store.set_webhook(app_id, None, None)
