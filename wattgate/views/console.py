"""The admin console's pages, from plain data: each function names its template
(``wattgate/templates/admin-*.html``) and the values the page shows.

The templates escape every value (Jinja2 autoescape), and every POST form
carries the session's CSRF token (the ``form`` macro of
``admin-macros.html``). No script anywhere: charts are inline SVG from
``wattgate.charts``, so the pages work with scripts off and under a CSP of
``default-src 'none'``. Not here: who may see a page (``views.admin``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import urlencode

from markupsafe import Markup

from .. import budget, rotation
from ..charts import (COUNT, MS, PALETTE, PERCENT, Series, Unit, count_label, legend, ms_label,
                      percent_label, stacked_bars)
from ..money import nanos_to_usd
from ..store import ACTIVE, NEEDS_RECONNECT, REVOKED, App, AppPolicy
from ..store.records import WebhookEvent
from ..store.browse import (CALL_STATUSES, CONNECTION_STATES, GRANT_STATES, DayCalls,
                             LogLine)
from ..store.reports import AppTotals, PayerSpend
from ..templates import month_name, render, when

DAY_CHOICES = (30, 90)
STATE_BADGES = {ACTIVE: ("ok", "active"), REVOKED: ("off", "revoked"),
                NEEDS_RECONNECT: ("warn", "needs reconnect")}
GRANT_BADGES = {"live": "ok", "spent": "off", "expired": "warn"}
DELIVERY_BADGES = {"delivered": "ok", "pending": "warn", "failed": "off"}
# How long the old secret key keeps working after a rotation: (form value, label).
OVERLAPS = (("1h", "1 hour"), ("24h", "24 hours"), ("7d", "7 days"),
            ("0", "No overlap: the old key stops at once (it leaked)"))
DEFAULT_OVERLAP = rotation.DEFAULT_OVERLAP

__all__ = ["DAY_CHOICES", "DEFAULT_OVERLAP", "OVERLAPS", "app_detail", "apps_list",
           "confirm_rotation", "login", "message", "month_name", "overview", "request_log",
           "secret_shown", "webhook_set", "when"]


def _page(template: str, title: str, *, csrf: str | None, active: str = "",
          **values: object) -> str:
    return render(template, title=title, csrf=csrf, active=active, day_choices=DAY_CHOICES,
                  **values)


def login(error: str | None = None) -> str:
    return _page("admin-login.html", "Sign in", csrf=None, error=error)


def overview(*, csrf: str, days: int, day_list: Sequence[str], by_app: Sequence[Series],
             by_model: Sequence[Series], payers: Sequence[PayerSpend], names: dict[str, str],
             month: Iterable[AppTotals], period: str, holds_open: int, backlog: int,
             activity: list[Chart]) -> str:
    month = list(month)
    return _page("admin-overview.html", "Overview", csrf=csrf, active="overview", days=days,
                 day_list=day_list, by_app=by_app, by_model=by_model, payers=payers,
                 names=names, period=period, holds_open=holds_open, backlog=backlog,
                 activity=activity,
                 spend=sum(t.cost_nanos for t in month), calls=sum(t.calls for t in month),
                 active_connections=sum(t.connections_active for t in month),
                 app_count=len(month))


def apps_list(*, csrf: str, apps: Sequence[App], totals: dict[str, AppTotals],
              period: str) -> str:
    return _page("admin-apps.html", "Apps", csrf=csrf, active="apps", apps=apps, totals=totals,
                 period=period)


def secret_shown(*, csrf: str, app: App, secret_key: str, created: bool,
                 previous_until: float | None = None) -> str:
    return _page("admin-secret.html", "App created" if created else "Secret key rotated",
                 csrf=csrf, active="apps", app=app, secret_key=secret_key, created=created,
                 previous_until=None if previous_until is None else rotation.utc(previous_until))


PAGE_SIZE = 50


@dataclass(frozen=True)
class Pager:
    """Where a table's page sits among the rows its filters match, and the links around it."""

    first: int  # 1-based position of the first row shown (0 when none)
    last: int
    total: int
    prev_href: str | None
    next_href: str | None


def link(base: str, params: dict[str, str], anchor: str = "", **changes: object) -> str:
    """``base`` with the page's query, some of it changed; empty values left out."""
    query = {k: str(v) for k, v in {**params, **changes}.items() if v not in ("", None)}
    return base + ("?" + urlencode(query) if query else "") + (f"#{anchor}" if anchor else "")


def pager(base: str, params: dict[str, str], key: str, page: int, shown: int, total: int,
          anchor: str) -> Pager:
    start = (page - 1) * PAGE_SIZE
    return Pager(start + 1 if shown else 0, start + shown, total,
                 link(base, params, anchor, **{key: page - 1 if page > 2 else ""})
                 if page > 1 else None,
                 link(base, params, anchor, **{key: page + 1})
                 if start + shown < total else None)


@dataclass(frozen=True)
class Browse:
    """One pageable table of the app page: its rows, filters and pager."""

    rows: Sequence[object]
    search: str
    state: str
    pager: Pager


def app_detail(*, csrf: str, app: App, days: int, day_list: Sequence[str],
               by_model: Sequence[Series], payers: Sequence[PayerSpend],
               connections: Browse, hashes: dict[int, str], all_connections: int,
               grants: Browse, live_grants: int, all_grants: int, activity: list[Chart],
               totals: AppTotals | None, period: str, now: float, params: dict[str, str],
               webhook_url: str | None, deliveries: Sequence[WebhookEvent],
               notice: str | None = None, webhook_notice: str | None = None,
               key_notice: str | None = None, policy_notice: str | None = None) -> str:
    until = rotation.previous_live_until(app.previous_secret_hash, app.previous_until, now)
    return _page("admin-app.html", app.name, csrf=csrf, active="apps", app=app, days=days,
                 day_list=day_list, by_model=by_model, payers=payers, connections=connections,
                 all_connections=all_connections, hashes=hashes, grants=grants,
                 grant_state=budget.grant_state, now=now, live_grants=live_grants,
                 all_grants=all_grants,
                 activity=activity, month=totals or AppTotals(app.app_id, 0, 0, 0, 0),
                 period=period, notice=notice, state_badges=STATE_BADGES,
                 grant_badges=GRANT_BADGES, params=params, link=link,
                 connection_states=CONNECTION_STATES, grant_state_names=GRANT_STATES,
                 webhook_url=webhook_url, deliveries=deliveries, webhook_notice=webhook_notice,
                 delivery_badges=DELIVERY_BADGES, key_notice=key_notice,
                 previous_until=None if until is None else rotation.utc(until),
                 policy_form=policy_form(app.policy), policy_notice=policy_notice)


def webhook_set(*, csrf: str, app: App, url: str, secret: str) -> str:
    return _page("admin-webhook.html", "Webhook endpoint set", csrf=csrf, active="apps",
                 app=app, url=url, secret=secret)


def policy_form(policy: AppPolicy) -> dict[str, str]:
    """The policy as the console's form shows it (amounts exact, in USD)."""
    def usd(nanos: int | None) -> str:
        return "" if nanos is None else format(nanos_to_usd(nanos).normalize(), "f")
    return {"models": "\n".join(policy.models), "max_cap": usd(policy.max_cap_nanos),
            "suggested_cap": usd(policy.suggested_cap_nanos),
            "max_tokens": "" if policy.max_tokens is None else str(policy.max_tokens)}


def request_log(*, csrf: str, app: App, lines: Sequence[LogLine], filters: dict[str, str],
                older_href: str | None, day_list: Sequence[str], activity: list[Chart],
                days: int) -> str:
    return _page("admin-requests.html", f"Requests · {app.name}", csrf=csrf, active="apps",
                 app=app, lines=lines, filters=filters, older_href=older_href,
                 statuses=CALL_STATUSES, activity=activity, day_list=day_list, days=days,
                 link=link)


def confirm_rotation(*, csrf: str, app: App) -> str:
    return _page("admin-rotate.html", "Rotate secret key", csrf=csrf, active="apps", app=app,
                 overlaps=OVERLAPS, default_overlap=DEFAULT_OVERLAP)


def message(title: str, text: str, *, csrf: str | None, back: str = "/admin") -> str:
    return _page("admin-message.html", title, csrf=csrf, text=text, back=back)


# ---- activity: requests, tokens, latency and error rate per day ---------------------
@dataclass(frozen=True)
class Chart:
    chart_id: str
    title: str
    figure: str  # the range's total or average, beside the title
    svg: Markup  # drawn by wattgate.charts, which escapes its labels


def activity_charts(day_list: Sequence[str], rows: Sequence[DayCalls]) -> list[Chart]:
    """Four small charts from ``daily_calls``: requests (errors apart), tokens (prompt and
    completion), the average latency and the error rate of each day."""
    by_day = {r.day: r for r in rows}
    days = [by_day.get(d) for d in day_list]

    def per_day(value: Callable[[DayCalls], int]) -> tuple[int, ...]:
        return tuple(value(r) if r is not None else 0 for r in days)

    calls = sum(r.calls for r in rows)
    errors = sum(r.errors for r in rows)
    tokens = sum(r.tokens for r in rows)
    latency = sum(r.latency_ms_total for r in rows)
    requests = [Series("ok", PALETTE[2], per_day(lambda r: r.calls - r.errors)),
                Series("errors", PALETTE[4], per_day(lambda r: r.errors))]
    token_series = [Series("prompt", PALETTE[0], per_day(lambda r: r.prompt_tokens)),
                    Series("completion", PALETTE[1], per_day(lambda r: r.completion_tokens))]
    avg = [Series("average latency", PALETTE[5],
                  per_day(lambda r: r.latency_ms_total // max(1, r.calls)))]
    rate = [Series("error rate", PALETTE[4],
                   per_day(lambda r: r.errors * 10_000 // max(1, r.calls)))]

    def draw(chart_id: str, title: str, figure: str, series: list[Series], unit: Unit,
             key: bool) -> Chart:
        svg = stacked_bars(day_list, series, label=f"{title}, per day", width=520,
                           height=200, unit=unit) + (legend(series, unit) if key else "")
        return Chart(chart_id, title, figure, Markup(svg))  # charts.py escaped its labels
    return [
        draw("requests-chart", "Requests", count_label(calls), requests, COUNT, True),
        draw("tokens-chart", "Tokens", count_label(tokens), token_series, COUNT, True),
        draw("latency-chart", "Average latency",
             ms_label(latency // calls) if calls else "—", avg, MS, False),
        draw("errors-chart", "Error rate",
             percent_label(errors * 10_000 // calls) if calls else "—", rate, PERCENT, False),
    ]
