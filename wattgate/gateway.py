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
from .ratelimit import RateLimiter
from .sealing import Sealer, key_id_of
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

    def __post_init__(self) -> None:
        self.sealer = Sealer(self.keys.master_keys, self.keys.active_key_id)
        self.sessions = SessionCodec(self.keys.jwt_secret, self.config.public_origin,
                                     self.config.sessions_ttl_seconds)
        self.rl_sessions = RateLimiter(self.config.limits_sessions_per_minute, name="RL_SESSIONS")
        self.rl_chat = RateLimiter(self.config.limits_chat_per_minute, name="RL_CHAT")

    def unseal(self, sealed: str, aad: str) -> str:
        """Open a sealed funding key (SealError if it cannot be opened).

        A key id this process has not seen means ``wattgate keys rotate`` ran
        in another process while this one was serving: reload the keys file
        once and retry, so rotation never needs a restart.
        """
        if not self.sealer.has_key(key_id_of(sealed)) and self.keys.path is not None:
            self.reload_keys()
        return self.sealer.unseal(sealed, aad)

    def reload_keys(self) -> None:
        assert self.keys.path is not None
        fresh = load_keys(self.keys.path, create=False)
        # Keys this process already has stay: a sealed value never becomes unreadable.
        self.keys.master_keys.update(
            {k: v for k, v in fresh.master_keys.items() if k not in self.keys.master_keys})
        self.keys.active_key_id = fresh.active_key_id
        self.sealer = Sealer(self.keys.master_keys, self.keys.active_key_id)

    def hash(self, value: str) -> str:
        return keyed_hash(self.keys.hash_key, value)

    async def app_for_secret(self, secret_key: str) -> App:
        """The app a secret key belongs to, or AuthError.

        A primary-key read on the loop thread (microseconds) each time, so a
        rotation made by the CLI in another process takes effect at once.
        """
        app_id, secret = parse_secret_key(secret_key)
        app = await self.store.get_app(app_id)
        if app is None or not same_hash(app.secret_hash, self.hash(secret)):
            raise AuthError("Invalid secret key.")
        return app

    async def session_for_token(self, token: str) -> tuple[Session, App]:
        session = self.sessions.verify(token, now=self.clock())
        app = await self.store.get_app(session.app_id)
        if app is None:
            raise AuthError("The app of this session token no longer exists.")
        return session, app


def open_gateway(config: Config, *, clock: Callable[[], float] = time.time) -> Gateway:
    """Open the store (creating and migrating it) and the keys file (creating it).

    The database comes first, so an unusable data folder is reported as the
    database's problem, the one the operator configured.
    """
    try:
        config.database_file.parent.mkdir(parents=True, exist_ok=True)
        store = SQLiteStore.open(config.database_file)
    except (OSError, sqlite3.Error, SchemaError) as e:
        raise ConfigError(f"cannot open database {config.database_file}: {e}") from None
    try:
        keys = load_keys(config.keys_path)
    except BaseException:
        store.close_now()
        raise
    return Gateway(config=config, keys=keys, store=store, clock=clock)
