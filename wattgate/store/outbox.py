"""The webhook outbox: events written in the transaction of the change they tell.

Both backends' SQL for it lives here, written once with ``?`` placeholders
(``pg`` numbers them for asyncpg): what a change writes (``emit_*``; nothing at
all when the app has no endpoint: the ``INSERT … SELECT`` finds no app row),
what a SQLite settle writes when it crosses 80 % or 100 % of the cap or uses a
grant up (``sqlite_after_settle``, only then), and what the deliverer claims and
records. PostgreSQL's settle writes the same events, same dedupe keys, same
bodies byte for byte, inside its group-committed ``wattgate_settle`` (migration 4,
``pg_migrations.m004_webhooks``): no round trip more. The writes off the hot path that
move the same aggregates (the hold sweep's estimate, reconciliation's final figure)
tell the same events in their own transaction: ``sqlite_after_change`` and
``pg_after_change`` (the latter through migration 4's SQL functions).

An event of a stream (a connection ``c<id>``, a grant with no connection
``g<id>``) is claimed only when no earlier event of its stream is still pending:
delivered in order per connection. A claim leases the event (``next_at`` moved
past the attempt's timeout) in the claim's own transaction, so two processes
never send it at once, and a process killed mid-attempt leaves it to be tried
again once the lease ends. The rules (which thresholds, when a grant is used
up, the body) are ``wattgate.webhooks``'; this module only stores them.
"""

from __future__ import annotations

import re
import sqlite3
from typing import Any, Mapping

from .. import webhooks
from .records import ACTIVE, EVENT_COLS, NEEDS_RECONNECT, REVOKED, Connection, WebhookEvent

_EMIT = ("INSERT INTO webhook_events (public_id, app_id, stream, type, dedupe, body, "
         "created_at, next_at, since) SELECT ?, app_id, ?, ?, ?, ?, ?, ?, ? FROM apps "
         "WHERE app_id = ? AND webhook_url IS NOT NULL AND deleted_at IS NULL "
         "ON CONFLICT DO NOTHING")
# The head of each stream that is due: no earlier event of its stream still pending.
DUE = (f"SELECT {EVENT_COLS} FROM webhook_events e WHERE status = 'pending' AND next_at <= ? "
       "AND NOT EXISTS (SELECT 1 FROM webhook_events p WHERE p.stream = e.stream "
       "AND p.status = 'pending' AND p.event_id < e.event_id) ORDER BY event_id LIMIT ?")
LEASE = "UPDATE webhook_events SET next_at = ?, attempts = attempts + 1 WHERE event_id = ?"
RESULT = ("UPDATE webhook_events SET status = ?, next_at = ?, last_code = ?, last_error = ?, "
          "delivered_at = ? WHERE event_id = ? AND status = 'pending'")
RECENT = (f"SELECT {EVENT_COLS} FROM webhook_events WHERE app_id = ? "
          "ORDER BY event_id DESC LIMIT ?")
RESEND = ("UPDATE webhook_events SET status = 'pending', next_at = ?, since = ? "
          "WHERE app_id = ? AND public_id = ? AND status <> 'pending'")
PRUNE = "DELETE FROM webhook_events WHERE status <> 'pending' AND created_at < ?"
SET_WEBHOOK = ("UPDATE apps SET webhook_url = ?, webhook_secret = ? WHERE app_id = ? "
               "AND deleted_at IS NULL")
GET_WEBHOOK = ("SELECT app_id, webhook_url, webhook_secret FROM apps WHERE app_id = ? "
               "AND deleted_at IS NULL AND webhook_url IS NOT NULL")
# Every app's sealed signing secret (deleted apps' too): ``wattgate keys rotate`` re-seals them.
SEALED_SECRETS = "SELECT app_id, webhook_secret FROM apps WHERE webhook_secret IS NOT NULL"
_USER = "SELECT app_id, app_user_id FROM connections WHERE connection_id = ?"
_SPENT = "SELECT spent_nanos FROM periods WHERE connection_id = ? AND period = ?"
_CAP = "SELECT cap_nanos FROM connections WHERE connection_id = ?"
_GRANT = ("SELECT used, requests, max_nanos, spent_nanos, held_nanos, connection_id, app_id "
          "FROM grants WHERE grant_id = ?")


def sealed_column(table: str) -> tuple[str, str, str]:
    """(table, id column, sealed column) of ``all_sealed_keys``' table names (SQL
    identifiers from this fixed list only)."""
    columns = {"connections": ("connections", "connection_id", "sealed_key"),
               "grants": ("grants", "grant_id", "sealed_key"),
               "apps": ("apps", "app_id", "webhook_secret")}
    if table not in columns:
        raise ValueError(f"nothing sealed in {table}")
    return columns[table]


def pg(sql: str) -> str:
    """``?`` placeholders as asyncpg's ``$1, $2, …`` (none of this module's SQL quotes a ``?``)."""
    count = iter(range(1, sql.count("?") + 1))
    return re.sub(r"\?", lambda _: f"${next(count)}", sql)


def event(row: Any) -> WebhookEvent:
    return WebhookEvent(*row)


def stream_of(connection_id: int | None, grant_id: int | None = None) -> str:
    return f"c{connection_id}" if connection_id is not None else f"g{grant_id}"


def _params(app_id: str, stream: str, event_type: str, data: Mapping[str, Any], now: float,
            dedupe: str | None) -> tuple[Any, ...]:
    event_id = webhooks.new_event_id()
    body = webhooks.body_of(event_id, event_type, now, {"appId": app_id, **data})
    return (event_id, stream, event_type, dedupe, body, now, now, now, app_id)


def connection_data(app_user_id: str, cap_nanos: int | None, **extra: Any) -> dict[str, Any]:
    return {"appUserId": app_user_id, "capUsd": webhooks.usd(cap_nanos), **extra}


def connection_events(before: Connection | None, after: Connection | None
                      ) -> list[tuple[str, dict[str, Any]]]:
    """(type, data) of what a connection's change from ``before`` to ``after`` tells."""
    if after is None:
        return []
    was = before.state if before is not None else None
    data = connection_data(after.app_user_id, after.cap_nanos)
    if after.state == ACTIVE and was != ACTIVE:
        return [(webhooks.CONNECTION_CREATED, data)]
    if after.state == ACTIVE and before is not None and before.cap_nanos != after.cap_nanos:
        return [(webhooks.CONNECTION_CAP_CHANGED,
                 {**data, "previousCapUsd": webhooks.usd(before.cap_nanos)})]
    if after.state == REVOKED and was not in (None, REVOKED):
        return [(webhooks.CONNECTION_REVOKED, data)]
    if after.state == NEEDS_RECONNECT and was == ACTIVE:
        return [(webhooks.FUNDING_INVALID, data)]
    return []


def _threshold(connection: Any, connection_id: int, period: str, cap: int, spent: int,
               percent: int, now: float) -> tuple[Any, ...]:
    data = {"appUserId": connection[1], "period": period, "percent": percent,
            "capUsd": webhooks.usd(cap), "spentUsd": webhooks.usd(spent)}
    return _params(connection[0], stream_of(connection_id), webhooks.BUDGET_THRESHOLD, data,
                   now, f"threshold:{connection_id}:{period}:{percent}")


def _exhausted(grant_id: int, g: Any, user: Any, now: float) -> tuple[Any, ...] | None:
    used, requests, max_nanos, spent = g[0], g[1], g[2], g[3]
    if not webhooks.grant_exhausted(used, requests, max_nanos, spent, g[4]):
        return None
    data = {"appUserId": user[1] if user else None, "grantId": grant_id,
            "requests": requests, "used": used, "maxUsd": webhooks.usd(max_nanos),
            "spentUsd": webhooks.usd(spent)}
    return _params(g[6], stream_of(g[5], grant_id), webhooks.GRANT_EXHAUSTED, data, now,
                   f"grant:{grant_id}")


# ---- SQLite (inside the writer's transaction) ------------------------------------------
def emit_sqlite(db: sqlite3.Connection, app_id: str, stream: str, event_type: str,
                data: Mapping[str, Any], now: float, dedupe: str | None = None) -> None:
    db.execute(_EMIT, _params(app_id, stream, event_type, data, now, dedupe))


def sqlite_connection_changed(db: sqlite3.Connection, before: Connection | None,
                              after: Connection | None, now: float) -> None:
    for event_type, data in connection_events(before, after):
        assert after is not None
        emit_sqlite(db, after.app_id, stream_of(after.connection_id), event_type, data, now)


def sqlite_after_settle(db: sqlite3.Connection, connection_id: int | None,
                        grant_id: int | None, period: str, cap: int | None,
                        spent_after: int | None, moved: int, now: float) -> None:
    """What a settle that moved spend by ``moved`` must tell, only if it crossed a line."""
    if connection_id is not None and cap is not None and moved > 0:
        if spent_after is None:
            row = db.execute(_SPENT, (connection_id, period)).fetchone()
            spent_after = row[0] if row else 0
        crossed = webhooks.crossed_thresholds(cap, spent_after - moved, spent_after)
        if crossed:
            user = db.execute(_USER, (connection_id,)).fetchone()
            for percent in crossed:
                db.execute(_EMIT, _threshold(user, connection_id, period, cap, spent_after,
                                             percent, now))
    if grant_id is not None:
        g = db.execute(_GRANT, (grant_id,)).fetchone()
        user = db.execute(_USER, (g[5],)).fetchone() if g[5] is not None else None
        params = _exhausted(grant_id, g, user, now)
        if params is not None:
            db.execute(_EMIT, params)


def sqlite_after_change(db: sqlite3.Connection, connection_id: int | None,
                        grant_id: int | None, period: str, moved: int, now: float,
                        spent_after: int | None = None) -> None:
    """``sqlite_after_settle`` for the writes off the hot path (the sweep's estimate,
    reconciliation's final figure, a grant's call released): the cap read here."""
    cap = None
    if connection_id is not None and moved > 0:
        row = db.execute(_CAP, (connection_id,)).fetchone()
        cap = row[0] if row else None
    sqlite_after_settle(db, connection_id, grant_id, period, cap, spent_after, moved, now)


# ---- PostgreSQL (inside the caller's transaction) ---------------------------------------
async def emit_pg(con: Any, app_id: str, stream: str, event_type: str,
                  data: Mapping[str, Any], now: float, dedupe: str | None = None) -> None:
    await con.execute(pg(_EMIT), *_params(app_id, stream, event_type, data, now, dedupe))


async def pg_connection_changed(con: Any, before: Connection | None,
                                after: Connection | None, now: float) -> None:
    for event_type, data in connection_events(before, after):
        assert after is not None
        await emit_pg(con, after.app_id, stream_of(after.connection_id), event_type, data, now)



async def pg_after_change(con: Any, connection_id: int | None, grant_id: int | None,
                          period: str, moved: int, spent_after: int | None,
                          now: float) -> None:
    """What a change off the hot path (the sweep's estimate, reconciliation's final
    figure, a grant's call released) must tell: the settle's events, written by the
    same SQL functions (``wattgate_thresholds``, ``wattgate_grant_exhausted``, migration
    4), so the same dedupe keys and bodies; nothing when no line was crossed."""
    if connection_id is not None and moved > 0 and spent_after is not None:
        cap = await con.fetchval(pg(_CAP), connection_id)
        if webhooks.crossed_thresholds(cap, spent_after - moved, spent_after):
            await con.execute("SELECT wattgate_thresholds($1, $2, $3, $4, $5, $6)",
                              connection_id, period, cap, spent_after - moved, spent_after,
                              now)
    if grant_id is not None:
        g = await con.fetchrow(pg(_GRANT), grant_id)
        if g is not None and webhooks.grant_exhausted(g[0], g[1], g[2], g[3], g[4]):
            await con.execute("SELECT wattgate_grant_exhausted($1, $2)", grant_id, now)
