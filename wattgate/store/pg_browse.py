"""The PostgreSQL store's pageable reads: ``browse.py``'s queries in PostgreSQL's SQL.

Same methods, same rows, never a write; each is one or two short statements
on a pooled connection. Held amounts come from the ``holds`` table, which on
PostgreSQL names every process's calls in flight.
"""

from __future__ import annotations

from typing import Any

from .browse import (LOG_COLS, MAX_PAGE, DayCalls, GrantRow, LogFilter, LogLine, Page,
                     grant_state_sql, log_line)
from .pg_reports import PgReportsMixin
from .records import CONNECTION_COLS, GRANT_COLS, Connection, Grant
from .reports import ConnectionSpend

_C_COLS = ", ".join("c." + col for col in CONNECTION_COLS.split(", "))
_G_COLS = ", ".join("g." + col for col in GRANT_COLS.split(", "))
_USER = ("u.connection_id = (SELECT connection_id FROM connections "
         "WHERE app_id = $1 AND app_user_id = $2)")


class PgBrowseMixin(PgReportsMixin):
    async def connections_page(self, app_id: str, period: str, *, search: str = "",
                               state: str | None = None, offset: int = 0,
                               limit: int = 50) -> Page[ConnectionSpend]:
        where = ("c.app_id = $1 AND ($2 = '' OR strpos(c.app_user_id, $2) > 0) "
                 "AND ($3::text IS NULL OR c.state = $3)")
        rows = await self._all(
            f"SELECT {_C_COLS}, c.spent, (SELECT COALESCE(SUM(h.amount_nanos), 0) "
            "FROM holds h WHERE h.connection_id = c.connection_id AND h.period = $4) "
            "FROM (SELECT c.*, COALESCE(p.spent_nanos, 0) AS spent FROM connections c "
            "LEFT JOIN periods p ON p.connection_id = c.connection_id AND p.period = $4 "
            f"WHERE {where} ORDER BY spent DESC, c.app_user_id LIMIT $5 OFFSET $6) c "
            "ORDER BY c.spent DESC, c.app_user_id",
            app_id, search, state, period, min(limit, MAX_PAGE), max(0, offset))
        total = await self._all(f"SELECT COUNT(*) FROM connections c WHERE {where}",
                                app_id, search, state)
        return Page([ConnectionSpend(Connection(*r[:9]), int(r[9]), int(r[10])) for r in rows],
                    int(total[0][0]))

    async def grants_page(self, app_id: str, *, now: float, search: str = "",
                          state: str | None = None, offset: int = 0,
                          limit: int = 50) -> Page[GrantRow]:
        where = ("g.app_id = $1 AND ($2 = '' OR strpos(COALESCE(c.app_user_id, ''), $2) > 0) "
                 f"AND ($3::text IS NULL OR {grant_state_sql('$4::double precision')} = $3)")
        join = "FROM grants g LEFT JOIN connections c ON c.connection_id = g.connection_id "
        rows = await self._all(
            f"SELECT {_G_COLS}, c.app_user_id {join} WHERE {where} "
            "ORDER BY g.created_at DESC, g.grant_id DESC LIMIT $5 OFFSET $6",
            app_id, search, state, now, min(limit, MAX_PAGE), max(0, offset))
        total = await self._all(f"SELECT COUNT(*) {join} WHERE {where}",
                                app_id, search, state, now)
        return Page([GrantRow(Grant(*r[:12]), r[12]) for r in rows], int(total[0][0]))

    async def request_log(self, f: LogFilter, *, limit: int = 50) -> list[LogLine]:
        args: list[Any] = [f.app_id, f.app_user_id]
        sql = (f"SELECT {LOG_COLS} FROM usage u LEFT JOIN connections c "
               "ON c.connection_id = u.connection_id WHERE u.app_id = $1")
        if f.app_user_id is not None:
            sql += " AND " + _USER
        else:
            sql += " AND $2::text IS NULL"
        for clause, value in ((" AND u.model = ${}", f.model), (" AND u.status = ${}", f.status),
                              (" AND u.created_at >= ${}", f.since),
                              (" AND u.created_at < ${}", f.until)):
            if value is not None:
                args.append(value)
                sql += clause.format(len(args))
        if f.before is not None:
            args += list(f.before)
            sql += f" AND (u.created_at, u.usage_id) < (${len(args) - 1}, ${len(args)})"
        args.append(min(limit, MAX_PAGE))
        sql += f" ORDER BY u.created_at DESC, u.usage_id DESC LIMIT ${len(args)}"
        return [log_line(r) for r in await self._all(sql, *args)]

    async def daily_calls(self, app_id: str | None, since: float, until: float, *,
                          app_user_id: str | None = None) -> list[DayCalls]:
        user = _USER if app_user_id is not None else "$2::text IS NULL"
        rows = await self._all(
            "SELECT to_char(to_timestamp(u.created_at) AT TIME ZONE 'UTC', 'YYYY-MM-DD'), "
            "COUNT(*), SUM(CASE WHEN u.status = 'ok' THEN 0 ELSE 1 END), "
            "SUM(u.prompt_tokens), SUM(u.completion_tokens), SUM(u.latency_ms) FROM usage u "
            "WHERE (u.app_id = $1 OR ($1::text IS NULL AND u.app_id IN "
            "(SELECT app_id FROM apps WHERE deleted_at IS NULL))) "
            f"AND {user} AND u.created_at >= $3 AND u.created_at < $4 "
            "GROUP BY 1 ORDER BY 1", app_id, app_user_id, since, until)
        return [DayCalls(r[0], *(int(v) for v in r[1:])) for r in rows]
