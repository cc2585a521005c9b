"""Prototypes of optimisations, applied to a benchmark wattgate only (never shipped).

``bench/wattgate_server.py --variant NAME`` patches wattgate with one of
these before ``create_app``, so that ``bench/run.py --variant NAME`` measures
stock wattgate and the prototype side by side in one run. A prototype that
earns its keep is then proposed for wattgate itself, with the figures.

- ``inline-writer``: the store's group commit runs on the event loop thread
  instead of a writer thread. Operations queued during one loop iteration are
  applied together in one ``BEGIN IMMEDIATE`` transaction, each in its own
  savepoint, and every caller still awaits its own commit: the same
  guarantees, without two thread hops per write and without the GIL hand-offs
  between the loop and the writer thread that every SQLite statement costs.
  A commit in WAL mode with ``synchronous = NORMAL`` does not fsync, so it
  costs microseconds; what could block the loop is moved off it: when another
  process holds the write lock (``BEGIN IMMEDIATE`` answers busy at once,
  with ``busy_timeout = 0``), the batch falls back to the writer thread with
  the usual 10 s patience; WAL checkpoints (which fsync) run on the writer
  thread, through their own connection, instead of inside a commit.
- ``bg-checkpoint``: only the last part of that: the writer thread stays, but
  SQLite's automatic WAL checkpoint (an fsync of the WAL and the database,
  run inside whichever commit crosses 1000 pages) is replaced by a passive
  checkpoint every 200 commits on a connection of its own, so no caller's
  commit waits for it.
- ``timeout-cm``: the proxy bounds its wait for the upstream's headers with
  ``async with asyncio.timeout(...)`` instead of ``asyncio.wait_for(...)``,
  which in Python 3.11 wraps the request in a Task of its own (a Task, a
  context copy and a timer handle per call).

- ``lone-op``: a transaction that carries a single operation (the common case
  at low concurrency) runs it without the ``SAVEPOINT``/``RELEASE`` pair that
  isolates operations sharing a transaction: if it raises, the transaction is
  rolled back instead, which leaves the database exactly as the savepoint
  would. Two statements fewer per commit. For the loop-thread writer.

Names joined with ``+`` apply several prototypes at once.
"""

from __future__ import annotations

import asyncio
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from wattgate.store import sqlite as store_sqlite

CHECKPOINT_EVERY = 200   # commits between two passive WAL checkpoints (on the thread)


def _writer_runs_on_a_thread() -> bool:
    """The prototypes below were written against the thread writer (before group commit
    moved onto the loop thread in wattgate itself); against the new one they do not apply."""
    return hasattr(store_sqlite._Writer, "_drain")


class InlineWriter(store_sqlite._Writer):
    def __init__(self, db: sqlite3.Connection, *args: Any) -> None:
        super().__init__(db, *args)
        self._flush_handle: asyncio.Handle | None = None
        self._path = db.execute("PRAGMA database_list").fetchone()[2]
        db.execute("PRAGMA wal_autocheckpoint = 0")
        db.execute("PRAGMA busy_timeout = 0")
        self._since_checkpoint = 0
        self._checkpointing = False

    def _enqueue(self, op: Any) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.append((op, future))
        if self._draining is None and self._flush_handle is None:
            self._flush_handle = loop.call_soon(self._flush)
        return future

    async def run(self, op: Any) -> Any:
        return await self._enqueue(op)

    def submit(self, op: Any) -> None:
        self._enqueue(op).add_done_callback(store_sqlite._consume)

    def _flush(self) -> None:
        self._flush_handle = None
        if self._draining is not None or not self._queue:
            return
        batch, self._queue = self._queue, []
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError:
            # Another process writes: wait for it on the thread, never on the loop.
            self._queue = batch + self._queue
            self._db.execute("PRAGMA busy_timeout = 10000")
            self._draining = asyncio.get_running_loop().create_task(self._drain_on_thread())
            return
        try:
            results = self._apply_begun([op for op, _ in batch])
        except BaseException as e:  # the whole transaction failed
            results = [(False, e)] * len(batch)
        for (_, future), (ok, value) in zip(batch, results):
            if future.done():
                continue
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)
        self._since_checkpoint += 1
        if self._since_checkpoint >= CHECKPOINT_EVERY and not self._checkpointing:
            self._since_checkpoint = 0
            self._checkpointing = True
            fut = asyncio.get_running_loop().run_in_executor(self._executor, self._checkpoint)
            fut.add_done_callback(lambda _: setattr(self, "_checkpointing", False))

    async def _drain_on_thread(self) -> None:
        try:
            await store_sqlite._Writer._drain(self)
        finally:
            self._db.execute("PRAGMA busy_timeout = 0")

    def _apply(self, ops: list[Any]) -> list[tuple[bool, Any]]:
        self._db.execute("BEGIN IMMEDIATE")
        return self._apply_begun(ops)

    def _apply_begun(self, ops: list[Any]) -> list[tuple[bool, Any]]:
        db = self._db
        results: list[tuple[bool, Any]] = []
        try:
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
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        self.commits += 1
        return results

    def _checkpoint(self) -> None:
        db = sqlite3.connect(self._path, isolation_level=None)
        try:
            db.execute("PRAGMA busy_timeout = 10000")
            db.execute("PRAGMA wal_checkpoint(PASSIVE)")
        finally:
            db.close()

    async def close(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush()
        await super().close()


class CheckpointAsideWriter(store_sqlite._Writer):
    def __init__(self, db: sqlite3.Connection, *args: Any) -> None:
        super().__init__(db, *args)
        self._path = db.execute("PRAGMA database_list").fetchone()[2]
        db.execute("PRAGMA wal_autocheckpoint = 0")
        self._checkpoint_at = CHECKPOINT_EVERY
        self._checkpointer = ThreadPoolExecutor(1, thread_name_prefix="wattgate-checkpoint")
        self._checkpointing = False

    def _apply(self, ops: list[Any]) -> list[tuple[bool, Any]]:
        results = super()._apply(ops)
        if self.commits >= self._checkpoint_at and not self._checkpointing:
            self._checkpoint_at = self.commits + CHECKPOINT_EVERY
            self._checkpointing = True
            self._checkpointer.submit(self._checkpoint)
        return results

    def _checkpoint(self) -> None:
        try:
            db = sqlite3.connect(self._path, isolation_level=None)
            try:
                db.execute("PRAGMA busy_timeout = 10000")
                db.execute("PRAGMA wal_checkpoint(PASSIVE)")
            finally:
                db.close()
        finally:
            self._checkpointing = False

    def shutdown(self) -> None:
        self._checkpointer.shutdown(wait=True)
        super().shutdown()


class _AsyncioWithTimeoutCM:
    """``asyncio`` as the proxy module sees it, with wait_for done in the caller's task."""

    def __getattr__(self, name: str) -> Any:
        return getattr(asyncio, name)

    @staticmethod
    async def wait_for(aw: Any, timeout: float | None) -> Any:
        async with asyncio.timeout(timeout):
            return await aw


def _lone_op() -> None:
    base = store_sqlite._Writer
    if _writer_runs_on_a_thread():
        raise SystemExit("lone-op is written for the loop-thread writer")
    stock_apply = base._apply

    def _apply(self: Any, ops: list[Any], wait: bool) -> list[tuple[bool, Any]]:
        if len(ops) != 1:
            return stock_apply(self, ops, wait)
        db = self._db
        db.execute(f"PRAGMA busy_timeout = {10000 if wait else 0}")
        db.execute("BEGIN IMMEDIATE")
        try:
            value = ops[0](db)
        except Exception as e:
            db.execute("ROLLBACK")
            return [(False, e)]
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        try:
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        self.commits += 1
        return [(True, value)]
    base._apply = _apply  # type: ignore[method-assign]


def _timeout_cm() -> None:
    from wattgate.views import proxy

    proxy.asyncio = _AsyncioWithTimeoutCM()  # type: ignore[assignment]


def _writer(cls: type) -> Any:
    def patch() -> None:
        if not _writer_runs_on_a_thread():
            raise SystemExit(f"{cls.__name__}: wattgate's store no longer uses the thread "
                             "writer this prototype replaces (it is in wattgate now)")
        store_sqlite._Writer = cls  # type: ignore[misc]
    return patch


VARIANTS = {"inline-writer": _writer(InlineWriter),
            "bg-checkpoint": _writer(CheckpointAsideWriter),
            "timeout-cm": _timeout_cm,
            "lone-op": _lone_op}


def apply(names: str) -> None:
    for name in names.split("+"):
        if name not in VARIANTS:
            raise SystemExit(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")
        VARIANTS[name]()
