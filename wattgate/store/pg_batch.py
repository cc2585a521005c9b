"""Group commit for the PostgreSQL store: the writes queued while one is in flight go as one.

``GroupCommit.put`` queues one item (a settle, a note) and returns a future
of that item's own answer. One flusher task per queue sends everything
queued so far as one batch (one round trip, one transaction), then the next
batch: under load many calls share a commit, as SQLite's writer does, and
alone a call waits for nothing but its own round trip.

The flusher keeps its pool connection while batches follow each other (one
acquire and release per burst, not per call). It is tracked in the store's
set of running writes, so a caller
cancelled while waiting never cancels the write, and ``close`` waits for it.
A batch that fails for one item's sake (not because the database is
unreachable) is run again item by item, so one call's failure is never its
neighbours'. An idempotent write (a settle, on its generation id; a note) is
run again whatever the failure; any other (an admission, a rate-limit take)
only when the server reported the failure, so its transaction surely rolled
back and nothing is taken twice. It owns no SQL and no rule of money.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, AsyncContextManager, Awaitable, Callable, Generic, TypeVar

import asyncpg

from ..errors import Unavailable

log = logging.getLogger("wattgate.store")
R = TypeVar("R")
MAX_BATCH = 256  # items per round trip at most

# A batch failing for one of these was rolled back by the server for contention only.
_CONTENTION = (asyncpg.exceptions.LockNotAvailableError, asyncpg.exceptions.DeadlockDetectedError,
               asyncpg.exceptions.SerializationError)


class InDoubt(Unavailable):
    """A batch reached the server and the database went away before it answered:
    whether it committed is unknown (a write that is not idempotent must be undone
    or looked up by its caller once the database answers again)."""


class GroupCommit(Generic[R]):
    """``lease`` lends a connection (the store's pool, failures as ``Unavailable``),
    kept by the flusher while batches follow each other; ``run`` sends one batch on
    it; ``down`` tells a failure that means the database cannot answer now."""

    def __init__(self, run: Callable[[Any, list[Any]], Awaitable[list[R]]],
                 lease: Callable[[], AsyncContextManager[Any]],
                 down: Callable[[BaseException], BaseException | None],
                 writes: set[asyncio.Task[Any]], *, idempotent: bool) -> None:
        self._run, self._lease, self._down = run, lease, down
        self._idempotent = idempotent
        self._writes = writes
        self._queue: list[tuple[Any, asyncio.Future[R]]] = []
        self._flusher: asyncio.Task[None] | None = None

    def put(self, item: Any) -> "asyncio.Future[R]":
        fut: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        fut.add_done_callback(_retrieve)
        self._queue.append((item, fut))
        if self._flusher is None:
            self._flusher = asyncio.ensure_future(self._flush())
            self._writes.add(self._flusher)
            self._flusher.add_done_callback(self._writes.discard)
        return fut

    async def _flush(self) -> None:
        batch: list[tuple[Any, asyncio.Future[R]]] = []
        try:
            while self._queue:
                try:
                    async with self._lease() as con:
                        while self._queue:
                            batch, self._queue = (self._queue[:MAX_BATCH],
                                                  self._queue[MAX_BATCH:])
                            healthy = await self._send(con, batch)
                            batch = []
                            if not healthy:
                                break  # a fresh connection for what follows
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # no connection to be had
                    log.error("ledger write failed: %r", e)
                    _fail(batch + self._queue, e)
                    batch, self._queue = [], []
        finally:
            self._flusher = None
            # Only on cancellation (the loop ending): never leave a caller waiting.
            _fail(batch + self._queue, Unavailable("The ledger write was interrupted."))
            self._queue = []

    async def _send(self, con: Any, batch: list[tuple[Any, asyncio.Future[R]]]) -> bool:
        """Run one batch and answer its callers; False if the connection is suspect."""
        try:
            results = await self._run(con, [item for item, _ in batch])
        except asyncio.CancelledError:
            raise
        except Exception as e:
            down = self._down(e)
            if len(batch) > 1 and self._alone_may_pass(e, down):
                for one in batch:
                    if not await self._send(con, [one]):
                        _fail(batch, e if down is None else InDoubt(str(down)))
                        return False
                return True
            log.error("ledger write failed: %r", e)
            _fail(batch, e if down is None else InDoubt(str(down)))
            return down is None
        for (_, fut), result in zip(batch, results):
            if not fut.done():  # a caller cancelled meanwhile: the write is done all the same
                fut.set_result(result)
        return True

    def _alone_may_pass(self, e: BaseException, down: BaseException | None) -> bool:
        if isinstance(e, _CONTENTION):
            return True
        if down is not None:
            return False
        return self._idempotent or isinstance(e, asyncpg.PostgresError)


def _fail(batch: list[tuple[Any, "asyncio.Future[Any]"]], e: BaseException) -> None:
    for _, fut in batch:
        if not fut.done():
            fut.set_exception(e)


def _retrieve(fut: "asyncio.Future[Any]") -> None:
    """A failure is logged once by the flusher; a caller that never looks is no error."""
    if not fut.cancelled():
        fut.exception()
