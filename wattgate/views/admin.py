"""The admin console at /admin: who may use it, and what each page does.

Sign-in takes the admin token (keys file ``admin_token`` or
``WATTGATE_ADMIN_TOKEN``; not an app key), compared in constant time, with
failed attempts rate-limited (``RL_ADMIN_LOGIN``, counted by the ledger). A
successful sign-in sets a random session id in an HttpOnly, SameSite=Strict
cookie scoped to /admin; the ledger keeps only its SHA-256, with the session's
CSRF token (``Ledger.open_admin_session``), so whichever process of a fleet a
request reaches knows the session, and a restart keeps it. Every POST must carry that CSRF token in the form and, when the
browser sends an Origin, come from this host. Pages are sent with a CSP that
allows no script, no framing and no referrer, and are never cached.

``add_routes(app)`` mounts the console, ``/metrics`` and the request log on
an app. The HTML lives in ``views.console``; the SQL in ``store.reports``.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import math
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from aiohttp import web

from .. import export, policy, reconcile, rotation, webhooks
from ..charts import day_range, series_by
from ..origins import normalize_origin
from ..credentials import is_app_id, mint_credentials
from ..errors import RateLimited
from ..gateway import Gateway
from ..ledger import period_bounds, period_of
from ..logs import user_hash
from ..store import REVOKED, App, AppPolicy, Ledger
from ..store.browse import CALL_STATUSES, CONNECTION_STATES, GRANT_STATES, LogFilter
from ..store.reports import DAY
from . import console, metrics
from .inputs import client_of
from .state import gateway_key, upstream_key

log = logging.getLogger("wattgate.admin")  # what operators changed: an audit trail

SESSION_COOKIE = "wattgate_admin"
SESSION_SECONDS = 12 * 3600
CSS = Path(__file__).resolve().parent.parent / "static" / "admin.css"
PAGE_HEADERS = {
    "Content-Security-Policy": ("default-src 'none'; style-src 'self'; img-src 'self' data:; "
                                "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"),
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
}


@dataclass(frozen=True)
class AdminSession:
    csrf: str
    expires_at: float


class AdminSessions:
    """Signed-in console sessions, kept by the ledger under their cookie's SHA-256
    (the cookie itself is never stored: a copy of the ledger opens no console)."""

    def __init__(self, store: Ledger) -> None:
        self._store = store

    @staticmethod
    def _key(cookie: str) -> str:
        return hashlib.sha256(cookie.encode()).hexdigest()

    async def open(self, now: float) -> tuple[str, AdminSession]:
        cookie = secrets.token_urlsafe(32)
        session = AdminSession(secrets.token_urlsafe(24), now + SESSION_SECONDS)
        await self._store.open_admin_session(self._key(cookie), session.csrf,
                                             expires_at=session.expires_at, now=now)
        return cookie, session

    async def find(self, cookie: str | None, now: float) -> AdminSession | None:
        if not cookie:
            return None
        row = await self._store.find_admin_session(self._key(cookie), now=now)
        return AdminSession(*row) if row is not None and row[1] > now else None

    async def close(self, cookie: str | None) -> None:
        if cookie:
            await self._store.close_admin_session(self._key(cookie))


sessions_key = web.AppKey("admin_sessions", AdminSessions)
Page = Callable[[web.Request, Gateway, AdminSession], Awaitable[web.StreamResponse]]


def html_response(text: str, status: int = 200) -> web.Response:
    return web.Response(text=text, status=status, content_type="text/html",
                        headers=PAGE_HEADERS)


def _see(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location, "Cache-Control": "no-store"})


def _same_host(request: web.Request) -> bool:
    """Whether a POST came from a page of this console, as the browser attests.

    ``Sec-Fetch-Site`` when the browser sends it, else the ``Origin`` host; a
    client sending neither (curl, a script) is not a cross-site browser form.
    """
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None:
        return site == "same-origin"
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    return origin != "null" and urlsplit(origin).netloc == request.host


def signed_in(page: Page) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """A console page: needs a live session; a POST also needs its CSRF token."""
    async def handler(request: web.Request) -> web.StreamResponse:
        gw = request.app[gateway_key]
        session = await request.app[sessions_key].find(request.cookies.get(SESSION_COOKIE),
                                                       gw.clock())
        if session is None:
            if request.method == "GET":
                return _see("/admin")
            return html_response(console.login("Your session ended; sign in again."), 403)
        if request.method == "POST":
            form = await request.post()
            token = form.get("csrf")
            if not _same_host(request) or not isinstance(token, str) or \
                    not hmac.compare_digest(token.encode(), session.csrf.encode()):
                return html_response(console.message(
                    "Request refused", "This form was not sent by this console page (stale or "
                    "forged). Go back, reload and try again.", csrf=session.csrf), 403)
        try:
            return await page(request, gw, session)
        except web.HTTPNotFound:
            return html_response(console.message(
                "Not found", "No such app or connection; it may have been deleted.",
                csrf=session.csrf, back="/admin/apps"), 404)
    return handler


async def home(request: web.Request) -> web.StreamResponse:
    gw = request.app[gateway_key]
    session = await request.app[sessions_key].find(request.cookies.get(SESSION_COOKIE),
                                                   gw.clock())
    if session is None:
        return html_response(console.login())
    return await overview(request, gw, session)


async def login(request: web.Request) -> web.StreamResponse:
    gw = request.app[gateway_key]
    sessions = request.app[sessions_key]
    if not _same_host(request):
        return html_response(console.login("Sign in from this console's own page."), 403)
    form = await request.post()
    token = form.get("token")
    given = token.encode() if isinstance(token, str) else b""
    peer = client_of(gw.config, request).address
    try:
        # Before the comparison: past the limit a right guess is refused like a wrong one,
        # so the 429s tell a guesser nothing.
        await gw.limit("RL_ADMIN_LOGIN", peer, take=False)
    except RateLimited as e:
        response = html_response(console.login(
            f"Too many failed attempts; wait {e.retry_after} seconds."), 429)
        response.headers["Retry-After"] = str(e.retry_after)
        return response
    if not hmac.compare_digest(given, gw.keys.admin_token.encode()):
        with contextlib.suppress(RateLimited):  # the last token went to a racing failure
            await gw.limit("RL_ADMIN_LOGIN", peer)
        return html_response(console.login("That is not the admin token."), 401)
    cookie, _ = await sessions.open(gw.clock())
    response = _see("/admin")
    response.set_cookie(SESSION_COOKIE, cookie, max_age=SESSION_SECONDS, path="/admin",
                        httponly=True, samesite="Strict",
                        secure=gw.config.public_origin.startswith("https://"))
    return response


async def logout(request: web.Request, gw: Gateway, session: AdminSession) -> web.StreamResponse:
    await request.app[sessions_key].close(request.cookies.get(SESSION_COOKIE))
    response = _see("/admin")
    response.del_cookie(SESSION_COOKIE, path="/admin")
    return response


def _days(request: web.Request) -> int:
    try:
        days = int(request.query.get("days", "30"))
    except ValueError:
        days = 30
    return days if days in console.DAY_CHOICES else 30


def _window(now: float, days: int) -> tuple[list[str], float, float]:
    day_list = day_range(now, days)
    since = export.parse_bound(day_list[0])
    return day_list, since, since + days * DAY


def _month(now: float) -> tuple[float, float]:
    # A call's row is dated at its admission, so this month's rows are this period's.
    return period_bounds(period_of(now))


async def overview(request: web.Request, gw: Gateway, session: AdminSession) -> web.Response:
    now, days = gw.clock(), _days(request)
    day_list, since, until = _window(now, days)
    apps = await gw.store.list_apps()
    names = {a.app_id: a.name for a in apps}
    taken = [a.name for a in apps]
    names = {i: n if taken.count(n) == 1 else f"{n} ({i})" for i, n in names.items()}
    spend = await gw.store.daily_spend(since, until)
    by_app = series_by(day_list, ((d.day, names.get(d.app_id, d.app_id), d.cost_nanos)
                                  for d in spend))
    by_model = series_by(day_list, ((d.day, d.model, d.cost_nanos) for d in spend))
    payers = await gw.store.top_payers(since, until, limit=10)
    month = await gw.store.app_totals(*_month(now))
    return html_response(console.overview(
        csrf=session.csrf, days=days, day_list=day_list, by_app=by_app, by_model=by_model,
        payers=payers, names=names, month=month.values(), period=period_of(now),
        holds_open=await gw.store.open_holds(), backlog=await gw.store.provisional_count(),
        activity=console.activity_charts(day_list, await gw.store.daily_calls(
            None, since, until))))


async def apps_page(request: web.Request, gw: Gateway, session: AdminSession) -> web.Response:
    now = gw.clock()
    return html_response(console.apps_list(
        csrf=session.csrf, apps=await gw.store.list_apps(),
        totals=await gw.store.app_totals(*_month(now)), period=period_of(now)))


def _origins_of(text: str) -> list[str]:
    return [normalize_origin(line) for line in text.replace(",", "\n").splitlines()
            if line.strip()]


async def create_app(request: web.Request, gw: Gateway, session: AdminSession) -> web.Response:
    form = await request.post()
    name = str(form.get("name", "")).strip()[:100]
    try:
        origins = _origins_of(str(form.get("origins", "")))
    except ValueError as e:
        return html_response(console.message("App not created", str(e), csrf=session.csrf,
                                             back="/admin/apps"), 400)
    if not name or not origins:
        return html_response(console.message("App not created", "An app needs a name and at "
                                             "least one origin.", csrf=session.csrf,
                                             back="/admin/apps"), 400)
    creds = mint_credentials()
    app = await gw.store.create_app(creds.app_id, name, gw.hash(creds.secret), origins,
                                    now=gw.clock())
    log.info("console: created app %s with origins %s", app.app_id, " ".join(origins))
    return html_response(console.secret_shown(csrf=session.csrf, app=app,
                                              secret_key=creds.secret_key, created=True))


async def _app(request: web.Request, gw: Gateway) -> App:
    app_id = request.match_info["app_id"]
    app = await gw.store.get_app(app_id) if is_app_id(app_id) else None
    if app is None:
        raise web.HTTPNotFound()
    return app


def _text(request: web.Request, name: str) -> str:
    return request.query.get(name, "").strip()[:200]


def _choice(request: web.Request, name: str, choices: tuple[str, ...]) -> str:
    value = request.query.get(name, "")
    return value if value in choices else ""


def _page_number(request: web.Request, name: str) -> int:
    try:
        return max(1, min(1_000_000, int(request.query.get(name, "1"))))
    except ValueError:
        return 1


async def app_page(request: web.Request, gw: Gateway, session: AdminSession) -> web.Response:
    """The app's figures, charts, and its connections and grants a page at a time
    (``q``/``state``/``page`` and ``gq``/``gstate``/``gpage``)."""
    app = await _app(request, gw)
    now, days = gw.clock(), _days(request)
    day_list, since, until = _window(now, days)
    spend = await gw.store.daily_spend(since, until, app_id=app.app_id)
    q, state, page = (_text(request, "q"), _choice(request, "state", CONNECTION_STATES),
                      _page_number(request, "page"))
    gq, gstate, gpage = (_text(request, "gq"), _choice(request, "gstate", GRANT_STATES),
                         _page_number(request, "gpage"))
    params = {"days": str(days) if "days" in request.query else "", "q": q, "state": state,
              "page": str(page) if page > 1 else "", "gq": gq, "gstate": gstate,
              "gpage": str(gpage) if gpage > 1 else ""}
    base, size = f"/admin/apps/{app.app_id}", console.PAGE_SIZE
    connections = await gw.store.connections_page(
        app.app_id, period_of(now), search=q, state=state or None, offset=(page - 1) * size,
        limit=size)
    grants = await gw.store.grants_page(app.app_id, now=now, search=gq, state=gstate or None,
                                        offset=(gpage - 1) * size, limit=size)
    all_connections = connections.total if not (q or state) else \
        (await gw.store.connections_page(app.app_id, period_of(now), limit=0)).total
    all_grants = grants.total if not (gq or gstate) else \
        (await gw.store.grants_page(app.app_id, now=now, limit=0)).total
    live = (await gw.store.grants_page(app.app_id, now=now, state="live", limit=0)).total
    hashes = {r.connection.connection_id: user_hash(gw.keys.hash_key, r.connection.app_user_id)
              for r in connections.rows}
    totals = await gw.store.app_totals(*_month(now))
    notice = None
    revoked = await gw.store.get_connection_by_id(int(request.query["revoked"])) \
        if request.query.get("revoked", "").isdigit() else None
    if revoked is not None and revoked.app_id == app.app_id and revoked.state == REVOKED:
        notice = (f"Revoked the connection of {revoked.app_user_id}: their next call is "
                  "refused with 402 not_connected until they connect again.")
    hook = await gw.store.get_webhook(app.app_id)
    key_notice = {"1": "The previous secret key no longer works, nor do the session tokens "
                       "it minted.",
                  "0": "There was no previous secret key to retire."
                  }.get(request.query.get("retired", ""))
    return html_response(console.app_detail(
        csrf=session.csrf, app=app, days=days, day_list=day_list, key_notice=key_notice,
        by_model=series_by(day_list, ((d.day, d.model, d.cost_nanos) for d in spend)),
        payers=await gw.store.top_payers(since, until, app_id=app.app_id, limit=10),
        connections=console.Browse(connections.rows, q, state, console.pager(
            base, params, "page", page, len(connections.rows), connections.total,
            "connections")),
        hashes=hashes, all_connections=all_connections,
        grants=console.Browse(grants.rows, gq, gstate, console.pager(
            base, params, "gpage", gpage, len(grants.rows), grants.total, "grants")),
        live_grants=live, all_grants=all_grants,
        activity=console.activity_charts(
            day_list, await gw.store.daily_calls(app.app_id, since, until)),
        totals=totals.get(app.app_id), period=period_of(now), now=now, params=params,
        notice=notice, webhook_url=hook.url if hook else None,
        deliveries=await gw.store.recent_webhooks(app.app_id, 50),
        webhook_notice=_webhook_notice(request.query),
        policy_notice="Policy saved: the next call on every gateway process is judged by it."
        if request.query.get("policy") == "saved" else None))


async def set_policy(request: web.Request, gw: Gateway, session: AdminSession) -> web.Response:
    """The app's policy from the console's form (``wattgate.policy`` says what it means)."""
    app = await _app(request, gw)
    form = await request.post()

    def field(name: str) -> str | None:
        value = str(form.get(name, "")).strip()
        return value or None
    try:
        if form.get("clear"):
            wanted = AppPolicy()
        else:
            wanted = policy.make_policy(
                models=str(form.get("models", "")).replace(",", "\n").split(),
                max_cap_usd=field("max_cap"), max_tokens=policy.parse_max_tokens(field("max_tokens")),
                suggested_cap_usd=field("suggested_cap"))
    except ValueError as e:
        return html_response(console.message("Policy not changed", str(e), csrf=session.csrf,
                                             back=f"/admin/apps/{app.app_id}#policy"), 400)
    if await gw.store.set_app_policy(app.app_id, wanted) is None:
        raise web.HTTPNotFound()  # deleted since the page was read: nothing was saved
    log.info("console: set the policy of app %s: %s", app.app_id,
             json.dumps(policy.describe(wanted)))
    return _see(f"/admin/apps/{app.app_id}?policy=saved#policy")


def _keyset(text: str) -> tuple[float, int] | None:
    """``before=<created_at>:<usage_id>``, the last line of the previous page."""
    if not text:
        return None
    t, _, usage_id = text.partition(":")
    try:
        keyset = (float(t), int(usage_id))
    except ValueError:
        keyset = (math.nan, 0)
    if not math.isfinite(keyset[0]):
        raise ValueError("before is not a position in the log")
    return keyset


async def requests_page(request: web.Request, gw: Gateway,
                        session: AdminSession) -> web.Response:
    """The request log of an app, or of one user (``user``), newest first, filtered by
    ``model``, ``status`` and a ``from``/``to`` date range, a keyset page at a time."""
    app = await _app(request, gw)
    now, days = gw.clock(), _days(request)
    filters = {"user": _text(request, "user"), "model": _text(request, "model"),
               "status": _choice(request, "status", CALL_STATUSES),
               "from": _text(request, "from"), "to": _text(request, "to"),
               "before": _text(request, "before")}
    try:
        log_filter = LogFilter(
            app.app_id, app_user_id=filters["user"] or None, model=filters["model"] or None,
            status=filters["status"] or None,
            since=export.parse_bound(filters["from"]) if filters["from"] else None,
            until=export.parse_bound(filters["to"], end=True) if filters["to"] else None,
            before=_keyset(filters["before"]))
    except ValueError as e:
        return html_response(console.message(
            "Filter refused", f"{e}. Use dates like 2026-11-01.", csrf=session.csrf,
            back=f"/admin/apps/{app.app_id}/requests"), 400)
    size = console.PAGE_SIZE
    lines = await gw.store.request_log(log_filter, limit=size)
    here = f"/admin/apps/{app.app_id}/requests"
    older = console.link(here, filters, "log", before=f"{lines[-1].created_at!r}:"
                         f"{lines[-1].usage_id}") if len(lines) == size else None
    day_list, since, until = _window(now, days)
    activity = console.activity_charts(day_list, await gw.store.daily_calls(
        app.app_id, since, until, app_user_id=filters["user"] or None))
    return html_response(console.request_log(
        csrf=session.csrf, app=app, lines=lines, filters=filters, older_href=older,
        day_list=day_list, activity=activity, days=days))


async def rotate_secret(request: web.Request, gw: Gateway, session: AdminSession) -> web.Response:
    app = await _app(request, gw)
    if request.method == "GET":  # changing every backend's key deserves a second click
        return html_response(console.confirm_rotation(csrf=session.csrf, app=app))
    choice = str((await request.post()).get("overlap", console.DEFAULT_OVERLAP))
    try:
        overlap = rotation.parse_overlap(choice)
    except ValueError as e:
        return html_response(console.message("Secret key not rotated", str(e),
                                             csrf=session.csrf,
                                             back=f"/admin/apps/{app.app_id}"), 400)
    done = await rotation.rotate(gw, app.app_id, overlap)
    if done is None:  # deleted since the page was read
        raise web.HTTPNotFound()
    if done.previous_until is None:
        log.warning("console: rotated the secret key of app %s; the old key no longer works",
                    app.app_id)
    else:
        log.warning("console: rotated the secret key of app %s; the old key works until %s",
                    app.app_id, rotation.utc(done.previous_until))
    return html_response(console.secret_shown(csrf=session.csrf, app=app,
                                              secret_key=done.secret_key, created=False,
                                              previous_until=done.previous_until))


async def retire_secret(request: web.Request, gw: Gateway, session: AdminSession) -> web.Response:
    app = await _app(request, gw)
    retired = await gw.store.retire_previous_secret(app.app_id)
    if retired:
        log.warning("console: retired the previous secret key of app %s", app.app_id)
    return _see(f"/admin/apps/{app.app_id}?retired={int(retired)}#keys")


async def change_origin(request: web.Request, gw: Gateway, session: AdminSession) -> web.Response:
    app = await _app(request, gw)
    remove = request.path.endswith("/remove")
    try:
        origin = normalize_origin(str((await request.post()).get("origin", "")))
    except ValueError as e:
        return html_response(console.message("Origin not changed", str(e), csrf=session.csrf,
                                             back=f"/admin/apps/{app.app_id}"), 400)
    await gw.store.set_origins(app.app_id, [] if remove else [origin], [origin] if remove else [])
    log.info("console: %s origin %s for app %s", "removed" if remove else "added", origin,
             app.app_id)
    return _see(f"/admin/apps/{app.app_id}")


async def revoke(request: web.Request, gw: Gateway, session: AdminSession) -> web.Response:
    app = await _app(request, gw)
    try:
        connection_id = int(request.match_info["connection_id"])
    except ValueError:
        raise web.HTTPNotFound() from None
    connection = await gw.store.get_connection_by_id(connection_id)
    if connection is None or connection.app_id != app.app_id:
        raise web.HTTPNotFound()
    if connection.state != REVOKED:
        await reconcile.revoke(gw, request.app[upstream_key], connection)
        log.info("console: revoked connection %d of app %s (user %s)", connection_id,
                 app.app_id, user_hash(gw.keys.hash_key, connection.app_user_id))
    return _see(f"/admin/apps/{app.app_id}?revoked={connection_id}#connections")


# ---- webhooks: the endpoint, and the deliveries an operator can send again ----
_WEBHOOK_NOTICES = {
    "cleared": "Webhooks stopped: no new events are written; pending deliveries fail.",
    "resent": "Queued for delivery again, with the same event id and body.",
    "not-resent": "Not resent: that event is pending already (or no longer listed).",
}


def _webhook_notice(query: Any) -> str | None:
    return _WEBHOOK_NOTICES.get(query.get("webhook", ""))


async def set_webhook(request: web.Request, gw: Gateway, session: AdminSession) -> web.Response:
    app = await _app(request, gw)
    try:
        url = webhooks.validate_url(str((await request.post()).get("url", "")))
    except ValueError as e:
        return html_response(console.message("Webhook not set", str(e), csrf=session.csrf,
                                             back=f"/admin/apps/{app.app_id}#webhooks"), 400)
    secret = await webhooks.set_endpoint(gw.store, gw.sealer, app.app_id, url)
    if secret is None:
        raise web.HTTPNotFound()
    log.warning("console: set the webhook endpoint of app %s (a new signing secret)", app.app_id)
    return html_response(console.webhook_set(csrf=session.csrf, app=app, url=url, secret=secret))


async def clear_webhook(request: web.Request, gw: Gateway,
                        session: AdminSession) -> web.Response:
    app = await _app(request, gw)
    await webhooks.clear_endpoint(gw.store, app.app_id)
    log.warning("console: cleared the webhook endpoint of app %s", app.app_id)
    return _see(f"/admin/apps/{app.app_id}?webhook=cleared#webhooks")


async def resend_webhook(request: web.Request, gw: Gateway,
                         session: AdminSession) -> web.Response:
    app = await _app(request, gw)
    event_id = request.match_info["event_id"]
    resent = await gw.store.resend_webhook(app.app_id, event_id, now=gw.clock())
    if resent:
        log.info("console: resend of webhook event %s of app %s", event_id, app.app_id)
    return _see(f"/admin/apps/{app.app_id}?webhook={'resent' if resent else 'not-resent'}"
                "#webhooks")


async def usage_download(request: web.Request, gw: Gateway,
                         session: AdminSession) -> web.StreamResponse:
    app = await _app(request, gw)
    fmt = request.query.get("format", "csv")
    try:
        if fmt not in export.FORMATS:
            raise ValueError(f"unknown format {fmt!r}")
        since = export.parse_bound(request.query["from"]) if request.query.get("from") else None
        until = export.parse_bound(request.query["to"], end=True) \
            if request.query.get("to") else None
    except ValueError as e:
        return html_response(console.message("Export refused", f"{e}. Use dates like "
                                             "2026-11-01.", csrf=session.csrf,
                                             back=f"/admin/apps/{app.app_id}#export"), 400)
    response = web.StreamResponse(headers={
        "Content-Type": f"{export.FORMATS[fmt]}; charset=utf-8", "Cache-Control": "no-store",
        "Content-Disposition":
            f'attachment; filename="{export.filename(app.app_id, fmt, since, until)}"'})
    await response.prepare(request)
    async for text in export.pages(gw.store, app.app_id, fmt, since, until):
        await response.write(text.encode())
    await response.write_eof()
    return response


async def stylesheet(request: web.Request) -> web.Response:
    return web.Response(body=CSS.read_bytes(), content_type="text/css",
                        headers={"Cache-Control": "max-age=300"})


async def sessions_ctx(app: web.Application) -> AsyncIterator[None]:
    metrics.check_token_file(app[gateway_key].config)  # refuse to start, not to scrape
    app[sessions_key] = AdminSessions(app[gateway_key].store)
    yield


def add_routes(app: web.Application) -> None:
    """Mount the console and /metrics (one line in ``create_app``)."""
    app.cleanup_ctx.append(sessions_ctx)
    r = app.router
    r.add_get("/metrics", metrics.metrics)
    r.add_get("/admin", home)
    r.add_get("/admin/admin.css", stylesheet)
    r.add_post("/admin/login", login)
    r.add_post("/admin/logout", signed_in(logout))
    r.add_get("/admin/apps", signed_in(apps_page))
    r.add_post("/admin/apps", signed_in(create_app))
    r.add_get("/admin/apps/{app_id}", signed_in(app_page))
    r.add_get("/admin/apps/{app_id}/rotate-secret", signed_in(rotate_secret))
    r.add_post("/admin/apps/{app_id}/rotate-secret", signed_in(rotate_secret))
    r.add_post("/admin/apps/{app_id}/retire-secret", signed_in(retire_secret))
    r.add_post("/admin/apps/{app_id}/policy", signed_in(set_policy))
    r.add_post("/admin/apps/{app_id}/origins", signed_in(change_origin))
    r.add_post("/admin/apps/{app_id}/origins/remove", signed_in(change_origin))
    r.add_post("/admin/apps/{app_id}/connections/{connection_id}/revoke", signed_in(revoke))
    r.add_get("/admin/apps/{app_id}/usage", signed_in(usage_download))
    r.add_post("/admin/apps/{app_id}/webhook", signed_in(set_webhook))
    r.add_post("/admin/apps/{app_id}/webhook/clear", signed_in(clear_webhook))
    r.add_post("/admin/apps/{app_id}/webhooks/{event_id}/resend", signed_in(resend_webhook))
    r.add_get("/admin/apps/{app_id}/requests", signed_in(requests_page))


__all__ = ["AdminSessions", "add_routes"]
