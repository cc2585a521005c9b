"""The console's server-drawn charts: amounts people can read, bars that add up, no markup leaks."""

from __future__ import annotations

import re
from datetime import UTC, datetime

from wattgate.charts import OTHER_COLOUR, day_range, series_by, stacked_bars

NANO = 10**9


def test_days_end_today_in_utc():
    end = datetime(2026, 11, 22, 23, 59, tzinfo=UTC).timestamp()
    days = day_range(end, 30)
    assert len(days) == 30 and days[-1] == "2026-11-22" and days[0] == "2026-10-24"


def test_small_series_fold_into_others():
    days = ["2026-11-01", "2026-11-02"]
    points = [(days[i % 2], f"model-{i}", (i + 1) * NANO) for i in range(10)]
    points.append(("2026-10-01", "model-0", 999 * NANO))  # outside the range: ignored
    series = series_by(days, points, limit=4)
    assert [s.name for s in series] == ["model-9", "model-8", "model-7", "7 others"]
    assert series[-1].colour == OTHER_COLOUR
    assert sum(s.total for s in series) == sum(range(1, 11)) * NANO


def test_bars_scale_to_the_axis_and_escape_names():
    days = ["2026-11-01", "2026-11-02"]
    series = series_by(days, [(days[0], "<b>x</b>", 3 * NANO), (days[1], "y", 7 * NANO)])
    svg = stacked_bars(days, series, label="Spend", width=300, height=140)
    assert "<b>x</b>" not in svg and "&lt;b&gt;x&lt;/b&gt;" in svg
    heights = [float(h) for h in re.findall(r'<rect [^>]*height="([\d.]+)"', svg)]
    plot_h = 140 - 12 - 28
    # $7 is the tallest bar on an axis that tops out at $10.
    assert max(heights) == round(plot_h * 0.7, 1)
    assert ">$10.00<" in svg and ">$0.00<" in svg
