"""Frozen rows: what leaves the store. Amounts are integer nano-dollars."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

ACTIVE = "active"
REVOKED = "revoked"
NEEDS_RECONNECT = "needs_reconnect"


@dataclass(frozen=True)
class AppPolicy:
    """What the app's operator allows its calls and its users' caps (``wattgate/policy.py``
    holds the rules; this is only the stored data). None or empty: no limit."""

    models: tuple[str, ...] = ()  # model id patterns, lower case; empty: every model
    max_cap_nanos: int | None = None  # the largest monthly cap a user may approve
    max_tokens: int | None = None  # the largest output bound of one call
    suggested_cap_nanos: int | None = None  # preselected in the consent popup

    @property
    def empty(self) -> bool:
        return self == AppPolicy()

    def to_text(self) -> str | None:
        """The stored form (JSON, amounts as integer nano-dollars); None when empty."""
        if self.empty:
            return None
        return json.dumps({"models": list(self.models), "max_cap_nanos": self.max_cap_nanos,
                           "max_tokens": self.max_tokens,
                           "suggested_cap_nanos": self.suggested_cap_nanos})

    @classmethod
    def from_text(cls, text: str | None) -> AppPolicy:
        if not text:
            return cls()
        data = json.loads(text)
        return cls(tuple(data.get("models") or ()), data.get("max_cap_nanos"),
                   data.get("max_tokens"), data.get("suggested_cap_nanos"))


@dataclass(frozen=True)
class App:
    app_id: str
    name: str
    secret_hash: str
    origins: tuple[str, ...]
    created_at: float
    deleted_at: float | None = None  # a deleted app's tombstone keeps its history
    # The secret replaced by a rotation with overlap: it authenticates too while the
    # clock is before ``previous_until`` (UTC epoch seconds), until retired.
    previous_secret_hash: str | None = None
    previous_until: float | None = None
    policy: AppPolicy = field(default_factory=AppPolicy)


@dataclass(frozen=True)
class Connection:
    connection_id: int
    app_id: str
    app_user_id: str
    state: str
    cap_nanos: int | None  # None: unlimited (dev switch only)
    sealed_key: str | None
    browser_hash: str | None  # the presence proof of the browser that approved it
    created_at: float
    updated_at: float

    @property
    def connected(self) -> bool:
        return self.state == ACTIVE and self.sealed_key is not None


@dataclass(frozen=True)
class Grant:
    grant_id: int
    app_id: str
    token_hash: str
    requests: int
    used: int
    max_nanos: int | None
    spent_nanos: int
    held_nanos: int
    sealed_key: str | None
    connection_id: int | None  # set when funded by the user's connection
    created_at: float
    expires_at: float


# A call the upstream refused before any byte of an answer (a non-200: bad key,
# 429, 5xx): recorded at $0 with no tokens, so the request log and its error rate
# show it, but never a metered call. Spend, call counts, the export and a grant's
# used requests leave it out (``METERED``, the same SQL on both engines).
UPSTREAM_REFUSED = "upstream_refused"
METERED = "status <> 'upstream_refused'"


@dataclass(frozen=True)
class Usage:
    """One metered call, as the ledger stores it (never prompt or completion)."""

    generation_id: str
    app_id: str
    connection_id: int | None
    grant_id: int | None
    model: str
    prompt_tokens: int
    completion_tokens: int
    cost_nanos: int
    provisional: bool
    status: str
    latency_ms: int
    created_at: float
    # The HTTP code of an ``UPSTREAM_REFUSED`` call's answer (401, 429, 500…); None for
    # every other row (not in ``USAGE_COLS``: only the request log reads it).
    upstream_code: int | None = None


@dataclass(frozen=True)
class Hold:
    hold_id: int
    connection_id: int | None
    grant_id: int | None
    period: str
    amount_nanos: int


# The columns each row above is built from, in its fields' order (every backend
# selects these, so ``Connection(*row)`` means the same on both).
USAGE_COLS = ("generation_id, app_id, connection_id, grant_id, model, prompt_tokens, "
              "completion_tokens, cost_nanos, provisional, status, latency_ms, created_at")
CONNECTION_COLS = ("connection_id, app_id, app_user_id, state, cap_nanos, sealed_key, "
                   "browser_hash, created_at, updated_at")
APP_COLS = ("app_id, name, secret_hash, created_at, deleted_at, previous_secret_hash, "
            "previous_until, policy")


def app_of(row: Sequence[Any], origins: tuple[str, ...]) -> App:
    """An ``App`` from a row of ``APP_COLS`` and its origins (either backend's row)."""
    app_id, name, secret_hash, created_at, deleted_at, previous, until, policy = row
    return App(app_id, name, secret_hash, origins, created_at, deleted_at, previous, until,
               AppPolicy.from_text(policy))


GRANT_COLS = ("grant_id, app_id, token_hash, requests, used, max_nanos, spent_nanos, "
              "held_nanos, sealed_key, connection_id, created_at, expires_at")


# A webhook event in the outbox; ``status`` is pending, delivered or failed.
PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"
EVENT_COLS = ("event_id, public_id, app_id, stream, type, body, created_at, status, attempts, "
              "next_at, since, last_code, last_error, delivered_at")


@dataclass(frozen=True)
class WebhookEvent:
    event_id: int  # the outbox's order (per stream: the order of delivery)
    public_id: str  # the body's "id", what receivers dedupe on
    app_id: str
    stream: str  # events of one stream (a connection, a grant) are delivered in order
    type: str
    body: str  # sent byte for byte on every attempt
    created_at: float
    status: str
    attempts: int
    next_at: float  # when it may be tried again (a claim leases it until then)
    since: float  # start of its current delivery series (creation or the last resend)
    last_code: int | None  # the receiver's last HTTP status
    last_error: str | None  # or why no status came back (timeout, refused)
    delivered_at: float | None


@dataclass(frozen=True)
class Webhook:
    """An app's endpoint; ``sealed_secret`` is unsealed only to sign a delivery."""

    app_id: str
    url: str
    sealed_secret: str
