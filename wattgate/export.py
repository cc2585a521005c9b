"""Usage export: metered calls as CSV or JSON Lines, for billing and reconciliation.

One line per metered call: the time it was admitted (ISO-8601, UTC; a call
belongs to the period of its admission, see ``ledger``), app, the user id (or the
grant id for a grant funded by a typed key), model, tokens, cost in USD as an
exact decimal string (nano-dollar precision, so the column sums to the ledger
to the last digit), provisional or final, status and the upstream generation
id. Never prompt or completion content: the ledger does not hold any.

Used by ``wattgate usage export`` and the console's download; pure, no I/O
beyond the text it returns.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import AsyncIterator, Iterable, Iterator
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING

from .money import NANOS_PER_USD
from .store.reports import UsageLine

if TYPE_CHECKING:
    from .store import Ledger

FORMATS = {"csv": "text/csv", "jsonl": "application/x-ndjson"}
COLUMNS = ("time", "app_id", "user_id", "grant_id", "model", "prompt_tokens",
           "completion_tokens", "cost_usd", "state", "status", "generation_id")


def usd_text(nanos: int) -> str:
    """Exact dollars from nano-dollars: ``12345`` → ``"0.000012345"``."""
    return f"{Decimal(nanos) / NANOS_PER_USD:.9f}"


def iso_utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds") \
        .replace("+00:00", "Z")


def parse_bound(text: str, *, end: bool = False) -> float:
    """A ``--from``/``--to`` bound as a timestamp; raises ValueError.

    A date (``2026-11-01``) means that whole UTC day: as an end bound it
    includes the day. A date-time without an offset is taken as UTC.
    """
    text = text.strip()
    try:
        day = date.fromisoformat(text)
    except ValueError:
        moment = datetime.fromisoformat(text)
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return moment.timestamp()
    start = datetime.combine(day, time(0), UTC)
    return (start + timedelta(days=1) if end else start).timestamp()


def record(line: UsageLine) -> dict[str, object]:
    return {
        "time": iso_utc(line.created_at),
        "app_id": line.app_id,
        "user_id": line.app_user_id,
        "grant_id": line.grant_id,
        "model": line.model,
        "prompt_tokens": line.prompt_tokens,
        "completion_tokens": line.completion_tokens,
        "cost_usd": usd_text(line.cost_nanos),
        "state": "provisional" if line.provisional else "final",
        "status": line.status,
        "generation_id": line.generation_id,
    }


def _cell(value: object) -> object:
    # A user id like "=HYPERLINK(...)" would run as a formula in a spreadsheet.
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return "" if value is None else value


def csv_lines(lines: Iterable[UsageLine], *, header: bool = True) -> Iterator[str]:
    """A header row (unless this continues an export), then one row per call."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    if header:
        writer.writerow(COLUMNS)
    for line in lines:
        writer.writerow([_cell(v) for v in record(line).values()])
    yield buf.getvalue()


def jsonl_lines(lines: Iterable[UsageLine], *, header: bool = True) -> Iterator[str]:
    for line in lines:
        yield json.dumps(record(line), separators=(",", ":")) + "\n"


def render(lines: Iterable[UsageLine], fmt: str, *, header: bool = True) -> str:
    """One page of an export as text; ``header=False`` for the pages after the first."""
    if fmt == "csv":
        return "".join(csv_lines(lines, header=header))
    if fmt == "jsonl":
        return "".join(jsonl_lines(lines))
    raise ValueError(f"unknown export format {fmt!r}; use csv or jsonl")


async def pages(store: Ledger, app_id: str, fmt: str, since: float | None,
                until: float | None) -> AsyncIterator[str]:
    """The whole export as text, a page of calls at a time (a CSV header even when empty)."""
    first = True
    async for lines in store.usage_lines(app_id, since, until):
        yield render(lines, fmt, header=first)
        first = False
    if first and fmt == "csv":
        yield render([], fmt)


def filename(app_id: str, fmt: str, since: float | None, until: float | None) -> str:
    def day(ts: float | None, default: str) -> str:
        return default if ts is None else datetime.fromtimestamp(ts, UTC).strftime("%Y%m%d")
    last = None if until is None else until - 1  # the bound is exclusive
    return f"wattgate-usage-{app_id}-{day(since, 'start')}-{day(last, 'now')}.{fmt}"
