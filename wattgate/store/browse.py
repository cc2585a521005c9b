"""The console's pageable reads: connections, grants and the request log of one app.

An app may have tens of thousands of users and millions of calls, so each read
here returns one page, filtered and ordered in SQL (never every row loaded to
be cut in Python): connections and grants by offset with a total (a page
number a person can follow), the request log by keyset, newest first (it grows
while it is read, and an offset would skip or repeat rows). Searching by user
id is a substring match, the same on both backends. Rows leave as the frozen
dataclasses below; ``BrowseMixin`` is the SQLite side, ``pg_browse`` the
PostgreSQL one. Not here: what a page shows (``views.console``).
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from .records import CONNECTION_COLS, GRANT_COLS, UPSTREAM_REFUSED, Connection, Grant
from .reports import ConnectionSpend, ReportsMixin

T = TypeVar("T")

CONNECTION_STATES = ("active", "needs_reconnect", "revoked")
GRANT_STATES = ("live", "spent", "expired")
# The statuses a call is recorded with (``calls.Call.settle``, and ``UPSTREAM_REFUSED``
# by ``Call.release``): every one but "ok" counts as an error in the request log's
# error rate.
CALL_STATUSES = ("ok", "upstream_error", "upstream_cut", "client_gone", UPSTREAM_REFUSED)
MAX_PAGE = 200


@dataclass(frozen=True)
class Page(Generic[T]):
    rows: list[T]
    total: int  # rows matching the filters, on every page


@dataclass(frozen=True)
class GrantRow:
    grant: Grant
    app_user_id: str | None  # the user whose connection funds it; None for a typed key


@dataclass(frozen=True)
class LogLine:
    """One call in the request log: never prompt or completion content."""

    usage_id: int
    created_at: float
    app_user_id: str | None
    grant_id: int | None
    model: str
    prompt_tokens: int
    completion_tokens: int
    cost_nanos: int
    provisional: bool
    status: str
    latency_ms: int
    upstream_code: int | None  # an upstream_refused call's HTTP code


@dataclass(frozen=True)
class LogFilter:
    """What the request log shows; ``before`` is the keyset (created_at, usage_id) of the
    last line of the previous page."""

    app_id: str
    app_user_id: str | None = None
    model: str | None = None
    status: str | None = None
    since: float | None = None
    until: float | None = None
    before: tuple[float, int] | None = None


@dataclass(frozen=True)
class DayCalls:
    """Calls of one UTC day (``YYYY-MM-DD``): how many, their tokens, errors and latency."""

    day: str
    calls: int
    errors: int
    prompt_tokens: int
    completion_tokens: int
    latency_ms_total: int

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def grant_state_sql(now: str) -> str:
    """``budget.grant_state`` in SQL (both dialects): 'spent', 'expired' or 'live'."""
    return ("CASE WHEN g.used >= g.requests OR (g.max_nanos IS NOT NULL AND "
            "g.spent_nanos + g.held_nanos >= g.max_nanos) THEN 'spent' "
            f"WHEN g.expires_at <= {now} THEN 'expired' ELSE 'live' END")


def log_line(r: Any) -> LogLine:
    return LogLine(usage_id=int(r[0]), created_at=r[1], app_user_id=r[2], grant_id=r[3],
                   model=r[4], prompt_tokens=int(r[5]), completion_tokens=int(r[6]),
                   cost_nanos=int(r[7]), provisional=bool(r[8]), status=r[9],
                   latency_ms=int(r[10]), upstream_code=r[11])


LOG_COLS = ("u.usage_id, u.created_at, c.app_user_id, u.grant_id, u.model, u.prompt_tokens, "
            "u.completion_tokens, u.cost_nanos, u.provisional, u.status, u.latency_ms, "
            "u.upstream_code")
_C_COLS = ", ".join("c." + col for col in CONNECTION_COLS.split(", "))
_G_COLS = ", ".join("g." + col for col in GRANT_COLS.split(", "))


class BrowseMixin(ReportsMixin):
    """The pageable reads of ``SQLiteStore``; each runs on a read-only connection."""

    async def connections_page(self, app_id: str, period: str, *, search: str = "",
                               state: str | None = None, offset: int = 0,
                               limit: int = 50) -> Page[ConnectionSpend]:
        where = ("c.app_id = :app AND (:q = '' OR instr(c.app_user_id, :q) > 0) "
                 "AND (:state IS NULL OR c.state = :state)")
        params = {"app": app_id, "period": period, "q": search, "state": state,
                  "n": min(limit, MAX_PAGE), "o": max(0, offset)}
        # The page is cut first; only its rows pay for the held sum.
        sql = (f"SELECT {_C_COLS}, c.spent, (SELECT COALESCE(SUM(h.amount_nanos), 0) "
               "FROM holds h WHERE h.connection_id = c.connection_id AND h.period = :period) "
               f"FROM (SELECT c.*, COALESCE(p.spent_nanos, 0) AS spent FROM connections c "
               "LEFT JOIN periods p ON p.connection_id = c.connection_id "
               f"AND p.period = :period WHERE {where} "
               "ORDER BY spent DESC, c.app_user_id LIMIT :n OFFSET :o) c "
               "ORDER BY c.spent DESC, c.app_user_id")
        held = self._meter.held  # type: ignore[attr-defined]

        def run(db: sqlite3.Connection) -> Page[ConnectionSpend]:
            rows = db.execute(sql, params).fetchall()
            total = db.execute(f"SELECT COUNT(*) FROM connections c WHERE {where}",
                               params).fetchone()[0]
            return Page([ConnectionSpend(Connection(*r[:9]), r[9], max(r[10], held(r[0], period)))
                         for r in rows], total)
        return await self._report(run)

    async def grants_page(self, app_id: str, *, now: float, search: str = "",
                          state: str | None = None, offset: int = 0,
                          limit: int = 50) -> Page[GrantRow]:
        where = ("g.app_id = :app AND (:q = '' OR instr(COALESCE(c.app_user_id, ''), :q) > 0) "
                 f"AND (:state IS NULL OR {grant_state_sql(':now')} = :state)")
        params = {"app": app_id, "q": search, "state": state, "now": now,
                  "n": min(limit, MAX_PAGE), "o": max(0, offset)}
        join = "FROM grants g LEFT JOIN connections c ON c.connection_id = g.connection_id "

        def run(db: sqlite3.Connection) -> Page[GrantRow]:
            rows = db.execute(f"SELECT {_G_COLS}, c.app_user_id {join} WHERE {where} "
                              "ORDER BY g.created_at DESC, g.grant_id DESC LIMIT :n OFFSET :o",
                              params).fetchall()
            total = db.execute(f"SELECT COUNT(*) {join} WHERE {where}", params).fetchone()[0]
            return Page([GrantRow(Grant(*r[:12]), r[12]) for r in rows], total)
        return await self._report(run)

    async def request_log(self, f: LogFilter, *, limit: int = 50) -> list[LogLine]:
        """Calls of an app (or one of its users), newest first, one page."""
        sql = (f"SELECT {LOG_COLS} FROM usage u LEFT JOIN connections c "
               "ON c.connection_id = u.connection_id WHERE u.app_id = :app")
        params: dict[str, Any] = {
            "app": f.app_id, "user": f.app_user_id, "model": f.model, "status": f.status,
            "since": f.since, "until": f.until, "n": min(limit, MAX_PAGE),
            "t": f.before[0] if f.before else None, "id": f.before[1] if f.before else None}
        if f.app_user_id is not None:  # probes usage_by_connection
            sql += (" AND u.connection_id = (SELECT connection_id FROM connections "
                    "WHERE app_id = :app AND app_user_id = :user)")
        for clause, value in ((" AND u.model = :model", f.model),
                              (" AND u.status = :status", f.status),
                              (" AND u.created_at >= :since", f.since),
                              (" AND u.created_at < :until", f.until),
                              (" AND (u.created_at, u.usage_id) < (:t, :id)", f.before)):
            if value is not None:
                sql += clause
        sql += " ORDER BY u.created_at DESC, u.usage_id DESC LIMIT :n"
        return await self._report(
            lambda db: [log_line(r) for r in db.execute(sql, params).fetchall()])

    async def daily_calls(self, app_id: str | None, since: float, until: float, *,
                          app_user_id: str | None = None) -> list[DayCalls]:
        """Per UTC day in [since, until): calls, errors, tokens and total latency, of one
        app (or one user of it), or of every app not deleted when ``app_id`` is None."""
        sql = ("SELECT date(u.created_at, 'unixepoch'), COUNT(*), "
               "SUM(CASE WHEN u.status = 'ok' THEN 0 ELSE 1 END), SUM(u.prompt_tokens), "
               "SUM(u.completion_tokens), SUM(u.latency_ms) FROM usage u "
               "WHERE u.created_at >= :since AND u.created_at < :until")
        sql += " AND u.app_id = :app" if app_id is not None else \
            " AND u.app_id IN (SELECT app_id FROM apps WHERE deleted_at IS NULL)"
        if app_user_id is not None:
            sql += (" AND u.connection_id = (SELECT connection_id FROM connections "
                    "WHERE app_id = :app AND app_user_id = :user)")
        sql += " GROUP BY 1 ORDER BY 1"
        params = {"app": app_id, "since": since, "until": until, "user": app_user_id}
        return await self._report(
            lambda db: [DayCalls(*r) for r in db.execute(sql, params).fetchall()])
