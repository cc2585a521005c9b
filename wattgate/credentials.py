"""App credentials, grant tokens and presence cookies: minting, parsing, hashing.

- publishable key ``pk_live_{appId}``: names an app, safe in a browser.
- secret key ``sk_live_{appId}_{secret}``: stored only as HMAC-SHA256(hash_key,
  secret) and compared in constant time.
- grant token ``wfg_{random}`` and presence cookie values: random, stored only
  as their HMAC too, so a copy of the database redeems nothing.

appIds are ``app`` + 16 lowercase hex digits: no underscore, so the secret key
splits unambiguously.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from .errors import AuthError

_APP_ID = re.compile(r"^app[0-9a-f]{16}$")


@dataclass(frozen=True)
class NewCredentials:
    app_id: str
    publishable_key: str
    secret_key: str
    secret: str


def new_app_id() -> str:
    return "app" + secrets.token_hex(8)


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def mint_credentials(app_id: str | None = None, secret: str | None = None) -> NewCredentials:
    app_id = app_id or new_app_id()
    secret = secret or new_secret()
    return NewCredentials(app_id, f"pk_live_{app_id}", f"sk_live_{app_id}_{secret}", secret)


def keyed_hash(hash_key: bytes, value: str) -> str:
    return hmac.new(hash_key, value.encode(), hashlib.sha256).hexdigest()


def same_hash(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def is_app_id(value: str) -> bool:
    return bool(_APP_ID.match(value))


def parse_secret_key(key: str) -> tuple[str, str]:
    """``sk_live_{appId}_{secret}`` → (appId, secret); AuthError if malformed."""
    parts = key.split("_", 3)
    if len(parts) != 4 or parts[0] != "sk" or parts[1] not in ("live", "test") \
            or not is_app_id(parts[2]) or not parts[3]:
        raise AuthError("Missing or invalid secret key.")
    return parts[2], parts[3]


def parse_publishable_key(key: str) -> str:
    parts = key.split("_", 2)
    if len(parts) != 3 or parts[0] != "pk" or parts[1] not in ("live", "test") \
            or not is_app_id(parts[2]):
        raise AuthError("Invalid publishable key.")
    return parts[2]


def new_grant_token() -> str:
    return "wfg_" + secrets.token_urlsafe(32)


def new_presence_value() -> str:
    return secrets.token_urlsafe(32)
