"""The store: the one place wattgate's state is read and written.

Handlers and domain modules call the methods of the ledger contract
(``contract.Ledger``) and receive the frozen rows of ``records``; no SQL exists
outside this package, and no module outside it imports a backend or a driver:
``open_store`` picks one from the config. SQLite (``sqlite.SQLiteStore``) keeps
the holds of calls in flight in the serving process's memory (``meter``), so one
gateway process serves a database file (``claim``); PostgreSQL
(``postgres.PostgresStore``) keeps them in the database, for a fleet of
processes sharing one ledger.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .contract import AdminSessionRow, Ledger, StoreInUse
from .records import (ACTIVE, NEEDS_RECONNECT, REVOKED, App, AppPolicy, Connection, Grant,
                      Hold, Usage)
from .sqlite import SQLiteStore

if TYPE_CHECKING:
    from ..config import Config

__all__ = ["ACTIVE", "NEEDS_RECONNECT", "REVOKED", "AdminSessionRow", "App", "AppPolicy", "Connection",
           "Grant", "Hold", "Ledger", "SQLiteStore", "StoreInUse", "Usage", "open_store"]


async def open_store(config: Config, *, serving: bool = False) -> Ledger:
    """The ledger the config names: PostgreSQL at ``database.url`` when set (imported
    only then: its driver is not needed otherwise), else SQLite at ``database.path``
    (created and migrated on open)."""
    if config.database_url:
        from .postgres import PostgresStore  # type: ignore[import-not-found,unused-ignore]
        store: Ledger = await PostgresStore.open(config.database_url)
        return store
    # serving (``wattgate serve``): SQLite is claimed before the file is opened.
    return SQLiteStore.open(config.database_file, claim=serving)
