"""Periods and the ConnectionStatus a user or app sees; pure functions.

The budget period is the calendar month in UTC (``"2026-11"``). Usage lives in
per-period aggregates, so spend "resets" at the month boundary simply because
a new period key starts at zero: no reset job exists.

**A call belongs to the period in which it was admitted**, everywhere: its
hold counts only against that period's cap, its ledger row carries that period
and is dated at its admission (``created_at``), so a call admitted on Oct 31 at
23:59:59 and settled on Nov 1 is October's in the user's status, the usage
export and the console alike. Every reader derives a month from a time with
``period_of`` and a time range from a month with ``period_bounds``.
"""

from __future__ import annotations

import calendar
import time
from typing import Any

from .money import nanos_to_json
from .store import Ledger
from .store.records import Connection


def period_of(now: float) -> str:
    """The period of a moment: of a call, the moment it was admitted."""
    t = time.gmtime(now)
    return f"{t.tm_year:04d}-{t.tm_mon:02d}"


def period_bounds(period: str) -> tuple[float, float]:
    """[start, end) of a period as timestamps: ``"2026-10"`` → Oct 1 00:00 UTC, Nov 1 00:00 UTC."""
    year, month = int(period[:4]), int(period[5:7])
    nyear, nmonth = (year + 1, 1) if month == 12 else (year, month + 1)
    return (float(calendar.timegm((year, month, 1, 0, 0, 0))),
            float(calendar.timegm((nyear, nmonth, 1, 0, 0, 0))))


def status_body(connection: Connection | None, spent_nanos: int,
                held_nanos: int = 0) -> dict[str, Any]:
    """ConnectionStatus: the reference shape, plus ``heldUsd``.

    Not connected (never, revoked, or funding rejected): ``limits`` null,
    ``remainingUsd`` 0 (nothing can be spent; null would mean unlimited).
    ``remainingUsd`` stays the reference's ``limits − usage``; ``heldUsd`` (a
    wattgate extension, never null) is what this month's calls in flight hold
    at their worst case, so a new call has ``remainingUsd − heldUsd`` to fit in.
    A revoked connection's calls still running hold too: they finish and bill.
    """
    held = nanos_to_json(held_nanos)
    if connection is None or not connection.connected:
        return {"connected": False, "limits": None,
                "usage": {"monthlyUsd": nanos_to_json(spent_nanos)}, "remainingUsd": 0,
                "heldUsd": held}
    cap = connection.cap_nanos
    return {
        "connected": True,
        "limits": {"monthlyUsd": None if cap is None else nanos_to_json(cap)},
        "usage": {"monthlyUsd": nanos_to_json(spent_nanos)},
        "remainingUsd": None if cap is None else nanos_to_json(max(0, cap - spent_nanos)),
        "heldUsd": held,
    }


async def status_of(store: Ledger, connection: Connection | None, now: float) -> dict[str, Any]:
    """A connection's ConnectionStatus for the period of ``now``, read from the store."""
    if connection is None:
        return status_body(None, 0)
    period = period_of(now)
    return status_body(connection, await store.period_spent(connection.connection_id, period),
                       await store.held(connection.connection_id, period))
