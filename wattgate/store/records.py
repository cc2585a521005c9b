"""Frozen rows: what leaves the store. Amounts are integer nano-dollars."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

ACTIVE = "active"
REVOKED = "revoked"
NEEDS_RECONNECT = "needs_reconnect"


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
            "previous_until")


def app_of(row: Sequence[Any], origins: tuple[str, ...]) -> App:
    """An ``App`` from a row of ``APP_COLS`` and its origins (either backend's row)."""
    app_id, name, secret_hash, created_at, deleted_at, previous, until = row
    return App(app_id, name, secret_hash, origins, created_at, deleted_at, previous, until)


GRANT_COLS = ("grant_id, app_id, token_hash, requests, used, max_nanos, spent_nanos, "
              "held_nanos, sealed_key, connection_id, created_at, expires_at")
