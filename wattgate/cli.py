"""The ``wattgate`` command line: serve, manage apps, rotate keys.

Every command takes ``--config PATH`` (or ``WATTGATE_CONFIG``). Failures print
one line, ``wattgate: error: …``, and exit 2 (usage) or 1 (everything else);
never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sqlite3
import sys
import time
from typing import Any, Awaitable, Callable, Sequence

from . import __version__, origins, policy, rotation
from .config import Config, load_config
from .credentials import mint_credentials
from .errors import ConfigError
from .gateway import Gateway, open_gateway
from .money import format_usd, nanos_to_usd
from .store import App, AppPolicy


class CommandError(Exception):
    """A command failed for a reason the user can fix; printed as one line."""


def normalize_origin(value: str) -> str:
    try:
        return origins.normalize_origin(value)
    except ValueError as e:
        raise CommandError(str(e)) from None


def _run(config: Config, fn: Callable[[Gateway], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        gw = await open_gateway(config)
        try:
            return await fn(gw)
        finally:
            await gw.store.close()
    return asyncio.run(main())


def cmd_serve(args: argparse.Namespace, config: Config) -> int:
    from .app import create_app
    from .server import run

    changes = {}
    if args.host:
        changes["server.host"] = args.host
    if args.port is not None:
        changes["server.port"] = args.port
    if args.workers is not None:
        changes["server.workers"] = args.workers
    config = config.replace(**changes) if changes else config
    if config.server_workers > 1:
        return _serve_workers(config)
    app = create_app(config)

    def ready() -> None:  # once the socket listens
        print(f"wattgate listening on http://{config.server_host}:{config.server_port} "
              f"(database {_database_name(config)}, keys {config.keys_path})", flush=True)
    try:
        run(app, config, ready)
    except OSError as e:
        raise CommandError(f"cannot listen on {config.server_host}:{config.server_port}: "
                           f"{e.strerror or e}") from None
    return 0


def _serve_workers(config: Config) -> int:
    """``serve --workers N``: a supervisor (``wattgate.supervisor``) and N gateways."""
    from .supervisor import Supervisor, listen

    workers = config.server_workers
    if not config.database_url:
        # The SQLite ledger keeps the holds of calls in flight in its one serving
        # process's memory (SQLiteStore.claim): a second process could pass a cap.
        raise CommandError(f"server.workers = {workers} needs the PostgreSQL ledger "
                           "(database.url): the SQLite ledger is served by one process")
    try:
        sockets = listen(config.server_host, config.server_port)
    except OSError as e:
        raise CommandError(f"cannot listen on {config.server_host}:{config.server_port}: "
                           f"{e.strerror or e}") from None
    port = sockets[0].getsockname()[1]

    def ready() -> None:  # once every worker listens
        print(f"wattgate listening on http://{config.server_host}:{port} with {workers} "
              f"workers (database {_database_name(config)}, keys {config.keys_path})",
              flush=True)
    try:
        return Supervisor(workers, lambda socks, up: serve_worker(config, socks, up),
                          sockets, ready=ready).run()
    finally:
        for sock in sockets:
            sock.close()


def serve_worker(config: Config, sockets: Sequence[Any], ready: Callable[[], None]) -> int:
    """One gateway process of ``serve --workers``, on sockets its supervisor bound; its
    failures reported as ``main`` reports a command's (one line, exit 1)."""
    from .app import create_app
    from .server import run

    def serve() -> int:
        run(create_app(config), config, ready, sockets=sockets)
        return 0
    return _guarded(serve)


def _database_name(config: Config) -> str:
    """The ledger, for a log line: a PostgreSQL URL without its password."""
    if not config.database_url:
        return str(config.database_file)
    from urllib.parse import urlsplit
    parts = urlsplit(config.database_url)
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return f"{parts.scheme}://{parts.username + '@' if parts.username else ''}{host}{parts.path}"


def cmd_apps(args: argparse.Namespace, config: Config) -> int:
    if args.apps_command == "create":
        origins = [normalize_origin(o) for o in args.origin]
        name = args.name.strip()
        if not name:
            raise CommandError("--name must not be empty")
        creds = mint_credentials()

        async def create(gw: Gateway) -> None:
            await gw.store.create_app(creds.app_id, name, gw.hash(creds.secret), origins,
                                      now=time.time())
        _run(config, create)
        out = {"appId": creds.app_id, "publishableKey": creds.publishable_key,
               "secretKey": creds.secret_key}
        if args.json:
            print(json.dumps(out))
        else:
            print(f"Created app {name!r}\n  appId:          {creds.app_id}\n"
                  f"  publishableKey: {creds.publishable_key}\n"
                  f"  secretKey:      {creds.secret_key}\n"
                  "The secret key is shown once; store it in your backend's secrets.")
        return 0
    if args.apps_command in ("set-policy", "show"):
        return cmd_app_policy(args, config)
    if args.apps_command == "list":
        apps = _run(config, lambda gw: gw.store.list_apps())
        rows = [_app_json(a) for a in apps]
        if args.json:
            print(json.dumps(rows))
        elif not rows:
            print("no apps yet: wattgate apps create --name NAME --origin URL")
        else:
            for r in rows:
                print(f"{r['appId']}  {r['name']}  {' '.join(r['origins'])}")
        return 0
    app_id = args.app_id
    if args.apps_command == "rotate-secret":
        try:
            overlap = rotation.parse_overlap(args.overlap)
        except ValueError as e:
            raise CommandError(f"--overlap: {e}") from None
        done = _run(config, lambda gw: rotation.rotate(gw, app_id, overlap))
        if done is None:
            raise CommandError(f"unknown app {app_id}")
        until = done.previous_until
        if args.json:
            print(json.dumps({"appId": app_id, "secretKey": done.secret_key,
                              "previousValidUntil": until and rotation.iso(until)}))
        elif until is None:
            print(f"New secret key for {app_id} (shown once; the old one no longer works, "
                  f"nor do the session tokens it minted):\n  {done.secret_key}")
        else:
            print(f"New secret key for {app_id} (shown once; it works now):\n"
                  f"  {done.secret_key}\n"
                  f"The previous secret key keeps working until {rotation.utc(until)}: deploy "
                  f"the new one, then end the overlap with\n"
                  f"  wattgate apps retire-secret {app_id}")
        return 0
    if args.apps_command == "retire-secret":
        async def retire(gw: Gateway) -> bool | None:
            if await gw.store.get_app(app_id) is None:
                return None
            return await gw.store.retire_previous_secret(app_id)
        retired = _run(config, retire)
        if retired is None:
            raise CommandError(f"unknown app {app_id}")
        if args.json:
            print(json.dumps({"appId": app_id, "retired": retired}))
        else:
            print(f"retired the previous secret key of {app_id}: it and its session tokens "
                  "stop working now" if retired else
                  f"{app_id} has no previous secret key: nothing to retire")
        return 0
    if args.apps_command == "set-webhook":
        from . import webhooks
        try:
            url = webhooks.validate_url(args.url)
        except ValueError as e:
            raise CommandError(str(e)) from None
        secret = _run(config, lambda gw: webhooks.set_endpoint(gw.store, gw.sealer, app_id, url))
        if secret is None:
            raise CommandError(f"unknown app {app_id}")
        print(json.dumps({"url": url, "secret": secret}) if args.json
              else f"Webhooks of {app_id} now go to {url}\n"
                   f"  signing secret: {secret}\n"
                   "The secret is shown once; your receiver verifies each delivery with it "
                   "(a new set-webhook replaces it).")
        return 0
    if args.apps_command == "clear-webhook":
        from . import webhooks
        if not _run(config, lambda gw: webhooks.clear_endpoint(gw.store, app_id)):
            raise CommandError(f"unknown app {app_id}")
        print(f"cleared the webhook endpoint of {app_id}: no new events are written; "
              "pending deliveries fail")
        return 0
    if args.apps_command == "delete":
        if not _run(config, lambda gw: gw.store.delete_app(app_id, now=time.time())):
            raise CommandError(f"unknown app {app_id}")
        print(f"deleted app {app_id}: its keys, connections and grants stop now; its spend "
              f"history stays (wattgate usage export --app {app_id})")
        return 0
    origin = normalize_origin(args.origin)
    add = [origin] if args.apps_command == "add-origin" else []
    remove = [origin] if args.apps_command == "remove-origin" else []
    if not _run(config, lambda gw: gw.store.set_origins(app_id, add, remove)):
        raise CommandError(f"unknown app {app_id}")
    print(f"{'added' if add else 'removed'} origin {origin} for {app_id}")
    return 0


def _app_json(app: App) -> dict[str, Any]:
    return {"appId": app.app_id, "name": app.name, "publishableKey": f"pk_live_{app.app_id}",
            "origins": list(app.origins), "policy": policy.describe(app.policy)}


def _usd_text(nanos: int | None) -> str | None:
    return None if nanos is None else str(nanos_to_usd(nanos))


def _optional(value: str | None) -> str | None:
    """An option's value, where ``none`` removes that limit."""
    return None if value is None or value.strip().lower() == "none" else value


def cmd_app_policy(args: argparse.Namespace, config: Config) -> int:
    """``apps show APP_ID`` and ``apps set-policy APP_ID [--models P ...] [--max-cap USD]
    [--max-tokens N|none] [--suggested-cap USD] [--clear]``: options given replace those
    limits, the others stay (``--clear`` first removes them all)."""
    app_id = args.app_id

    async def apply(gw: Gateway) -> App:
        app = await gw.store.get_app(app_id)
        if app is None:
            raise CommandError(f"unknown app {app_id}")
        if args.apps_command == "show":
            return app
        current = AppPolicy() if args.clear else app.policy
        tokens = current.max_tokens
        if args.max_tokens is not None:
            raw = _optional(args.max_tokens)
            try:
                tokens = policy.parse_max_tokens(raw)
            except ValueError:
                raise CommandError("--max-tokens must be a whole number or none") from None
        try:
            wanted = policy.make_policy(
                models=current.models if args.models is None else args.models,
                max_cap_usd=_usd_text(current.max_cap_nanos) if args.max_cap is None
                else _optional(args.max_cap),
                max_tokens=tokens,
                suggested_cap_usd=_usd_text(current.suggested_cap_nanos) if args.suggested_cap is None
                else _optional(args.suggested_cap))
        except ValueError as e:
            raise CommandError(str(e)) from None
        saved = await gw.store.set_app_policy(app_id, wanted)
        if saved is None:
            raise CommandError(f"unknown app {app_id}")
        return saved
    app = _run(config, apply)
    if args.json:
        print(json.dumps(_app_json(app) if args.apps_command == "show"
                         else {"appId": app.app_id, "policy": policy.describe(app.policy)}))
        return 0
    p = app.policy
    print(f"{app.app_id}  {app.name}  {' '.join(app.origins)}\n"
          f"  models:        {', '.join(p.models) or 'any'}\n"
          f"  max cap:       "
          f"{'none' if p.max_cap_nanos is None else format_usd(p.max_cap_nanos) + ' a month'}\n"
          f"  max tokens:    {'none' if p.max_tokens is None else f'{p.max_tokens} per call'}\n"
          f"  suggested cap: "
          f"{'none' if p.suggested_cap_nanos is None else format_usd(p.suggested_cap_nanos)}")
    return 0


def cmd_keys(args: argparse.Namespace, config: Config) -> int:
    from .keyfile import add_master_key
    from .sealing import Sealer, SealError, connection_aad, grant_aad, webhook_aad

    aad_of = {"connections": lambda i: connection_aad(int(i)),
              "grants": lambda i: grant_aad(int(i)), "apps": lambda i: webhook_aad(str(i))}

    async def rotate(gw: Gateway) -> tuple[str, int, int]:
        kid = add_master_key(gw.keys)
        gw.sealer = Sealer(gw.keys.master_keys, gw.keys.active_key_id)
        changes: list[tuple[str, int | str, str, str]] = []
        # Funding keys and the apps' webhook signing secrets, all in one pass: once
        # done, the old master key seals nothing and can leave the keys file.
        for table, row_id, sealed in await gw.store.all_sealed_keys():
            aad = aad_of[table](row_id)
            try:
                plain = gw.sealer.unseal(sealed, aad)
            except SealError as e:
                raise CommandError(f"{table} row {row_id}: {e}") from None
            changes.append((table, row_id, sealed, gw.sealer.seal(plain, aad)))
        keys = await gw.store.replace_sealed_keys([c for c in changes if c[0] != "apps"])
        secrets = await gw.store.replace_sealed_keys([c for c in changes if c[0] == "apps"])
        return kid, keys, secrets
    kid, keys, secrets = _run(config, rotate)
    print(f"master key {kid} is now active; re-sealed {keys} funding keys "
          f"and {secrets} webhook signing secrets")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wattgate", description=(
        "Self-hosted consent and metering gateway for AI spend."))
    parser.add_argument("--version", action="version", version=f"wattgate {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="TOML config file (default: $WATTGATE_CONFIG or "
                        "embedded defaults)")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", parents=[common], help="run the gateway")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--workers", type=int, metavar="N", help=(
        "gateway processes serving the port, supervised (default: server.workers, 1); "
        "more than 1 needs the PostgreSQL ledger (database.url)"))

    apps = sub.add_parser("apps", help="register and manage apps")
    apps_sub = apps.add_subparsers(dest="apps_command", required=True)
    create = apps_sub.add_parser("create", parents=[common], help="register an app")
    create.add_argument("--name", required=True)
    create.add_argument("--origin", action="append", required=True,
                        help="an origin allowed to open the consent popup (repeatable)")
    create.add_argument("--json", action="store_true")
    lst = apps_sub.add_parser("list", parents=[common], help="list apps")
    lst.add_argument("--json", action="store_true")
    rot = apps_sub.add_parser("rotate-secret", parents=[common], help=(
        "issue a new secret key, working at once; the old one stops at once, or keeps "
        "working for --overlap so backends can move to the new one without downtime"))
    rot.add_argument("app_id")
    # Without --overlap the old key stops at once, as this command always did: a runbook
    # that rotates a leaked key must not leave it working for a day.
    rot.add_argument("--overlap", default="0", metavar="DURATION", help=(
        "how long the old secret key still works: e.g. 24h, 90m, 7d (at most 30d); "
        "default 0: it stops at once (a leaked key)"))
    rot.add_argument("--json", action="store_true")
    ret = apps_sub.add_parser("retire-secret", parents=[common], help=(
        "end a rotation's overlap now: the previous secret key stops working"))
    ret.add_argument("app_id")
    ret.add_argument("--json", action="store_true")
    hook = apps_sub.add_parser("set-webhook", parents=[common], help=(
        "send the app's budget events to URL, signed with a new secret (printed once)"))
    hook.add_argument("app_id", metavar="APP_ID")
    hook.add_argument("--url", required=True, help="http:// or https:// endpoint")
    hook.add_argument("--json", action="store_true", help='print {"url", "secret"}')
    unhook = apps_sub.add_parser("clear-webhook", parents=[common],
                                 help="stop sending the app's budget events")
    unhook.add_argument("app_id", metavar="APP_ID")
    dele = apps_sub.add_parser("delete", parents=[common], help="delete an app")
    dele.add_argument("app_id")
    show = apps_sub.add_parser("show", parents=[common], help="an app, its origins and policy")
    show.add_argument("app_id")
    show.add_argument("--json", action="store_true")
    pol = apps_sub.add_parser("set-policy", parents=[common], help=(
        "limit an app's models, output tokens and users' caps (options given replace "
        "those limits; none removes one)"))
    pol.add_argument("app_id")
    pol.add_argument("--models", nargs="*", metavar="PATTERN", help=(
        "allowed model ids; * is any run of characters but / (openai/*); none given: any"))
    pol.add_argument("--max-cap", metavar="USD", help="the largest monthly cap a user may "
                     "approve")
    pol.add_argument("--max-tokens", metavar="N", help="the largest output bound of one call")
    pol.add_argument("--suggested-cap", metavar="USD", help="the cap the consent popup "
                     "preselects (at most --max-cap)")
    pol.add_argument("--clear", action="store_true", help="remove every limit first")
    pol.add_argument("--json", action="store_true")
    for name in ("add-origin", "remove-origin"):
        p = apps_sub.add_parser(name, parents=[common], help=f"{name.split('-')[0]} an origin")
        p.add_argument("app_id")
        p.add_argument("origin")

    keys = sub.add_parser("keys", help="manage the master sealing keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    keys_sub.add_parser("rotate", parents=[common],
                        help="add a new master key and re-seal every funding key")
    ledger = sub.add_parser("ledger", help="verify and reconcile the spend ledger")
    ledger_sub = ledger.add_subparsers(dest="ledger_command", required=True)
    check = ledger_sub.add_parser("check", parents=[common], help=(
        "audit the ledger: spend within caps, aggregates equal to their rows, no row or "
        "hold pointing at what does not exist, no hold without a call; print each problem "
        "naming its row and exit 1"))
    check.add_argument("--upstream", nargs="?", type=int, const=100, metavar="N", help=(
        "also compare the latest N final calls (default 100) with what the upstream billed "
        "(GET /generation, with each payer's own key)"))
    ledger_sub.add_parser("reconcile", parents=[common], help=(
        "ask the upstream for the final cost of provisional calls, correct them, and sweep "
        "expired holds"))
    demo = sub.add_parser("demo", help="run the gateway, a fake OpenRouter and an example "
                          "app on loopback, offline, and print the URL to open")
    demo.add_argument("--port", type=int, default=8787, help="the gateway's port (default 8787)")
    demo.add_argument("--app-port", type=int, default=8790, help="the example app's port")
    demo.add_argument("--fake-port", type=int, default=8788, help="the fake OpenRouter's port")
    demo.add_argument("--data", help="keep the demo's database in this folder "
                      "(default: a temporary folder, deleted on exit)")
    add_usage_parser(sub, common)
    return parser


def cmd_demo(args: argparse.Namespace, config: Config) -> int:
    from pathlib import Path

    from .demo import PortBusy, run

    try:
        return run(data_dir=Path(args.data) if args.data else None, gateway_port=args.port,
                   app_port=args.app_port, fake_port=args.fake_port)
    except PortBusy as e:
        raise CommandError(f"cannot start the demo: {e.strerror}") from None
    except OSError as e:
        raise CommandError(f"cannot start the demo: {e}") from None


def cmd_ledger(args: argparse.Namespace, config: Config) -> int:
    if args.ledger_command == "check":
        if args.upstream is not None and args.upstream < 1:
            raise CommandError("--upstream: expected a number of calls, 1 or more")

        async def check(gw: Gateway) -> tuple[list[str], int]:
            problems = await gw.store.check(now=time.time(),
                                            hold_ttl=config.metering_hold_ttl_seconds)
            if args.upstream is not None:
                problems += await check_upstream(gw, args.upstream)
            return problems, await gw.store.provisional_count()

        async def check_upstream(gw: Gateway, limit: int) -> list[str]:
            from .reconcile import Reconciler
            from .upstream import Upstream
            upstream = Upstream.from_config(config, clock=time.time)
            await upstream.start()
            try:
                found, compared, unknown = await Reconciler(gw, upstream).verify(limit)
            finally:
                await upstream.close()
            print(f"compared {compared} calls with the upstream ({unknown} it could not be "
                  "asked about: no funding key left, or not known upstream yet)")
            return found
        problems, provisional = _run(config, check)
        for line in problems:
            print(f"ledger: {line}")
        if problems:
            print(f"ledger check failed: {len(problems)} problems", file=sys.stderr)
            return 1
        print(f"ledger ok ({provisional} provisional calls awaiting reconciliation)")
        return 0

    from .reconcile import Reconciler
    from .upstream import Upstream

    async def reconcile(gw: Gateway) -> tuple[int, Any]:
        upstream = Upstream.from_config(config, clock=time.time)
        await upstream.start()
        try:
            reconciler = Reconciler(gw, upstream)
            swept = await reconciler.sweep()
            return swept, await reconciler.run_once(force=True)
        finally:
            await upstream.close()
    swept, report = _run(config, reconcile)
    print(f"swept {swept} expired holds; checked {report.checked} provisional calls, "
          f"corrected {report.corrected}, {report.waiting} not ready upstream yet, "
          f"{report.unreachable} without a funding key to ask with")
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace, Config], int]] = {
    "serve": cmd_serve, "apps": cmd_apps, "keys": cmd_keys, "demo": cmd_demo, "ledger": cmd_ledger,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    def command() -> int:
        config = load_config(getattr(args, "config", None))
        if getattr(args, "log_level", None):
            config = config.replace(**{"log.level": args.log_level})
        logging.basicConfig(level=config.log_level.upper(),
                            format="%(asctime)s %(levelname)s %(name)s %(message)s")
        configure_log_format(config)
        return COMMANDS[args.command](args, config)
    return _guarded(command)


def _guarded(command: Callable[[], int]) -> int:
    """Run a command; a failure is one line on stderr and exit 1, never a traceback."""
    try:
        return command()
    except (ConfigError, CommandError) as e:
        print(f"wattgate: error: {e}", file=sys.stderr)
        return 1
    except sqlite3.Error as e:
        print(f"wattgate: error: database: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # never a traceback; the log has it at debug level
        from .redaction import redact

        logging.getLogger("wattgate").debug("command failed", exc_info=True)
        # An exception's text may quote what it failed on: never a secret on stderr.
        print(redact(f"wattgate: error: {type(e).__name__}: {e}"), file=sys.stderr)
        return 1


# ---- wattgate usage export ------------------------------------------------
def add_usage_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    usage = sub.add_parser("usage", help="export the metered calls of an app")
    usage_sub = usage.add_subparsers(dest="usage_command", required=True)
    exp = usage_sub.add_parser("export", parents=[common], help=(
        "print one line per metered call (time UTC, user or grant, model, tokens, exact "
        "cost in USD, provisional or final); never prompt content"))
    exp.add_argument("--app", required=True, help="the app id")
    exp.add_argument("--from", dest="since", help="first day (YYYY-MM-DD, UTC) or date-time")
    exp.add_argument("--to", dest="until", help="last day, included (YYYY-MM-DD, UTC) or "
                     "date-time, excluded")
    exp.add_argument("--format", choices=["csv", "jsonl"], default="csv",
                     help="csv (with a header row) or jsonl (default csv)")
    exp.add_argument("--output", "-o", help="write to this file instead of standard output")


def cmd_usage(args: argparse.Namespace, config: Config) -> int:
    from . import export

    try:
        since = export.parse_bound(args.since) if args.since else None
        until = export.parse_bound(args.until, end=True) if args.until else None
    except ValueError:
        raise CommandError("--from/--to: expected a date like 2026-11-01 or an ISO date-time") \
            from None

    async def write(gw: Gateway) -> None:
        if await gw.store.get_app(args.app, deleted=True) is None:  # a deleted app's history too
            raise CommandError(f"unknown app {args.app}")
        out = open(args.output, "w", newline="") if args.output else sys.stdout
        try:
            async for text in export.pages(gw.store, args.app, args.format, since, until):
                out.write(text)
        finally:
            if args.output:
                out.close()
    _run(config, write)
    return 0


def configure_log_format(config: Config) -> None:
    from .logs import configure
    configure(config.log_level, config.log_format)


COMMANDS["usage"] = cmd_usage

if __name__ == "__main__":
    sys.exit(main())
