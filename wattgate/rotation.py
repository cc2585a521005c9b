"""Rotating an app's secret key, with an overlap so a deploy can roll without downtime.

A rotation makes a new secret the app's current one at once. With an overlap
the replaced secret (and the session tokens it minted) keeps working until a
deadline, then stops; ``retire`` ends it sooner. With none, for a leaked
secret, the replaced one stops at once. An app holds at most two secrets: a
rotation during an overlap drops the oldest. The deadline is enforced where a
secret authenticates (``Gateway.app_for_secret``, ``Gateway.session_for_token``),
against the gateway's clock, on every request.

Used by the CLI (``wattgate apps rotate-secret`` / ``retire-secret``) and the
console; no web layer here.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import datetime, timezone

from .credentials import mint_credentials
from .gateway import Gateway

DEFAULT_OVERLAP = "24h"  # the console's preselected choice (the CLI's default is 0: at once)
MAX_OVERLAP = 30 * 86400.0
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"^\s*(\d{1,7})\s*([smhd]?)\s*$")


@dataclass(frozen=True)
class Rotation:
    secret_key: str  # shown once
    previous_until: float | None  # None: the replaced secret stopped at once


def parse_overlap(text: str) -> float:
    """``"24h"``, ``"90m"``, ``"7d"``, ``"30s"``, ``"0"`` (a bare number: seconds) →
    seconds; ValueError naming the accepted forms otherwise."""
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(f"overlap {text!r} is not a duration: use e.g. 24h, 90m, 7d or 0 "
                         "(the old secret stops at once)")
    seconds = float(int(match.group(1)) * _UNITS[match.group(2) or "s"])
    if seconds > MAX_OVERLAP:
        raise ValueError(f"overlap {text!r} is longer than the 30 days allowed")
    return seconds


def utc(at: float) -> str:
    """A deadline as operators read it: ``2027-01-15 08:00:00 UTC``."""
    return datetime.fromtimestamp(at, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def iso(at: float) -> str:
    """A deadline for machines (``--json``): ``2027-01-15T08:00:00Z``."""
    return datetime.fromtimestamp(at, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def previous_live_until(app_previous: str | None, until: float | None, now: float) -> float | None:
    """The deadline of an app's previous secret while it still works, else None."""
    if app_previous is None or until is None or now >= until:
        return None
    return until


async def rotate(gw: Gateway, app_id: str, overlap: float) -> Rotation | None:
    """Give a live app a new secret; the replaced one works ``overlap`` seconds more
    (0: not at all; the deadline is rounded up to a whole second, so it reads as
    it is enforced). None when no such live app."""
    creds = mint_credentials(app_id)
    until = float(math.ceil(gw.clock() + overlap)) if overlap > 0 else None
    if not await gw.store.set_app_secret(app_id, gw.hash(creds.secret),
                                         keep_previous_until=until):
        return None
    return Rotation(creds.secret_key, until)
