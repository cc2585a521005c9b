"""The PostgreSQL store: one ledger shared by a fleet of gateway processes and hosts.

Holds live in the database, so every process sees every call in flight:

- ``admit`` is one call of ``wattgate_admit`` (migration 3): the connection
  row ``SELECT … FOR UPDATE``, then its period's spent and held (statements
  of their own, new snapshots, so they see every hold committed before the
  lock was granted), the cap inequality of ``budget.cap_refusal``, the hold's
  row. Python words any refusal from the numbers it returns, with
  ``budget``. Two admissions on one connection queue on its row lock, so no
  two can pass on the same room. ``admit_grant`` locks the funding
  connection's row before the grant's (one fixed order, so two admissions
  never deadlock).
- ``settle`` is one call of ``wattgate_settle``, idempotent on the generation
  id (``INSERT … ON CONFLICT DO NOTHING``); a final figure replaces a
  provisional one and moves the aggregates by the difference. Aggregates are
  always locked grants before periods. What the caller awaits survives its
  cancellation.
- The metered path's round trips are group-committed (``pg_batch``):
  admissions, rate-limit takes, notes and settles queued while one of their
  kind is in flight go to the server as one call, each caller told its own
  answer. One call, one round trip when alone; many calls, one when busy.
- Every hold names its owner, a random 63-bit id whose session advisory lock
  this store holds on its own connection (``pg_lifeline``); ``sweep_holds()``
  takes only holds whose owner's lock nobody holds and that has not been seen
  (its heartbeat) for ``OWNER_GRACE``: a dead process, not one whose lifeline
  is reconnecting. While its lifeline is down a process admits nothing (503),
  so no hold of it is younger than its last heartbeat; one that comes back
  presumed dead re-inserts the holds of its calls still running before it
  admits again (a swept unnamed hold no longer narrowed the cap).

Failure is closed: any driver failure (server down, connection dropped,
statement or lock timeout) becomes ``Unavailable`` (503), never a call passed
unmetered; the pool opens new connections by itself when the server is back.
One kind of row is cached: ``get_connection``'s answers, each kept under the
``apps_version`` it was read at, so any notified change (by any process: every
write to a connection notifies, ``_changed``) drops them all, and none is used
while the listener is down (``apps_version()`` None). Admission re-reads the
connection's state and cap under its lock regardless. Pool connections keep
no session state, so asyncpg's reset query after each release is skipped.

Driver: asyncpg, chosen by ``bench/pg_driver.py`` on this workload (admit +
note + settle, 32 tasks on one cap, pool of 8, PostgreSQL 15 on a shared 2-core
machine): asyncpg 731 µs of client CPU per call against 1064 µs for psycopg 3
with psycopg-pool, at equal throughput (~640-720 calls/s, bound by the server
there). The gateway's own CPU per call is what the fleet bench is judged on.
asyncpg takes positional ``$n`` parameters only, so the SQL here is positional.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import secrets
from typing import Any, AsyncIterator, Awaitable, Callable, Iterable

import asyncpg

from .. import budget
from ..errors import ConsentRequired, GrantInvalid, KeysMismatch, NotConnected, Unavailable
from . import outbox
from .pg_audit import audit
from .pg_batch import GroupCommit, InDoubt
from .pg_lifeline import OWNER_GRACE, Lifeline
from .pg_migrations import migrate
from .pg_browse import PgBrowseMixin
from .records import (ACTIVE, APP_COLS, CONNECTION_COLS, DELIVERED, GRANT_COLS, METERED, REVOKED,
                      USAGE_COLS, App, AppPolicy, Connection, Grant, Hold, Usage, Webhook,
                      WebhookEvent, app_of)

log = logging.getLogger("wattgate.store")

# What a transaction may wait at most, server side; and on the client, for a
# connection from the pool and for any one command (a frozen server).
SERVER_SETTINGS = {"statement_timeout": "5000", "lock_timeout": "2000",
                   "idle_in_transaction_session_timeout": "10000",
                   "application_name": "wattgate"}
CONNECT_TIMEOUT = 5.0
ACQUIRE_TIMEOUT = 5.0
COMMAND_TIMEOUT = 10.0
# A write the database could not take (settle, release, a generation's name) is tried
# again this often, doubling up to the second figure, until it lands: only this
# process knows what its call cost.
RETRY_FIRST, RETRY_MAX = 0.5, 5.0
# How long a statement whose client went away may still run, and commit, on the
# server (its statement_timeout, plus a margin): an admission in doubt is undone after.
IN_DOUBT_FOR = int(SERVER_SETTINGS["statement_timeout"]) / 1000 + 1.0

# Every failure that means "the database cannot answer now".
_DOWN: tuple[type[BaseException], ...] = (
    OSError, asyncio.TimeoutError, asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,            # class 08
    asyncpg.exceptions.OperatorInterventionError,  # 57: shutdown, terminated, cancelled
    asyncpg.exceptions.InsufficientResourcesError,  # 53: too many connections
    asyncpg.exceptions.LockNotAvailableError,   # lock_timeout
    asyncpg.exceptions.DeadlockDetectedError,
    asyncpg.exceptions.SerializationError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.InternalClientError,     # a connection dying mid-operation
    # A login refused (password changed, role locked or dropped, database gone) while
    # serving: the pool's new connections fail until an operator fixes it.
    asyncpg.exceptions.InvalidAuthorizationSpecificationError,  # 28
    asyncpg.exceptions.InvalidCatalogNameError,  # 3D000
)

_NOTIFY = "SELECT pg_notify('wattgate_changes', '')"
_APP_COLS_A = ", ".join("a." + col for col in APP_COLS.split(", "))


CONNECTION_CACHE_SIZE = 10_000  # get_connection's answers kept at most (then all dropped)


async def _no_reset(con: Any) -> None:
    """Pool connections keep no session state: nothing to reset (see ``open``)."""


def _down(e: BaseException) -> Unavailable | None:
    """``e`` as the store's ``Unavailable`` when it means the database cannot answer now."""
    return unavailable(e) if isinstance(e, _DOWN) else None


def unavailable(e: BaseException) -> Unavailable:
    log.warning("ledger database unavailable: %r", e)
    return Unavailable("The ledger database is unreachable; try again shortly.")


class PostgresStore(PgBrowseMixin):
    """The ledger contract (``store/contract.py``) on one shared PostgreSQL database."""

    kind = "postgresql"

    def __init__(self, pool: Any, lifeline: Lifeline) -> None:
        self._pool = pool
        self._life = lifeline
        self.owner = lifeline.owner
        # Holds admitted here, not settled or released yet: hold id → (Hold, app id,
        # created_at, expires_at), and the generation each was named for, so they
        # can be restored if another process presumed this one dead and swept them.
        self._mine: dict[int, tuple[Hold, str | None, float, float]] = {}
        # Admissions queued or sent and not answered yet, by (created_at, amount): an
        # undo of a lost one never takes a hold one of them may own.
        self._admitting: dict[tuple[float, int], int] = {}
        self._names: dict[int, tuple[str, str, str]] = {}
        self._restoring = asyncio.Lock()
        self.owner_grace = OWNER_GRACE
        lifeline.on_presumed_dead = self._restore_soon
        self._writes: set[asyncio.Task[Any]] = set()  # shielded writes still running
        self._closing = False  # writes stop retrying: close() waits for them
        self._settles: GroupCommit[bool] = GroupCommit(
            self._settle_batch, self._con, _down, self._writes, idempotent=True)
        self._notes: GroupCommit[None] = GroupCommit(
            self._note_batch, self._con, _down, self._writes, idempotent=True)
        self._admits: GroupCommit[Any] = GroupCommit(
            self._admit_batch, self._con, _down, self._writes, idempotent=False)
        self._rates: GroupCommit[Any] = GroupCommit(
            self._rate_batch, self._con, _down, self._writes, idempotent=False)
        # get_connection's answers, each under the apps_version it was read at.
        self._connections: dict[tuple[str, str], tuple[Any, Connection | None]] = {}

    # ---- lifecycle ---------------------------------------------------------
    @classmethod
    async def open(cls, url: str, *, pool_size: int = 10) -> "PostgresStore":
        """Create the pool, apply the migrations (one process at a time), take an owner id."""
        def connect() -> Any:
            return asyncpg.connect(url, timeout=CONNECT_TIMEOUT,
                                   server_settings=SERVER_SETTINGS)
        try:
            # No pool connection ever changes session state (no session advisory
            # locks, LISTEN, SET or cursors: those live on the lifeline), so the
            # reset round trip after every release is skipped; asyncpg still
            # rolls back a transaction left open.
            pool = await asyncpg.create_pool(
                url, min_size=1, max_size=pool_size, timeout=CONNECT_TIMEOUT,
                command_timeout=COMMAND_TIMEOUT, server_settings=SERVER_SETTINGS,
                reset=_no_reset)
        except _DOWN as e:
            raise unavailable(e) from e
        try:
            async with pool.acquire(timeout=ACQUIRE_TIMEOUT) as con:
                await migrate(con)
            lifeline = Lifeline(connect, secrets.randbits(63) or 1)
            await lifeline.start()
        except BaseException as e:
            pool.terminate()
            if isinstance(e, _DOWN):
                raise unavailable(e) from e
            raise
        return cls(pool, lifeline)

    async def close(self) -> None:
        self._closing = True
        if self._writes:
            await asyncio.wait(list(self._writes))
        await self._life.close()
        try:
            await asyncio.wait_for(self._pool.close(), COMMAND_TIMEOUT)
        except _DOWN:
            self._pool.terminate()

    def close_now(self) -> None:
        self._life.close_now()
        self._pool.terminate()

    def claim(self) -> None:
        """Any number of processes may serve one PostgreSQL ledger: nothing to take."""

    @contextlib.asynccontextmanager
    async def _con(self) -> AsyncIterator[Any]:
        try:
            async with self._pool.acquire(timeout=ACQUIRE_TIMEOUT) as con:
                yield con
        except _DOWN as e:
            raise unavailable(e) from e

    @contextlib.asynccontextmanager
    async def _tx(self) -> AsyncIterator[Any]:
        try:
            async with self._pool.acquire(timeout=ACQUIRE_TIMEOUT) as con:
                async with con.transaction():
                    yield con
        except _DOWN as e:
            raise unavailable(e) from e

    async def _one(self, sql: str, *args: Any) -> Any:
        async with self._con() as con:
            return await con.fetchrow(sql, *args)

    async def _all(self, sql: str, *args: Any) -> list[Any]:
        async with self._con() as con:
            return list(await con.fetch(sql, *args))

    async def _changed(self, write: Callable[[Any], Awaitable[Any]]) -> Any:
        """Run ``write`` in a transaction that notifies every process of a change."""
        try:
            async with self._tx() as con:
                result = await write(con)
                await con.execute(_NOTIFY)
            return result
        finally:
            self._life.bump()  # this process need not wait for its own notification

    def _shield(self, write: Callable[[], Awaitable[Any]]) -> "asyncio.Future[Any]":
        """Run ``write()`` to its end whatever happens to the caller awaiting the result.

        The caller learns how the first attempt went. One the database could not
        take (``Unavailable``: down, restarting) is tried again in the background
        until it lands, or until the store closes: each such write is idempotent
        (settle on the generation id, release and a generation's name on the
        hold), and this process alone knows what its call in flight cost.
        """
        first: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        # Retrieved here, so a first attempt nobody awaited is never reported at exit.
        first.add_done_callback(lambda f: f.cancelled() or f.exception())

        def tell(result: Any = None, error: BaseException | None = None) -> None:
            if not first.done():  # the caller may have been cancelled
                if error is not None:
                    first.set_exception(error)
                else:
                    first.set_result(result)

        async def attempts() -> None:
            delay = RETRY_FIRST
            while True:
                try:
                    result = await write()
                except Unavailable as e:
                    tell(error=e)
                    if self._closing:
                        raise
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, RETRY_MAX)
                    continue
                except BaseException as e:
                    tell(error=e)
                    raise
                tell(result)
                return

        task = asyncio.ensure_future(attempts())
        self._writes.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._writes.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.error("ledger write failed: %r", t.exception())
        task.add_done_callback(done)
        return first

    async def ping(self) -> bool:
        try:
            async with self._pool.acquire(timeout=ACQUIRE_TIMEOUT) as con:
                return bool(await con.fetchval("SELECT 1", timeout=ACQUIRE_TIMEOUT) == 1)
        except Exception:
            return False

    async def holds_apps(self) -> bool:
        return await self._one("SELECT 1 FROM apps LIMIT 1") is not None

    async def bind_keys(self, fingerprint: str) -> None:
        async with self._tx() as con:
            await con.execute("INSERT INTO meta (name, value) VALUES ('keys_fingerprint', $1) "
                              "ON CONFLICT (name) DO NOTHING", fingerprint)
            stored = await con.fetchval("SELECT value FROM meta WHERE name = 'keys_fingerprint'")
        if stored != fingerprint:
            raise KeysMismatch("this host's hash and JWT keys differ from those the ledger was "
                               "started with: give every process the same keys file")

    def apps_version(self) -> tuple[int, int] | None:
        """Moves on every notified change (any process, the CLI); None while not listening."""
        return self._life.version()

    # ---- apps --------------------------------------------------------------
    async def create_app(self, app_id: str, name: str, secret_hash: str,
                         origins: Iterable[str], *, now: float) -> App:
        origins = tuple(dict.fromkeys(origins))

        async def write(con: Any) -> None:
            await con.execute("INSERT INTO apps (app_id, name, secret_hash, created_at) "
                              "VALUES ($1, $2, $3, $4)", app_id, name, secret_hash, now)
            await con.executemany("INSERT INTO app_origins (app_id, origin) VALUES ($1, $2)",
                                  [(app_id, o) for o in origins])
        await self._changed(write)
        return App(app_id, name, secret_hash, origins, now)

    async def get_app(self, app_id: str, *, deleted: bool = False) -> App | None:
        async with self._con() as con:
            row = await con.fetchrow(f"SELECT {APP_COLS} FROM apps WHERE app_id = $1", app_id)
            if row is None or (row[4] is not None and not deleted):
                return None
            origins = tuple(r[0] for r in await con.fetch(
                "SELECT origin FROM app_origins WHERE app_id = $1 ORDER BY origin", app_id))
        return app_of(row, origins)

    async def list_apps(self) -> list[App]:
        rows = await self._all(
            f"SELECT {_APP_COLS_A}, "
            "COALESCE(array_agg(o.origin ORDER BY o.origin) FILTER (WHERE o.origin IS NOT NULL), "
            "'{}') FROM apps a LEFT JOIN app_origins o ON o.app_id = a.app_id "
            "WHERE a.deleted_at IS NULL GROUP BY a.app_id ORDER BY a.created_at, a.app_id")
        return [app_of(r[:8], tuple(r[8])) for r in rows]

    async def set_app_secret(self, app_id: str, secret_hash: str, *,
                             keep_previous_until: float | None = None) -> bool:
        async def write(con: Any) -> bool:
            return await con.fetchval(
                "UPDATE apps SET previous_secret_hash = CASE WHEN $3::float8 IS NULL THEN NULL "
                "ELSE secret_hash END, previous_until = $3, secret_hash = $1 "
                "WHERE app_id = $2 AND deleted_at IS NULL RETURNING 1",
                secret_hash, app_id, keep_previous_until) is not None
        return bool(await self._changed(write))

    async def retire_previous_secret(self, app_id: str) -> bool:
        async def write(con: Any) -> bool:
            return await con.fetchval(
                "UPDATE apps SET previous_secret_hash = NULL, previous_until = NULL "
                "WHERE app_id = $1 AND deleted_at IS NULL "
                "AND previous_secret_hash IS NOT NULL RETURNING 1", app_id) is not None
        return bool(await self._changed(write))

    async def delete_app(self, app_id: str, *, now: float) -> bool:
        """Tombstone the app, revoke its connections, end its grants (see
        ``SQLiteStore.delete_app``: rows and ids stay its own; keys wait for
        ``erase_revoked_keys``)."""
        async def write(con: Any) -> bool:
            if await con.fetchval("UPDATE apps SET deleted_at = $2, secret_hash = '', "
                                  "previous_secret_hash = NULL, previous_until = NULL "
                                  "WHERE app_id = $1 AND deleted_at IS NULL RETURNING 1",
                                  app_id, now) is None:
                return False
            await con.execute("DELETE FROM app_origins WHERE app_id = $1", app_id)
            await con.execute("UPDATE connections SET state = $3, browser_hash = NULL, "
                              "updated_at = $2 WHERE app_id = $1", app_id, now, REVOKED)
            await con.execute("UPDATE grants SET expires_at = LEAST(expires_at, $2) "
                              "WHERE app_id = $1", app_id, now)
            return True
        return bool(await self._changed(write))

    async def set_origins(self, app_id: str, add: Iterable[str] = (),
                          remove: Iterable[str] = ()) -> bool:
        async def write(con: Any) -> bool:
            if await con.fetchval("SELECT 1 FROM apps WHERE app_id = $1 AND deleted_at IS NULL "
                                  "FOR UPDATE", app_id) is None:
                return False
            await con.executemany("INSERT INTO app_origins (app_id, origin) VALUES ($1, $2) "
                                  "ON CONFLICT DO NOTHING", [(app_id, o) for o in add])
            await con.executemany("DELETE FROM app_origins WHERE app_id = $1 AND origin = $2",
                                  [(app_id, o) for o in remove])
            return True
        return bool(await self._changed(write))

    async def set_app_policy(self, app_id: str, policy: AppPolicy) -> App | None:
        async def write(con: Any) -> bool:
            return await con.fetchval("UPDATE apps SET policy = $1 WHERE app_id = $2 "
                                      "AND deleted_at IS NULL RETURNING 1",
                                      policy.to_text(), app_id) is not None
        return await self.get_app(app_id) if await self._changed(write) else None

    async def origin_registered(self, origin: str) -> bool:
        return await self._one("SELECT 1 FROM app_origins WHERE origin = $1 LIMIT 1",
                               origin) is not None

    # ---- connections ---------------------------------------------------------
    async def get_connection(self, app_id: str, app_user_id: str) -> Connection | None:
        """Cached until the next change notification (every write to a connection
        notifies: ``_changed``); not at all while the lifeline is down."""
        version = self.apps_version()
        key = (app_id, app_user_id)
        if version is not None:
            cached = self._connections.get(key)
            if cached is not None and cached[0] == version:
                return cached[1]
        row = await self._one(f"SELECT {CONNECTION_COLS} FROM connections "
                              "WHERE app_id = $1 AND app_user_id = $2", app_id, app_user_id)
        connection = Connection(*row) if row else None
        if version is not None:  # the version read before: a change meanwhile drops it
            if len(self._connections) >= CONNECTION_CACHE_SIZE:
                self._connections.clear()
            self._connections[key] = (version, connection)
        return connection

    async def get_connection_by_id(self, connection_id: int) -> Connection | None:
        row = await self._one(f"SELECT {CONNECTION_COLS} FROM connections "
                              "WHERE connection_id = $1", connection_id)
        return Connection(*row) if row else None

    async def connections_for_browser(self, browser_hash: str) -> list[Connection]:
        return [Connection(*r) for r in await self._all(
            f"SELECT {CONNECTION_COLS} FROM connections WHERE browser_hash = $1 "
            "ORDER BY updated_at DESC", browser_hash)]

    async def connections_for_app(self, app_id: str) -> list[Connection]:
        return [Connection(*r) for r in await self._all(
            f"SELECT {CONNECTION_COLS} FROM connections WHERE app_id = $1 "
            "ORDER BY updated_at DESC", app_id)]

    async def save_connection(self, app_id: str, app_user_id: str, *, state: str,
                              cap_nanos: int | None, sealed_key: str | None,
                              browser_hash: str | None, now: float,
                              seal: Callable[[int], str] | None = None) -> Connection:
        async def write(con: Any) -> Connection:
            before = await con.fetchrow(f"SELECT {CONNECTION_COLS} FROM connections "
                                        "WHERE app_id = $1 AND app_user_id = $2 FOR UPDATE",
                                        app_id, app_user_id)
            row = await con.fetchrow(
                "INSERT INTO connections (app_id, app_user_id, state, cap_nanos, sealed_key, "
                "browser_hash, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $7) "
                "ON CONFLICT (app_id, app_user_id) DO UPDATE SET state = EXCLUDED.state, "
                "cap_nanos = EXCLUDED.cap_nanos, sealed_key = EXCLUDED.sealed_key, "
                "browser_hash = EXCLUDED.browser_hash, updated_at = EXCLUDED.updated_at "
                f"RETURNING {CONNECTION_COLS}",
                app_id, app_user_id, state, cap_nanos, sealed_key, browser_hash, now)
            connection = Connection(*row)
            if seal is not None:
                sealed = seal(connection.connection_id)
                await con.execute("UPDATE connections SET sealed_key = $1 "
                                  "WHERE connection_id = $2", sealed, connection.connection_id)
                connection = dataclasses.replace(connection, sealed_key=sealed)
            await outbox.pg_connection_changed(con, Connection(*before) if before else None,
                                               connection, now)
            return connection
        connection: Connection = await self._changed(write)
        return connection

    async def update_cap(self, connection_id: int, cap_nanos: int | None, *,
                         expected_key: str | None, expected_cap: int | None,
                         now: float) -> Connection | None:
        """See ``SQLiteStore.update_cap``: a compare-and-set on the key and the cap."""
        async def write(con: Any) -> Connection | None:
            before = await _locked_connection(con, connection_id)
            row = await con.fetchrow(
                "UPDATE connections SET cap_nanos = $1, updated_at = $2 WHERE connection_id = $3 "
                "AND state = $4 AND sealed_key IS NOT DISTINCT FROM $5 "
                "AND cap_nanos IS NOT DISTINCT FROM $6::bigint "
                f"RETURNING {CONNECTION_COLS}", cap_nanos, now, connection_id, ACTIVE,
                expected_key, expected_cap)
            after = Connection(*row) if row else None
            if after is not None:
                await outbox.pg_connection_changed(con, before, after, now)
            return after
        result: Connection | None = await self._changed(write)
        return result

    async def set_connection_state(self, connection_id: int, state: str, *,
                                   now: float) -> None:
        """Revoked stays revoked; revoking ends the grants it funds (see SQLiteStore)."""
        async def write(con: Any) -> None:
            before = await _locked_connection(con, connection_id)
            row = await con.fetchrow("UPDATE connections SET state = $1, updated_at = $2 "
                                     "WHERE connection_id = $3 AND (state != $4 OR $1 = $4) "
                                     f"RETURNING {CONNECTION_COLS}",
                                     state, now, connection_id, REVOKED)
            if row is not None:
                await outbox.pg_connection_changed(con, before, Connection(*row), now)
            if state == REVOKED:
                await con.execute("UPDATE grants SET expires_at = LEAST(expires_at, $1) "
                                  "WHERE connection_id = $2", now, connection_id)
        await self._changed(write)

    async def all_sealed_keys(self) -> list[tuple[str, int | str, str]]:
        rows = await self._all(
            "SELECT 'connections', connection_id, sealed_key FROM connections "
            "WHERE sealed_key IS NOT NULL UNION ALL "
            "SELECT 'grants', grant_id, sealed_key FROM grants WHERE sealed_key IS NOT NULL")
        secrets = await self._all(outbox.SEALED_SECRETS)
        return [(r[0], r[1], r[2]) for r in rows] + [("apps", r[0], r[1]) for r in secrets]

    async def replace_sealed_keys(self, changes: list[tuple[str, int | str, str, str]]) -> int:
        async def write(con: Any) -> int:
            n = 0
            for table, row_id, old, new in changes:
                table, id_col, col = outbox.sealed_column(table)
                n += len(await con.fetch(f"UPDATE {table} SET {col} = $1 "
                                         f"WHERE {id_col} = $2 AND {col} = $3 RETURNING 1",
                                         new, row_id, old))
            return n
        return int(await self._changed(write))

    # ---- holds and debits ----------------------------------------------------
    async def period_spent(self, connection_id: int, period: str) -> int:
        row = await self._one("SELECT spent_nanos FROM periods WHERE connection_id = $1 "
                              "AND period = $2", connection_id, period)
        return int(row[0]) if row else 0

    async def held(self, connection_id: int, period: str | None = None) -> int:
        row = await self._one("SELECT COALESCE(SUM(amount_nanos), 0) FROM holds "
                              "WHERE connection_id = $1 AND ($2::text IS NULL OR period = $2)",
                              connection_id, period)
        return int(row[0])

    async def admit(self, connection_id: int, period: str, amount_nanos: int, *,
                    now: float, expires_at: float) -> Hold:
        """One ``wattgate_admit`` (migration 3: lock, read, compare, hold), group-committed
        with the admissions queued beside it; the rules' words come from ``budget``."""
        await self._ready()
        key = (now, amount_nanos)
        self._admitting[key] = self._admitting.get(key, 0) + 1
        fut = self._admits.put((connection_id, period, amount_nanos, now, expires_at))
        fut.add_done_callback(lambda f: self._admitted(f, key))
        try:
            row = await asyncio.shield(fut)
        except asyncio.CancelledError:
            # The admission goes on: a hold nobody will own is released at once.
            fut.add_done_callback(lambda f: self._release_unowned(f, connection_id, period,
                                                                  amount_nanos))
            raise
        hold_id = row["hold_id"]
        if not row["known"]:
            raise NotConnected()
        spent, held = int(row["spent"]), int(row["held"])
        if hold_id is None:
            # Refused there: worded here, by the rules of budget.
            budget.check_connection(row["state"], row["sealed_key"])
            budget.check_cap(row["cap_nanos"], spent, held, amount_nanos)
            raise AssertionError("wattgate_admit refused a call budget admits")
        hold = Hold(hold_id, connection_id, None, period, amount_nanos)  # in _mine already
        if budget.cap_refusal(row["cap_nanos"], spent, held, amount_nanos) is not None:
            # Never expected (a contract test pins the two together): fail closed.
            await self.release(hold)
            raise AssertionError("wattgate_admit held a call budget refuses")
        return hold

    def _admitted(self, fut: "asyncio.Future[Any]", key: tuple[float, int]) -> None:
        left = self._admitting.pop(key) - 1
        if left:
            self._admitting[key] = left
        if not fut.cancelled() and isinstance(fut.exception(), InDoubt):
            # Sent, and the database went away before it answered: it may commit yet.
            self._undo_lost_admission(*key)

    def _release_unowned(self, fut: "asyncio.Future[Any]", connection_id: int, period: str,
                         amount_nanos: int) -> None:
        if fut.cancelled() or fut.exception() is not None or fut.result()["hold_id"] is None:
            return
        self.release(Hold(fut.result()["hold_id"], connection_id, None, period, amount_nanos))

    def _undo_lost_admission(self, created_at: float, amount_nanos: int) -> None:
        """An admission cut off around its commit (the server went away) may have left
        a hold that no call will settle: the caller was told 503. Once the server
        answers again and the cut-off statement can no longer be running
        (``IN_DOUBT_FOR``: a backend whose client left still commits a statement
        that was waiting for a lock), drop any such hold of this process (identified
        by its admission's moment and amount, never one this process owns or is
        still admitting) and give a grant's request back."""
        settled_at = asyncio.get_running_loop().time() + IN_DOUBT_FOR

        async def write() -> None:
            loop = asyncio.get_running_loop()
            while not self._closing and loop.time() < settled_at:
                await asyncio.sleep(min(0.5, settled_at - loop.time()))
            async with self._tx() as con:
                rows = await con.fetch(
                    "SELECT hold_id, grant_id FROM holds WHERE owner = $1 AND created_at = $2 "
                    "AND amount_nanos = $3 AND generation_id IS NULL",
                    self.owner, created_at, amount_nanos)
                if (created_at, amount_nanos) in self._admitting:
                    # One like it is in flight: never drop a live hold (a lost one
                    # narrows the cap until the hold TTL's sweep takes it).
                    return
                for hold_id, grant_id in rows:
                    if hold_id in self._mine:
                        continue
                    if await _drop_hold(con, hold_id) and grant_id is not None:
                        await _refund_request(con, grant_id)
        self._shield(write)

    async def _admit_batch(self, con: Any, items: list[tuple[Any, ...]]) -> list[Any]:
        c, p, a, n, e = (list(col) for col in zip(*items))
        rows = await con.fetch(_ADMIT, c, p, a, self.owner, n, e)
        by_item = {r["i"]: r for r in rows}
        answers = [by_item[k] for k in range(1, len(items) + 1)]
        for (connection_id, period, amount, now, expires), row in zip(items, answers):
            if row["hold_id"] is not None:  # this process's before any caller runs on
                hold = Hold(row["hold_id"], connection_id, None, period, amount)
                self._mine[hold.hold_id] = (hold, row["app_id"], now, expires)
        return answers

    @staticmethod
    async def _rate_batch(con: Any, items: list[tuple[Any, ...]]) -> list[Any]:
        rows = await con.fetch(_RATE_TAKE, *[list(col) for col in zip(*items)])
        by_item = {r["i"]: r for r in rows}
        return [by_item[k] for k in range(1, len(items) + 1)]

    def note_generation(self, hold: Hold, generation_id: str, app_id: str,
                        model: str) -> Awaitable[None] | None:
        """Group-committed: the notes queued in one loop turn are one UPDATE."""
        if hold.hold_id not in self._mine:
            return None
        self._names[hold.hold_id] = (generation_id, app_id, model[:200])
        item = (hold.hold_id, generation_id, app_id, model[:200])
        return self._shield(lambda: self._notes.put(item))

    def settle(self, hold: Hold | None, usage: Usage, period: str) -> Awaitable[bool]:
        """Group-committed: the settles queued while one is in flight are one call of
        ``wattgate_settle`` (one transaction), each caller told its own answer."""
        if hold is not None:  # settled from now on: never to be restored
            self._forget(hold.hold_id)
        item = (hold.hold_id if hold is not None else None, usage.generation_id, usage.app_id,
                usage.connection_id, usage.grant_id, period, usage.model,
                usage.prompt_tokens, usage.completion_tokens, usage.cost_nanos,
                usage.provisional, usage.status, usage.latency_ms, usage.created_at)

        async def write() -> bool:
            await self._after_restoring()
            return await self._settles.put(item)
        return self._shield(write)

    @staticmethod
    async def _settle_batch(con: Any, items: list[tuple[Any, ...]]) -> list[bool]:
        counted = await con.fetchval(_SETTLE, *[list(c) for c in zip(*items)])
        return [bool(c) for c in counted]

    @staticmethod
    async def _note_batch(con: Any, items: list[tuple[Any, ...]]) -> list[None]:
        await con.execute(_NOTE, *[list(c) for c in zip(*items)])
        return [None] * len(items)

    def release(self, hold: Hold, *, refund_request: bool = False,
                record: Usage | None = None) -> Awaitable[None]:
        """One transaction: the hold dropped, a grant's request given back when asked,
        and ``record`` (a $0 row of a call the upstream refused) written."""
        self._forget(hold.hold_id)

        async def write() -> None:
            await self._after_restoring()
            try:
                async with self._tx() as con:
                    dropped = await _drop_hold(con, hold.hold_id)
                    if dropped and refund_request and hold.grant_id is not None:
                        await _refund_request(con, hold.grant_id)
                    if record is not None:
                        await con.execute(
                            "INSERT INTO usage (generation_id, app_id, connection_id, "
                            "grant_id, period, model, prompt_tokens, completion_tokens, "
                            "cost_nanos, provisional, status, latency_ms, created_at, "
                            "upstream_code) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, "
                            "$11, $12, $13, $14) "
                            "ON CONFLICT (generation_id) DO NOTHING",
                            record.generation_id, record.app_id, record.connection_id,
                            record.grant_id, hold.period, record.model, record.prompt_tokens,
                            record.completion_tokens, record.cost_nanos, record.provisional,
                            record.status, record.latency_ms, record.created_at,
                            record.upstream_code)
            finally:
                self._forget(hold.hold_id)
        return self._shield(write)

    async def sweep_holds(self, *, older_than: float | None = None,
                          now: float | None = None) -> int:
        """Holds created before ``older_than`` (any process's), or with None the holds of
        every process that is gone: its owner lock free AND unseen for ``owner_grace``
        (a lifeline reconnecting is not a death). A named hold becomes a provisional
        row at its estimate; an unnamed one is released, its request refunded. A dead
        owner's holds are swept in one transaction under its owner lock, its
        ``owners`` row deleted with them, so a process coming back meanwhile keeps
        its holds, and one coming back later knows it was presumed dead."""
        if older_than is not None:
            rows = await self._all("SELECT hold_id FROM holds WHERE created_at < $1 "
                                   "ORDER BY hold_id", older_than)
            swept = 0
            for (hold_id,) in rows:
                async with self._tx() as con:
                    swept += await _sweep_hold(con, hold_id, now)
                self._forget(hold_id)
            return swept
        owners = await self._all(
            "SELECT owner FROM holds WHERE owner <> $1 UNION "
            "SELECT owner FROM owners WHERE owner <> $1 "
            "AND last_seen < extract(epoch FROM clock_timestamp()) - $2",
            self.owner, self.owner_grace)
        swept = 0
        for (owner,) in owners:
            async with self._tx() as con:
                if not await con.fetchval("SELECT pg_try_advisory_xact_lock($1)", owner):
                    continue  # its process is alive
                fresh = await con.fetchval(
                    "SELECT last_seen >= extract(epoch FROM clock_timestamp()) - $2 "
                    "FROM owners WHERE owner = $1 FOR UPDATE", owner, self.owner_grace)
                if fresh:
                    continue  # its lifeline is down, but not for long: wait
                # Its grants first, in id order, before any period: a settle locks
                # its grant, then its period, and this transaction debits several.
                await con.execute("SELECT 1 FROM grants WHERE grant_id IN (SELECT grant_id "
                                  "FROM holds WHERE owner = $1) ORDER BY grant_id FOR UPDATE",
                                  owner)
                for (hold_id,) in await con.fetch("SELECT hold_id FROM holds WHERE owner = $1 "
                                                  "ORDER BY hold_id", owner):
                    swept += await _sweep_hold(con, hold_id, now)
                await con.execute("DELETE FROM owners WHERE owner = $1", owner)
        return swept

    # ---- presumed dead: restoring this process's holds ---------------------------
    async def _ready(self) -> None:
        """Admit only while this process is vouched alive and its holds are all there."""
        if not self._life.up:
            raise Unavailable("This gateway lost its ledger connection; try again shortly.")
        if self._life.presumed_dead:
            await self._restore_holds()

    def _forget(self, hold_id: int) -> None:
        self._mine.pop(hold_id, None)
        self._names.pop(hold_id, None)

    async def _after_restoring(self) -> None:
        # A settle or release must not commit while a restoration may re-insert the
        # very hold it drops (the restore's insert would not be visible to its delete).
        if self._restoring.locked():
            async with self._restoring:
                pass

    def _restore_soon(self) -> None:
        task = asyncio.ensure_future(self._restore_holds())
        self._writes.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._writes.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.warning("restoring swept holds failed (retried at the next "
                            "admission): %r", t.exception())
        task.add_done_callback(done)

    async def _restore_holds(self) -> None:
        """Put back the holds of this process's running calls that a sweep took.

        A swept named hold is a provisional row at its estimate already (it
        narrows the cap as spend; the call's settle makes it final): left so.
        Any other (unnamed when swept; its request refunded) is inserted again
        with its own id, its grant's request and held amount taken again."""
        async with self._restoring:
            if not self._life.presumed_dead:
                return
            restored = 0
            for hold_id, (hold, app_id, created_at, expires_at) in list(self._mine.items()):
                name = self._names.get(hold_id)
                async with self._tx() as con:
                    if hold_id not in self._mine:
                        continue  # settled or released meanwhile
                    if await con.fetchval("SELECT 1 FROM holds WHERE hold_id = $1",
                                          hold_id):
                        continue
                    if name is not None and await con.fetchval(
                            "SELECT 1 FROM usage WHERE generation_id = $1", name[0]):
                        continue
                    await con.execute(
                        "INSERT INTO holds (hold_id, owner, connection_id, grant_id, app_id, "
                        "period, amount_nanos, generation_id, model, created_at, expires_at) "
                        "OVERRIDING SYSTEM VALUE VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, "
                        "$10, $11)", hold_id, self.owner, hold.connection_id, hold.grant_id,
                        name[1] if name else app_id, hold.period, hold.amount_nanos,
                        name[0] if name else None, name[2] if name else None, created_at,
                        expires_at)
                    if hold.grant_id is not None:
                        await con.execute("UPDATE grants SET used = used + 1, held_nanos = "
                                          "held_nanos + $1 WHERE grant_id = $2",
                                          hold.amount_nanos, hold.grant_id)
                    restored += 1
            self._life.presumed_dead = False
            log.warning("restored %d budget holds swept while this process was presumed dead",
                        restored)

    async def open_holds(self) -> int:
        row = await self._one("SELECT COUNT(*) FROM holds")
        return int(row[0])

    # ---- grants ----------------------------------------------------------------
    async def create_grant(self, app_id: str, token_hash: str, requests: int,
                           max_nanos: int | None, *, sealed_key: str | None,
                           connection_id: int | None, now: float, expires_at: float,
                           seal: Callable[[int], str] | None = None,
                           approved_by: str | None = None) -> Grant:
        """See ``SQLiteStore.create_grant``; the funding connection's row is locked
        (shared) so a revocation cannot slip between the check and the insert."""
        async with self._tx() as con:
            if connection_id is not None:
                conn = await con.fetchrow("SELECT state, sealed_key, browser_hash FROM "
                                          "connections WHERE connection_id = $1 FOR SHARE",
                                          connection_id)
                if conn is None or conn[0] != ACTIVE or conn[1] is None or \
                        approved_by is None or conn[2] != approved_by:
                    raise ConsentRequired("The connection changed meanwhile (revoked or "
                                          "approved again); approve the grant again.")
            grant_id = await con.fetchval(
                "INSERT INTO grants (app_id, token_hash, requests, max_nanos, sealed_key, "
                "connection_id, created_at, expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) "
                "RETURNING grant_id", app_id, token_hash, requests, max_nanos, sealed_key,
                connection_id, now, expires_at)
            key = sealed_key
            if seal is not None:
                key = seal(grant_id)
                await con.execute("UPDATE grants SET sealed_key = $1 WHERE grant_id = $2",
                                  key, grant_id)
        return Grant(grant_id, app_id, token_hash, requests, 0, max_nanos, 0, 0, key,
                     connection_id, now, expires_at)

    async def get_grant(self, token_hash: str) -> Grant | None:
        row = await self._one(f"SELECT {GRANT_COLS} FROM grants WHERE token_hash = $1",
                              token_hash)
        return Grant(*row) if row else None

    async def get_grant_by_id(self, grant_id: int) -> Grant | None:
        row = await self._one(f"SELECT {GRANT_COLS} FROM grants WHERE grant_id = $1", grant_id)
        return Grant(*row) if row else None

    async def grants_for_app(self, app_id: str) -> list[Grant]:
        return [Grant(*r) for r in await self._all(
            f"SELECT {GRANT_COLS} FROM grants WHERE app_id = $1 ORDER BY created_at DESC",
            app_id)]

    async def admit_grant(self, token_hash: str, app_id: str, period: str, amount_nanos: int,
                          *, now: float, expires_at: float) -> tuple[Grant, Hold]:
        await self._ready()
        writing: list[bool] = []  # the grant's request and hold were sent
        try:
            return await self._admit_grant(token_hash, app_id, period, amount_nanos, now=now,
                                           expires_at=expires_at, writing=writing)
        except Unavailable:
            if writing:
                self._undo_lost_admission(now, amount_nanos)
            raise

    async def _admit_grant(self, token_hash: str, app_id: str, period: str,
                           amount_nanos: int, *, now: float, expires_at: float,
                           writing: list[bool]) -> tuple[Grant, Hold]:
        async with self._tx() as con:
            # A grant's funding connection never changes: read it unlocked, then lock
            # connection before grant (the one order every admission uses).
            funder = await con.fetchrow("SELECT connection_id FROM grants WHERE token_hash = $1",
                                        token_hash)
            if funder is None:
                raise GrantInvalid()
            conn = None
            if funder[0] is not None:
                conn = await con.fetchrow(_LOCK_CONNECTION, funder[0])
            row = await con.fetchrow(f"SELECT {GRANT_COLS} FROM grants WHERE token_hash = $1 "
                                     "FOR UPDATE", token_hash)
            grant = Grant(*row) if row else None
            budget.check_grant(grant, app_id, now, amount_nanos)
            assert grant is not None
            if grant.connection_id is not None:
                try:
                    budget.check_connection(conn["state"] if conn else None,
                                            conn["sealed_key"] if conn else None)
                except NotConnected:
                    raise GrantInvalid("The connection funding this grant was revoked.") \
                        from None
                assert conn is not None
                if conn["cap_nanos"] is not None:
                    spent, held = await con.fetchrow(_SPENT_AND_HELD, grant.connection_id,
                                                     period)
                    budget.check_cap(conn["cap_nanos"], spent, held, amount_nanos)
            writing.append(True)
            await con.execute("UPDATE grants SET used = used + 1, held_nanos = held_nanos + $1 "
                              "WHERE grant_id = $2", amount_nanos, grant.grant_id)
            hold_id = await con.fetchval(_INSERT_HOLD, self.owner, grant.connection_id,
                                         grant.grant_id, grant.app_id, period, amount_nanos, now,
                                         expires_at)
        hold = Hold(hold_id, grant.connection_id, grant.grant_id, period, amount_nanos)
        self._mine[hold_id] = (hold, grant.app_id, now, expires_at)
        grant = Grant(grant.grant_id, grant.app_id, grant.token_hash, grant.requests,
                      grant.used + 1, grant.max_nanos, grant.spent_nanos,
                      grant.held_nanos + amount_nanos, grant.sealed_key, grant.connection_id,
                      grant.created_at, grant.expires_at)
        return grant, hold

    # ---- webhooks (the outbox: store/outbox.py) ----------------------------------
    async def set_webhook(self, app_id: str, url: str | None,
                          sealed_secret: str | None) -> bool:
        async with self._con() as con:
            return await con.fetchval(outbox.pg(outbox.SET_WEBHOOK) + " RETURNING 1", url,
                                      sealed_secret, app_id) is not None

    async def get_webhook(self, app_id: str) -> Webhook | None:
        row = await self._one(outbox.pg(outbox.GET_WEBHOOK), app_id)
        return Webhook(*row) if row else None

    async def claim_webhooks(self, *, now: float, lease_until: float,
                             limit: int = 100) -> list[WebhookEvent]:
        # SKIP LOCKED: another claimer's events are passed over, not waited for; an
        # event after a locked head stays out (its head is still pending).
        async with self._tx() as con:
            rows = await con.fetch(outbox.pg(outbox.DUE).replace(
                "ORDER BY event_id LIMIT $2", "ORDER BY event_id LIMIT $2 FOR UPDATE SKIP LOCKED"),
                now, limit)
            events = [outbox.event(r) for r in rows]
            await con.executemany(outbox.pg(outbox.LEASE),
                                  [(lease_until, e.event_id) for e in events])
        return [dataclasses.replace(e, attempts=e.attempts + 1, next_at=lease_until)
                for e in events]

    async def record_webhook(self, event_id: int, *, status: str, next_at: float,
                             code: int | None, error: str | None, now: float) -> None:
        async with self._con() as con:
            await con.execute(outbox.pg(outbox.RESULT), status, next_at, code, error,
                              now if status == DELIVERED else None, event_id)

    async def recent_webhooks(self, app_id: str, limit: int = 50) -> list[WebhookEvent]:
        return [outbox.event(r) for r in await self._all(outbox.pg(outbox.RECENT), app_id,
                                                          limit)]

    async def resend_webhook(self, app_id: str, public_id: str, *, now: float) -> bool:
        async with self._con() as con:
            return await con.fetchval(outbox.pg(outbox.RESEND) + " RETURNING 1", now, now,
                                      app_id, public_id) is not None

    async def prune_webhooks(self, *, before: float) -> int:
        return len(await self._all(outbox.pg(outbox.PRUNE) + " RETURNING 1", before))

    # ---- presence ----------------------------------------------------------------
    async def add_presence(self, browser_hash: str, *, now: float) -> None:
        async with self._con() as con:
            await con.execute("INSERT INTO presence (browser_hash, created_at) VALUES ($1, $2) "
                              "ON CONFLICT DO NOTHING", browser_hash, now)

    async def has_presence(self, browser_hash: str) -> bool:
        return await self._one("SELECT 1 FROM presence WHERE browser_hash = $1",
                               browser_hash) is not None

    async def rotate_presence(self, old_hashes: Iterable[str], new_hash: str, *,
                              now: float) -> None:
        """``new_hash`` proves what the old hashes did; they prove nothing any more."""
        old = [h for h in old_hashes if h != new_hash]

        async def write(con: Any) -> None:
            await con.execute("INSERT INTO presence (browser_hash, created_at) VALUES ($1, $2) "
                              "ON CONFLICT DO NOTHING", new_hash, now)
            for old_hash in old:
                await con.execute("UPDATE connections SET browser_hash = $1 "
                                  "WHERE browser_hash = $2", new_hash, old_hash)
                await con.execute("DELETE FROM presence WHERE browser_hash = $1", old_hash)
        await self._changed(write)

    # ---- reconciliation ------------------------------------------------------------
    async def correct_usage(self, generation_id: str, cost_nanos: int, *,
                            now: float | None = None) -> bool:
        async with self._tx() as con:
            return await _correct(con, generation_id, cost_nanos, None, None, now)

    async def provisional_usage(self, limit: int = 100, *, after: int = 0,
                                since: float | None = None) -> list[tuple[Usage, str]]:
        return [(u, p) for _, u, p in await self.provisional_page(limit, after=after,
                                                                  since=since)]

    async def provisional_page(self, limit: int, *, after: int = 0,
                               since: float | None = None) -> list[tuple[int, Usage, str]]:
        rows = await self._all(
            f"SELECT {USAGE_COLS}, period, usage_id FROM usage WHERE provisional "
            "AND generation_id NOT LIKE 'wg-%' AND usage_id > $1 "
            "AND ($2::double precision IS NULL OR created_at >= $2) ORDER BY usage_id LIMIT $3",
            after, since, limit)
        return [(r[-1], _usage(r), r[-2]) for r in rows]

    async def recent_final_usage(self, limit: int) -> list[tuple[int, Usage]]:
        rows = await self._all(
            f"SELECT {USAGE_COLS}, usage_id FROM usage WHERE NOT provisional "
            "AND generation_id NOT LIKE 'wg-%' ORDER BY usage_id DESC LIMIT $1", limit)
        return [(r[-1], _usage(r)) for r in rows]

    async def provisional_of_connection(self, connection_id: int,
                                        limit: int = 100) -> list[Usage]:
        rows = await self._all(
            f"SELECT {USAGE_COLS} FROM usage WHERE connection_id = $1 AND provisional "
            "AND generation_id NOT LIKE 'wg-%' ORDER BY usage_id LIMIT $2", connection_id, limit)
        return [_usage(r) for r in rows]

    async def provisional_count(self) -> int:
        row = await self._one("SELECT COUNT(*) FROM usage WHERE provisional")
        return int(row[0])

    async def erase_revoked_keys(self, *, since: float, now: float | None = None,
                                 connection_id: int | None = None) -> int:
        """The rule of ``SQLiteStore.erase_revoked_keys``; calls in flight on every
        process are rows of ``holds`` here."""
        grants = now is not None and connection_id is None
        pending = ("AND NOT EXISTS (SELECT 1 FROM holds h WHERE h.{col} = {table}.{col}) "
                   "AND NOT EXISTS (SELECT 1 FROM usage u WHERE u.{col} = {table}.{col} "
                   "  AND u.provisional AND u.generation_id NOT LIKE 'wg-%' "
                   "  AND u.created_at >= $1)")

        async def write(con: Any) -> int:
            n = len(await con.fetch(
                "UPDATE connections SET sealed_key = NULL WHERE state = $2 "
                "AND sealed_key IS NOT NULL AND ($3::bigint IS NULL OR connection_id = $3) "
                + pending.format(col="connection_id", table="connections") + " RETURNING 1",
                since, REVOKED, connection_id))
            if grants:
                n += len(await con.fetch(
                    "UPDATE grants SET sealed_key = NULL WHERE sealed_key IS NOT NULL "
                    "AND (expires_at <= $2 OR used >= requests) "
                    + pending.format(col="grant_id", table="grants") + " RETURNING 1",
                    since, now))
            return n
        return int(await self._changed(write))

    async def check(self, *, now: float, hold_ttl: float) -> list[str]:
        async with self._con() as con:
            return await audit(con, now=now, hold_ttl=hold_ttl)

    async def recent_usage(self, connection_id: int, limit: int = 20) -> list[Usage]:
        rows = await self._all(
            f"SELECT {USAGE_COLS} FROM usage WHERE connection_id = $1 AND {METERED} "
            "ORDER BY created_at DESC, usage_id DESC LIMIT $2", connection_id, limit)
        return [_usage(r) for r in rows]

    # ---- fleet-wide state --------------------------------------------------------
    async def rate_take(self, limiter: str, key: str, per_minute: int, *, now: float,
                        take: bool = True) -> int | None:
        """The token bucket of ``ratelimit.RateLimiter``, one atomic UPSERT in
        ``wattgate_rate_take``, group-committed with the takes queued beside it."""
        row = await self._rates.put((limiter, key, float(per_minute), now,
                                     1.0 if take else 0.0))
        if row["allowed"]:
            return None
        return max(1, math.ceil((1.0 - float(row["tokens"])) / (per_minute / 60.0)))

    async def open_admin_session(self, session_hash: str, csrf: str, *,
                                 expires_at: float, now: float) -> None:
        async with self._tx() as con:
            await con.execute("DELETE FROM admin_sessions WHERE expires_at <= $1", now)
            await con.execute("INSERT INTO admin_sessions (session_hash, csrf, expires_at) "
                              "VALUES ($1, $2, $3) ON CONFLICT (session_hash) DO UPDATE "
                              "SET csrf = EXCLUDED.csrf, expires_at = EXCLUDED.expires_at",
                              session_hash, csrf, expires_at)

    async def find_admin_session(self, session_hash: str, *,
                                 now: float) -> tuple[str, float] | None:
        row = await self._one("SELECT csrf, expires_at FROM admin_sessions "
                              "WHERE session_hash = $1 AND expires_at > $2", session_hash, now)
        return (row[0], row[1]) if row else None

    async def close_admin_session(self, session_hash: str) -> None:
        async with self._con() as con:
            await con.execute("DELETE FROM admin_sessions WHERE session_hash = $1",
                              session_hash)

    async def lead(self, task: str) -> bool:
        return await self._life.lead(task)


# The connection row, locked. Its period's spent and held are read by a second
# statement, after the lock is granted: under READ COMMITTED a statement that
# waited for a row lock re-reads only that row, so a sum computed in the same
# statement would miss the holds its predecessors committed (a race test proved it).
_LOCK_CONNECTION = ("SELECT app_id, state, sealed_key, cap_nanos FROM connections "
                    "WHERE connection_id = $1 FOR UPDATE")
_SPENT_AND_HELD = (
    "SELECT (SELECT COALESCE(SUM(spent_nanos), 0) FROM periods "
    "        WHERE connection_id = $1 AND period = $2), "
    "       (SELECT COALESCE(SUM(amount_nanos), 0) FROM holds "
    "        WHERE connection_id = $1 AND period = $2)")
_SETTLE = ("SELECT wattgate_settle($1::bigint[], $2::text[], $3::text[], $4::bigint[], "
           "$5::bigint[], $6::text[], $7::text[], $8::bigint[], $9::bigint[], $10::bigint[], "
           "$11::boolean[], $12::text[], $13::bigint[], $14::double precision[])")
_NOTE = ("UPDATE holds h SET generation_id = n.generation_id, app_id = n.app_id, "
         "model = n.model FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[]) "
         "AS n(hold_id, generation_id, app_id, model) WHERE h.hold_id = n.hold_id")
_INSERT_HOLD = (
    "INSERT INTO holds (owner, connection_id, grant_id, app_id, period, amount_nanos, "
    "created_at, expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING hold_id")
_ADMIT = ("SELECT * FROM wattgate_admit_many($1::bigint[], $2::text[], $3::bigint[], "
          "$4::bigint, $5::double precision[], $6::double precision[])")
_RATE_TAKE = ("SELECT * FROM wattgate_rate_take($1::text[], $2::text[], "
              "$3::double precision[], $4::double precision[], $5::double precision[])")


def _usage(r: Any) -> Usage:
    return Usage(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], bool(r[8]), r[9], r[10], r[11])


async def _sweep_hold(con: Any, hold_id: int, now: float | None) -> int:
    """Take one hold no living process will settle; 1 if it was still there. What
    that tells is dated ``now`` (None: the call's own time)."""
    r = await con.fetchrow(
        "DELETE FROM holds WHERE hold_id = $1 RETURNING connection_id, grant_id, "
        "period, amount_nanos, generation_id, app_id, model, created_at", hold_id)
    if r is None:
        return 0  # settled or released meanwhile
    told = r["created_at"] if now is None else now
    if r["grant_id"] is not None:
        await con.execute("UPDATE grants SET held_nanos = held_nanos - $1 "
                          "WHERE grant_id = $2", r["amount_nanos"], r["grant_id"])
    if r["generation_id"] is None:  # never reached the model
        if r["grant_id"] is not None:
            await _refund_request(con, r["grant_id"])
            await outbox.pg_after_change(con, None, r["grant_id"], r["period"], 0, None,
                                         told)
        return 1
    inserted = await con.fetchval(
        "INSERT INTO usage (generation_id, app_id, connection_id, grant_id, period, "
        "model, prompt_tokens, completion_tokens, cost_nanos, provisional, status, "
        "latency_ms, created_at) VALUES ($1, $2, $3, $4, $5, $6, 0, 0, $7, TRUE, "
        "'swept', 0, $8) ON CONFLICT (generation_id) DO NOTHING RETURNING 1",
        r["generation_id"], r["app_id"] or "", r["connection_id"], r["grant_id"],
        r["period"], r["model"] or "", r["amount_nanos"], r["created_at"])
    if inserted:  # the estimate told as a settle would tell it (lines, a grant used up)
        await _debit(con, r["connection_id"], r["grant_id"], r["period"], r["amount_nanos"],
                     told)
    elif r["grant_id"] is not None:
        await outbox.pg_after_change(con, None, r["grant_id"], r["period"], 0, None, told)
    return 1


async def _drop_hold(con: Any, hold_id: int) -> bool:
    row = await con.fetchrow("DELETE FROM holds WHERE hold_id = $1 RETURNING grant_id, "
                             "amount_nanos", hold_id)
    if row is not None and row[0] is not None:
        await con.execute("UPDATE grants SET held_nanos = held_nanos - $1 WHERE grant_id = $2",
                          row[1], row[0])
    return row is not None


async def _debit(con: Any, connection_id: int | None, grant_id: int | None, period: str,
                 nanos: int, created: float) -> None:
    """Move the aggregates by ``nanos`` off the hot path (the sweep, reconciliation) and
    write what that tells, dated ``created``, as ``wattgate_settle`` does for a settle."""
    # Grants before periods, always: the one lock order of every writer.
    if grant_id is not None:
        await con.execute("UPDATE grants SET spent_nanos = spent_nanos + $1 WHERE grant_id = $2",
                          nanos, grant_id)
    spent = None
    if connection_id is not None:
        spent = await con.fetchval(
            "INSERT INTO periods (connection_id, period, spent_nanos) "
            "VALUES ($1, $2, $3) ON CONFLICT (connection_id, period) DO UPDATE "
            "SET spent_nanos = periods.spent_nanos + EXCLUDED.spent_nanos RETURNING spent_nanos",
            connection_id, period, nanos)
    await outbox.pg_after_change(con, connection_id, grant_id, period, nanos, spent, created)


async def _locked_connection(con: Any, connection_id: int) -> Connection | None:
    row = await con.fetchrow(f"SELECT {CONNECTION_COLS} FROM connections "
                             "WHERE connection_id = $1 FOR UPDATE", connection_id)
    return Connection(*row) if row else None


async def _correct(con: Any, generation_id: str, cost_nanos: int, prompt_tokens: int | None,
                   completion_tokens: int | None, now: float | None) -> bool:
    """Make a provisional row final at ``cost_nanos``, aggregates moved by the difference."""
    row = await con.fetchrow("SELECT connection_id, grant_id, period, cost_nanos, created_at "
                             "FROM usage WHERE generation_id = $1 AND provisional FOR UPDATE",
                             generation_id)
    if row is None:
        return False
    await con.execute("UPDATE usage SET cost_nanos = $1, provisional = FALSE, "
                      "prompt_tokens = COALESCE($2, prompt_tokens), "
                      "completion_tokens = COALESCE($3, completion_tokens) "
                      "WHERE generation_id = $4", cost_nanos, prompt_tokens, completion_tokens,
                      generation_id)
    # Dated ``now``, else as the call's settle would have been.
    await _debit(con, row[0], row[1], row[2], cost_nanos - row[3],
                 row[4] if now is None else now)
    return True


async def _refund_request(con: Any, grant_id: int) -> None:
    await con.execute("UPDATE grants SET used = used - 1 WHERE grant_id = $1 AND used > 0",
                      grant_id)
