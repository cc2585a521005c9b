"""The PostgreSQL store's reporting reads: ``reports.py``'s queries in PostgreSQL's SQL.

Same methods, same rows (the dataclasses of ``reports``), never a write. Each
read is one short statement on a pooled connection (the export pages by keyset,
so no read stays open for a whole download). Days and months are UTC.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from .records import CONNECTION_COLS, METERED, Connection
from .reports import AppTotals, ConnectionSpend, DaySpend, PayerSpend, UsageLine

_DAY = "to_char(to_timestamp(created_at) AT TIME ZONE 'UTC', 'YYYY-MM-DD')"
_CONNECTION_COLS = ", ".join("c." + col for col in CONNECTION_COLS.split(", "))
_PAYER_JOIN = "LEFT JOIN connections c ON c.connection_id = u.connection_id "
_LIVE_APPS = "(SELECT app_id FROM apps WHERE deleted_at IS NULL)"


class PgReportsMixin:
    """Reporting reads of ``PostgresStore`` (which provides ``_all``)."""

    _all: Callable[..., Awaitable[list[Any]]]  # PostgresStore's point read

    async def daily_spend(self, since: float, until: float, *,
                          app_id: str | None = None) -> list[DaySpend]:
        """Spend per UTC day, app and model for calls in [since, until)."""
        rows = await self._all(
            f"SELECT {_DAY}, app_id, model, COUNT(*), SUM(cost_nanos) FROM usage "
            f"WHERE created_at >= $1 AND created_at < $2 AND {METERED} AND "
            f"(app_id = $3 OR ($3::text IS NULL AND app_id IN {_LIVE_APPS})) "
            "GROUP BY 1, 2, 3 ORDER BY 1, 2, 3", since, until, app_id)
        return [DaySpend(r[0], r[1], r[2], int(r[3]), int(r[4])) for r in rows]

    async def top_payers(self, since: float, until: float, *, app_id: str | None = None,
                         limit: int = 10) -> list[PayerSpend]:
        rows = await self._all(
            "SELECT u.app_id, c.app_user_id, CASE WHEN u.connection_id IS NULL "
            "THEN u.grant_id END, COUNT(*), SUM(u.cost_nanos) FROM usage u " + _PAYER_JOIN +
            f"WHERE u.created_at >= $1 AND u.created_at < $2 AND u.{METERED} AND "
            f"(u.app_id = $3 OR ($3::text IS NULL AND u.app_id IN {_LIVE_APPS})) "
            "GROUP BY 1, 2, 3 ORDER BY 5 DESC, 4 DESC LIMIT $4", since, until, app_id, limit)
        return [PayerSpend(r[0], r[1], r[2], int(r[3]), int(r[4])) for r in rows]

    async def connection_spend(self, app_id: str, period: str) -> list[ConnectionSpend]:
        """Every connection of an app with its spend and held (every process) in ``period``."""
        rows = await self._all(
            f"SELECT {_CONNECTION_COLS}, COALESCE(p.spent_nanos, 0), "
            "(SELECT COALESCE(SUM(h.amount_nanos), 0) FROM holds h "
            " WHERE h.connection_id = c.connection_id AND h.period = $2) "
            "FROM connections c LEFT JOIN periods p "
            "ON p.connection_id = c.connection_id AND p.period = $2 "
            "WHERE c.app_id = $1 ORDER BY 10 DESC, c.updated_at DESC", app_id, period)
        return [ConnectionSpend(Connection(*r[:9]), int(r[9]), int(r[10])) for r in rows]

    async def app_totals(self, since: float, until: float) -> dict[str, AppTotals]:
        rows = await self._all(
            "SELECT a.app_id, "
            "(SELECT COUNT(*) FROM usage u WHERE u.app_id = a.app_id "
            f" AND u.created_at >= $1 AND u.created_at < $2 AND u.{METERED}), "
            "(SELECT COALESCE(SUM(cost_nanos), 0) FROM usage u WHERE u.app_id = a.app_id "
            " AND u.created_at >= $1 AND u.created_at < $2), "
            "(SELECT COUNT(*) FROM usage u WHERE u.app_id = a.app_id AND u.provisional "
            " AND u.created_at >= $1 AND u.created_at < $2), "
            "(SELECT COUNT(*) FROM connections c WHERE c.app_id = a.app_id "
            " AND c.state = 'active' AND c.sealed_key IS NOT NULL) FROM apps a "
            "WHERE a.deleted_at IS NULL", since, until)
        return {r[0]: AppTotals(r[0], int(r[1]), int(r[2]), int(r[3]), int(r[4])) for r in rows}

    async def usage_lines(self, app_id: str, since: float | None = None,
                          until: float | None = None, *,
                          page: int = 5000) -> AsyncIterator[list[UsageLine]]:
        """Every metered call of an app in [since, until), oldest first, a page at a time."""
        after_t, after_id = float("-inf"), 0
        while True:
            rows = await self._all(
                "SELECT u.created_at, u.generation_id, u.app_id, c.app_user_id, u.grant_id, "
                "u.model, u.prompt_tokens, u.completion_tokens, u.cost_nanos, u.provisional, "
                "u.status, u.usage_id FROM usage u " + _PAYER_JOIN + f"WHERE u.app_id = $1 AND u.{METERED} "
                "AND ($2::double precision IS NULL OR u.created_at >= $2) "
                "AND ($3::double precision IS NULL OR u.created_at < $3) "
                "AND (u.created_at, u.usage_id) > ($4, $5) "
                "ORDER BY u.created_at, u.usage_id LIMIT $6",
                app_id, since, until, after_t, after_id, page)
            if rows:
                yield [UsageLine(created_at=r[0], generation_id=r[1], app_id=r[2],
                                 app_user_id=r[3], grant_id=r[4], model=r[5],
                                 prompt_tokens=r[6], completion_tokens=r[7],
                                 cost_nanos=r[8], provisional=bool(r[9]), status=r[10])
                       for r in rows]
            if len(rows) < page:
                return
            after_t, after_id = rows[-1][0], rows[-1][11]
