"""Charts for the admin console, drawn on the server as inline SVG; pure.

No script, no chart library, no CDN: a chart is a string of SVG the page
embeds, readable with scripts off and under a CSP that allows no inline
style (colours are presentation attributes). Hovering a bar shows its exact
amount through SVG ``<title>``. Amounts are integer nano-dollars.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from .money import NANOS_PER_USD, format_usd

PALETTE = ("#4f46e5", "#0ea5e9", "#10b981", "#f59e0b", "#ef4444", "#8b5cf6", "#14b8a6",
           "#ec4899")
OTHER_COLOUR = "#94a3b8"
MAX_SERIES = len(PALETTE)


def day_range(end: float, days: int) -> list[str]:
    """The ``days`` UTC dates ending with the day of ``end``, oldest first."""
    last = datetime.fromtimestamp(end, UTC).date()
    return [(last - timedelta(days=n)).isoformat() for n in range(days - 1, -1, -1)]


@dataclass(frozen=True)
class Series:
    name: str
    colour: str
    values: tuple[int, ...]  # one amount per day

    @property
    def total(self) -> int:
        return sum(self.values)


def series_by(days: Sequence[str], points: Iterable[tuple[str, str, int]],
              *, limit: int = MAX_SERIES) -> list[Series]:
    """(day, name, amount) points → one series per name, biggest first.

    Past ``limit`` names, the smallest are summed into one grey "other" series.
    """
    index = {d: i for i, d in enumerate(days)}
    sums: dict[str, list[int]] = {}
    for day, name, amount in points:
        if day in index:
            sums.setdefault(name, [0] * len(days))[index[day]] += amount
    ranked = sorted(sums.items(), key=lambda kv: (-sum(kv[1]), kv[0]))
    head = ranked if len(ranked) <= limit else ranked[:limit - 1]
    out = [Series(name, PALETTE[i % len(PALETTE)], tuple(v)) for i, (name, v) in enumerate(head)]
    rest = ranked[len(head):]
    if rest:
        values = tuple(sum(v[i] for _, v in rest) for i in range(len(days)))
        out.append(Series(f"{len(rest)} others", OTHER_COLOUR, values))
    return out


def _nice_top(value: int, empty: int) -> int:
    """A round axis maximum at or above ``value`` (1, 2 or 5 times a power of ten)."""
    if value <= 0:
        return empty  # an empty chart still has an axis: $0 to $0.01, 0 to 1
    step = 1
    while step * 10 <= value:
        step *= 10
    for m in (1, 2, 5, 10):
        if m * step >= value:
            return m * step
    return 10 * step


def count_label(n: int) -> str:
    return f"{n:,}"


def ms_label(ms: int) -> str:
    return f"{ms:,} ms"


def percent_label(basis_points: int) -> str:
    """An error rate kept in basis points (1/100 of a percent): ``12.5%``."""
    return f"{basis_points / 100:g}%"


@dataclass(frozen=True)
class Unit:
    """How a chart prints its amounts, and the axis it has with nothing to show."""

    label: Callable[[int], str]
    empty_top: int


USD = Unit(format_usd, NANOS_PER_USD // 100)
COUNT = Unit(count_label, 1)
MS = Unit(ms_label, 100)
PERCENT = Unit(percent_label, 100)  # 1%


def _short_day(day: str) -> str:
    d = date.fromisoformat(day)
    return f"{d.strftime('%b')} {d.day}"


def stacked_bars(days: Sequence[str], series: Sequence[Series], *, label: str,
                 width: int = 880, height: int = 260, unit: Unit = USD) -> str:
    """Stacked bars of an amount per day (spend unless ``unit`` says otherwise); an
    accessible SVG string."""
    left, right, top, bottom = 64, 24, 12, 28
    plot_w, plot_h = width - left - right, height - top - bottom
    totals = [sum(s.values[i] for s in series) for i in range(len(days))]
    ymax = _nice_top(max(totals, default=0), unit.empty_top)
    slot = plot_w / max(1, len(days))
    bar = max(2.0, slot * 0.72)
    e = html.escape
    parts = [(f'<svg class="chart" viewBox="0 0 {width} {height}" width="100%" role="img" '
              f'aria-label="{e(label)}" xmlns="http://www.w3.org/2000/svg">')]
    for k in range(5):
        y = top + plot_h - plot_h * k / 4
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}" '
                     f'stroke="{"#cbd5e1" if k == 0 else "#e2e8f0"}" stroke-width="1"/>')
        if ymax * k % 4 == 0:  # only exact values: a count axis to 10 reads 0, 5, 10
            parts.append(f'<text x="{left - 8}" y="{y + 4:.1f}" text-anchor="end" '
                         f'font-size="11" fill="#64748b">{e(unit.label(ymax * k // 4))}</text>')
    every = 1 if len(days) <= 10 else 7 if len(days) <= 45 else 14
    for i, day in enumerate(days):
        x = left + slot * i + (slot - bar) / 2
        if (len(days) - 1 - i) % every == 0:
            # The last label ends at its bar, so it never runs off the right edge.
            anchor, tx = ("end", x + bar) if i == len(days) - 1 and len(days) > 10 \
                else ("middle", x + bar / 2)
            parts.append(f'<text x="{tx:.1f}" y="{height - 8}" text-anchor="{anchor}" '
                         f'font-size="11" fill="#64748b">{e(_short_day(day))}</text>')
        y = top + plot_h
        for s in series:
            amount = s.values[i]
            if amount <= 0:
                continue
            h = plot_h * amount / ymax
            y -= h
            parts.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar:.1f}" '
                         f'height="{max(h, 0.5):.1f}" fill="{s.colour}" rx="1.5">'
                         f'<title>{e(_short_day(day))} · {e(s.name)}: '
                         f'{e(unit.label(amount))}</title></rect>')
    parts.append("</svg>")
    return "".join(parts)


def legend(series: Sequence[Series], unit: Unit = USD) -> str:
    """The chart's key, as HTML: a swatch, the name and the range total of each series."""
    items = []
    for s in series:
        items.append(f'<li><svg width="10" height="10" aria-hidden="true"><rect width="10" '
                     f'height="10" rx="2" fill="{s.colour}"/></svg> {html.escape(s.name)} '
                     f'<span class="muted">{html.escape(unit.label(s.total))}</span></li>')
    return f'<ul class="legend">{"".join(items)}</ul>'


def meter(used: int, limit: int | None, *, width: int = 140, colour: str | None = None) -> str:
    """A thin horizontal bar: ``used`` out of ``limit`` (a full grey track when unlimited)."""
    if limit is None or limit <= 0:
        share = 0.0
    else:
        share = min(1.0, used / limit)
    if colour is None:
        colour = "#ef4444" if share >= 0.9 else "#f59e0b" if share >= 0.7 else "#4f46e5"
    return (f'<svg class="meter" width="{width}" height="8" role="img" '
            f'aria-label="{round(share * 100)}%">'
            f'<rect width="{width}" height="8" rx="4" fill="#e2e8f0"/>'
            f'<rect width="{max(0.0, share * width):.1f}" height="8" rx="4" fill="{colour}"/>'
            f'</svg>')


def shares(rows: Mapping[str, int], *, width: int = 160) -> dict[str, str]:
    """For a table of amounts: a bar per row, scaled to the largest."""
    top = max(rows.values(), default=0)
    return {k: meter(v, top, width=width, colour="#0ea5e9") for k, v in rows.items()}
