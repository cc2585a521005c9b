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
from urllib.parse import urlsplit

from .config import Config
from .credentials import keyed_hash, parse_secret_key, same_hash
from .errors import AuthError, ConfigError, RateLimited, Unavailable
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
    # presented secret key → (app, store.apps_version() when verified, None for the
    # current secret or the deadline of the previous one)
    _verified: dict[str, tuple[App, object, float | None]] = field(
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

        The key may be the app's current secret, or the previous one while the
        clock is before its deadline (a rotation with overlap; see
        ``matching_secret``). Verified keys are kept in memory until apps may
        have changed: this store's own app writes and any commit by another
        process (the CLI rotating or retiring a secret) invalidate them, so a
        change takes effect on the very next request without a database read
        per call; a previous secret's deadline is checked against the clock on
        every call, cached or not.
        """
        version = self.store.apps_version()
        cached = self._verified.get(secret_key)
        if cached is not None and version is not None and cached[1] == version:
            known, _, until = cached
            if until is None or self.clock() < until:
                return known
            raise AuthError("Invalid secret key.")
        app_id, secret = parse_secret_key(secret_key)
        app = await self.store.get_app(app_id)
        if app is None:
            raise AuthError("Invalid secret key.")
        until = matching_secret(app.secret_hash, app.previous_secret_hash, app.previous_until,
                                self.hash(secret), now=self.clock())
        if version is not None:
            if len(self._verified) >= 1024:
                self._verified.clear()
            self._verified[secret_key] = (app, version, until)
        return app

    def secret_tag(self, secret_hash: str) -> str:
        """A short tag of one of the app's secrets, carried by the session tokens it mints."""
        return keyed_hash(self.keys.hash_key, "session-tag:" + secret_hash)[:16]

    def session_tag_of(self, secret_key: str) -> str:
        """The tag of a (verified) secret key: a session token minted with it lives as
        long as that secret does, the previous one's included."""
        return self.secret_tag(self.hash(parse_secret_key(secret_key)[1]))

    async def session_for_token(self, token: str) -> tuple[Session, App]:
        session = self.sessions.verify(token, now=self.clock())
        app = await self.store.get_app(session.app_id)
        if app is None:
            raise AuthError("The app of this session token no longer exists.")
        previous = app.previous_secret_hash
        previous_tag = self.secret_tag(previous or _NO_PREVIOUS)  # the same work either way
        try:
            matching_secret(self.secret_tag(app.secret_hash),
                            None if previous is None else previous_tag,
                            app.previous_until, session.secret_tag, now=self.clock())
        except AuthError:
            raise AuthError("Session token minted with a secret key that was rotated "
                            "or retired.") from None
        return session, app


# Compared against when an app has no previous secret, so that both comparisons
# always run and take the same time whichever secret (if any) matches.
_NO_PREVIOUS = "-" * 64


def matching_secret(current: str, previous: str | None, previous_until: float | None,
                    presented: str, *, now: float) -> float | None:
    """Which of an app's secrets ``presented`` is (hashes, or session tags of them):
    None for the current one; the deadline for the previous one while ``now`` is
    before it; else ``AuthError``.

    Both are compared, in constant time, whatever the first answers: how long
    this takes does not say which one matched.
    """
    is_current = same_hash(current, presented)
    is_previous = same_hash(previous or _NO_PREVIOUS, presented)
    live = previous is not None and previous_until is not None and now < previous_until
    if is_current and current:
        return None
    if is_previous and live:
        return previous_until
    raise AuthError("Invalid secret key.")


def _cause(e: BaseException) -> str:
    """What the operator can act on: a driver failure's own text, not the 503 it became
    ("unreachable; try again" would hide a wrong host, sslmode or login)."""
    if isinstance(e, Unavailable) and e.__cause__ is not None:
        cause = e.__cause__
        return str(cause) or type(cause).__name__
    return str(e)


def _without_password(text: str, url: str) -> str:
    """``text`` with the database URL's password taken out, wherever a driver quoted it."""
    try:
        password = urlsplit(url).password if url else None
    except ValueError:
        password = None
    return text.replace(password, "[redacted]") if password else text


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
        raise ConfigError(_without_password(f"cannot open database {where}: {_cause(e)}",
                                            config.database_url)) from None
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
