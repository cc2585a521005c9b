"""Configuration: every setting declared once, as data, with its default and help.

Sources, later ones winning: the embedded defaults below, a TOML file
(``--config`` or ``WATTGATE_CONFIG``), then environment variables named
``WATTGATE_<SECTION>__<KEY>`` (upper case, double underscore), e.g.
``WATTGATE_SERVER__PORT=9000``. Unknown keys and bad values are refused with a
``ConfigError`` naming the key. Secrets never live here: see ``wattgate.keyfile``.

``config.example.toml`` documents every setting; a test keeps it in step.
"""

from __future__ import annotations

import math
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit

from .errors import ConfigError


@dataclass(frozen=True)
class Setting:
    section: str
    key: str
    type: type
    default: Any
    help: str
    minimum: float | None = None
    maximum: float | None = None

    @property
    def name(self) -> str:
        return f"{self.section}.{self.key}"

    @property
    def env(self) -> str:
        return f"WATTGATE_{self.section.upper()}__{self.key.upper()}"


SETTINGS: tuple[Setting, ...] = (
    Setting("server", "host", str, "127.0.0.1", "Address to listen on."),
    Setting("server", "port", int, 8787, "TCP port to listen on.", 0, 65535),
    Setting("server", "public_url", str, "",
            "URL end users' browsers reach the gateway at (consent popup, SDK). "
            "Empty: http://{host}:{port}."),
    Setting("server", "max_body_bytes", int, 4 * 1024 * 1024,
            "Largest request body accepted, in bytes.", 1024),
    Setting("server", "shutdown_timeout", float, 30.0,
            "On SIGTERM: seconds running calls may take to finish (and settle) after the "
            "gateway stops accepting new ones.", 0),
    Setting("server", "header_timeout", float, 10.0,
            "Seconds a client may take to send a request's line and headers, from their "
            "first byte; a slower client is disconnected. Idle keep-alive connections are "
            "closed after keepalive_timeout.", 0.1),
    Setting("server", "body_timeout", float, 60.0,
            "Seconds a client may take to send a request's body, from the end of its "
            "headers; a slower one gets 408 and the connection is closed. Bounds what "
            "clients send, never how long an answer streams to them.", 0.1),
    Setting("server", "write_timeout", float, 60.0,
            "Seconds a client may go without taking a byte of an answer while the "
            "connection's buffers are full; past that it is treated as gone, as on a "
            "disconnect: its call is billed in the background and the connection closed. "
            "Bounds each wait for a write to move, never how long an answer streams nor "
            "a slow client that keeps reading. 60 s outlasts a phone's network stall yet "
            "frees a stalled call's budget hold and upstream stream well before "
            "metering.hold_ttl_seconds.", 0.1),
    Setting("server", "event_loop", str, "auto",
            "The event loop serving calls: uvloop (faster: less CPU per call and per "
            "streamed event), asyncio (the standard library's) or auto (uvloop where it "
            "is installed, which it is by default on Linux and macOS)."),
    Setting("server", "workers", int, 1,
            "Gateway processes serving server.port (a supervisor restarts any that dies). "
            "More than 1 needs the PostgreSQL ledger (database.url).", 1, 64),
    Setting("server", "trusted_proxies", list, [],
            "Addresses or CIDR networks of the reverse proxies in front of the gateway "
            "(e.g. [\"127.0.0.1\", \"::1\"]; in the environment, comma-separated). Only a "
            "request from one of them has its X-Forwarded-For and X-Forwarded-Proto believed: "
            "by the admin login limiter, /metrics access and the request log. Empty: no "
            "proxy is trusted and those headers are ignored."),
    Setting("server", "keepalive_timeout", float, 75.0,
            "Seconds an idle connection (or one that has sent nothing yet) stays open.",
            0.1),
    Setting("database", "path", str, "wattgate.db",
            "SQLite ledger file (when database.url is empty). Relative paths are "
            "relative to the working folder."),
    Setting("database", "url", str, "",
            "PostgreSQL ledger shared by a fleet of gateway processes and hosts, as "
            "postgresql://user[:password]@host[:port]/dbname. Empty: the embedded SQLite "
            "ledger at database.path, served by one process."),
    Setting("keys", "file", str, "",
            "Keys file (JWT signing key, master sealing keys), created mode 0600 on "
            "first use. Empty: next to the database, named <database>.keys.json."),
    Setting("upstream", "base_url", str, "https://openrouter.ai/api/v1",
            "OpenAI-compatible upstream the proxy forwards to."),
    Setting("upstream", "key_check_path", str, "/key",
            "Path under base_url used to check a funding key before it is saved "
            "(OpenRouter's GET /key). Empty: check with GET /models instead."),
    Setting("upstream", "connect_timeout", float, 10.0,
            "Seconds to open a connection to the upstream.", 0.1),
    Setting("upstream", "first_byte_timeout", float, 120.0,
            "Seconds to wait for the upstream's response headers.", 0.1),
    Setting("upstream", "idle_timeout", float, 120.0,
            "Seconds of silence tolerated between two chunks of a streamed answer (an "
            "upstream silent this long is cut within 1¼ times it).", 0.1),
    Setting("upstream", "stream_whole_answers", bool, True,
            "Ask the upstream to stream even when the client wants one JSON answer, and "
            "assemble that answer from the stream: the generation id then reaches the "
            "ledger while the model works, so a gateway crash mid-call loses no spend. "
            "false: forward non-streamed calls as they are."),
    Setting("upstream", "send_max_price", bool, True,
            "Send OpenRouter's provider.max_price with every call, set to the prices its "
            "budget hold assumed, so no routing (fallback providers, provider preferences, "
            "models fallbacks) can bill a dearer endpoint. Turn off only for an upstream "
            "that is not OpenRouter; requests naming provider are then refused."),
    Setting("upstream", "attribution", bool, True,
            "Send each call with HTTP-Referer (the app's registered origin, an https one "
            "first) and X-Title (the app's name) unless the client set them, so the user's "
            "OpenRouter activity shows which app spent. false: only the client's own."),
    Setting("upstream", "models_ttl", float, 600.0,
            "Seconds a fetched model price list is used before it is refreshed.", 1),
    Setting("sessions", "ttl_seconds", int, 600,
            "Lifetime of a session token minted by POST /sessions.", 10),
    Setting("limits", "sessions_per_minute", int, 120,
            "RL_SESSIONS: session mints per minute per app.", 1),
    Setting("limits", "chat_per_minute", int, 30,
            "RL_CHAT: inference requests per minute per app and user.", 1),
    Setting("metering", "default_max_tokens", int, 4096,
            "max_tokens injected into a request that sets none, so its worst cost "
            "is known before it leaves.", 1),
    Setting("metering", "fit_to_budget", str, "unset",
            "A call whose worst case does not fit what is left of its cap (a month's or a "
            "grant's maxUsd) is sent with its max_tokens lowered to what fits, instead of "
            "refused, when at least fit_min_tokens fit; the answer's header "
            "x-wattfare-max-tokens says so. unset: only calls that set no max_tokens or "
            "max_completion_tokens (the limit was the gateway's default_max_tokens, not "
            "theirs); always: a client's own limit is lowered too; never: refuse."),
    Setting("metering", "fit_min_tokens", int, 256,
            "The fewest answer tokens fit_to_budget sends a call with; below it the call is "
            "refused (402), with a message saying what would fit.", 1),
    Setting("metering", "hold_ttl_seconds", int, 900,
            "A budget hold older than this is swept (its request is long gone). Must be "
            "longer than upstream.connect_timeout + upstream.first_byte_timeout.", 60),
    Setting("metering", "drain_seconds", float, 60.0,
            "When a client disconnects mid-stream, how long the gateway keeps "
            "reading the upstream to learn the final cost.", 0),
    Setting("metering", "max_drains", int, 64,
            "How many such drains may run at once; past that the call is recorded "
            "at its estimate, marked provisional.", 0),
    Setting("metering", "reconcile_interval", float, 30.0,
            "Seconds between background passes that sweep expired holds and ask the "
            "upstream for the final cost of provisional calls (and erase the funding keys "
            "of revoked connections once none of their calls can be corrected).", 0.1),
    Setting("metering", "reconcile_give_up", float, 86400.0,
            "Seconds after a call past which its provisional cost is no longer "
            "reconciled and stays at its estimate.", 60),
    Setting("webhooks", "timeout", float, 10.0,
            "Seconds a webhook receiver has to answer one delivery (connect, send, status "
            "line); past that the attempt failed and is retried.", 0.1),
    Setting("webhooks", "retry_first", float, 10.0,
            "Seconds before the second attempt of a webhook delivery; each later wait "
            "doubles, up to retry_max.", 0.01),
    Setting("webhooks", "retry_max", float, 3600.0,
            "Longest wait between two attempts of one webhook delivery.", 0.01),
    Setting("webhooks", "give_up", float, 86400.0,
            "Seconds after an event (or its resend from the console) past which a delivery "
            "no receiver accepted is marked failed and no longer tried.", 1),
    Setting("webhooks", "keep_days", int, 90,
            "Days a delivered or failed webhook event stays listed (and resendable) before "
            "it is deleted. At least 62, so an event that must happen once a month (a "
            "threshold) is never told twice.", 62),
    Setting("webhooks", "poll_interval", float, 1.0,
            "Seconds between looks at the outbox for events due (by the one process of a "
            "fleet that leads webhook delivery).", 0.01),
    Setting("grants", "ttl_seconds", int, 600, "Lifetime of a one-time grant token.", 10),
    Setting("grants", "max_requests", int, 100,
            "Largest request count one grant may authorize.", 1),
    Setting("dev", "allow_unlimited", bool, False,
            "Allow connections with monthlyUsd: null (no cap). Development only."),
    Setting("log", "level", str, "info", "debug, info, warning or error."),
    Setting("log", "format", str, "text",
            "text (logfmt: time= level= logger= msg= then the fields, values quoted as "
            "needed) or json (one object per line). "
            "Either way there is one line per request: request id, client address, route, status, "
            "latency, app, user id hash, model, cost; never keys, tokens or prompts."),
    Setting("metrics", "enabled", bool, True, "Serve Prometheus metrics at GET /metrics."),
    Setting("metrics", "allow_remote", bool, False,
            "Serve /metrics to any client. false: loopback clients only (a request that "
            "came through a reverse proxy is not loopback), unless token_file is set."),
    Setting("metrics", "token_file", str, "",
            "File holding a bearer token (32+ random characters) that lets a remote scraper read "
            "/metrics. Empty: no token."),
    Setting("oauth", "auth_base", str, "https://openrouter.ai",
            "Where \"Connect with OpenRouter\" sends the user: {auth_base}/auth with a "
            "PKCE challenge. Empty: the consent popup offers only a pasted key."),
    Setting("oauth", "api_base", str, "",
            "Base the gateway exchanges the OAuth code at (POST {api_base}/auth/keys). "
            "Empty: upstream.base_url."),
)

_BY_NAME = {s.name: s for s in SETTINGS}
SECTIONS = sorted({s.section for s in SETTINGS})


def _check_together(values: Mapping[str, Any]) -> None:
    """Settings that are only safe in relation to each other."""
    waits = values.get("upstream.connect_timeout", 0) + values.get("upstream.first_byte_timeout", 0)
    ttl = values.get("metering.hold_ttl_seconds")
    if ttl is not None and ttl <= waits:
        # A hold the upstream has not answered yet lives only in memory; the sweep
        # drops such holds past the TTL, which must outlast the wait for an answer.
        raise ConfigError(f"metering.hold_ttl_seconds ({ttl}) must be longer than "
                          f"upstream.connect_timeout + upstream.first_byte_timeout ({waits:g})")


class Config:
    """Parsed settings, read as ``config.get("server.port")`` or ``config.server_port``."""

    def __init__(self, values: Mapping[str, Any], *, source: str | None = None) -> None:
        self._values = dict(values)
        self.source = source
        _check_together(self._values)
        # ``config.server_port`` as a plain attribute: the hot path reads a dozen
        # settings per call, and ``__getattr__`` (below) costs a string split each.
        for name, value in self._values.items():
            section, _, key = name.partition(".")
            if "_" not in section:
                self.__dict__.setdefault(f"{section}_{key}", value)

    def get(self, name: str) -> Any:
        return self._values[name]

    def __getattr__(self, attr: str) -> Any:
        section, _, key = attr.partition("_")
        try:
            return self._values[f"{section}.{key}"]
        except KeyError:
            raise AttributeError(attr) from None

    def replace(self, **changes: Any) -> "Config":
        values = dict(self._values)
        for name, raw in changes.items():
            setting = _BY_NAME.get(name.replace("__", "."))
            if setting is None:
                raise ConfigError(f"unknown setting {name!r}")
            values[setting.name] = _coerce(setting, raw, origin=setting.name)
        return Config(values, source=self.source)

    @property
    def public_origin(self) -> str:
        url = self.server_public_url or f"http://{self.server_host}:{self.server_port}"
        return url.rstrip("/")

    @property
    def database_file(self) -> Path:
        return Path(self.database_path)

    @property
    def keys_path(self) -> Path:
        if self.keys_file:
            return Path(self.keys_file)
        db = self.database_file
        return db.with_name(db.name + ".keys.json")


def _coerce(setting: Setting, raw: Any, *, origin: str) -> Any:
    t = setting.type
    value: Any
    if t is list:
        if isinstance(raw, str):
            raw = [item for item in (part.strip() for part in raw.split(",")) if item]
        if not isinstance(raw, list) or not all(isinstance(item, str) for item in raw):
            raise ConfigError(f"{origin}: expected a list of strings, got {raw!r}")
        check = _CHECKS.get(setting.name)
        return check(list(raw), origin) if check else list(raw)
    if isinstance(raw, str) and t is not str:
        text = raw.strip()
        if t is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ConfigError(f"{origin}: expected true or false, got {raw!r}")
        try:
            value = t(text)
        except ValueError:
            raise ConfigError(f"{origin}: expected {t.__name__}, got {raw!r}") from None
    elif t is float and isinstance(raw, int) and not isinstance(raw, bool):
        value = float(raw)
    elif isinstance(raw, t) and not (t is int and isinstance(raw, bool)):
        value = raw
    else:
        raise ConfigError(f"{origin}: expected {t.__name__}, got {type(raw).__name__}")
    if t is float and not math.isfinite(value):
        raise ConfigError(f"{origin}: expected a finite number, got {raw!r}")
    if setting.minimum is not None and value < setting.minimum:
        raise ConfigError(f"{origin}: must be at least {setting.minimum:g}, got {value}")
    if setting.maximum is not None and value > setting.maximum:
        raise ConfigError(f"{origin}: must be at most {setting.maximum:g}, got {value}")
    check = _CHECKS.get(setting.name)
    return check(value, origin) if check else value


def _one_of(*choices: str) -> Callable[[str, str], str]:
    """A check that takes one of ``choices``, in any case."""
    names = ", ".join(choices[:-1]) + f" or {choices[-1]}"

    def check(value: str, origin: str) -> str:
        if value.lower() not in choices:
            raise ConfigError(f"{origin}: expected {names}, got {value!r}")
        return value.lower()
    return check


def _http_url(value: str, origin: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"{origin}: expected an http(s) URL, got {value!r}")
    return value


def _optional_origin(value: str, origin: str) -> str:
    """Empty, or an origin: browsers compare it exactly (postMessage, Origin, cookies)."""
    if not value:
        return value
    parts = urlsplit(_http_url(value, origin))
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(f"{origin}: expected an origin like https://gw.example.com "
                          f"(wattgate serves at the root; no path), got {value!r}")
    return value


def _path_or_empty(value: str, origin: str) -> str:
    if value and not value.startswith("/"):
        raise ConfigError(f"{origin}: expected a path starting with /, got {value!r}")
    return value


def _postgres_url_or_empty(value: str, origin: str) -> str:
    if not value.strip():
        return ""
    try:
        parts = urlsplit(value.strip())
        parts.port  # noqa: B018 (parsed lazily: a bad port raises only here)
    except ValueError as e:  # its text names the fault, never the URL (nor its password)
        raise ConfigError(f"{origin}: not a valid database URL ({e})") from None
    if parts.scheme not in ("postgresql", "postgres") or not parts.path.strip("/"):
        raise ConfigError(f"{origin}: expected postgresql://user@host:port/dbname")
    return value.strip()


def _networks(value: list[str], origin: str) -> list[str]:
    from .clientaddr import parse_networks
    parse_networks(value, origin)
    return value


def _file_path(value: str, origin: str) -> str:
    if not value.strip():
        raise ConfigError(f"{origin}: must name a file")
    return value


_CHECKS: dict[str, Callable[[Any, str], Any]] = {
    "log.level": _one_of("debug", "info", "warning", "error"),
    "log.format": _one_of("text", "json"),
    "metering.fit_to_budget": _one_of("unset", "always", "never"),
    "server.event_loop": _one_of("auto", "uvloop", "asyncio"),
    "upstream.base_url": _http_url,
    "server.public_url": _optional_origin,
    "upstream.key_check_path": _path_or_empty,
    "database.path": _file_path,
    "database.url": _postgres_url_or_empty,
    "server.trusted_proxies": _networks,
}


def load_config(path: str | os.PathLike[str] | None = None,
                env: Mapping[str, str] | None = None) -> Config:
    """Defaults, then the TOML file, then ``WATTGATE_*`` variables."""
    env = os.environ if env is None else env
    values = {s.name: s.default for s in SETTINGS}
    if path is None and env.get("WATTGATE_CONFIG"):
        path = env["WATTGATE_CONFIG"]
    if path is not None:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
        for section, table in data.items():
            if not isinstance(table, dict):
                raise ConfigError(f"{path}: {section} must be inside a [section]; "
                                  f"see config.example.toml")
            if section not in SECTIONS:
                raise ConfigError(f"{path}: unknown section [{section}]")
            for key, raw in table.items():
                setting = _BY_NAME.get(f"{section}.{key}")
                if setting is None:
                    raise ConfigError(f"{path}: unknown key {section}.{key}")
                values[setting.name] = _coerce(setting, raw, origin=f"{path}: {setting.name}")
    known_env = {s.env: s for s in SETTINGS}
    for name, raw in env.items():
        if not name.startswith("WATTGATE_") or "__" not in name:
            continue
        setting = known_env.get(name)
        if setting is None:
            raise ConfigError(f"unknown environment setting {name}")
        values[setting.name] = _coerce(setting, raw, origin=name)
    return Config(values, source=str(path) if path else None)


def example_toml() -> str:
    """The text of config.example.toml, made from SETTINGS."""
    lines = ["# wattgate configuration: every key with its default.",
             "# Each key can also be set as WATTGATE_<SECTION>__<KEY> in the environment.",
             "# Secrets are never read from here: see the keys file.", ""]
    for section in dict.fromkeys(s.section for s in SETTINGS):
        lines.append(f"[{section}]")
        for s in SETTINGS:
            if s.section != section:
                continue
            lines.append(f"# {s.help}")
            lines.append(f"{s.key} = {_toml_value(s.default)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)
