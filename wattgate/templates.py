"""The HTML templates: one Jinja2 environment for every page the gateway serves.

Templates live in ``wattgate/templates/`` (package data, shipped in the wheel).
Every value a template prints is HTML-escaped (autoescape for ``.html``), and a
name the template uses but the caller did not pass is an error
(``StrictUndefined``), never an empty string. Only values marked safe on
purpose are printed raw: the server-drawn SVG charts (``wattgate.charts``
escapes their labels) and the JSON a page reads from a
``<script type="application/json">`` block (``page_json``, which cannot close
the tag). Not here: which page a request gets (``views``).
"""

from __future__ import annotations

import json
import time
from functools import cache
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from markupsafe import Markup

from . import charts
from .money import format_usd

LOGO = Markup('<svg class="bolt" viewBox="0 0 24 24" aria-hidden="true">'
              '<path d="M13 2 4 14h7l-1 8 9-12h-7z"/></svg>')


def page_json(data: Any) -> Markup:
    """JSON for a ``<script type="application/json">`` block (never closes the tag)."""
    return Markup(json.dumps(data).replace("<", "\\u003c").replace(">", "\\u003e")
                  .replace("&", "\\u0026"))


def month_name(period: str) -> str:
    """``2026-11`` → ``November 2026``."""
    return time.strftime("%B %Y", time.strptime(period, "%Y-%m"))


def when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(ts))


def _svg(draw: Any) -> Any:
    def drawn(*args: Any, **kwargs: Any) -> Markup:
        return Markup(draw(*args, **kwargs))
    return drawn


def share_bars(amounts: list[int]) -> list[Markup]:
    """For a table of amounts: a bar per row, scaled to the largest."""
    drawn = charts.shares({str(i): a for i, a in enumerate(amounts)})
    return [Markup(drawn[str(i)]) for i in range(len(amounts))]


@cache
def environment() -> Environment:
    """The one environment, built on first use and shared by every page."""
    env = Environment(loader=PackageLoader("wattgate", "templates"),
                      autoescape=select_autoescape(["html"]), undefined=StrictUndefined,
                      trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.filters.update(usd=format_usd, when=when, month_name=month_name, page_json=page_json,
                       number=charts.count_label, ms=charts.ms_label)
    env.globals.update(logo=LOGO, stacked_bars=_svg(charts.stacked_bars),
                       legend=_svg(charts.legend),
                       meter=_svg(charts.meter), share_bars=share_bars)
    return env


def render(name: str, **values: Any) -> str:
    return environment().get_template(name).render(**values)


__all__ = ["environment", "page_json", "render"]
