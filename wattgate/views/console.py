"""The admin console's HTML: the page frame and each page's body, from plain data.

Functions here take rows from the store and return HTML strings; every value
that came from a user or an app is escaped with ``html.escape``. Every POST
form carries the session's CSRF token (``_form``). No script anywhere: charts
are inline SVG from ``wattgate.charts``, so the pages work with scripts off
and under a CSP of ``default-src 'none'``. Not here: who may see a page
(``views.admin``).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from html import escape as e

from .. import budget
from ..charts import Series, legend, meter, shares, stacked_bars, usd_label
from ..store import ACTIVE, NEEDS_RECONNECT, REVOKED, App, Grant
from ..store.reports import AppTotals, ConnectionSpend, PayerSpend

DAY_CHOICES = (30, 90)
ON = ' class="on" aria-current="page"'


def month_name(period: str) -> str:
    """``2026-11`` → ``November 2026``."""
    return time.strftime("%B %Y", time.strptime(period, "%Y-%m"))


def when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(ts))


def frame(title: str, body: str, *, csrf: str | None, active: str = "") -> str:
    nav = ""
    if csrf is not None:
        links = "".join(
            f'<a href="{href}"{ON if key == active else ""}>{label}</a>'
            for key, href, label in (("overview", "/admin", "Overview"),
                                     ("apps", "/admin/apps", "Apps")))
        sign_out = _form("/admin/logout", csrf, '<button class="link">Sign out</button>')
        nav = f'<nav>{links}</nav>{sign_out}'
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{e(title)} · wattgate console</title>
<link rel="stylesheet" href="/admin/admin.css">
</head><body>
<header class="top"><div class="wrap bar">
<a class="brand" href="/admin"><svg width="22" height="22" viewBox="0 0 24 24" aria-hidden="true">
<rect width="24" height="24" rx="6" fill="#4f46e5"/><path d="M13 3 6 14h5l-1 7 7-11h-5z"
fill="#fff"/></svg> wattgate <span>console</span></a>{nav}</div></header>
<main class="wrap">{body}</main>
</body></html>"""


def _form(action: str, csrf: str, inner: str, *, cls: str = "inline") -> str:
    return (f'<form method="post" action="{e(action)}" class="{cls}">'
            f'<input type="hidden" name="csrf" value="{e(csrf)}">{inner}</form>')


def login(error: str | None = None) -> str:
    message = f'<p class="error" role="alert">{e(error)}</p>' if error else ""
    return frame("Sign in", f"""
<section class="login card">
<h1>Sign in to the console</h1>
<p class="muted">Use the admin token from the gateway's keys file
(<code>admin_token</code>) or <code>WATTGATE_ADMIN_TOKEN</code>.</p>
{message}
<form method="post" action="/admin/login">
<label for="token">Admin token</label>
<input id="token" name="token" type="password" autocomplete="current-password" required autofocus>
<button type="submit">Sign in</button>
</form></section>""", csrf=None)


def _days_switch(base: str, days: int) -> str:
    links = "".join(
        f'<a href="{e(base)}?days={d}"{ON if d == days else ""}>{d} days</a>'
        for d in DAY_CHOICES)
    return f'<div class="switch" role="group" aria-label="Range">{links}</div>'


def _chart_card(title: str, days: Sequence[str], series: Sequence[Series], *,
                chart_id: str, half: bool = False) -> str:
    total = sum(s.total for s in series)
    if not series:
        body = '<p class="empty">No metered calls in this range yet.</p>'
    else:
        size = {"width": 520, "height": 240} if half else {}
        body = stacked_bars(days, series, label=f"{title}, per day", **size) + legend(series)
    return (f'<section class="card" id="{chart_id}"><div class="card-head"><h2>{e(title)}</h2>'
            f'<span class="figure">{e(usd_label(total))}</span></div>{body}</section>')


def _payer_name(p: PayerSpend) -> str:
    if p.app_user_id is not None:
        return e(p.app_user_id)
    return f'<span class="muted">grant #{p.grant_id}</span>'


def top_payers(payers: Sequence[PayerSpend], names: dict[str, str], *,
               show_app: bool) -> str:
    if not payers:
        return ('<section class="card"><h2>Top users</h2>'
                '<p class="empty">No spend in this range yet.</p></section>')
    bars = shares({str(i): p.cost_nanos for i, p in enumerate(payers)})
    rows = []
    for i, p in enumerate(payers):
        app = f'<td>{e(names.get(p.app_id, p.app_id))}</td>' if show_app else ""
        rows.append(f'<tr><td class="rank">{i + 1}</td><td>{_payer_name(p)}</td>{app}'
                    f'<td class="num">{p.calls}</td><td class="num">{e(usd_label(p.cost_nanos))}'
                    f'</td><td>{bars[str(i)]}</td></tr>')
    app_head = "<th>App</th>" if show_app else ""
    return (f'<section class="card" id="top-users"><h2>Top users</h2><table><thead><tr><th></th>'
            f'<th>User</th>{app_head}<th class="num">Calls</th><th class="num">Spend</th><th></th>'
            f'</tr></thead><tbody>{"".join(rows)}</tbody></table></section>')


def _stat(label: str, value: str, hint: str = "") -> str:
    hint_html = f'<span class="muted">{e(hint)}</span>' if hint else ""
    return f'<div class="stat"><span class="label">{e(label)}</span><b>{e(value)}</b>{hint_html}</div>'


def overview(*, csrf: str, days: int, day_list: Sequence[str], by_app: Sequence[Series],
             by_model: Sequence[Series], payers: Sequence[PayerSpend], names: dict[str, str],
             month: Iterable[AppTotals], period: str, holds_open: int, backlog: int) -> str:
    month = list(month)
    spend = sum(t.cost_nanos for t in month)
    calls = sum(t.calls for t in month)
    active = sum(t.connections_active for t in month)
    stats = (_stat(f"Spend in {month_name(period)}", usd_label(spend), f"{calls} calls")
             + _stat("Active connections", str(active), f"{len(month)} apps")
             + _stat("Calls in flight", str(holds_open), "budget holds open")
             + _stat("Awaiting final cost", str(backlog), "provisional calls"))
    body = f"""
<div class="page-head"><h1>Overview</h1>{_days_switch("/admin", days)}</div>
<div class="stats">{stats}</div>
{_chart_card(f"Spend per app, last {days} days", day_list, by_app, chart_id="spend-by-app")}
<div class="grid2">
{_chart_card(f"Spend per model, last {days} days", day_list, by_model, chart_id="spend-by-model",
             half=True)}
{top_payers(payers, names, show_app=True)}
</div>"""
    return frame("Overview", body, csrf=csrf, active="overview")


def apps_list(*, csrf: str, apps: Sequence[App], totals: dict[str, AppTotals],
              period: str) -> str:
    rows = []
    for a in apps:
        t = totals.get(a.app_id)
        rows.append(
            f'<tr><td><a href="/admin/apps/{e(a.app_id)}"><b>{e(a.name)}</b></a>'
            f'<div class="mono muted">{e(a.app_id)}</div></td>'
            f'<td>{"<br>".join(e(o) for o in a.origins) or "<span class=muted>none</span>"}</td>'
            f'<td class="num">{t.connections_active if t else 0}</td>'
            f'<td class="num">{t.calls if t else 0}</td>'
            f'<td class="num">{e(usd_label(t.cost_nanos if t else 0))}</td></tr>')
    table = (f'<table><thead><tr><th>App</th><th>Origins</th><th class="num">Active connections'
             f'</th><th class="num">Calls in {e(month_name(period))}</th><th class="num">Spend'
             f'</th></tr></thead><tbody>{"".join(rows)}</tbody></table>') if apps else \
        '<p class="empty">No apps yet. Create the first one below.</p>'
    create = _form("/admin/apps", csrf, """
<div class="fields"><label>Name<input name="name" required maxlength="100"
placeholder="My chat app"></label>
<label>Allowed origins <span class="muted">one per line</span><textarea name="origins" rows="2"
required placeholder="https://app.example.com"></textarea></label></div>
<button type="submit">Create app</button>""", cls="stack")
    body = f"""<div class="page-head"><h1>Apps</h1></div>
<section class="card">{table}</section>
<section class="card"><h2>Create an app</h2>
<p class="muted">The secret key is shown once, right after creation.</p>{create}</section>"""
    return frame("Apps", body, csrf=csrf, active="apps")


def secret_shown(*, csrf: str, app: App, secret_key: str, created: bool) -> str:
    what = "App created" if created else "Secret key rotated"
    note = "" if created else "<p>The previous secret key stopped working just now.</p>"
    body = f"""<div class="page-head"><h1>{what}: {e(app.name)}</h1></div>
<section class="card notice">
<p><b>Copy the secret key now; it is shown only once.</b> Store it in your backend's secrets.</p>
{note}
<dl class="keys"><dt>App id</dt><dd class="mono">{e(app.app_id)}</dd>
<dt>Publishable key</dt><dd class="mono">pk_live_{e(app.app_id)}</dd>
<dt>Secret key</dt><dd class="mono secret" id="secret-key">{e(secret_key)}</dd></dl>
<p><a class="button" href="/admin/apps/{e(app.app_id)}">Continue to the app</a></p></section>"""
    return frame(what, body, csrf=csrf, active="apps")


_STATE_BADGE = {ACTIVE: ("ok", "active"), REVOKED: ("off", "revoked"),
                NEEDS_RECONNECT: ("warn", "needs reconnect")}


def _connections(csrf: str, app: App, rows: Sequence[ConnectionSpend],
                 hashes: dict[int, str], period: str) -> str:
    if not rows:
        return '<p class="empty">No user has connected a budget to this app yet.</p>'
    out = []
    for r in rows:
        c = r.connection
        kind, label = _STATE_BADGE.get(c.state, ("off", c.state))
        if c.state == ACTIVE and c.sealed_key is None:
            kind, label = "off", "no key"
        cap = "unlimited" if c.cap_nanos is None else usd_label(c.cap_nanos)
        revoke = ""
        if c.state != REVOKED:
            revoke = _form(f"/admin/apps/{app.app_id}/connections/{c.connection_id}/revoke", csrf,
                           f'<button class="danger small" aria-label="Revoke {e(c.app_user_id)}">'
                           'Revoke</button>')
        held = f' <span class="muted">+{e(usd_label(r.held_nanos))} held</span>' \
            if r.held_nanos else ""
        out.append(
            f'<tr data-user="{e(c.app_user_id)}"><td><b>{e(c.app_user_id)}</b>'
            f'<div class="mono muted" title="user hash in the request log">'
            f'{e(hashes.get(c.connection_id, ""))}</div></td>'
            f'<td><span class="badge {kind}">{e(label)}</span></td>'
            f'<td class="num">{e(cap)}</td>'
            f'<td><div class="spend">{meter(r.spent_nanos, c.cap_nanos)}'
            f'<span>{e(usd_label(r.spent_nanos))}{held}</span></div></td>'
            f'<td class="muted">{e(when(c.updated_at))}</td><td class="actions">{revoke}</td></tr>')
    return (f'<table class="connections"><thead><tr><th>User</th><th>State</th>'
            f'<th class="num">Cap / month</th><th>Spend in {e(month_name(period))}</th>'
            f'<th>Updated</th><th></th></tr></thead><tbody>{"".join(out)}</tbody></table>')


def _grants(grants: Sequence[Grant], users: dict[int, str], now: float) -> str:
    if not grants:
        return '<p class="empty">No one-time grants yet.</p>'
    badge = {"live": "ok", "spent": "off", "expired": "warn"}
    out = []
    for g in grants:
        state = budget.grant_state(g, now)
        funded = e(users.get(g.connection_id, f"connection #{g.connection_id}")) \
            if g.connection_id is not None else '<span class="muted">typed key</span>'
        cap = "—" if g.max_nanos is None else usd_label(g.max_nanos)
        out.append(f'<tr><td class="mono">#{g.grant_id}</td><td>{funded}</td>'
                   f'<td><span class="badge {badge[state]}">{state}</span></td>'
                   f'<td class="num">{g.used} / {g.requests}</td>'
                   f'<td class="num">{e(usd_label(g.spent_nanos))}</td><td class="num">{e(cap)}</td>'
                   f'<td class="muted">{e(when(g.created_at))}</td>'
                   f'<td class="muted">{e(when(g.expires_at))}</td></tr>')
    return (f'<table><thead><tr><th>Grant</th><th>Funded by</th><th>State</th>'
            f'<th class="num">Requests</th><th class="num">Spent</th><th class="num">Dollar cap</th>'
            f'<th>Created</th><th>Expires</th></tr></thead><tbody>{"".join(out)}</tbody></table>')


def _origins(csrf: str, app: App) -> str:
    items = "".join(
        f'<li><span class="mono">{e(o)}</span>'
        + _form(f"/admin/apps/{app.app_id}/origins/remove", csrf,
                f'<input type="hidden" name="origin" value="{e(o)}">'
                f'<button class="link danger" aria-label="Remove {e(o)}">remove</button>')
        + "</li>" for o in app.origins) or '<li class="muted">No origin: the consent popup ' \
                                           'will refuse every site.</li>'
    add = _form(f"/admin/apps/{app.app_id}/origins", csrf,
                '<input name="origin" required placeholder="https://app.example.com">'
                '<button type="submit" class="small">Add origin</button>', cls="row")
    return f'<ul class="origins">{items}</ul>{add}'


def app_detail(*, csrf: str, app: App, days: int, day_list: Sequence[str],
               by_model: Sequence[Series], payers: Sequence[PayerSpend],
               connections: Sequence[ConnectionSpend], hashes: dict[int, str],
               grants: Sequence[Grant], totals: AppTotals | None, period: str, now: float,
               notice: str | None = None) -> str:
    base = f"/admin/apps/{app.app_id}"
    users = {r.connection.connection_id: r.connection.app_user_id for r in connections}
    month = totals or AppTotals(app.app_id, 0, 0, 0, 0)
    stats = (_stat(f"Spend in {month_name(period)}", usd_label(month.cost_nanos),
                   f"{month.calls} calls")
             + _stat("Active connections", str(month.connections_active),
                     f"{len(connections)} in all")
             + _stat("Live grants", str(sum(budget.grant_state(g, now) == "live" for g in grants)),
                     f"{len(grants)} in all")
             + _stat("Awaiting final cost", str(month.provisional), "provisional calls"))
    banner = f'<p class="flash" role="status">{e(notice)}</p>' if notice else ""
    rotate = f'<a class="button secondary small" href="{e(base)}/rotate-secret">Rotate secret key</a>'
    export = f"""<form method="get" action="{e(base)}/usage" class="row">
<label>From <input type="date" name="from"></label><label>To <input type="date" name="to"></label>
<label>Format <select name="format"><option value="csv">CSV</option>
<option value="jsonl">JSON Lines</option></select></label>
<button type="submit" class="small">Download usage</button></form>
<p class="muted">One line per metered call: time (UTC), user or grant, model, tokens, exact cost
in USD, provisional or final. Never prompt content. Dates are optional and inclusive.</p>"""
    body = f"""
<div class="page-head"><div><a class="muted" href="/admin/apps">Apps</a> /
<h1>{e(app.name)}</h1> <span class="mono muted">{e(app.app_id)}</span></div>
{_days_switch(base, days)}</div>
<div class="stats">{stats}</div>
{_chart_card(f"Spend per model, last {days} days", day_list, by_model, chart_id="spend-chart")}
<div class="grid2">{top_payers(payers, {}, show_app=False)}
<section class="card"><h2>Keys and origins</h2>
<dl class="keys"><dt>Publishable key</dt><dd class="mono">pk_live_{e(app.app_id)}</dd>
<dt>Secret key</dt><dd>shown once at creation {rotate}</dd></dl>
<h3>Allowed origins</h3>{_origins(csrf, app)}</section></div>
<section class="card" id="connections"><h2>Connections</h2>{banner}
{_connections(csrf, app, connections, hashes, period)}</section>
<section class="card" id="grants"><h2>One-time grants</h2>{_grants(grants, users, now)}</section>
<section class="card" id="export"><h2>Usage export</h2>{export}</section>"""
    return frame(app.name, body, csrf=csrf, active="apps")


def confirm_rotation(*, csrf: str, app: App) -> str:
    form = _form(f"/admin/apps/{app.app_id}/rotate-secret", csrf,
                 '<button class="danger" type="submit">Rotate the secret key now</button> '
                 f'<a class="button secondary" href="/admin/apps/{e(app.app_id)}">Cancel</a>')
    return frame("Rotate secret key", f"""<section class="card login">
<h1>Rotate the secret key of {e(app.name)}?</h1>
<p>A new secret key is shown once. <b>The current key stops working at once</b>: every
backend using it gets <code>401</code> until it is given the new one, and session tokens
minted with it stop working too. Users' connections and budgets are not affected.</p>{form}
</section>""", csrf=csrf, active="apps")


def message(title: str, text: str, *, csrf: str | None, back: str = "/admin") -> str:
    return frame(title, f'<section class="card login"><h1>{e(title)}</h1><p>{e(text)}</p>'
                        f'<p><a class="button" href="{e(back)}">Back</a></p></section>', csrf=csrf)
