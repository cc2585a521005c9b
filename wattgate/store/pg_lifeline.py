"""The PostgreSQL store's own connection: who this process is, what changed, who leads.

One connection per store, outside the pool, for the store's whole life. On it:

- the owner lock: a session advisory lock on the store's random 63-bit owner
  id, which every hold row it admits names. The server drops the lock when
  the connection ends (the process died, or the network did), so a sweep
  can tell the holds of a dead process from a living one's;
- ``LISTEN wattgate_changes``: every write that changes apps, connections,
  caps, states or sealed keys notifies in its transaction, and each
  notification bumps ``epoch``; while this connection is down the epoch is
  not vouched for (``version`` is None) and callers read the database;
- leadership of background tasks: session advisory locks in wattgate's
  two-key space, gone with the connection.

- the owner's heartbeat: its ``owners`` row's ``last_seen`` (the server's
  clock), written on every ping. A free owner lock alone does not make a
  process dead (its lifeline may be reconnecting): a sweep also waits until
  it has not been seen for ``OWNER_GRACE``. A sweep deletes the row of the
  owner it swept, so a process that comes back finds its row gone: it was
  presumed dead (``presumed_dead``), and the store restores its holds.

A watchdog pings the connection every second and reconnects it when it is
gone (taking the owner lock again). A ping or a lead query that is merely slow
(a loaded machine) is not a death: the connection is given up only when it
fails, or answers nothing for ``DEAD_AFTER`` seconds; giving up a healthy
connection would hand its leadership and owner lock to another process. It does not own the pool, the SQL of the
ledger or any rule of money.
"""

from __future__ import annotations

import asyncio
import logging
import zlib
from typing import Any, Callable

import asyncpg

from .pg_migrations import LOCK_SPACE

log = logging.getLogger("wattgate.store")
CHANNEL = "wattgate_changes"
PING_EVERY = 1.0  # seconds between pings
DEAD_AFTER = 5.0  # seconds without an answer before the connection is given up
OWNER_GRACE = 15.0  # seconds unseen (and its lock free) before a process is presumed dead


_HOLDING = ("SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' "
            "AND pid = pg_backend_pid() AND granted AND objsubid = 2 "
            "AND classid = $1::bigint::oid AND objid = $2::bigint::oid)")


# The heartbeat; answers True when it had to insert the row (a sweep deleted it).
_HEARTBEAT = ("INSERT INTO owners (owner, last_seen) "
              "VALUES ($1, extract(epoch FROM clock_timestamp())) ON CONFLICT (owner) "
              "DO UPDATE SET last_seen = EXCLUDED.last_seen RETURNING (xmax = 0)")


def task_key(task: str) -> int:
    """A background task's lock key (key 0 is the migrations')."""
    return zlib.crc32(task.encode()) % 0x7FFFFFFF + 1


class Lifeline:
    def __init__(self, connect: Callable[[], Any], owner: int) -> None:
        self._connect = connect
        self.owner = owner
        self.epoch = 0
        self.generation = 0  # which connection the epoch is counted on
        self._con: Any = None
        self._lock = asyncio.Lock()  # one query at a time on the connection
        self._leading: set[str] = set()
        self._watchdog: asyncio.Task[None] | None = None
        self.presumed_dead = False  # swept while away: the store must restore its holds
        self.on_presumed_dead: Callable[[], None] | None = None

    @property
    def up(self) -> bool:
        return self._con is not None and not self._con.is_closed()

    def version(self) -> tuple[int, int] | None:
        return (self.generation, self.epoch) if self.up else None

    def bump(self) -> None:
        self.epoch += 1

    async def start(self) -> None:
        await self._open()
        self._watchdog = asyncio.get_running_loop().create_task(self._watch())

    async def _open(self) -> None:
        con = await self._connect()
        try:
            # The owner id is random: held by nobody else but a sweep checking it.
            await con.execute("SELECT pg_advisory_lock($1)", self.owner)
            inserted = await con.fetchval(_HEARTBEAT, self.owner)
            await con.add_listener(CHANNEL, self._notified)
            con.add_termination_listener(self._ended)
        except BaseException:
            con.terminate()
            raise
        self._con = con
        self.generation += 1
        self.epoch += 1  # whatever changed while we were not listening
        if inserted and self.generation > 1:
            self._swept()

    def _swept(self) -> None:
        log.error("this process was presumed dead while its ledger connection was down "
                  "and its budget holds were swept; restoring them")
        self.presumed_dead = True
        if self.on_presumed_dead is not None:
            self.on_presumed_dead()

    def _notified(self, *_: Any) -> None:
        self.epoch += 1

    def _ended(self, *_: Any) -> None:
        self._leading.clear()

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(PING_EVERY)
            if self.up:
                try:
                    async with self._lock:
                        inserted = await self._con.fetchval(_HEARTBEAT, self.owner,
                                                            timeout=DEAD_AFTER)
                    if inserted:  # cannot happen while the lock is held; if it did, react
                        self._swept()
                    continue
                except Exception as e:  # whatever way it failed, it is not vouched for
                    log.warning("ledger listener connection lost: %r", e)
                    self._drop()
            try:
                await self._open()
                log.info("ledger listener connection restored")
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError,
                    asyncio.TimeoutError):
                pass  # still down; try again next second

    def _drop(self) -> None:
        self._leading.clear()
        if self._con is not None:
            self._con.terminate()
            self._con = None

    async def lead(self, task: str) -> bool:
        if not self.up:
            self._leading.clear()
            return False
        # Held already: ask the server whether it still is. The server frees a
        # terminated session's locks before its socket closes, so a local flag
        # alone could lead alongside the next leader for a moment.
        sql = _HOLDING if task in self._leading else "SELECT pg_try_advisory_lock($1, $2)"
        try:
            async with self._lock:
                got = await self._con.fetchval(sql, LOCK_SPACE, task_key(task),
                                               timeout=DEAD_AFTER)
        except Exception:  # a dying connection fails in many ways: not leading
            self._drop()
            return False
        if got:
            self._leading.add(task)
        else:
            self._leading.discard(task)
        return bool(got)

    async def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            try:
                await self._watchdog
            except asyncio.CancelledError:
                pass
            self._watchdog = None
        con, self._con = self._con, None
        self._leading.clear()
        if con is not None and not con.is_closed():
            try:
                # Gone for good: what it leaves may be swept at once, no grace.
                await con.execute("DELETE FROM owners WHERE owner = $1", self.owner,
                                  timeout=PING_EVERY)
                await asyncio.wait_for(con.close(), PING_EVERY)
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError,
                    asyncio.TimeoutError):
                con.terminate()

    def close_now(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        self._drop()
