"""The gateway's own secrets: where they come from and how they are created.

Secrets never live in the TOML config. Each comes from the environment when
set there, else from a JSON keys file that wattgate creates with mode 0600 on
first use (next to the database unless ``[keys] file`` says otherwise):

- ``jwt_secret`` (``WATTGATE_JWT_SECRET``): signs session tokens (HS256).
- ``hash_key`` (``WATTGATE_HASH_KEY``): keys the HMAC under which app secrets,
  grant tokens and presence cookies are stored.
- ``master_keys`` + ``active_key_id`` (``WATTGATE_MASTER_KEY``, base64 of 32
  bytes, taken as key id ``env``): AES-256-GCM keys sealing funding keys.
  ``wattgate keys rotate`` adds a key, makes it active and re-seals every
  stored funding key; old keys stay so that nothing becomes unreadable.
- ``admin_token`` (``WATTGATE_ADMIN_TOKEN``): the admin console's login.

Secrets an operator may choose (the admin token, the JWT secret, the metrics
token) must be strong enough that guessing is hopeless whatever a limiter
allows: ``check_strong`` refuses, at start, one shorter than 32 characters or
with less than about 128 bits by a character-class estimate. Every generated
default passes. The hash key must be at least 16 bytes.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
import os
import secrets
import stat
import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

log = logging.getLogger("wattgate.keys")


@dataclass
class Keys:
    jwt_secret: str
    hash_key: bytes
    master_keys: dict[str, bytes]
    active_key_id: str
    admin_token: str
    path: Path | None = field(default=None, compare=False)

    @property
    def active_master_key(self) -> bytes:
        return self.master_keys[self.active_key_id]

    def fingerprint(self) -> str:
        """Names the hash key and the JWT secret without revealing either.

        SHA-256 of a domain-separated, length-prefixed concatenation; the
        ledger stores it (``Ledger.bind_keys``) so that a process holding other
        keys is refused. The master sealing keys are left out: they rotate.
        """
        h = hashlib.sha256(b"wattgate keys fingerprint v1\0")
        for part in (self.hash_key, self.jwt_secret.encode()):
            h.update(len(part).to_bytes(8, "big"))
            h.update(part)
        return "sha256:" + h.hexdigest()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str, what: str) -> bytes:
    try:
        data = base64.b64decode(text, validate=True)
    except (ValueError, TypeError):
        raise ConfigError(f"{what} is not valid base64") from None
    return data


MIN_SECRET_CHARS = 32
MIN_SECRET_BITS = 128
MIN_DISTINCT_CHARS = 8
MIN_HASH_KEY_BYTES = 16
_CLASSES = (string.ascii_lowercase, string.ascii_uppercase, string.digits)


def secret_bits(value: str) -> float:
    """A generous estimate of a secret's entropy: length × log2(its alphabet).

    The alphabet is the union of the character classes used (hex digits alone
    count as 16). It overrates a chosen phrase; the length and distinct-character
    floors in ``check_strong`` catch the rest of the usual weak choices.
    """
    if value and all(c in string.hexdigits for c in value):
        pool = 16
    else:
        pool = sum(len(cls) for cls in _CLASSES if any(c in cls for c in value))
        if any(not c.isalnum() for c in value):
            pool += 32
    return len(value) * math.log2(pool) if pool > 1 else 0.0


def check_strong(value: str, name: str) -> None:
    """ConfigError naming ``name`` (never the value) when the secret is guessable."""
    fix = ("use a random one, e.g. python -c \"import secrets; "
           "print(secrets.token_urlsafe(32))\"")
    if len(value) < MIN_SECRET_CHARS:
        raise ConfigError(f"{name} is too weak: {len(value)} characters, at least "
                          f"{MIN_SECRET_CHARS} needed; {fix}")
    repeats = value in (value + value)[1:-1]  # "abcabc…", "0123456789" * 4
    if repeats or len(set(value)) < MIN_DISTINCT_CHARS or secret_bits(value) < MIN_SECRET_BITS:
        raise ConfigError(f"{name} is too weak: not random enough (about "
                          f"{MIN_SECRET_BITS} bits needed); {fix}")


def _new_key_id(existing: Mapping[str, bytes]) -> str:
    n = len(existing) + 1
    while f"k{n}" in existing:
        n += 1
    return f"k{n}"


def _fresh() -> dict[str, Any]:
    return {
        "jwt_secret": secrets.token_urlsafe(48),
        "hash_key": _b64(secrets.token_bytes(32)),
        "master_keys": {"k1": _b64(secrets.token_bytes(32))},
        "active_key_id": "k1",
        "admin_token": secrets.token_urlsafe(24),
    }


def _write(path: Path, data: dict[str, Any], *, replace: bool = True) -> bool:
    """Write the keys file atomically, mode 0600 from its first byte.

    With ``replace=False`` an existing file wins (two processes starting on an
    empty folder at once must end up with one set of keys): answers False.
    """
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        if replace:
            os.replace(tmp, path)
            return True
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        return True
    finally:
        if tmp.exists():
            tmp.unlink()


def load_keys(path: Path, env: Mapping[str, str] | None = None, *, create: bool = True) -> Keys:
    """Read the keys file (creating it if missing), then apply env overrides."""
    env = os.environ if env is None else env
    if not path.exists():
        if not create:
            raise ConfigError(f"keys file not found: {path}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            _write(path, _fresh(), replace=False)
        except OSError as e:
            raise ConfigError(f"cannot create keys file {path}: {e.strerror}") from None
    try:
        data = json.loads(path.read_text())
        mode = stat.S_IMODE(path.stat().st_mode)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read keys file {path}: {e}") from None
    if mode & 0o077:
        log.warning("keys file %s is readable by others (mode %o); chmod 600 it", path, mode)
    try:
        masters = {kid: _unb64(v, f"master key {kid}") for kid, v in data["master_keys"].items()}
        keys = Keys(
            jwt_secret=data["jwt_secret"],
            hash_key=_unb64(data["hash_key"], "hash_key"),
            master_keys=masters,
            active_key_id=data["active_key_id"],
            admin_token=data["admin_token"],
            path=path,
        )
    except (KeyError, TypeError, AttributeError):
        raise ConfigError(f"keys file {path} is missing fields; restore it from backup") from None
    if env.get("WATTGATE_JWT_SECRET"):
        keys.jwt_secret = env["WATTGATE_JWT_SECRET"]
    if env.get("WATTGATE_HASH_KEY"):
        keys.hash_key = _unb64(env["WATTGATE_HASH_KEY"], "WATTGATE_HASH_KEY")
    if env.get("WATTGATE_ADMIN_TOKEN"):
        keys.admin_token = env["WATTGATE_ADMIN_TOKEN"]
    if env.get("WATTGATE_MASTER_KEY"):
        keys.master_keys["env"] = _unb64(env["WATTGATE_MASTER_KEY"], "WATTGATE_MASTER_KEY")
        keys.active_key_id = "env"
    where = f"keys file {path}: "
    check_strong(keys.admin_token, "WATTGATE_ADMIN_TOKEN" if env.get("WATTGATE_ADMIN_TOKEN")
                 else where + "admin_token")
    check_strong(keys.jwt_secret, "WATTGATE_JWT_SECRET" if env.get("WATTGATE_JWT_SECRET")
                 else where + "jwt_secret")
    if len(keys.hash_key) < MIN_HASH_KEY_BYTES:
        raise ConfigError(("WATTGATE_HASH_KEY" if env.get("WATTGATE_HASH_KEY") else
                           where + "hash_key") + f" must be at least {MIN_HASH_KEY_BYTES} "
                          f"bytes, got {len(keys.hash_key)}")
    for kid, key in keys.master_keys.items():
        if len(key) != 32:
            raise ConfigError(f"master key {kid} must be 32 bytes, got {len(key)}")
    if keys.active_key_id not in keys.master_keys:
        raise ConfigError(f"active master key {keys.active_key_id!r} is not in the keys file")
    return keys


def add_master_key(keys: Keys) -> str:
    """Add a fresh master key, make it active, and persist the keys file."""
    if keys.path is None:
        raise ConfigError("keys have no file to write to")
    data = json.loads(keys.path.read_text())
    kid = _new_key_id({k: b"" for k in data["master_keys"]})
    new = secrets.token_bytes(32)
    data["master_keys"][kid] = _b64(new)
    data["active_key_id"] = kid
    _write(keys.path, data)
    keys.master_keys[kid] = new
    keys.active_key_id = kid
    return kid
