"""The Gateway: every long-lived part of a running wattgate, wired once.

``create_app`` builds one ``Gateway`` and stores it under ``gateway_key``;
handlers take what they need from it and pass it on explicitly. Nothing here
imports aiohttp's web layer, so the CLI reuses the same wiring without a server.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from dataclasses import dataclass, field
from typing import Callable

from .config import Config
from .credentials import keyed_hash, parse_secret_key, same_hash
from .errors import AuthError, ConfigError
from .keyfile import Keys, load_keys
from .observer import Observer
from .ratelimit import RateLimiter
from .sealing import Sealer
from .sessions import Session, SessionCodec
from .store import App, SQLiteStore
from .store.migrations import SchemaError

log = logging.getLogger("wattgate")


@dataclass
class Gateway:
    config: Config
    keys: Keys
    store: SQLiteStore
    clock: Callable[[], float] = time.time
    sealer: Sealer = field(init=False)
    sessions: SessionCodec = field(init=False)
    rl_sessions: RateLimiter = field(init=False)
    rl_chat: RateLimiter = field(init=False)
    observer: Observer = field(init=False)  # metrics and request-log hooks
    # presented secret key → (app, store.apps_version() when verified)
    _verified: dict[str, tuple[App, tuple[int, int]]] = field(
        init=False, default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.sealer = Sealer(self.keys.master_keys, self.keys.active_key_id,
                             load_key=self._load_master_key)
        self.sessions = SessionCodec(self.keys.jwt_secret, self.config.public_origin,
                                     self.config.sessions_ttl_seconds)
        self.rl_sessions = RateLimiter(self.config.limits_sessions_per_minute, name="RL_SESSIONS")
        self.rl_chat = RateLimiter(self.config.limits_chat_per_minute, name="RL_CHAT")
        self.observer = Observer((self.rl_sessions, self.rl_chat))

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


def open_gateway(config: Config, *, clock: Callable[[], float] = time.time,
                 serving: bool = False) -> Gateway:
    """Open the store (creating and migrating it) and the keys file (creating it).

    The database comes first, so an unusable data folder is reported as the
    database's problem, the one the operator configured. ``serving``: for
    ``wattgate serve``, the store is claimed (``Ledger.claim``) before it is
    opened, so a refused second server never touches the file.
    """
    try:
        config.database_file.parent.mkdir(parents=True, exist_ok=True)
        store = SQLiteStore.open(config.database_file, claim=serving)
    except (OSError, sqlite3.Error, SchemaError) as e:
        raise ConfigError(f"cannot open database {config.database_file}: {e}") from None
    try:
        if not config.keys_path.exists() and store.holds_apps():
            # A fresh keys file would silently orphan every app secret and sealed key.
            raise ConfigError(
                f"keys file {config.keys_path} is missing but {config.database_file} holds "
                "apps: restore the keys file from your backup (new keys would make every "
                "secret key and stored funding key unusable)")
        keys = load_keys(config.keys_path)
    except BaseException:
        store.close_now()
        raise
    return Gateway(config=config, keys=keys, store=store, clock=clock)
