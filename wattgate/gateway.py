"""The Gateway: every long-lived part of a running wattgate, wired once.

``create_app`` builds one ``Gateway`` and stores it under ``gateway_key``;
handlers take what they need from it and pass it on explicitly. Nothing here
imports aiohttp's web layer, so the CLI reuses the same wiring without a server.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

from .config import Config
from .credentials import keyed_hash, parse_secret_key, same_hash
from .errors import AuthError, ConfigError, RateLimited
from .keyfile import Keys, load_keys
from .observer import Observer
from .sealing import Sealer
from .sessions import Session, SessionCodec
from .store import App, Ledger, StoreInUse, open_store

log = logging.getLogger("wattgate")


# Failed console sign-ins allowed per minute and client address.
ADMIN_LOGINS_PER_MINUTE = 10


@dataclass
class Limit:
    """A named rate limit: its allowance and this process's count of refusals (metrics)."""

    name: str
    per_minute: int
    rejections: int = 0


@dataclass
class Gateway:
    config: Config
    keys: Keys
    store: Ledger
    clock: Callable[[], float] = time.time
    sealer: Sealer = field(init=False)
    sessions: SessionCodec = field(init=False)
    limits: dict[str, Limit] = field(init=False)
    observer: Observer = field(init=False)  # metrics and request-log hooks
    # presented secret key → (app, store.apps_version() when verified)
    _verified: dict[str, tuple[App, object]] = field(
        init=False, default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.sealer = Sealer(self.keys.master_keys, self.keys.active_key_id,
                             load_key=self._load_master_key)
        self.sessions = SessionCodec(self.keys.jwt_secret, self.config.public_origin,
                                     self.config.sessions_ttl_seconds)
        self.limits = {limit.name: limit for limit in (
            Limit("RL_SESSIONS", self.config.limits_sessions_per_minute),
            Limit("RL_CHAT", self.config.limits_chat_per_minute),
            Limit("RL_ADMIN_LOGIN", ADMIN_LOGINS_PER_MINUTE))}
        self.observer = Observer(self.limits.values())

    async def limit(self, name: str, key: str, *, take: bool = True) -> None:
        """Take a token of rate limit ``name`` for ``key`` (every process of the ledger
        counts against the same bucket), or refuse with ``RateLimited``.

        ``take=False`` only checks (for limits on failures: check before judging
        an attempt, take when it failed).
        """
        limit = self.limits[name]
        wait = await self.store.rate_take(name, key, limit.per_minute, now=self.clock(),
                                          take=take)
        if wait is not None:
            limit.rejections += 1
            raise RateLimited(f"Rate limit {name} reached; retry later.", retry_after=wait)

    def _load_master_key(self, key_id: str) -> bytes | None:
        """A master key added to the keys file since start (by ``wattgate keys rotate``)."""
        if self.keys.path is None:
            return None
        try:
            fresh = load_keys(self.keys.path, create=False)
        except ConfigError as e:
            log.error("cannot reload the keys file: %s", e)
            return None
        key = fresh.master_keys.get(key_id)
        if key is not None:
            self.keys.master_keys.setdefault(key_id, key)
        return key

    def hash(self, value: str) -> str:
        return keyed_hash(self.keys.hash_key, value)

    async def app_for_secret(self, secret_key: str) -> App:
        """The app a secret key belongs to, or AuthError.

        Verified keys are kept in memory until apps may have changed: this
        store's own app writes and any commit by another process (the CLI
        rotating a secret) invalidate them, so a rotation takes effect on the
        very next request without a database read per call.
        """
        version = self.store.apps_version()
        cached = self._verified.get(secret_key)
        if cached is not None and version is not None and cached[1] == version:
            return cached[0]
        app_id, secret = parse_secret_key(secret_key)
        app = await self.store.get_app(app_id)
        if app is None or not same_hash(app.secret_hash, self.hash(secret)):
            raise AuthError("Invalid secret key.")
        if version is not None:
            if len(self._verified) >= 1024:
                self._verified.clear()
            self._verified[secret_key] = (app, version)
        return app

    def secret_tag(self, app: App) -> str:
        """A short tag of the app's current secret, carried by its session tokens."""
        return keyed_hash(self.keys.hash_key, "session-tag:" + app.secret_hash)[:16]

    async def session_for_token(self, token: str) -> tuple[Session, App]:
        session = self.sessions.verify(token, now=self.clock())
        app = await self.store.get_app(session.app_id)
        if app is None:
            raise AuthError("The app of this session token no longer exists.")
        if not same_hash(session.secret_tag, self.secret_tag(app)):
            raise AuthError("Session token minted before the app's secret key was rotated.")
        return session, app


async def open_gateway(config: Config, *, clock: Callable[[], float] = time.time,
                       serving: bool = False) -> Gateway:
    """Open the store (creating and migrating it) and the keys file (creating it), and
    bind the keys to the ledger (``Ledger.bind_keys``): a process, server or CLI,
    holding other keys than the ledger's first is refused before it mints or verifies.

    The database comes first, so an unusable data folder is reported as the
    database's problem, the one the operator configured. ``serving``: for
    ``wattgate serve``, the store is claimed (``Ledger.claim``) before it is
    opened, so a refused second server never touches the file.
    """
    where = "the database.url ledger" if config.database_url else str(config.database_file)
    try:
        if not config.database_url:
            config.database_file.parent.mkdir(parents=True, exist_ok=True)
        store = await open_store(config, serving=serving)
    except ConfigError:
        raise
    except StoreInUse as e:  # another server has this SQLite file: its own one line
        raise ConfigError(str(e)) from None
    except Exception as e:  # OSError, the driver's errors, SchemaError: one line
        raise ConfigError(f"cannot open database {where}: {e}") from None
    try:
        if not config.keys_path.exists() and await store.holds_apps():
            # A fresh keys file would silently orphan every app secret and sealed key.
            raise ConfigError(
                f"keys file {config.keys_path} is missing but {where} holds "
                "apps: restore the keys file from your backup (new keys would make every "
                "secret key and stored funding key unusable)")
        keys = load_keys(config.keys_path)
        await store.bind_keys(keys.fingerprint())
    except BaseException:
        store.close_now()
        raise
    return Gateway(config=config, keys=keys, store=store, clock=clock)
