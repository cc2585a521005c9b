"""The ledger audit behind ``wattgate ledger check``: every way the ledger disagrees with itself.

Read-only SQL over one connection; each finding is a sentence that names the
row (``usage row 12 (gen-…)``, ``hold 7``, ``grant 3``, ``connection 5 period
2026-11``) so an operator can look at it. What it verifies:

- money stays within its bounds: a period's spend within its connection's cap
  (the cap in force: a cap lowered below what was already spent is not
  passed by that spend), a grant's spend within its ``maxUsd``, its used
  requests within its requests;
- every call is dated in the period it counts in (its admission's month);
- every aggregate equals its rows: a period's spend and the usage rows of that
  connection and month; a grant's spend, held amount and used count and its
  usage rows and holds;
- every row points at something that exists, and at the same app: usage rows
  and holds at their app, connection and grant; periods at their connection;
  grants at their funding connection; a deleted app's connections hold no key;
- every hold has a call behind it: a connection's hold row is only written
  naming its generation, a settled generation has no hold left, no hold
  outlives ``metering.hold_ttl_seconds``, and no amount is negative.

Holds of calls in flight that the serving gateway keeps in memory are not
rows, so this audit, run from another process, never sees them.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from typing import Any

from .records import METERED


def audit(db: sqlite3.Connection, *, now: float, hold_ttl: float) -> list[str]:
    """Every problem found, as sentences (empty: the ledger is consistent)."""
    problems: list[str] = []
    for check in (_periods, _dates, _caps, _grants, _usage_refs, _holds, _other_refs):
        problems += check(db, now, hold_ttl)
    return problems


def _periods(db: sqlite3.Connection, now: float, ttl: float) -> list[str]:
    out = []
    for cid, period, spent, rows in db.execute(
            "SELECT p.connection_id, p.period, p.spent_nanos, "
            "(SELECT COALESCE(SUM(cost_nanos), 0) FROM usage u "
            " WHERE u.connection_id = p.connection_id AND u.period = p.period) FROM periods p"):
        if spent != rows:
            out.append(f"connection {cid} period {period}: aggregate {spent} nano-USD but its "
                       f"rows sum to {rows}")
    for cid, period, rows in db.execute(
            "SELECT connection_id, period, SUM(cost_nanos) FROM usage u "
            "WHERE connection_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM periods p "
            "WHERE p.connection_id = u.connection_id AND p.period = u.period) "
            "GROUP BY connection_id, period"):
        if rows:
            out.append(f"connection {cid} period {period}: rows sum to {rows} nano-USD but no "
                       "aggregate exists")
    return out


def _dates(db: sqlite3.Connection, now: float, ttl: float) -> list[str]:
    # A call is the period's it was admitted in, and its row is dated at its admission:
    # every reader that picks a month by date (export, console) relies on it.
    return [f"usage row {usage_id} ({gen}) of period {period} is dated outside it ({created})"
            for usage_id, gen, period, created in db.execute(
                "SELECT usage_id, generation_id, period, created_at FROM usage "
                "WHERE strftime('%Y-%m', created_at, 'unixepoch') != period")]


def _caps(db: sqlite3.Connection, now: float, ttl: float) -> list[str]:
    # Admission holds each call's worst case, so a month's spend stays within the cap
    # in force. The only cap history kept is the connection's last change: spend
    # recorded by then may stand above a cap lowered then, and so may the calls
    # admitted before it, which settle (or are swept) within the hold TTL.
    out = []
    for cid, period, spent, cap, before in db.execute(
            "SELECT p.connection_id, p.period, p.spent_nanos, c.cap_nanos, "
            "(SELECT COALESCE(SUM(cost_nanos), 0) FROM usage u WHERE u.connection_id = "
            " p.connection_id AND u.period = p.period AND u.created_at <= c.updated_at + "
            " CASE WHEN c.updated_at > c.created_at THEN :ttl ELSE 0 END) "
            "FROM periods p JOIN connections c ON c.connection_id = p.connection_id "
            "WHERE c.cap_nanos IS NOT NULL AND p.spent_nanos > c.cap_nanos", {"ttl": ttl}):
        if spent > max(cap, before):
            out.append(f"connection {cid} period {period}: spent {spent} nano-USD on a cap of "
                       f"{cap}")
    return out


# Each grant with what its rows say (the same SQL on both engines).
GRANTS_SQL = (
    "SELECT g.grant_id, g.requests, g.used, g.max_nanos, g.spent_nanos, g.held_nanos, "
    "(SELECT COALESCE(SUM(cost_nanos), 0) FROM usage u WHERE u.grant_id = g.grant_id), "
    # A refused call's $0 row is no used request (its request was given back).
    f"(SELECT COUNT(*) FROM usage u WHERE u.grant_id = g.grant_id AND u.{METERED}), "
    "(SELECT COALESCE(SUM(amount_nanos), 0) FROM holds h WHERE h.grant_id = g.grant_id), "
    "(SELECT COUNT(*) FROM holds h WHERE h.grant_id = g.grant_id) FROM grants g")


def grant_findings(rows: Iterable[Sequence[Any]]) -> list[str]:
    """The sentences for ``GRANTS_SQL``'s rows that disagree with themselves."""
    out = []
    for gid, requests, used, max_nanos, spent, held, costs, calls, holds, holding in rows:
        if spent != costs or held != holds:
            out.append(f"grant {gid}: spent {spent}/held {held} but rows sum to {costs} and "
                       f"holds to {holds}")
        if used != calls + holding:
            out.append(f"grant {gid}: {used} requests used but {calls} calls recorded and "
                       f"{holding} in flight")
        if calls + holding > requests:
            out.append(f"grant {gid}: {calls + holding} calls on {requests} requests")
        if max_nanos is not None and costs > max_nanos:
            out.append(f"grant {gid}: spent {costs} nano-USD on a cap of {max_nanos}")
    return out


def _grants(db: sqlite3.Connection, now: float, ttl: float) -> list[str]:
    return grant_findings(db.execute(GRANTS_SQL))


def _missing(table: str) -> str:
    """SQL naming what a row of ``table`` aliased ``r`` points at that does not exist."""
    return (
        "CASE WHEN NOT EXISTS (SELECT 1 FROM apps a WHERE a.app_id = r.app_id) "
        "  THEN 'app ' || r.app_id || ' does not exist' "
        "WHEN r.connection_id IS NOT NULL AND c.connection_id IS NULL "
        "  THEN 'connection ' || r.connection_id || ' does not exist' "
        "WHEN r.connection_id IS NOT NULL AND c.app_id != r.app_id "
        "  THEN 'connection ' || r.connection_id || ' belongs to app ' || c.app_id "
        "WHEN r.grant_id IS NOT NULL AND g.grant_id IS NULL "
        "  THEN 'grant ' || r.grant_id || ' does not exist' "
        "WHEN r.grant_id IS NOT NULL AND g.app_id != r.app_id "
        "  THEN 'grant ' || r.grant_id || ' belongs to app ' || g.app_id "
        "WHEN r.grant_id IS NOT NULL AND r.connection_id IS NOT g.connection_id "
        "  THEN 'grant ' || r.grant_id || ' is not funded by connection ' || "
        "       COALESCE(r.connection_id, 'none') END "
        f"FROM {table} r LEFT JOIN connections c ON c.connection_id = r.connection_id "
        "LEFT JOIN grants g ON g.grant_id = r.grant_id")


def _usage_refs(db: sqlite3.Connection, now: float, ttl: float) -> list[str]:
    out = []
    for usage_id, gen, why in db.execute(
            f"SELECT r.usage_id, r.generation_id, {_missing('usage')}"):
        if why is not None:
            out.append(f"usage row {usage_id} ({gen}): {why}")
    return out


def _holds(db: sqlite3.Connection, now: float, ttl: float) -> list[str]:
    out = []
    for hold_id, why in db.execute(f"SELECT r.hold_id, {_missing('holds')}"):
        if why is not None:
            out.append(f"hold {hold_id}: {why}")
    for hold_id, grant_id, gen, amount, created, settled in db.execute(
            "SELECT h.hold_id, h.grant_id, h.generation_id, h.amount_nanos, h.created_at, "
            "EXISTS (SELECT 1 FROM usage u WHERE u.generation_id = h.generation_id) FROM holds h"):
        if hold_id <= 0:
            out.append(f"hold {hold_id}: not an id of the ledger's sequence")
        if amount < 0:
            out.append(f"hold {hold_id}: amount {amount} nano-USD is not a call's worst case")
        if gen is None and grant_id is None:
            out.append(f"hold {hold_id}: no call behind it (a connection's hold is written "
                       "only with its generation id)")
        if settled:
            out.append(f"hold {hold_id}: its call {gen} was already settled")
        if created < now - ttl:
            out.append(f"hold {hold_id} is {int(now - created)} s old (bound {int(ttl)} s)")
    return out


def _other_refs(db: sqlite3.Connection, now: float, ttl: float) -> list[str]:
    out = []
    for cid, period in db.execute(
            "SELECT p.connection_id, p.period FROM periods p WHERE NOT EXISTS "
            "(SELECT 1 FROM connections c WHERE c.connection_id = p.connection_id)"):
        out.append(f"connection {cid} period {period}: connection {cid} does not exist")
    for gid, cid, app in db.execute(
            "SELECT g.grant_id, g.connection_id, c.app_id FROM grants g LEFT JOIN connections c "
            "ON c.connection_id = g.connection_id WHERE g.connection_id IS NOT NULL "
            "AND (c.connection_id IS NULL OR c.app_id != g.app_id)"):
        out.append(f"grant {gid}: funding connection {cid} "
                   + ("does not exist" if app is None else f"belongs to app {app}"))
    for cid, app in db.execute(
            "SELECT c.connection_id, c.app_id FROM connections c JOIN apps a "
            "ON a.app_id = c.app_id WHERE a.deleted_at IS NOT NULL AND c.state = 'active'"):
        # A revoked connection keeps its key (unusable) until the reconciler's rule
        # erases it: only an active one could spend.
        out.append(f"connection {cid}: app {app} was deleted but it can still spend")
    return out
