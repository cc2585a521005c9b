"""The meter: budget held by the calls in flight, kept in this process's memory.

A hold is the worst-case cost of a call between its admission and its
settlement. Holds of calls paid by a connection live here only, until the
upstream names the call's generation: then the store writes the hold's row
(with the generation id) so that a crash leaves something to reconcile. Until
then a crash loses nothing a restart could use: a hold without a generation id
never reached a model whose answer we could look up, and a restart starts with
no call in flight.

Admission against the cap is one synchronous check-and-add on the event loop
(``SQLiteStore.admit``): spent (committed, from the ledger) + held here + the
call's worst case ≤ the cap. No await separates the check from the add, so two
calls can never both pass on the same room. This holds for one gateway process
per database, which ``SQLiteStore.claim`` enforces with a lock on the database file.

Every hold has an id from one sequence for the ledger's whole life, whether
its row is written at admission (a grant's) or later (a connection's): the
meter hands ids out above the highest the ledger ever saw (``holds``'
``sqlite_sequence``), and each written row moves that mark up with it. No sign
convention tells the two kinds apart; ``written`` does.

The meter also caches what admission reads on every call: connection rows and
the period aggregates. The store drops or updates these right after the commit
that changes them (``_Writer`` runs an operation's ``after`` hook before any
other code can run), and drops them all when another process commits. Nothing
here touches SQL.
"""

from __future__ import annotations

from typing import Any

from .records import Connection, Hold

# Past this many cached rows the cache starts again (a bound, not a policy).
MAX_CACHED = 100_000


class Meter:
    def __init__(self) -> None:
        self.holds: dict[int, Hold] = {}
        self.held_by_connection: dict[int, int] = {}
        # A hold counts against the cap of the period it was admitted in, only.
        self.held_by_period: dict[tuple[int, str], int] = {}
        self.written: set[int] = set()  # holds whose row exists or was queued for writing
        self.times: dict[int, tuple[float, float]] = {}  # hold → (created, expires)
        self._next_id = 1
        self.connections: dict[int, Connection] = {}
        self.connection_ids: dict[tuple[str, str], int] = {}
        self.spent: dict[tuple[int, str], int] = {}

    # ---- holds -------------------------------------------------------------
    def new_id(self) -> int:
        self._next_id += 1
        return self._next_id - 1

    def ids_above(self, highest: int) -> None:
        """Never hand out an id at or below ``highest`` (the ledger's mark for holds)."""
        self._next_id = max(self._next_id, highest + 1)

    def add(self, hold: Hold, created: float, expires: float) -> None:
        self.holds[hold.hold_id] = hold
        self.times[hold.hold_id] = (created, expires)
        if hold.connection_id is not None:
            cid = hold.connection_id
            self.held_by_connection[cid] = self.held_by_connection.get(cid, 0) + hold.amount_nanos
            key = (cid, hold.period)
            self.held_by_period[key] = self.held_by_period.get(key, 0) + hold.amount_nanos

    def remove(self, hold: Hold) -> bool:
        """Forget a hold (settled or released); False if it was not held here."""
        self.written.discard(hold.hold_id)
        self.times.pop(hold.hold_id, None)
        if self.holds.pop(hold.hold_id, None) is None:
            return False
        if hold.connection_id is not None:
            cid = hold.connection_id
            _take(self.held_by_connection, cid, hold.amount_nanos)
            _take(self.held_by_period, (cid, hold.period), hold.amount_nanos)
        return True

    def held(self, connection_id: int, period: str | None = None) -> int:
        """Held by this connection's calls in flight: admitted in ``period``, or in any."""
        if period is None:
            return self.held_by_connection.get(connection_id, 0)
        return self.held_by_period.get((connection_id, period), 0)

    def unwritten(self) -> int:
        """Holds with no row in the database (yet)."""
        return sum(1 for h in self.holds if h not in self.written)

    # ---- caches ------------------------------------------------------------
    def remember_connection(self, connection: Connection) -> None:
        if len(self.connections) >= MAX_CACHED:
            self.forget_connections()
        self.connections[connection.connection_id] = connection
        self.connection_ids[(connection.app_id, connection.app_user_id)] = \
            connection.connection_id

    def cached_connection(self, app_id: str, app_user_id: str) -> Connection | None:
        cid = self.connection_ids.get((app_id, app_user_id))
        return self.connections.get(cid) if cid is not None else None

    def forget_connections(self) -> None:
        self.connections.clear()
        self.connection_ids.clear()

    def remember_spent(self, connection_id: int, period: str, spent: int) -> None:
        if len(self.spent) >= MAX_CACHED:
            self.spent.clear()
        self.spent[(connection_id, period)] = spent

    def add_spent(self, connection_id: int | None, period: str, nanos: int) -> None:
        """A committed debit (or correction): move the cached aggregate with it."""
        if connection_id is None or not nanos:
            return
        key = (connection_id, period)
        if key in self.spent:
            self.spent[key] += nanos

    def forget(self) -> None:
        """Another process wrote: every cached row may be stale."""
        self.forget_connections()
        self.spent.clear()


def _take(totals: dict[Any, int], key: object, amount: int) -> None:
    left = totals.get(key, 0) - amount
    if left > 0:
        totals[key] = left
    else:
        totals.pop(key, None)
