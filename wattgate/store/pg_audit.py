"""The ledger audit of ``wattgate ledger check`` on PostgreSQL: ``audit.py``'s checks in its SQL.

Each check and each sentence is the SQLite audit's (see ``store/audit.py`` for
what is verified and why), read over one connection. One difference: holds
live in the database here from admission, so a connection's hold with no
generation id is a call in flight, not a finding; every hold is a row, so
this audit sees every process's calls in flight (and flags any older than
the hold TTL).
"""

from __future__ import annotations

from typing import Any

from .audit import GRANTS_SQL, grant_findings

# The UTC year-month of an epoch timestamp column.
_MONTH = "to_char(to_timestamp({col}) AT TIME ZONE 'UTC', 'YYYY-MM')"


async def audit(con: Any, *, now: float, hold_ttl: float) -> list[str]:
    """Every problem found, as sentences (empty: the ledger is consistent)."""
    problems: list[str] = []
    for check in (_periods, _dates, _caps, _grants, _usage_refs, _holds, _other_refs):
        problems += await check(con, now, hold_ttl)
    return problems


async def _periods(con: Any, now: float, ttl: float) -> list[str]:
    out = []
    for cid, period, spent, rows in await con.fetch(
            "SELECT p.connection_id, p.period, p.spent_nanos, "
            "(SELECT COALESCE(SUM(cost_nanos), 0) FROM usage u "
            " WHERE u.connection_id = p.connection_id AND u.period = p.period) FROM periods p"):
        if spent != rows:
            out.append(f"connection {cid} period {period}: aggregate {spent} nano-USD but its "
                       f"rows sum to {rows}")
    for cid, period, rows in await con.fetch(
            "SELECT connection_id, period, SUM(cost_nanos) FROM usage u "
            "WHERE connection_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM periods p "
            "WHERE p.connection_id = u.connection_id AND p.period = u.period) "
            "GROUP BY connection_id, period"):
        if rows:
            out.append(f"connection {cid} period {period}: rows sum to {rows} nano-USD but no "
                       "aggregate exists")
    return out


async def _dates(con: Any, now: float, ttl: float) -> list[str]:
    return [f"usage row {usage_id} ({gen}) of period {period} is dated outside it ({created})"
            for usage_id, gen, period, created in await con.fetch(
                "SELECT usage_id, generation_id, period, created_at FROM usage "
                f"WHERE {_MONTH.format(col='created_at')} != period")]


async def _caps(con: Any, now: float, ttl: float) -> list[str]:
    out = []
    for cid, period, spent, cap, before in await con.fetch(
            "SELECT p.connection_id, p.period, p.spent_nanos, c.cap_nanos, "
            "(SELECT COALESCE(SUM(cost_nanos), 0) FROM usage u WHERE u.connection_id = "
            " p.connection_id AND u.period = p.period AND u.created_at <= c.updated_at + "
            " CASE WHEN c.updated_at > c.created_at THEN $1::double precision ELSE 0 END) "
            "FROM periods p JOIN connections c ON c.connection_id = p.connection_id "
            "WHERE c.cap_nanos IS NOT NULL AND p.spent_nanos > c.cap_nanos", ttl):
        if spent > max(cap, before):
            out.append(f"connection {cid} period {period}: spent {spent} nano-USD on a cap of "
                       f"{cap}")
    return out


async def _grants(con: Any, now: float, ttl: float) -> list[str]:
    return grant_findings(await con.fetch(GRANTS_SQL))


def _missing(table: str) -> str:
    """SQL naming what a row of ``table`` aliased ``r`` points at that does not exist."""
    return (
        "CASE WHEN r.app_id IS NOT NULL AND NOT EXISTS "
        "  (SELECT 1 FROM apps a WHERE a.app_id = r.app_id) "
        "  THEN 'app ' || r.app_id || ' does not exist' "
        "WHEN r.connection_id IS NOT NULL AND c.connection_id IS NULL "
        "  THEN 'connection ' || r.connection_id || ' does not exist' "
        "WHEN r.connection_id IS NOT NULL AND c.app_id != r.app_id "
        "  THEN 'connection ' || r.connection_id || ' belongs to app ' || c.app_id "
        "WHEN r.grant_id IS NOT NULL AND g.grant_id IS NULL "
        "  THEN 'grant ' || r.grant_id || ' does not exist' "
        "WHEN r.grant_id IS NOT NULL AND g.app_id != r.app_id "
        "  THEN 'grant ' || r.grant_id || ' belongs to app ' || g.app_id "
        "WHEN r.grant_id IS NOT NULL AND r.connection_id IS DISTINCT FROM g.connection_id "
        "  THEN 'grant ' || r.grant_id || ' is not funded by connection ' || "
        "       COALESCE(r.connection_id::text, 'none') END "
        f"FROM {table} r LEFT JOIN connections c ON c.connection_id = r.connection_id "
        "LEFT JOIN grants g ON g.grant_id = r.grant_id")


async def _usage_refs(con: Any, now: float, ttl: float) -> list[str]:
    return [f"usage row {usage_id} ({gen}): {why}"
            for usage_id, gen, why in await con.fetch(
                f"SELECT r.usage_id, r.generation_id, {_missing('usage')}")
            if why is not None]


async def _holds(con: Any, now: float, ttl: float) -> list[str]:
    out = [f"hold {hold_id}: {why}"
           for hold_id, why in await con.fetch(f"SELECT r.hold_id, {_missing('holds')}")
           if why is not None]
    for hold_id, amount, created, gen, settled in await con.fetch(
            "SELECT h.hold_id, h.amount_nanos, h.created_at, h.generation_id, "
            "EXISTS (SELECT 1 FROM usage u WHERE u.generation_id = h.generation_id) FROM holds h"):
        if hold_id <= 0:
            out.append(f"hold {hold_id}: not an id of the ledger's sequence")
        if amount < 0:
            out.append(f"hold {hold_id}: amount {amount} nano-USD is not a call's worst case")
        if settled:
            out.append(f"hold {hold_id}: its call {gen} was already settled")
        if created < now - ttl:
            out.append(f"hold {hold_id} is {int(now - created)} s old (bound {int(ttl)} s)")
    return out


async def _other_refs(con: Any, now: float, ttl: float) -> list[str]:
    out = []
    for cid, period in await con.fetch(
            "SELECT p.connection_id, p.period FROM periods p WHERE NOT EXISTS "
            "(SELECT 1 FROM connections c WHERE c.connection_id = p.connection_id)"):
        out.append(f"connection {cid} period {period}: connection {cid} does not exist")
    for gid, cid, app in await con.fetch(
            "SELECT g.grant_id, g.connection_id, c.app_id FROM grants g LEFT JOIN connections c "
            "ON c.connection_id = g.connection_id WHERE g.connection_id IS NOT NULL "
            "AND (c.connection_id IS NULL OR c.app_id != g.app_id)"):
        out.append(f"grant {gid}: funding connection {cid} "
                   + ("does not exist" if app is None else f"belongs to app {app}"))
    for cid, app in await con.fetch(
            "SELECT c.connection_id, c.app_id FROM connections c JOIN apps a "
            "ON a.app_id = c.app_id WHERE a.deleted_at IS NOT NULL AND c.state = 'active'"):
        out.append(f"connection {cid}: app {app} was deleted but it can still spend")
    return out
