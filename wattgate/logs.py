"""The request log: one structured line per request, and how log lines are formatted.

``request_log_middleware`` (the outermost middleware) writes one line per
request to the ``wattgate.access`` logger when the answer is done: request id
(also sent back as ``X-Request-Id``), the client's address (and the scheme it
used, behind a proxy of ``server.trusted_proxies``: ``clientaddr``), method, route, status, latency, and what
the handler learned (``observer.RequestNote``): app, a keyed hash of the user
id, model, cost. It also counts the request for ``/metrics``.

What a line never holds: keys, tokens, cookies, query strings other than the
ones below, request or response bodies, the raw user id. The user hash is an
HMAC under the gateway's hash key (``user_hash``), the same on every line and
in the admin console, so an operator can follow one user without the log
naming them, and nobody without the keys file can test a guessed id against it.

``[log] format = "json"`` turns every log line of the process into one JSON
object (``JSONFormatter``); ``"text"`` writes logfmt lines (``TextFormatter``), every
value quoted and escaped as needed so a request cannot forge a field or a line.
``configure`` also puts the redactor (``wattgate.redaction``) on every handler.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from .credentials import is_app_id, keyed_hash
from .errors import WattgateError
from .gateway import Gateway
from .money import NANOS_PER_USD
from .observer import RequestNote, open_note
from .redaction import Redactor
from .sessions import SessionCodec
from .views.inputs import client_of
from .views.state import gateway_key

log = logging.getLogger("wattgate.access")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
FIELDS = ("request_id", "client", "scheme", "method", "route", "status", "latency_ms", "app", "user",
          "grant", "model", "cost_usd", "cost_state", "outcome")
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}
request_id_key = web.RequestKey("request_id", str)
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def user_hash(hash_key: bytes, user: str) -> str:
    """A stable, keyed pseudonym for a user id: 16 hex digits."""
    return keyed_hash(hash_key, "log-user:" + user)[:16]


def _route(request: web.Request) -> str:
    info = request.match_info
    resource = info.route.resource if info is not None and info.route is not None else None
    # The route's pattern, never the raw path: bounded label values, no ids in them.
    return resource.canonical if resource is not None else "unmatched"


def _caller(request: web.Request, sessions: SessionCodec, now: float) -> tuple[str | None,
                                                                               str | None]:
    """(app, user) the request's credentials name; only called for answers that were not 401.

    A secret key names its app (``sk_live_{app}_…``); a session token (the
    consent popup's calls) names its app and user once its signature checks.
    """
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    value = value.strip()
    if scheme.lower() != "bearer" or not value or value.startswith("pk_"):
        return None, None
    if value.startswith("sk_"):
        # Named by an unverified header: only a well-formed app id, never free text.
        parts = value.split("_")
        return (parts[2] if len(parts) >= 4 and is_app_id(parts[2]) else None), None
    try:
        session = sessions.verify(value, now=now)
    except WattgateError:
        return None, None
    return session.app_id, session.app_user_id


@web.middleware
async def request_log_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.perf_counter()
    request_id = secrets.token_hex(8)
    request[request_id_key] = request_id
    note = open_note()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as e:
        status = e.status
        raise
    except BaseException:  # cancelled (client gone) or a bug below the error middleware
        status = 499
        raise
    finally:
        gw = request.app[gateway_key]
        route = _route(request)
        # A client may send any method token: the label keeps a bounded set of values.
        method = request.method if request.method in METHODS else "OTHER"
        gw.observer.request_done(route, method, status)
        if log.isEnabledFor(logging.INFO):  # [log] level = "warning" turns the lines off
            _write_line(request, gw, note, route, status, request_id, started)


def _write_line(request: web.Request, gw: Gateway, note: RequestNote, route: str,
                status: int, request_id: str, started: float) -> None:
    client = client_of(gw.config, request)
    fields: dict[str, Any] = {
        "request_id": request_id, "client": client.address, "method": request.method[:16],
        "route": route, "status": status,
        "latency_ms": round((time.perf_counter() - started) * 1000, 1),
    }
    if client.scheme is not None:  # said by a trusted proxy: how the client reached it
        fields["scheme"] = client.scheme
    # A refused credential names no one: a 401 line never repeats a claimed identity.
    app, user = _caller(request, gw.sessions, gw.clock()) if status != 401 else (None, None)
    app = note.app_id or app or request.match_info.get("app_id")  # console pages of an app
    if status != 401:
        user = user or request.headers.get("x-wattfare-user")
        if user is None and route == "/api/v1/status":
            user = request.query.get("appUserId")
    if app:
        fields["app"] = app
    if user:
        fields["user"] = user_hash(gw.keys.hash_key, user)
    if note.grant_id is not None:
        fields["grant"] = note.grant_id
    if note.model:
        fields["model"] = note.model
    if note.cost_nanos is not None:
        fields["cost_usd"] = note.cost_nanos / NANOS_PER_USD
        fields["cost_state"] = "provisional" if note.provisional else "final"
        fields["outcome"] = note.outcome
    log.info("%s %s %s", request.method, route, status, extra={"request": fields})


async def add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: every answer, streamed or not, names its request id."""
    request_id = request.get(request_id_key)
    if request_id is not None:
        response.headers["X-Request-Id"] = request_id


class JSONFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and structured fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        out.update(getattr(record, "request", {}))
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key != "request":
                out[key] = value if isinstance(value, (str, int, float, bool)) else repr(value)
        exc = record.exc_text or (self.formatException(record.exc_info) if record.exc_info
                                  else None)
        if exc:
            out["exc"] = exc
        return json.dumps(out, default=str)


JSONFormatter.converter = time.gmtime  # type: ignore[assignment]

# Printable ASCII but space, '=', '"' and '\\' stands bare; anything else is quoted.
_BARE = re.compile(r'[\x21\x23-\x3c\x3e-\x5b\x5d-\x7e]+')


def logfmt_value(value: object) -> str:
    """One logfmt value: bare when safe, else a double-quoted string with JSON escapes.

    Spaces, '=', quotes, backslashes, control characters and line breaks can
    then never end a value early or start a forged field or line.
    """
    text = str(value)
    return text if _BARE.fullmatch(text) else json.dumps(text)


class TextFormatter(logging.Formatter):
    """One logfmt line per record: ``time= level= logger= msg=`` then the request's fields.

    Every value is quoted and escaped as needed (``logfmt_value``), so whatever a
    request carries (a path, a user id, a model name, a header) one record is
    exactly one line, and a parser reads back the fields we wrote, no others.
    """

    converter = time.gmtime  # type: ignore[assignment]

    def format(self, record: logging.LogRecord) -> str:
        stamp = self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z"
        parts = [("time", stamp), ("level", record.levelname.lower()),
                 ("logger", record.name), ("msg", record.getMessage())]
        fields = getattr(record, "request", None)
        if fields:
            parts += [(k, fields[k]) for k in FIELDS if k in fields]
        exc = record.exc_text or (self.formatException(record.exc_info) if record.exc_info
                                  else None)
        if exc:
            parts.append(("exc", exc))
        if record.stack_info:
            parts.append(("stack", record.stack_info))
        return " ".join(f"{k}={logfmt_value(v)}" for k, v in parts)


def formatter_for(fmt: str) -> logging.Formatter:
    return JSONFormatter() if fmt == "json" else TextFormatter()


def configure(level: str, fmt: str) -> None:
    """Point the root logger's handlers at the format, the level and the redactor (the CLI).

    Every record of the process reaches a root handler, so ``Redactor`` there is
    the one point no secret gets past, whoever logged it.
    """
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.StreamHandler())
    for handler in root.handlers:
        handler.setFormatter(formatter_for(fmt))
        if not any(isinstance(f, Redactor) for f in handler.filters):
            handler.addFilter(Redactor())
    root.setLevel(level.upper())
    logging.captureWarnings(True)  # library warnings reach the handlers, so the redactor too
