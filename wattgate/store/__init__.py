"""The store: the one place wattgate's state is read and written.

Handlers and domain modules call the methods of ``SQLiteStore`` and receive the
frozen rows of ``records``; no SQL exists outside this package. Holds of
calls in flight live in the serving process's memory (``meter``), so one
gateway process serves a database (``SQLiteStore.claim``). A second backend
(PostgreSQL, for several gateway processes sharing one ledger) would implement
the same methods with holds in the database; ``admit``/``admit_grant``/``settle``
are the ones that must stay atomic (there: ``SELECT … FOR UPDATE`` on the
connection row).
"""

from .records import ACTIVE, NEEDS_RECONNECT, REVOKED, App, Connection, Grant, Hold, Usage
from .sqlite import SQLiteStore

__all__ = ["ACTIVE", "NEEDS_RECONNECT", "REVOKED", "App", "Connection", "Grant", "Hold",
           "SQLiteStore", "Usage", "open_store"]


def open_store(path) -> SQLiteStore:  # type: ignore[no-untyped-def]
    return SQLiteStore.open(path)
