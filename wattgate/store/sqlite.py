"""The SQLite store: the SQL of the hot path (apps, connections, holds, the ledger).

The console's and exports' range reads live beside it in ``reports.py``.

Writes go through one writer with *group commit* (see ``_Writer``):
operations queued in one turn of the event loop are applied together in one
``BEGIN IMMEDIATE`` transaction, each inside its own savepoint, and every
caller awaits its own commit. Concurrent requests thus share one commit, yet no
request finishes before its own debit is durable. An operation, once queued,
runs even if its caller is cancelled, so a debit or a release is never lost
to a client disconnect.

Point reads run synchronously on the event loop thread through a second
connection: in WAL mode they never wait for the writer, and a primary-key
lookup costs microseconds, less than a hop to a thread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable, TypeVar

from .. import budget
from ..errors import BudgetExceeded, ConsentRequired, GrantInvalid, KeysMismatch, NotConnected
from ..ratelimit import RateLimiter
from .audit import audit
from .contract import AdminSessionRow, StoreInUse
from .meter import Meter
from . import outbox
from .migrations import migrate
from .records import (ACTIVE, APP_COLS, CONNECTION_COLS, DELIVERED, GRANT_COLS, METERED, REVOKED,
                      USAGE_COLS, App, AppPolicy, Connection, Grant, Hold, Usage, Webhook,
                      WebhookEvent, app_of)
from .browse import BrowseMixin  # the console's and exports' range and page reads

T = TypeVar("T")
log = logging.getLogger("wattgate.store")
Op = Callable[[sqlite3.Connection], Any]
After = Callable[[Any], object]  # what it returns is ignored
Queued = tuple[Op, "asyncio.Future[Any]", After | None]
Row = tuple[Any, ...]  # a row as sqlite3 answers it, before it becomes a record
Params = dict[str, Any] | tuple[Any, ...]


def _connect(path: Path) -> sqlite3.Connection:
    if not path.exists():
        # The ledger holds sealed funding keys and secret hashes: owner-only from the first
        # byte (SQLite gives its -wal and -shm files the database file's mode).
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
    db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = NORMAL")  # durable across process crashes in WAL
    db.execute("PRAGMA foreign_keys = ON")
    db.execute("PRAGMA busy_timeout = 10000")
    return db


class _Writer:
    """Group commit on the event loop thread, with a thread for when SQLite is busy.

    Operations queued during one turn of the event loop are applied together at
    the end of that turn in one ``BEGIN IMMEDIATE`` transaction, each in its own
    savepoint, and each caller's future resolves only after COMMIT. A commit
    in WAL mode with ``synchronous=NORMAL`` does not fsync, so it costs tens of
    microseconds: less than handing the work to a thread and back. Only when
    another process holds the write lock (the CLI) does the batch move to a
    thread that waits for it, so the event loop never blocks on a lock.
    Checkpoints (which do fsync) run on their own thread, never in a commit.
    """

    def __init__(self, db: sqlite3.Connection, path: Path) -> None:
        self._db = db
        self._path = path
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="wattgate-writer")
        self._queue: list[Queued] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._scheduled = False
        self._in_thread: asyncio.Future[Any] | None = None  # a batch waiting on a lock
        self._checkpointing: asyncio.Future[Any] | None = None
        self._since_checkpoint = 0
        self.commits = 0
        db.execute("PRAGMA wal_autocheckpoint = 0")
        db.execute("PRAGMA busy_timeout = 0")  # on the loop: never wait for a lock

    def run(self, op: Callable[[sqlite3.Connection], T],
            after: Callable[[T], object] | None = None) -> asyncio.Future[T]:
        """Queue ``op``; its future resolves after COMMIT.

        ``after(result)``, when given, runs on the event loop right after the
        commit and before any other code: how the meter's caches follow the
        ledger with no window in which they disagree.
        """
        loop = self._loop or asyncio.get_running_loop()
        self._loop = loop
        future: asyncio.Future[T] = loop.create_future()
        self._queue.append((op, future, after))  # typed per call above, Any in the queue
        if not self._scheduled and self._in_thread is None:
            self._scheduled = True
            loop.call_soon(self._flush)
        return future

    @property
    def in_thread(self) -> bool:
        return self._in_thread is not None

    def submit(self, op: Op, after: After | None = None) -> asyncio.Future[Any]:
        """Queue an operation whose failure nobody awaits (ordered before later ops)."""
        future = self.run(op, after)
        future.add_done_callback(_consume)
        return future

    def _flush(self) -> None:
        self._scheduled = False
        if not self._queue or self._in_thread is not None:
            return
        batch, self._queue = self._queue, []
        try:
            results = self._apply([q[0] for q in batch], wait=False)
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) and "busy" not in str(e):
                self._resolve(batch, [(False, e)] * len(batch))
                return
            # Another process holds the write lock: wait for it on the thread.
            assert self._loop is not None
            self._in_thread = self._loop.run_in_executor(
                self._executor, self._apply, [q[0] for q in batch], True)
            self._in_thread.add_done_callback(lambda f: self._after_thread(batch, f))
            return
        self._resolve(batch, results)

    def _after_thread(self, batch: list[Queued],
                      done: asyncio.Future[Any]) -> None:
        self._in_thread = None
        exc = done.exception()
        self._resolve(batch, [(False, exc)] * len(batch) if exc else done.result())
        if self._queue and not self._scheduled:
            self._scheduled = True
            assert self._loop is not None
            self._loop.call_soon(self._flush)

    def _resolve(self, batch: list[Queued], results: list[tuple[bool, Any]]) -> None:
        for (_, future, after), (ok, value) in zip(batch, results):
            if ok and after is not None:
                try:
                    after(value)
                except Exception:  # a cache hook must never lose a commit's answer
                    log.exception("post-commit hook failed")
            if future.done():
                continue
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)
        self._since_checkpoint += 1
        if self._since_checkpoint >= 500 and self._checkpointing is None:
            self._checkpoint()

    def _apply(self, ops: list[Op], wait: bool) -> list[tuple[bool, Any]]:
        db = self._db
        if wait:  # on the thread: wait for the other process's lock
            db.execute("PRAGMA busy_timeout = 10000")
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                results = self._apply_ops(db, ops)
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        finally:
            if wait:
                db.execute("PRAGMA busy_timeout = 0")
        self.commits += 1
        return results

    @staticmethod
    def _apply_ops(db: sqlite3.Connection, ops: list[Op]) -> list[tuple[bool, Any]]:
        if len(ops) == 1:  # alone in its transaction: no savepoint needed
            try:
                return [(True, ops[0](db))]
            except Exception as e:
                db.execute("ROLLBACK")
                db.execute("BEGIN IMMEDIATE")  # so COMMIT below has a transaction
                return [(False, e)]
        results: list[tuple[bool, Any]] = []
        for op in ops:
            db.execute("SAVEPOINT op")
            try:
                value = op(db)
            except Exception as e:
                db.execute("ROLLBACK TO op")
                db.execute("RELEASE op")
                results.append((False, e))
            else:
                db.execute("RELEASE op")
                results.append((True, value))
        return results

    def _checkpoint(self) -> None:
        assert self._loop is not None
        self._since_checkpoint = 0

        def work() -> None:
            db = sqlite3.connect(str(self._path), isolation_level=None)
            try:
                db.execute("PRAGMA busy_timeout = 10000")
                db.execute("PRAGMA wal_checkpoint(PASSIVE)")
            finally:
                db.close()

        self._checkpointing = self._loop.run_in_executor(None, work)

        def done(f: asyncio.Future[Any]) -> None:
            self._checkpointing = None
            if not f.cancelled() and f.exception() is not None:
                log.warning("WAL checkpoint failed: %r", f.exception())
        self._checkpointing.add_done_callback(done)

    async def close(self) -> None:
        while self._queue or self._in_thread is not None or self._scheduled:
            if self._in_thread is not None:
                await asyncio.wait([self._in_thread])
            else:
                self._flush()
                await asyncio.sleep(0)
        if self._checkpointing is not None:
            await asyncio.wait([self._checkpointing])
        self.shutdown()

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True)


class _Done:
    """An awaitable that is already done (a release with nothing to write)."""

    def __await__(self):  # type: ignore[no-untyped-def]
        return
        yield  # a generator that returns at once


_DONE = _Done()


def _consume(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("background ledger write failed: %r", future.exception())




class SQLiteStore(BrowseMixin):
    """The embedded ledger: one database file, served by one gateway process.

    Implements ``contract.Ledger``; what is per process here (holds in the
    meter, rate-limit buckets, the lead of background work) is correct because
    ``claim`` lets one server admit calls against a file.
    """

    kind = "sqlite"

    def __init__(self, path: Path, *, claim: bool = False) -> None:
        self.path = Path(path)
        self._lock_fd: int | None = None
        self._spare_fds: list[int] = []  # see _discard
        if claim:  # before any SQLite connection: a refused server never touches the file
            self.claim()
        try:
            self._write_db = _connect(self.path)
        except BaseException:
            self._unlock()
            raise
        try:
            migrate(self._write_db)
            self._read = _connect(self.path)
        except BaseException:
            self._write_db.close()
            self._unlock()
            raise
        self._writer = _Writer(self._write_db, self.path)
        self._apps_epoch = 0
        self._meter = Meter()
        self._note_hold_ids()
        self._seen_version: int | None = None
        self._version_fresh = False  # data_version read in this turn of the loop
        self._limiters: dict[str, RateLimiter] = {}

    @classmethod
    def open(cls, path: Path, *, claim: bool = False) -> "SQLiteStore":
        """Open (creating and migrating) the ledger; ``claim``: as a server, taking
        ``claim``'s lock before SQLite opens the file."""
        return cls(path, claim=claim)

    async def close(self) -> None:
        await self._writer.close()
        self.close_now()

    def close_now(self) -> None:
        """Close without awaiting: for a store opened but never used (setup failed)."""
        self._writer.shutdown()
        self._read.close()
        self._write_db.close()
        self._unlock()  # last: closing our fd of the file must not drop SQLite's locks

    def claim(self) -> None:
        """Become the one process that admits calls against this database.

        Holds of calls in flight live in the admitting process's memory (see
        ``meter``); a second gateway on the same ledger could not see them and
        together they could pass a cap. So the gateway takes an exclusive
        ``flock`` on the database file itself for its lifetime: the lock belongs
        to the file (its inode), so a second server reaching it by a symlink, a
        hard link or another relative path is refused as surely as by the same
        path. The kernel drops it when the process dies, even by SIGKILL. CLI
        commands do not admit and take no lock (SQLite's own locks are POSIX
        record locks, which ``flock`` never conflicts with on a local disk).

        The descriptor stays open for the store's life and is closed after
        SQLite's connections: closing any descriptor of a file drops every POSIX
        lock the process holds on it, SQLite's included. Idempotent.
        """
        if self._lock_fd is not None:
            return
        import fcntl
        # O_CREAT as _connect would: owner-only from the first byte; an empty file is
        # an empty SQLite database.
        fd = os.open(self.path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held, named = os.fstat(fd), os.stat(self.path)
        except OSError:
            self._discard(fd)
            raise StoreInUse(f"another wattgate server is using the database {self.path} "
                             "(through this path or another link to the same file); one "
                             "process serves a SQLite ledger, since its budget holds live in "
                             "memory") from None
        if (held.st_dev, held.st_ino) != (named.st_dev, named.st_ino):
            self._discard(fd)  # replaced between open and lock: never serve an unlocked file
            raise StoreInUse(f"the database file {self.path} was replaced while starting")
        self._lock_fd = fd

    def _discard(self, fd: int) -> None:
        """A descriptor of the file we will not lock through: closed now only if SQLite
        has no connection open in this process (closing it would drop SQLite's locks)."""
        if hasattr(self, "_write_db"):
            self._spare_fds.append(fd)
        else:
            os.close(fd)

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the lock
            self._lock_fd = None
        while self._spare_fds:
            os.close(self._spare_fds.pop())

    def _cache_ok(self) -> bool:
        """Whether the meter's cached rows may be used now (dropping them if stale).

        ``PRAGMA data_version`` on the writer's connection moves only when
        another connection commits: another process, since this one writes
        only through that connection. Not while a batch waits on the thread.
        """
        if self._writer.in_thread:
            return False
        if self._version_fresh:  # checked earlier in this turn of the event loop
            return True
        version = self._write_db.execute("PRAGMA data_version").fetchone()[0]
        if version != self._seen_version:
            self._seen_version = version
            self._meter.forget()
            self._note_hold_ids()
        try:
            asyncio.get_running_loop().call_soon(self._expire_version)
        except RuntimeError:  # no loop (a synchronous caller): check every time
            return True
        self._version_fresh = True
        return True

    def _note_hold_ids(self) -> None:
        row = self._one("SELECT seq FROM sqlite_sequence WHERE name = 'holds'")
        self._meter.ids_above(row[0] if row else 0)

    def _expire_version(self) -> None:
        self._version_fresh = False

    def _forget_connections(self, _: Any = None) -> None:
        self._meter.forget_connections()

    @property
    def commits(self) -> int:
        return self._writer.commits

    async def ping(self) -> bool:
        """Whether the database answers: one trivial read, for health checks."""
        try:
            return self._one("SELECT 1") == (1,)
        except sqlite3.Error:
            return False

    async def holds_apps(self) -> bool:
        """Whether any app is registered (the keys file then holds secrets that matter)."""
        return self._one("SELECT 1 FROM apps LIMIT 1") is not None

    async def bind_keys(self, fingerprint: str) -> None:
        """Record the keys' fingerprint on first use; refuse (KeysMismatch) any other."""
        def op(db: sqlite3.Connection) -> str:
            db.execute("INSERT OR IGNORE INTO meta (name, value) VALUES ('keys', :f)",
                       {"f": fingerprint})
            row = db.execute("SELECT value FROM meta WHERE name = 'keys'").fetchone()
            return str(row[0])
        row = self._one("SELECT value FROM meta WHERE name = 'keys'")
        bound = str(row[0]) if row is not None else await self._writer.run(op)
        if bound != fingerprint:
            raise KeysMismatch(_KEYS_DIFFER.format(path=self.path))

    # ---- fleet-wide state (one process serves a file: its memory is the fleet's) ----
    async def rate_take(self, limiter: str, key: str, per_minute: int, *, now: float,
                        take: bool = True) -> int | None:
        """A token bucket per (limiter, key) in this process's memory (see ``claim``)."""
        bucket = self._limiters.get(limiter)
        if bucket is None or bucket.per_minute != per_minute:
            bucket = self._limiters[limiter] = RateLimiter(per_minute, name=limiter)
        return bucket.try_take(key, now=now, take=take)

    async def open_admin_session(self, session_hash: str, csrf: str, *,
                                 expires_at: float, now: float) -> None:
        """In the ledger (not memory): a restart of the server keeps console sessions."""
        def op(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM admin_sessions WHERE expires_at <= :now", {"now": now})
            db.execute("INSERT OR REPLACE INTO admin_sessions (session_hash, csrf, expires_at) "
                       "VALUES (:h, :c, :x)", {"h": session_hash, "c": csrf, "x": expires_at})
        await self._writer.run(op)

    async def find_admin_session(self, session_hash: str, *,
                                 now: float) -> AdminSessionRow | None:
        row = self._one("SELECT csrf, expires_at FROM admin_sessions WHERE session_hash = :h "
                        "AND expires_at > :now", {"h": session_hash, "now": now})
        return (str(row[0]), float(row[1])) if row is not None else None

    async def close_admin_session(self, session_hash: str) -> None:
        def op(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM admin_sessions WHERE session_hash = :h", {"h": session_hash})
        await self._writer.run(op)

    async def lead(self, task: str) -> bool:
        """Always: the one server of a database file (``claim``) runs its background work."""
        return True

    def apps_version(self) -> tuple[int, int] | None:
        """Changes whenever apps may have changed: by this store or another process.

        ``PRAGMA data_version`` on the writer's connection moves only when
        another connection (a CLI command) commits; ``_apps_epoch`` counts this
        store's own app writes. None while the writer's connection is busy on
        its thread (then callers read the database instead).
        """
        if not self._cache_ok():
            return None
        return (self._seen_version or 0, self._apps_epoch)

    def data_version(self) -> int:
        """Changes whenever another connection (another process, the writer) commits."""
        return int(self._read.execute("PRAGMA data_version").fetchone()[0])

    def _one(self, sql: str, params: Params = ()) -> Row | None:
        row: Row | None = self._read.execute(sql, params).fetchone()
        return row

    def _all(self, sql: str, params: Params = ()) -> list[Row]:
        return self._read.execute(sql, params).fetchall()

    # ---- apps -------------------------------------------------------------
    async def create_app(self, app_id: str, name: str, secret_hash: str,
                         origins: Iterable[str], *, now: float) -> App:
        origins = tuple(dict.fromkeys(origins))

        def op(db: sqlite3.Connection) -> None:
            db.execute("INSERT INTO apps (app_id, name, secret_hash, created_at) "
                       "VALUES (:a, :n, :h, :t)", {"a": app_id, "n": name, "h": secret_hash, "t": now})
            db.executemany("INSERT INTO app_origins (app_id, origin) VALUES (?, ?)",
                           [(app_id, o) for o in origins])
        try:
            await self._writer.run(op)
        finally:
            self._apps_epoch += 1
        return App(app_id, name, secret_hash, origins, now)

    async def get_app(self, app_id: str, *, deleted: bool = False) -> App | None:
        """The app, or None; a deleted app's tombstone only when ``deleted`` (for its history)."""
        row = self._one(f"SELECT {APP_COLS} FROM apps WHERE app_id = ?", (app_id,))
        if row is None or (row[4] is not None and not deleted):
            return None
        origins = tuple(r[0] for r in self._all(
            "SELECT origin FROM app_origins WHERE app_id = ? ORDER BY origin", (app_id,)))
        return app_of(row, origins)

    async def list_apps(self) -> list[App]:
        apps = []
        for (app_id,) in self._all("SELECT app_id FROM apps WHERE deleted_at IS NULL "
                                   "ORDER BY created_at, app_id"):
            app = await self.get_app(app_id)
            if app is not None:
                apps.append(app)
        return apps

    async def set_app_secret(self, app_id: str, secret_hash: str, *,
                             keep_previous_until: float | None = None) -> bool:
        def op(db: sqlite3.Connection) -> bool:
            return db.execute(
                "UPDATE apps SET previous_secret_hash = CASE WHEN :until IS NULL THEN NULL "
                "ELSE secret_hash END, previous_until = :until, secret_hash = :h "
                "WHERE app_id = :a AND deleted_at IS NULL",
                {"h": secret_hash, "a": app_id, "until": keep_previous_until}).rowcount == 1
        try:
            return await self._writer.run(op)
        finally:
            self._apps_epoch += 1

    async def retire_previous_secret(self, app_id: str) -> bool:
        def op(db: sqlite3.Connection) -> bool:
            return db.execute("UPDATE apps SET previous_secret_hash = NULL, "
                              "previous_until = NULL WHERE app_id = :a AND deleted_at IS NULL "
                              "AND previous_secret_hash IS NOT NULL",
                              {"a": app_id}).rowcount == 1
        try:
            return await self._writer.run(op)
        finally:
            self._apps_epoch += 1

    async def delete_app(self, app_id: str, *, now: float) -> bool:
        """Delete an app: its credentials, origins, connections and grants stop at once.

        The app's row stays as a tombstone and its connections and grants as
        revoked (expired) rows, so its spend history stays exportable and
        auditable, and no id it used is ever handed to anyone else (ids come
        from AUTOINCREMENT sequences). A call of the app still in flight
        settles to its own (dead) connection or grant, never to another's.
        Their funding keys, which no call can use any more, are erased by the
        rule of revoked keys (``erase_revoked_keys``), once none of the app's
        calls is in flight or still correctable.
        """
        def op(db: sqlite3.Connection) -> bool:
            params = {"a": app_id, "t": now, "revoked": REVOKED}
            if db.execute("UPDATE apps SET deleted_at = :t, secret_hash = '', "
                          "previous_secret_hash = NULL, previous_until = NULL "
                          "WHERE app_id = :a AND deleted_at IS NULL", params).rowcount != 1:
                return False
            db.execute("DELETE FROM app_origins WHERE app_id = :a", params)
            # The funding keys stay until the reconciler's rule erases them
            # (``erase_revoked_keys``): unusable from now on, but still able to
            # ask the upstream the final cost of the app's provisional calls.
            db.execute("UPDATE connections SET state = :revoked, "
                       "browser_hash = NULL, updated_at = :t WHERE app_id = :a", params)
            db.execute("UPDATE grants SET expires_at = MIN(expires_at, :t) "
                       "WHERE app_id = :a", params)
            return True
        try:
            return await self._writer.run(op, self._forget_connections)
        finally:
            self._apps_epoch += 1

    async def set_origins(self, app_id: str, add: Iterable[str] = (),
                          remove: Iterable[str] = ()) -> bool:
        def op(db: sqlite3.Connection) -> bool:
            if db.execute("SELECT 1 FROM apps WHERE app_id = ? AND deleted_at IS NULL",
                          (app_id,)).fetchone() is None:
                return False
            db.executemany("INSERT OR IGNORE INTO app_origins (app_id, origin) VALUES (?, ?)",
                           [(app_id, o) for o in add])
            db.executemany("DELETE FROM app_origins WHERE app_id = ? AND origin = ?",
                           [(app_id, o) for o in remove])
            return True
        try:
            return await self._writer.run(op)
        finally:
            self._apps_epoch += 1

    async def set_app_policy(self, app_id: str, policy: AppPolicy) -> App | None:
        def op(db: sqlite3.Connection) -> bool:
            return db.execute("UPDATE apps SET policy = :p WHERE app_id = :a "
                              "AND deleted_at IS NULL",
                              {"p": policy.to_text(), "a": app_id}).rowcount == 1
        try:
            changed = await self._writer.run(op)
        finally:
            self._apps_epoch += 1
        return await self.get_app(app_id) if changed else None

    async def origin_registered(self, origin: str) -> bool:
        """Whether any app registered this origin (answers CORS preflights)."""
        return self._one("SELECT 1 FROM app_origins WHERE origin = ? LIMIT 1",
                         (origin,)) is not None

    # ---- connections ------------------------------------------------------
    async def get_connection(self, app_id: str, app_user_id: str) -> Connection | None:
        cache = self._cache_ok()
        if cache and (hit := self._meter.cached_connection(app_id, app_user_id)) is not None:
            return hit
        row = self._one(f"SELECT {CONNECTION_COLS} FROM connections "
                        "WHERE app_id = :a AND app_user_id = :u", {"a": app_id, "u": app_user_id})
        connection = Connection(*row) if row else None
        if cache and connection is not None:
            self._meter.remember_connection(connection)
        return connection

    async def get_connection_by_id(self, connection_id: int) -> Connection | None:
        return self._connection_by_id(connection_id, self._cache_ok())

    def _connection_by_id(self, connection_id: int, cache: bool) -> Connection | None:
        if cache and (hit := self._meter.connections.get(connection_id)) is not None:
            return hit
        row = self._one(f"SELECT {CONNECTION_COLS} FROM connections WHERE connection_id = ?",
                        (connection_id,))
        connection = Connection(*row) if row else None
        if cache and connection is not None:
            self._meter.remember_connection(connection)
        return connection

    def _spent(self, connection_id: int, period: str, cache: bool) -> int:
        if cache and (hit := self._meter.spent.get((connection_id, period))) is not None:
            return hit
        row = self._one("SELECT spent_nanos FROM periods WHERE connection_id = ? AND period = ?",
                        (connection_id, period))
        spent = row[0] if row else 0
        if cache:
            self._meter.remember_spent(connection_id, period, spent)
        return spent

    async def connections_for_browser(self, browser_hash: str) -> list[Connection]:
        rows = self._all(f"SELECT {CONNECTION_COLS} FROM connections WHERE browser_hash = ? "
                         "ORDER BY updated_at DESC", (browser_hash,))
        return [Connection(*r) for r in rows]

    async def connections_for_app(self, app_id: str) -> list[Connection]:
        rows = self._all(f"SELECT {CONNECTION_COLS} FROM connections WHERE app_id = ? "
                         "ORDER BY updated_at DESC", (app_id,))
        return [Connection(*r) for r in rows]

    async def save_connection(self, app_id: str, app_user_id: str, *, state: str,
                              cap_nanos: int | None, sealed_key: str | None,
                              browser_hash: str | None, now: float,
                              seal: Callable[[int], str] | None = None) -> Connection:
        """Insert or update the connection of (app, user).

        ``seal``, when given, is called with the connection id inside the
        transaction and its result stored as the sealed key (the sealed key's
        associated data names its row, which a new row only knows here).
        """
        def op(db: sqlite3.Connection) -> Connection:
            params = {"a": app_id, "u": app_user_id, "s": state, "c": cap_nanos,
                      "k": sealed_key, "b": browser_hash, "t": now}
            before = db.execute(f"SELECT {CONNECTION_COLS} FROM connections "
                                "WHERE app_id = :a AND app_user_id = :u", params).fetchone()
            db.execute(
                "INSERT INTO connections (app_id, app_user_id, state, cap_nanos, sealed_key, "
                "browser_hash, created_at, updated_at) VALUES (:a, :u, :s, :c, :k, :b, :t, :t) "
                "ON CONFLICT (app_id, app_user_id) DO UPDATE SET state = :s, cap_nanos = :c, "
                "sealed_key = :k, browser_hash = :b, updated_at = :t", params)
            row = db.execute(f"SELECT {CONNECTION_COLS} FROM connections "
                             "WHERE app_id = :a AND app_user_id = :u", params).fetchone()
            if seal is not None:
                sealed = seal(row[0])
                db.execute("UPDATE connections SET sealed_key = ? WHERE connection_id = ?",
                           (sealed, row[0]))
                row = row[:5] + (sealed,) + row[6:]
            after = Connection(*row)
            outbox.sqlite_connection_changed(db, Connection(*before) if before else None,
                                             after, now)
            return after
        return await self._writer.run(op, self._forget_connections)

    async def update_cap(self, connection_id: int, cap_nanos: int | None, *,
                         expected_key: str | None, expected_cap: int | None,
                         now: float) -> Connection | None:
        """Change the cap of a connection that is still active with the same funding key
        and the same cap as the caller read.

        None when it changed in between (revoked, re-funded, or re-capped): a cap
        change made without the funding key never revives or re-targets a
        connection, and one judged against a cap (is it a raise? within the app's
        policy?) never lands on another: an app's "unchanged" cap written over its
        user's lowering would be a raise nobody consented to.
        """
        def op(db: sqlite3.Connection) -> Connection | None:
            before = self._connection_row(db, connection_id)
            changed = db.execute(
                "UPDATE connections SET cap_nanos = :c, updated_at = :t WHERE connection_id = :id "
                "AND state = :active AND sealed_key IS :k AND cap_nanos IS :old",
                {"c": cap_nanos, "t": now, "id": connection_id, "active": ACTIVE,
                 "k": expected_key, "old": expected_cap}).rowcount
            if not changed:
                return None
            after = self._connection_row(db, connection_id)
            outbox.sqlite_connection_changed(db, before, after, now)
            return after
        return await self._writer.run(op, self._forget_connections)

    @staticmethod
    def _connection_row(db: sqlite3.Connection, connection_id: int) -> Connection | None:
        row = db.execute(f"SELECT {CONNECTION_COLS} FROM connections WHERE connection_id = ?",
                         (connection_id,)).fetchone()
        return Connection(*row) if row else None

    async def set_connection_state(self, connection_id: int, state: str, *, now: float) -> None:
        """Move a connection to ``state``; a revoked one stays revoked (only a re-funding,
        ``save_connection``, ends a revocation). The key stays: only
        ``erase_revoked_keys`` erases it, once no call can still need it.

        Revoking also ends, in the same transaction, every grant the connection
        funds: they were authorised by the consent being withdrawn, and must not
        come back, paid by a new key, when the user connects again.
        """
        def op(db: sqlite3.Connection) -> None:
            sql = "UPDATE connections SET state = :s, updated_at = :t"
            params = {"s": state, "t": now, "c": connection_id, "revoked": REVOKED}
            before = self._connection_row(db, connection_id)
            db.execute(sql + " WHERE connection_id = :c AND (state != :revoked OR :s = :revoked)",
                       params)
            outbox.sqlite_connection_changed(db, before, self._connection_row(db, connection_id),
                                             now)
            if state == REVOKED:
                db.execute("UPDATE grants SET expires_at = MIN(expires_at, :t) "
                           "WHERE connection_id = :c", params)
        await self._writer.run(op, self._forget_connections)

    async def all_sealed_keys(self) -> list[tuple[str, int | str, str]]:
        """(table, row id, sealed value): every funding key and webhook signing secret."""
        rows: list[tuple[str, int | str, str]] = [("connections", r[0], r[1]) for r in self._all(
            "SELECT connection_id, sealed_key FROM connections WHERE sealed_key IS NOT NULL")]
        rows += [("grants", r[0], r[1]) for r in self._all(
            "SELECT grant_id, sealed_key FROM grants WHERE sealed_key IS NOT NULL")]
        rows += [("apps", r[0], r[1]) for r in self._all(outbox.SEALED_SECRETS)]
        return rows

    async def replace_sealed_keys(self, changes: list[tuple[str, int | str, str, str]]) -> int:
        """Swap (table, id, old, new) sealed values in one transaction, only where still old."""
        def op(db: sqlite3.Connection) -> int:
            n = 0
            for table, row_id, old, new in changes:
                table, id_col, col = outbox.sealed_column(table)
                n += db.execute(f"UPDATE {table} SET {col} = :new "
                                f"WHERE {id_col} = :id AND {col} = :old",
                                {"new": new, "id": row_id, "old": old}).rowcount
            return n
        return await self._writer.run(op, self._forget_connections)

    # ---- spend ------------------------------------------------------------
    async def period_spent(self, connection_id: int, period: str) -> int:
        return self._spent(connection_id, period, self._cache_ok())

    async def held(self, connection_id: int, period: str | None = None) -> int:
        """Budget held by this process's calls in flight (rows left by a dead one count too),
        admitted in ``period`` (None: in any period)."""
        row = self._one("SELECT COALESCE(SUM(amount_nanos), 0) FROM holds "
                        "WHERE connection_id = :c AND (:p IS NULL OR period = :p)",
                        {"c": connection_id, "p": period})
        return max(self._meter.held(connection_id, period), row[0] if row else 0)

    async def admit(self, connection_id: int, period: str, amount_nanos: int, *,
                    now: float, expires_at: float) -> Hold:
        """Atomically: refuse if spent + held + amount would pass the cap, else hold.

        One synchronous check-and-add on the event loop (see ``meter``): the
        hold lives in memory until ``note_generation`` writes its row.
        """
        cache = self._cache_ok()
        connection = self._connection_by_id(connection_id, cache)
        if connection is None:
            raise NotConnected()
        budget.check_connection(connection.state, connection.sealed_key)
        if connection.cap_nanos is not None:  # no cap (the dev switch): no spend to read
            # Only this period's holds: a call admitted last month is last month's.
            budget.check_cap(connection.cap_nanos, self._spent(connection_id, period, cache),
                             self._meter.held(connection_id, period), amount_nanos)
        hold = Hold(self._meter.new_id(), connection_id, None, period, amount_nanos)
        self._meter.add(hold, now, expires_at)
        return hold

    def _has_row(self, hold: Hold) -> bool:
        return hold.hold_id in self._meter.written

    def settle(self, hold: Hold | None, usage: Usage, period: str) -> Awaitable[bool]:
        """Release the hold and debit the usage, in one transaction.

        Idempotent on ``usage.generation_id``: a second settle of the same
        generation records nothing more and answers False. Once called, the
        write happens even if the caller is cancelled (what it awaits is
        shielded), and the meter lets go of the hold at its commit.
        """
        has_row = hold is not None and self._has_row(hold)
        # The cap, as the meter knows it already (no read on the hot path); the
        # webhooks' thresholds are checked against it only when the spend crossed one.
        cached = self._meter.connections.get(usage.connection_id) \
            if usage.connection_id is not None and self._cache_ok() else None

        def cap(db: sqlite3.Connection) -> int | None:
            if cached is not None:
                return cached.cap_nanos
            assert usage.connection_id is not None
            row = db.execute("SELECT cap_nanos FROM connections WHERE connection_id = ?",
                             (usage.connection_id,)).fetchone()
            return row[0] if row else None

        def op(db: sqlite3.Connection) -> tuple[bool, tuple[int | None, str, int]]:
            if has_row:
                assert hold is not None
                _drop_hold(db, hold)
            if not _insert_usage(db, usage, period):
                # Already recorded. A final figure replaces a provisional one (a
                # swept hold's estimate); a final row is never counted twice.
                if not usage.provisional:
                    moved = _correct(db, usage.generation_id, usage.cost_nanos,
                                     usage.prompt_tokens, usage.completion_tokens,
                                     usage.created_at)
                    if moved is not None:
                        return True, moved
                return False, (None, period, 0)
            spent = _debit(db, usage.connection_id, usage.grant_id, period, usage.cost_nanos)
            if spent is not None or usage.grant_id is not None:
                outbox.sqlite_after_settle(
                    db, usage.connection_id, usage.grant_id, period,
                    cap(db) if usage.connection_id is not None else None, spent,
                    usage.cost_nanos, usage.created_at)
            return True, (usage.connection_id, period, usage.cost_nanos)

        def after(result: tuple[bool, tuple[int | None, str, int]]) -> None:
            if hold is not None:
                self._meter.remove(hold)
            self._meter.add_spent(*result[1])
        return self._shielded(self._writer.run(op, after), hold, lambda r: r[0])

    def _shielded(self, future: asyncio.Future[Any], hold: Hold | None,
                  answer: Callable[[Any], Any]) -> asyncio.Future[Any]:
        """What a caller awaits for a write: cancelling it never cancels the write.

        Whatever the write's fate, the meter lets go of ``hold`` when it is
        decided (after the commit when it succeeds: see the ``after`` hooks).
        """
        loop = asyncio.get_running_loop()
        outer: asyncio.Future[Any] = loop.create_future()

        def done(f: asyncio.Future[Any]) -> None:
            if hold is not None:
                self._meter.remove(hold)
            if outer.done():
                if not f.cancelled() and f.exception() is not None:
                    log.error("ledger write failed after its caller left: %r", f.exception())
            elif f.cancelled():
                outer.cancel()
            elif f.exception() is not None:
                outer.set_exception(f.exception())  # type: ignore[arg-type]
            else:
                outer.set_result(answer(f.result()))
        future.add_done_callback(done)
        return outer

    def note_generation(self, hold: Hold, generation_id: str, app_id: str,
                        model: str) -> asyncio.Future[Any] | None:
        """Write the hold's row, naming the generation it pays for, before any body byte.

        The returned future resolves at its commit; the proxy awaits it before
        it forwards the first byte of a stream. It is ordered before the call's
        settle in the writer queue. After a crash, a hold with a generation id
        becomes a provisional ledger row for reconciliation instead of vanishing.
        None when the hold is no longer held (settled or released already).
        """
        if hold.hold_id not in self._meter.holds:
            return None
        params = {"g": generation_id, "a": app_id, "m": model[:200], "h": hold.hold_id}
        if self._has_row(hold):  # a grant's hold: its row exists since admission
            def op(db: sqlite3.Connection) -> None:
                db.execute("UPDATE holds SET generation_id = :g, app_id = :a, model = :m "
                           "WHERE hold_id = :h", params)
        else:
            created, expires = self._meter.times[hold.hold_id]
            params.update(c=hold.connection_id, gr=hold.grant_id, p=hold.period,
                          n=hold.amount_nanos, t=created, x=expires)

            def op(db: sqlite3.Connection) -> None:
                db.execute("INSERT INTO holds (hold_id, connection_id, grant_id, period, "
                           "amount_nanos, created_at, expires_at, generation_id, app_id, model) "
                           "VALUES (:h, :c, :gr, :p, :n, :t, :x, :g, :a, :m)", params)
            self._meter.written.add(hold.hold_id)
        return self._writer.submit(op)

    async def correct_usage(self, generation_id: str, cost_nanos: int, *,
                            now: float | None = None) -> bool:
        """Replace a provisional row's cost with the upstream's final figure."""
        def op(db: sqlite3.Connection) -> tuple[int | None, str, int] | None:
            return _correct(db, generation_id, cost_nanos, None, None, now)

        def after(moved: tuple[int | None, str, int] | None) -> None:
            if moved is not None:
                self._meter.add_spent(*moved)
        return await self._writer.run(op, after) is not None

    async def provisional_usage(self, limit: int = 100, *, after: int = 0,
                                since: float | None = None) -> list[tuple[Usage, str]]:
        """Provisional rows that name a real upstream generation, oldest first.

        Keyset-paged: ``after`` is the last ``usage_id`` seen (see
        ``provisional_page``); ``since`` skips rows created before it.
        """
        return [(u, p) for _, u, p in await self.provisional_page(limit, after=after,
                                                                  since=since)]

    async def provisional_page(self, limit: int, *, after: int = 0,
                               since: float | None = None) -> list[tuple[int, Usage, str]]:
        rows = self._all(
            f"SELECT {USAGE_COLS}, period, usage_id FROM usage WHERE provisional = 1 "
            "AND generation_id NOT LIKE 'wg-%' AND usage_id > :after "
            "AND created_at >= :since ORDER BY usage_id LIMIT :limit",
            {"after": after, "since": since if since is not None else float("-inf"),
             "limit": limit})
        return [(r[-1], _usage(r), r[-2]) for r in rows]

    async def recent_final_usage(self, limit: int) -> list[tuple[int, Usage]]:
        """(usage id, row) of the latest final rows that name a real generation, newest first."""
        rows = self._all(
            f"SELECT {USAGE_COLS}, usage_id FROM usage WHERE provisional = 0 "
            "AND generation_id NOT LIKE 'wg-%' ORDER BY usage_id DESC LIMIT ?", (limit,))
        return [(r[-1], _usage(r)) for r in rows]

    async def provisional_of_connection(self, connection_id: int,
                                        limit: int = 100) -> list[Usage]:
        """A connection's provisional rows that name a real generation, oldest first."""
        rows = self._all(
            f"SELECT {USAGE_COLS} FROM usage WHERE connection_id = ? AND provisional = 1 "
            "AND generation_id NOT LIKE 'wg-%' ORDER BY usage_id LIMIT ?",
            (connection_id, limit))
        return [_usage(r) for r in rows]

    async def erase_revoked_keys(self, *, since: float, now: float | None = None,
                                 connection_id: int | None = None) -> int:
        """Erase the funding keys nothing can use or need any more; how many were erased.

        One rule for every sealed key: it is kept while no new call can use it
        only as long as the upstream may still correct one of its calls, then
        erased. That is, a key is erased once

        - its owner can take no new call: a revoked connection (``connection_id``:
          this one only), or, given ``now``, a grant with its own typed key that is
          expired or used up (a deleted app's grants are expired by ``delete_app``);
        - no call it pays for is in flight (a hold here or in the ledger);
        - none of its rows is provisional, names a real generation and was
          created at or after ``since`` (the reconciliation give-up).

        A connection re-funded meanwhile is not revoked any more and keeps its
        new key; a grant whose request was refunded is usable again and keeps its.
        """
        grants = now is not None and connection_id is None
        if self._one("SELECT 1 FROM connections WHERE state = ? AND sealed_key IS NOT NULL "
                     "LIMIT 1", (REVOKED,)) is None and not (
                         grants and _ended_grants(self._read, now)):
            return 0  # the usual case on each reconciler pass: no write, caches kept
        # Calls in flight in this process (a connection's hold has no row until the
        # upstream names its generation).
        busy = list(self._meter.held_by_connection)
        busy_grants = [h.grant_id for h in self._meter.holds.values() if h.grant_id is not None]
        pending = ("AND NOT EXISTS (SELECT 1 FROM holds h WHERE h.{col} = {table}.{col}) "
                   "AND NOT EXISTS (SELECT 1 FROM usage u WHERE u.{col} = {table}.{col} "
                   "  AND u.provisional = 1 AND u.generation_id NOT LIKE 'wg-%' "
                   "  AND u.created_at >= :since)")

        def op(db: sqlite3.Connection) -> int:
            n = db.execute(
                "UPDATE connections SET sealed_key = NULL WHERE state = :revoked "
                "AND sealed_key IS NOT NULL AND (:one IS NULL OR connection_id = :one) "
                "AND connection_id NOT IN (SELECT value FROM json_each(:busy)) "
                + pending.format(col="connection_id", table="connections"),
                {"revoked": REVOKED, "one": connection_id, "busy": json.dumps(busy),
                 "since": since}).rowcount
            if grants:
                n += db.execute(
                    "UPDATE grants SET sealed_key = NULL WHERE sealed_key IS NOT NULL "
                    "AND grant_id IN (SELECT value FROM json_each(:ended)) "
                    "AND grant_id NOT IN (SELECT value FROM json_each(:busy)) "
                    + pending.format(col="grant_id", table="grants"),
                    {"ended": json.dumps(_ended_grants(db, now)),
                     "busy": json.dumps(busy_grants), "since": since}).rowcount
            return n
        return await self._writer.run(op, self._forget_connections)

    async def provisional_count(self) -> int:
        row = self._one("SELECT COUNT(*) FROM usage WHERE provisional = 1")
        return row[0] if row else 0

    async def check(self, *, now: float, hold_ttl: float) -> list[str]:
        """Every way the ledger disagrees with itself, as sentences naming the row (see audit)."""
        return audit(self._read, now=now, hold_ttl=hold_ttl)

    def release(self, hold: Hold, *, refund_request: bool = False,
                record: Usage | None = None) -> Awaitable[None]:
        """Drop a hold without spend (the call never reached the model), writing the
        $0 row ``record`` in the same transaction when given.

        Like ``settle``, the write survives its caller's cancellation.
        """
        has_row = self._has_row(hold)
        if not has_row and record is None:  # held in memory only: nothing to write
            self._meter.remove(hold)
            return _DONE

        def op(db: sqlite3.Connection) -> None:
            dropped = has_row and _drop_hold(db, hold)
            if dropped and refund_request and hold.grant_id is not None:
                _refund_request(db, hold.grant_id)
            if record is not None:
                _insert_usage(db, record, hold.period)
        return self._shielded(self._writer.run(op, lambda _: self._meter.remove(hold)), hold,
                              lambda _: None)

    async def sweep_holds(self, *, older_than: float | None = None,
                          now: float | None = None) -> int:
        """Drop holds created before ``older_than`` (all holds when None).

        A hold whose upstream generation was already named may have been
        billed: it becomes a provisional row at its estimate, for
        reconciliation, never a silent $0. A hold with no generation never
        reached the model and is released, a grant's request given back.
        """
        def op(db: sqlite3.Connection) -> int:
            sql = ("SELECT hold_id, connection_id, grant_id, period, amount_nanos, "
                   "generation_id, app_id, model, created_at FROM holds")
            params: tuple[float, ...] = ()
            if older_than is not None:
                sql += " WHERE created_at < ?"
                params = (older_than,)
            rows = db.execute(sql, params).fetchall()
            for r in rows:
                hold = Hold(*r[:5])
                _drop_hold(db, hold)
                if r[5] is None:  # never reached the model: a grant gets its request back
                    if hold.grant_id is not None:
                        _refund_request(db, hold.grant_id)
                        outbox.sqlite_after_change(db, None, hold.grant_id, hold.period, 0,
                                                   r[8] if now is None else now)
                    continue
                inserted = db.execute(
                    "INSERT OR IGNORE INTO usage (generation_id, app_id, connection_id, "
                    "grant_id, period, model, prompt_tokens, completion_tokens, cost_nanos, "
                    "provisional, status, latency_ms, created_at) VALUES "
                    "(?, ?, ?, ?, ?, ?, 0, 0, ?, 1, 'swept', 0, ?)",
                    (r[5], r[6], hold.connection_id, hold.grant_id, hold.period, r[7] or "",
                     hold.amount_nanos, r[8])).rowcount
                # The estimate may cross a line of the cap or use a grant up: told here
                # as a settle would (later settles start above the line).
                spent = _debit(db, hold.connection_id, hold.grant_id, hold.period,
                               hold.amount_nanos) if inserted else None
                outbox.sqlite_after_change(db, hold.connection_id if inserted else None,
                                           hold.grant_id, hold.period,
                                           hold.amount_nanos if inserted else 0,
                                           r[8] if now is None else now, spent)
            return len(rows)
        def after(_: int) -> None:
            self._meter.spent.clear()  # rows became debits: read the aggregates again
            if older_than is None:
                return
            # Holds in memory past the bound too: a swept row's amount is now a debit,
            # and a hold whose upstream never answered in that long is a leak.
            for hold in [h for i, h in self._meter.holds.items()
                         if self._meter.times[i][0] < older_than]:
                if not self._has_row(hold):
                    leaked.append(hold)
                self._meter.remove(hold)
        leaked: list[Hold] = []
        rows = await self._writer.run(op, after)
        return rows + len(leaked)

    async def open_holds(self) -> int:
        """Holds of calls in flight: rows in the database and this process's others."""
        row = self._one("SELECT COUNT(*) FROM holds")
        return (row[0] if row else 0) + self._meter.unwritten()

    async def recent_usage(self, connection_id: int, limit: int = 20) -> list[Usage]:
        rows = self._all(
            "SELECT generation_id, app_id, connection_id, grant_id, model, prompt_tokens, "
            "completion_tokens, cost_nanos, provisional, status, latency_ms, created_at "
            f"FROM usage WHERE connection_id = ? AND {METERED} "
            "ORDER BY created_at DESC, usage_id DESC LIMIT ?",
            (connection_id, limit))
        return [_usage(r) for r in rows]

    # ---- grants -----------------------------------------------------------
    async def create_grant(self, app_id: str, token_hash: str, requests: int,
                           max_nanos: int | None, *, sealed_key: str | None,
                           connection_id: int | None, now: float, expires_at: float,
                           seal: Callable[[int], str] | None = None,
                           approved_by: str | None = None) -> Grant:
        """A grant funded by a typed key (``seal``) or by ``connection_id``.

        A connection funds it only if, in the same transaction, it is still
        active with a key and bound to the browser ``approved_by`` that the
        caller checked: a revocation (or a re-approval elsewhere) in between
        refuses it (ConsentRequired) instead of minting a grant it never allowed.
        """
        def op(db: sqlite3.Connection) -> Grant:
            if connection_id is not None:
                conn = db.execute("SELECT state, sealed_key, browser_hash FROM connections "
                                  "WHERE connection_id = ?", (connection_id,)).fetchone()
                if conn is None or conn[0] != ACTIVE or conn[1] is None or \
                        approved_by is None or conn[2] != approved_by:
                    raise ConsentRequired("The connection changed meanwhile (revoked or "
                                          "approved again); approve the grant again.")
            cur = db.execute(
                "INSERT INTO grants (app_id, token_hash, requests, max_nanos, sealed_key, "
                "connection_id, created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (app_id, token_hash, requests, max_nanos, sealed_key, connection_id, now,
                 expires_at))
            grant_id = _rowid(cur)
            key = sealed_key
            if seal is not None:
                key = seal(grant_id)
                db.execute("UPDATE grants SET sealed_key = ? WHERE grant_id = ?", (key, grant_id))
            return Grant(grant_id, app_id, token_hash, requests, 0, max_nanos, 0, 0, key,
                         connection_id, now, expires_at)
        return await self._writer.run(op)

    async def get_grant(self, token_hash: str) -> Grant | None:
        row = self._one(f"SELECT {GRANT_COLS} FROM grants WHERE token_hash = ?", (token_hash,))
        return Grant(*row) if row else None

    async def get_grant_by_id(self, grant_id: int) -> Grant | None:
        row = self._one(f"SELECT {GRANT_COLS} FROM grants WHERE grant_id = ?", (grant_id,))
        return Grant(*row) if row else None

    async def grants_for_app(self, app_id: str) -> list[Grant]:
        rows = self._all(f"SELECT {GRANT_COLS} FROM grants WHERE app_id = ? "
                         "ORDER BY created_at DESC", (app_id,))
        return [Grant(*r) for r in rows]

    async def admit_grant(self, token_hash: str, app_id: str, period: str, amount_nanos: int,
                          *, now: float, expires_at: float) -> tuple[Grant, Hold]:
        """Atomically use one request of a grant and hold its worst cost.

        Refuses (GrantInvalid) when the grant is unknown, another app's,
        expired, used up, or when the hold would pass its dollar cap; when the
        grant is funded by a connection, that connection's cap applies too.
        """
        def op(db: sqlite3.Connection) -> tuple[Grant, Hold]:
            row = db.execute(f"SELECT {GRANT_COLS} FROM grants WHERE token_hash = ?",
                             (token_hash,)).fetchone()
            found = Grant(*row) if row is not None else None
            budget.check_grant(found, app_id, now, amount_nanos)
            assert found is not None
            grant = found
            if grant.connection_id is not None:
                conn = db.execute("SELECT state, sealed_key FROM connections "
                                  "WHERE connection_id = ?", (grant.connection_id,)).fetchone()
                try:
                    budget.check_connection(*(conn or (None, None)))
                except NotConnected:
                    # Said as the grant's refusal: the app redeemed a grant, not a connection.
                    raise GrantInvalid("The connection funding this grant was revoked.") \
                        from None
            db.execute("UPDATE grants SET used = used + 1, held_nanos = held_nanos + ? "
                       "WHERE grant_id = ?", (amount_nanos, grant.grant_id))
            db.execute("INSERT INTO holds (hold_id, connection_id, grant_id, period, "
                       "amount_nanos, created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (hold_id, grant.connection_id, grant.grant_id, period, amount_nanos, now,
                        expires_at))
            hold = Hold(hold_id, grant.connection_id, grant.grant_id, period, amount_nanos)
            used = grant.used + 1
            grant = dataclasses.replace(grant, used=used, held_nanos=grant.held_nanos + amount_nanos)
            return grant, hold
        hold_id = self._meter.new_id()  # the ledger's sequence, shared with admit's holds
        grant, hold = await self._writer.run(op, lambda r: self._meter.written.add(r[1].hold_id))
        # The funding connection's cap, against every hold of this process: checked
        # and taken with no await in between, like ``admit``.
        if grant.connection_id is not None:
            cache = self._cache_ok()
            connection = self._connection_by_id(grant.connection_id, cache)
            cap = connection.cap_nanos if connection is not None else None
            shortfall = budget.cap_refusal(cap, self._spent(grant.connection_id, period, cache),
                                           self._meter.held(grant.connection_id, period),
                                           amount_nanos)
            if shortfall is not None:
                await self.release(hold, refund_request=True)
                raise BudgetExceeded(shortfall=shortfall)
        self._meter.add(hold, now, expires_at)
        return grant, hold

    # ---- webhooks (the outbox: store/outbox.py) ----------------------------
    async def set_webhook(self, app_id: str, url: str | None,
                          sealed_secret: str | None) -> bool:
        def op(db: sqlite3.Connection) -> bool:
            return db.execute(outbox.SET_WEBHOOK, (url, sealed_secret, app_id)).rowcount == 1
        return await self._writer.run(op)

    async def get_webhook(self, app_id: str) -> Webhook | None:
        row = self._one(outbox.GET_WEBHOOK, (app_id,))
        return Webhook(*row) if row else None

    async def claim_webhooks(self, *, now: float, lease_until: float,
                             limit: int = 100) -> list[WebhookEvent]:
        def op(db: sqlite3.Connection) -> list[WebhookEvent]:
            events = [outbox.event(r) for r in db.execute(outbox.DUE, (now, limit))]
            db.executemany(outbox.LEASE, [(lease_until, e.event_id) for e in events])
            return [dataclasses.replace(e, attempts=e.attempts + 1, next_at=lease_until)
                    for e in events]
        return await self._writer.run(op)

    async def record_webhook(self, event_id: int, *, status: str, next_at: float,
                             code: int | None, error: str | None, now: float) -> None:
        delivered = now if status == DELIVERED else None

        def op(db: sqlite3.Connection) -> None:
            db.execute(outbox.RESULT, (status, next_at, code, error, delivered, event_id))
        await self._writer.run(op)

    async def recent_webhooks(self, app_id: str, limit: int = 50) -> list[WebhookEvent]:
        return [outbox.event(r) for r in self._all(outbox.RECENT, (app_id, limit))]

    async def resend_webhook(self, app_id: str, public_id: str, *, now: float) -> bool:
        def op(db: sqlite3.Connection) -> bool:
            return db.execute(outbox.RESEND, (now, now, app_id, public_id)).rowcount == 1
        return await self._writer.run(op)

    async def prune_webhooks(self, *, before: float) -> int:
        def op(db: sqlite3.Connection) -> int:
            return db.execute(outbox.PRUNE, (before,)).rowcount
        return await self._writer.run(op)

    # ---- presence (the end user's browser, proven by an HttpOnly cookie) ---
    async def add_presence(self, browser_hash: str, *, now: float) -> None:
        def op(db: sqlite3.Connection) -> None:
            db.execute("INSERT OR IGNORE INTO presence (browser_hash, created_at) VALUES (?, ?)",
                       (browser_hash, now))
        await self._writer.run(op)

    async def has_presence(self, browser_hash: str) -> bool:
        return self._one("SELECT 1 FROM presence WHERE browser_hash = ?", (browser_hash,)) is not None

    async def rotate_presence(self, old_hashes: Iterable[str], new_hash: str, *,
                              now: float) -> None:
        """Make ``new_hash`` this browser's proof, in one transaction.

        The connections the ``old_hashes`` proved move to ``new_hash``, and the
        old hashes stop proving anything: whoever else holds an old value (it
        may have been planted) is left with nothing.
        """
        old = [h for h in old_hashes if h != new_hash]

        def op(db: sqlite3.Connection) -> None:
            db.execute("INSERT OR IGNORE INTO presence (browser_hash, created_at) VALUES (?, ?)",
                       (new_hash, now))
            for old_hash in old:
                db.execute("UPDATE connections SET browser_hash = ? WHERE browser_hash = ?",
                           (new_hash, old_hash))
                db.execute("DELETE FROM presence WHERE browser_hash = ?", (old_hash,))
        await self._writer.run(op, self._forget_connections)


_KEYS_DIFFER = ("the keys file differs from the one the ledger {path} was first used with: "
                "use that keys file (or its WATTGATE_* key variables) on every process")


def _ended_grants(db: sqlite3.Connection, now: float | None) -> list[int]:
    """Ids of grants with a typed key that can never take a call again (the grant
    rule's ``budget.grant_usable``, read in the transaction that erases them)."""
    assert now is not None
    return [g.grant_id for g in (Grant(*r) for r in db.execute(
        f"SELECT {GRANT_COLS} FROM grants WHERE sealed_key IS NOT NULL"))
        if not budget.grant_usable(g, now)]


def _debit(db: sqlite3.Connection, connection_id: int | None, grant_id: int | None,
           period: str, nanos: int) -> int | None:
    """Add ``nanos`` to the aggregates; the connection's period spend after it (or None)."""
    spent = None
    if connection_id is not None:
        spent = _add_spend(db, connection_id, period, nanos)
    if grant_id is not None:
        db.execute("UPDATE grants SET spent_nanos = spent_nanos + ? WHERE grant_id = ?",
                   (nanos, grant_id))
    return spent


def _correct(db: sqlite3.Connection, generation_id: str, cost_nanos: int,
             prompt_tokens: int | None, completion_tokens: int | None, now: float | None
             ) -> tuple[int | None, str, int] | None:
    """Make a provisional row final at ``cost_nanos``, moving the aggregates by the difference,
    and write what that tells (a line of the cap crossed, a grant used up), dated ``now``
    (None: the call's own time, as its settle would have dated it).

    Answers (connection, period, difference), or None when no provisional row has that id.
    """
    row = db.execute("SELECT connection_id, grant_id, period, cost_nanos, created_at FROM usage "
                     "WHERE generation_id = ? AND provisional = 1", (generation_id,)).fetchone()
    if row is None:
        return None
    db.execute("UPDATE usage SET cost_nanos = :c, provisional = 0, "
               "prompt_tokens = COALESCE(:pt, prompt_tokens), "
               "completion_tokens = COALESCE(:ct, completion_tokens) WHERE generation_id = :g",
               {"c": cost_nanos, "pt": prompt_tokens, "ct": completion_tokens, "g": generation_id})
    spent = _debit(db, row[0], row[1], row[2], cost_nanos - row[3])
    outbox.sqlite_after_change(db, row[0], row[1], row[2], cost_nanos - row[3],
                               row[4] if now is None else now, spent)
    return row[0], row[2], cost_nanos - row[3]


def _usage(r: Row) -> Usage:
    return Usage(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], bool(r[8]), r[9], r[10], r[11])


def _rowid(cursor: sqlite3.Cursor) -> int:
    assert cursor.lastrowid is not None  # right after an INSERT
    return cursor.lastrowid


def _add_spend(db: sqlite3.Connection, connection_id: int, period: str, nanos: int) -> int:
    row = db.execute("INSERT INTO periods (connection_id, period, spent_nanos) VALUES (?, ?, ?) "
                     "ON CONFLICT (connection_id, period) DO UPDATE SET "
                     "spent_nanos = spent_nanos + ? RETURNING spent_nanos",
                     (connection_id, period, nanos, nanos)).fetchone()
    return int(row[0])


def _insert_usage(db: sqlite3.Connection, usage: Usage, period: str) -> bool:
    """The row, unless its generation is recorded already (then False)."""
    return db.execute(
        "INSERT OR IGNORE INTO usage (generation_id, app_id, connection_id, grant_id, "
        "period, model, prompt_tokens, completion_tokens, cost_nanos, provisional, "
        "status, latency_ms, created_at, upstream_code) VALUES (:g, :a, :c, :gr, :p, :m, "
        ":pt, :ct, :cost, :prov, :st, :lat, :t, :code)",
        {"g": usage.generation_id, "a": usage.app_id, "c": usage.connection_id,
         "gr": usage.grant_id, "p": period, "m": usage.model,
         "pt": usage.prompt_tokens, "ct": usage.completion_tokens,
         "cost": usage.cost_nanos, "prov": int(usage.provisional), "st": usage.status,
         "lat": usage.latency_ms, "t": usage.created_at,
         "code": usage.upstream_code}).rowcount == 1


def _refund_request(db: sqlite3.Connection, grant_id: int) -> None:
    db.execute("UPDATE grants SET used = used - 1 WHERE grant_id = ? AND used > 0", (grant_id,))


def _drop_hold(db: sqlite3.Connection, hold: Hold) -> bool:
    dropped = db.execute("DELETE FROM holds WHERE hold_id = ?", (hold.hold_id,)).rowcount == 1
    if dropped and hold.grant_id is not None:
        db.execute("UPDATE grants SET held_nanos = held_nanos - ? WHERE grant_id = ?",
                   (hold.amount_nanos, hold.grant_id))
    return dropped

