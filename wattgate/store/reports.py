"""The store's reporting reads: spend per day, top users, connection spend, usage export.

What the admin console, ``/metrics`` and ``wattgate usage export`` read; never
a write. ``SQLiteStore`` inherits these methods, so callers still talk to one
store interface. They live apart from ``sqlite.py`` because they differ in
kind from its point reads: they scan ranges of the usage table, so each runs in
a worker thread on its own read-only connection (WAL: it never waits for the
writer, and the event loop serving the proxy never waits for it). Rows leave
as the frozen dataclasses below; amounts are integer nano-dollars.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from .records import CONNECTION_COLS, METERED, Connection

T = TypeVar("T")
DAY = 86400


@dataclass(frozen=True)
class DaySpend:
    """Spend of one (day, app, model); ``day`` is the UTC date, ``YYYY-MM-DD``."""

    day: str
    app_id: str
    model: str
    calls: int
    cost_nanos: int


@dataclass(frozen=True)
class PayerSpend:
    """Spend of one payer over a range: a connection's user, or a self-funded grant."""

    app_id: str
    app_user_id: str | None  # None: a grant funded by a typed key, not a connection
    grant_id: int | None
    calls: int
    cost_nanos: int


@dataclass(frozen=True)
class ConnectionSpend:
    connection: Connection
    spent_nanos: int  # in the period asked for
    held_nanos: int   # budget held by calls in flight admitted in that period


@dataclass(frozen=True)
class AppTotals:
    app_id: str
    calls: int
    cost_nanos: int
    provisional: int
    connections_active: int


@dataclass(frozen=True)
class UsageLine:
    """One metered call as exported: never prompt or completion content."""

    created_at: float
    generation_id: str
    app_id: str
    app_user_id: str | None
    grant_id: int | None
    model: str
    prompt_tokens: int
    completion_tokens: int
    cost_nanos: int
    provisional: bool
    status: str


_CONNECTION_COLS = ", ".join("c." + col for col in CONNECTION_COLS.split(", "))

# A grant's payer is the connection that funds it when there is one.
_PAYER_JOIN = ("LEFT JOIN connections c ON c.connection_id = u.connection_id ")


class ReportsMixin:
    """Reporting reads of ``SQLiteStore`` (which provides ``path``)."""

    path: Path

    async def _report(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        uri = self.path.resolve().as_uri() + "?mode=ro"

        def run() -> T:
            db = sqlite3.connect(uri, uri=True)
            try:
                db.execute("PRAGMA busy_timeout = 10000")
                return fn(db)
            finally:
                db.close()
        return await asyncio.to_thread(run)

    async def daily_spend(self, since: float, until: float, *,
                          app_id: str | None = None) -> list[DaySpend]:
        """Spend per UTC day, app and model for calls in [since, until)."""
        sql = ("SELECT date(created_at, 'unixepoch'), app_id, model, COUNT(*), "
               "SUM(cost_nanos) FROM usage WHERE created_at >= :since AND created_at < :until "
               f"AND {METERED}")
        params: dict[str, Any] = {"since": since, "until": until, "app": app_id}
        # Both forms probe the usage_by_app index (app_id, created_at).
        sql += " AND app_id = :app" if app_id is not None else \
            " AND app_id IN (SELECT app_id FROM apps WHERE deleted_at IS NULL)"
        sql += " GROUP BY 1, 2, 3 ORDER BY 1, 2, 3"
        return await self._report(
            lambda db: [DaySpend(*r) for r in db.execute(sql, params).fetchall()])

    async def top_payers(self, since: float, until: float, *, app_id: str | None = None,
                         limit: int = 10) -> list[PayerSpend]:
        """The payers who spent most in [since, until), most first."""
        sql = ("SELECT u.app_id, c.app_user_id, CASE WHEN u.connection_id IS NULL "
               "THEN u.grant_id END, COUNT(*), SUM(u.cost_nanos) FROM usage u " + _PAYER_JOIN +
               f"WHERE u.created_at >= :since AND u.created_at < :until AND u.{METERED}")
        params: dict[str, Any] = {"since": since, "until": until, "app": app_id, "n": limit}
        sql += " AND u.app_id = :app" if app_id is not None else \
            " AND u.app_id IN (SELECT app_id FROM apps WHERE deleted_at IS NULL)"
        sql += " GROUP BY 1, 2, 3 ORDER BY 5 DESC, 4 DESC LIMIT :n"
        return await self._report(
            lambda db: [PayerSpend(*r) for r in db.execute(sql, params).fetchall()])

    async def connection_spend(self, app_id: str, period: str) -> list[ConnectionSpend]:
        """Every connection of an app with its spend in ``period``, biggest spender first."""
        sql = (f"SELECT {_CONNECTION_COLS}, COALESCE(p.spent_nanos, 0), "
               "(SELECT COALESCE(SUM(h.amount_nanos), 0) FROM holds h "
               " WHERE h.connection_id = c.connection_id AND h.period = :period) "
               "FROM connections c LEFT JOIN periods p "
               "ON p.connection_id = c.connection_id AND p.period = :period "
               "WHERE c.app_id = :app ORDER BY 10 DESC, c.updated_at DESC")

        def run(db: sqlite3.Connection) -> list[ConnectionSpend]:
            rows = db.execute(sql, {"app": app_id, "period": period}).fetchall()
            # Rows hold what calls in flight named; the meter also what they have not yet.
            return [ConnectionSpend(Connection(*r[:9]), r[9], max(r[10], held(r[0], period)))
                    for r in rows]
        held = self._meter.held  # type: ignore[attr-defined]
        return await self._report(run)

    async def app_totals(self, since: float, until: float) -> dict[str, AppTotals]:
        """Per app: calls, spend and provisional calls in [since, until), active connections."""
        sql = ("SELECT a.app_id, "
               "(SELECT COUNT(*) FROM usage u WHERE u.app_id = a.app_id "
               f" AND u.created_at >= :since AND u.created_at < :until AND u.{METERED}), "
               "(SELECT COALESCE(SUM(cost_nanos), 0) FROM usage u WHERE u.app_id = a.app_id "
               " AND u.created_at >= :since AND u.created_at < :until), "
               "(SELECT COUNT(*) FROM usage u WHERE u.app_id = a.app_id AND u.provisional = 1 "
               " AND u.created_at >= :since AND u.created_at < :until), "
               "(SELECT COUNT(*) FROM connections c WHERE c.app_id = a.app_id "
               " AND c.state = 'active' AND c.sealed_key IS NOT NULL) FROM apps a "
               "WHERE a.deleted_at IS NULL")
        return await self._report(lambda db: {
            r[0]: AppTotals(*r) for r in db.execute(sql, {"since": since, "until": until})})

    async def usage_lines(self, app_id: str, since: float | None = None,
                          until: float | None = None, *,
                          page: int = 5000) -> AsyncIterator[list[UsageLine]]:
        """Every metered call of an app in [since, until), oldest first, a page at a time.

        Each page is its own short read (keyset on created_at, usage_id), so an
        export of millions of calls never holds them all in memory nor keeps
        one read transaction open for the whole download.
        """
        after: tuple[float, int] | None = None
        while True:
            def read(db: sqlite3.Connection, after: tuple[float, int] | None = after
                     ) -> tuple[list[UsageLine], tuple[float, int] | None]:
                return _usage_page(db, app_id, since, until, after, page)
            lines, after = await self._report(read)
            if lines:
                yield lines
            if after is None:
                return


def _usage_page(db: sqlite3.Connection, app_id: str, since: float | None,
                until: float | None, after: tuple[float, int] | None,
                limit: int) -> tuple[list[UsageLine], tuple[float, int] | None]:
    sql = ("SELECT u.created_at, u.generation_id, u.app_id, c.app_user_id, u.grant_id, u.model, "
           "u.prompt_tokens, u.completion_tokens, u.cost_nanos, u.provisional, u.status, "
           "u.usage_id FROM usage u " + _PAYER_JOIN + f"WHERE u.app_id = :app AND u.{METERED}")
    params: dict[str, Any] = {"app": app_id, "since": since, "until": until, "n": limit,
                              "t": after[0] if after else None, "id": after[1] if after else None}
    if since is not None:
        sql += " AND u.created_at >= :since"
    if until is not None:
        sql += " AND u.created_at < :until"
    if after is not None:
        sql += " AND (u.created_at, u.usage_id) > (:t, :id)"
    rows = db.execute(sql + " ORDER BY u.created_at, u.usage_id LIMIT :n", params).fetchall()
    lines = [UsageLine(created_at=r[0], generation_id=r[1], app_id=r[2], app_user_id=r[3],
                       grant_id=r[4], model=r[5], prompt_tokens=r[6], completion_tokens=r[7],
                       cost_nanos=r[8], provisional=bool(r[9]), status=r[10]) for r in rows]
    return lines, ((rows[-1][0], rows[-1][11]) if len(rows) == limit else None)
