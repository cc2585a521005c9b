"""Periods and the ConnectionStatus a user or app sees; pure functions.

The budget period is the calendar month in UTC (``"2026-11"``). Usage lives in
per-period aggregates, so spend "resets" at the month boundary simply because
a new period key starts at zero: no reset job exists.
"""

from __future__ import annotations

import time
from typing import Any

from .money import nanos_to_json
from .store.records import Connection


def period_of(now: float) -> str:
    t = time.gmtime(now)
    return f"{t.tm_year:04d}-{t.tm_mon:02d}"


def status_body(connection: Connection | None, spent_nanos: int) -> dict[str, Any]:
    """ConnectionStatus, exactly the reference shape.

    Not connected (never, revoked, or funding rejected): ``limits`` null,
    ``remainingUsd`` 0 (nothing can be spent; null would mean unlimited).
    """
    if connection is None or not connection.connected:
        return {"connected": False, "limits": None,
                "usage": {"monthlyUsd": nanos_to_json(spent_nanos)}, "remainingUsd": 0}
    cap = connection.cap_nanos
    return {
        "connected": True,
        "limits": {"monthlyUsd": None if cap is None else nanos_to_json(cap)},
        "usage": {"monthlyUsd": nanos_to_json(spent_nanos)},
        "remainingUsd": None if cap is None else nanos_to_json(max(0, cap - spent_nanos)),
    }
