"""The admin console's pages, from plain data: each function names its template
(``wattgate/templates/admin-*.html``) and the values the page shows.

The templates escape every value (Jinja2 autoescape), and every POST form
carries the session's CSRF token (the ``form`` macro of
``admin-macros.html``). No script anywhere: charts are inline SVG from
``wattgate.charts``, so the pages work with scripts off and under a CSP of
``default-src 'none'``. Not here: who may see a page (``views.admin``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .. import budget, rotation
from ..charts import Series
from ..money import nanos_to_usd
from ..store import ACTIVE, NEEDS_RECONNECT, REVOKED, App, AppPolicy, Grant
from ..store.records import WebhookEvent
from ..store.reports import AppTotals, ConnectionSpend, PayerSpend
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
           "confirm_rotation", "login", "message", "month_name", "overview", "secret_shown",
           "webhook_set", "when"]


def _page(template: str, title: str, *, csrf: str | None, active: str = "",
          **values: object) -> str:
    return render(template, title=title, csrf=csrf, active=active, day_choices=DAY_CHOICES,
                  **values)


def login(error: str | None = None) -> str:
    return _page("admin-login.html", "Sign in", csrf=None, error=error)


def overview(*, csrf: str, days: int, day_list: Sequence[str], by_app: Sequence[Series],
             by_model: Sequence[Series], payers: Sequence[PayerSpend], names: dict[str, str],
             month: Iterable[AppTotals], period: str, holds_open: int, backlog: int) -> str:
    month = list(month)
    return _page("admin-overview.html", "Overview", csrf=csrf, active="overview", days=days,
                 day_list=day_list, by_app=by_app, by_model=by_model, payers=payers,
                 names=names, period=period, holds_open=holds_open, backlog=backlog,
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


@dataclass(frozen=True)
class GrantRow:
    grant: Grant
    state: str      # live, spent or expired, now
    funded_by: str  # the connection's user id, when a connection funds it


def app_detail(*, csrf: str, app: App, days: int, day_list: Sequence[str],
               by_model: Sequence[Series], payers: Sequence[PayerSpend],
               connections: Sequence[ConnectionSpend], hashes: dict[int, str],
               grants: Sequence[Grant], totals: AppTotals | None, period: str, now: float,
               webhook_url: str | None, deliveries: Sequence[WebhookEvent],
               notice: str | None = None, webhook_notice: str | None = None,
               key_notice: str | None = None, policy_notice: str | None = None) -> str:
    users = {r.connection.connection_id: r.connection.app_user_id for r in connections}
    rows = [GrantRow(g, budget.grant_state(g, now),
                     users.get(g.connection_id, f"connection #{g.connection_id}")
                     if g.connection_id is not None else "") for g in grants]
    until = rotation.previous_live_until(app.previous_secret_hash, app.previous_until, now)
    return _page("admin-app.html", app.name, csrf=csrf, active="apps", app=app, days=days,
                 day_list=day_list, by_model=by_model, payers=payers, connections=connections,
                 connection_count=len(connections), hashes=hashes, grants=rows,
                 live_grants=sum(r.state == "live" for r in rows),
                 month=totals or AppTotals(app.app_id, 0, 0, 0, 0), period=period,
                 notice=notice, state_badges=STATE_BADGES, grant_badges=GRANT_BADGES,
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


def confirm_rotation(*, csrf: str, app: App) -> str:
    return _page("admin-rotate.html", "Rotate secret key", csrf=csrf, active="apps", app=app,
                 overlaps=OVERLAPS, default_overlap=DEFAULT_OVERLAP)


def message(title: str, text: str, *, csrf: str | None, back: str = "/admin") -> str:
    return _page("admin-message.html", title, csrf=csrf, text=text, back=back)
