"""A fleet of real ``wattgate serve`` processes on one PostgreSQL ledger, for tests.

``Fleet`` runs the fake OpenRouter in the test's event loop (so its exact
``charged`` total and its per-generation costs can be read, as
``wattgate.faults`` does), creates one keys file, then starts three ``wattgate
serve`` subprocesses on one PostgreSQL database (the last with ``--workers 2``),
all sharing that keys file, one public URL (as behind a load balancer) and the
upstream. Clients go round-robin over the three ports, each call on a fresh
connection so a ``--workers`` port spreads them over its workers.

The ledger is read only through what an operator has: ``wattgate usage export``,
``wattgate ledger reconcile|check`` and ``GET /api/v1/status``. Nothing here
knows the PostgreSQL schema.

``RestartableCluster`` is a throwaway PostgreSQL server (``tests/pg.py``'s
``Cluster``) that can be stopped and started again, for the test that restarts
the database: the server other tests share must never be restarted under them.

Not here: assertions. The tests in ``test_fleet_functional.py`` make them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from pg import Cluster, NoServer, server_binaries
from wattgate.fakeupstream import FakeOpenRouter, create_fake_openrouter
from wattgate.faults import free_port
from wattgate.money import usd_to_nanos

ORIGIN = "http://localhost:3000"


def funding_key(tag: str) -> str:
    """A distinct funding key per tag, so the upstream's bill says whose call it was."""
    return "sk-or-v1-" + (tag.encode().hex() * 48)[:48]


# ---- a PostgreSQL server to restart -------------------------------------------
class RestartableCluster(Cluster):
    """A throwaway cluster (``tests/pg.py``) that can also be stopped and started again.

    Its ``postgres`` database is the fleet's ledger: nothing else uses the cluster.
    """

    def halt(self, mode: str = "fast") -> None:
        """``fast`` ends every session and stops, as a restart begins; ``immediate``
        as a crash."""
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w",
                  "stop")

    def resume(self) -> None:
        """Start again on the same port and data."""
        options = (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 "
                   "-c fsync=off -c max_connections=400")
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-o", options,
                  "-l", str(self.root / "server.log"), "-w", "-t", "60", "start")


def restartable_cluster() -> RestartableCluster:
    bindir = server_binaries()
    if bindir is None:
        raise NoServer("the restart drill needs PostgreSQL server binaries of its own "
                       "(/usr/lib/postgresql/*/bin): install Debian's postgresql package")
    cluster = RestartableCluster(bindir)
    try:
        cluster.start()
    except BaseException:
        cluster.stop()
        raise
    return cluster


# ---- the fleet ----------------------------------------------------------------
@dataclass
class Serve:
    """One ``python -m wattgate serve`` process (a supervisor when ``workers`` > 1)."""

    name: str
    env: dict[str, str]
    port: int
    workers: int
    log: Path
    proc: asyncio.subprocess.Process | None = None
    dead: bool = False  # killed on purpose: round-robin skips it

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api(self) -> str:
        return self.url + "/api/v1"

    async def start(self) -> None:
        args = ["serve"] + (["--workers", str(self.workers)] if self.workers > 1 else [])
        with self.log.open("ab") as log:
            # Its own process group: a supervisor's workers are stopped with it.
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "wattgate", *args, env=self.env,
                stdout=asyncio.subprocess.DEVNULL, stderr=log, start_new_session=True)
        deadline = time.monotonic() + 30
        async with aiohttp.ClientSession() as http:
            while time.monotonic() < deadline:
                if self.proc.returncode is not None:
                    raise RuntimeError(f"wattgate serve ({self.name}) exited "
                                       f"{self.proc.returncode}: {self.log_tail()}")
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(self.url + "/healthz") as r:
                        if r.status == 200:
                            return
                await asyncio.sleep(0.05)
        raise RuntimeError(f"wattgate serve ({self.name}) did not answer /healthz in 30 s: "
                           + self.log_tail())

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def kill9(self) -> None:
        assert self.proc is not None
        self.dead = True
        os.kill(self.proc.pid, signal.SIGKILL)

    async def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 40)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # a worker left behind, if any


@dataclass
class App:
    app_id: str
    secret_key: str


@dataclass
class Answer:
    status: int
    body: Any          # the JSON body, or the text when it was not JSON
    headers: dict[str, str]
    port: int

    @property
    def code(self) -> str | None:
        if isinstance(self.body, dict) and isinstance(self.body.get("error"), dict):
            return self.body["error"].get("code")
        return None


@dataclass
class LedgerRow:
    cost_nanos: int
    provisional: bool
    user_id: str | None
    grant_id: Any


@dataclass
class Fleet:
    database_url: str
    dir: Path
    env_overrides: dict[str, str] = field(default_factory=dict)
    workers: tuple[int, ...] = (1, 1, 2)
    fake: FakeOpenRouter = field(default_factory=FakeOpenRouter)
    processes: list[Serve] = field(default_factory=list)
    http: aiohttp.ClientSession | None = None
    upstream_url: str = ""
    public_url: str = ""
    _runner: web.AppRunner | None = None
    _next: int = 0

    # ---- lifecycle ------------------------------------------------------------
    async def start(self) -> None:
        self._runner = web.AppRunner(create_fake_openrouter(self.fake), access_log=None)
        await self._runner.setup()
        fake_port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", fake_port).start()
        self.upstream_url = f"http://127.0.0.1:{fake_port}/api/v1"
        ports = [free_port() for _ in self.workers]
        # Behind a load balancer every process answers for one public URL.
        self.public_url = f"http://127.0.0.1:{ports[0]}"
        # The keys file exists before the fleet starts, as an operator deploys it: one
        # command creates it (and migrates the ledger and records its fingerprint).
        code, out = await self.cli("apps", "list")
        if code != 0:
            raise RuntimeError(f"wattgate apps list: {out}")
        self.processes = [Serve(f"gw{i}", self.env(port), port, workers,
                                self.dir / f"gw{i}.log")
                          for i, (port, workers) in enumerate(zip(ports, self.workers))]
        await asyncio.gather(*[p.start() for p in self.processes])
        self.http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))

    async def close(self) -> None:
        if self.http is not None:
            await self.http.close()
        await asyncio.gather(*[p.stop() for p in self.processes], return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def env(self, port: int | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("WATTGATE_")}
        env.update({
            "WATTGATE_DATABASE__URL": self.database_url,
            # Never used with database.url set; kept in the test's folder all the same.
            "WATTGATE_DATABASE__PATH": str(self.dir / "unused.db"),
            "WATTGATE_KEYS__FILE": str(self.dir / "keys.json"),
            "WATTGATE_SERVER__PUBLIC_URL": self.public_url,
            "WATTGATE_UPSTREAM__BASE_URL": self.upstream_url,
            "WATTGATE_LIMITS__CHAT_PER_MINUTE": "1000000",
            "WATTGATE_LIMITS__SESSIONS_PER_MINUTE": "1000000",
            "WATTGATE_METERING__RECONCILE_INTERVAL": "3600",  # tests reconcile by hand
            "WATTGATE_LOG__LEVEL": "warning",
        })
        if port is not None:
            env["WATTGATE_SERVER__PORT"] = str(port)
        env.update(self.env_overrides)
        return env

    async def cli(self, *args: str) -> tuple[int, str]:
        """``wattgate ARGS`` on the fleet's ledger and keys file: (exit code, output)."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "wattgate", *args, env=self.env(),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        out, _ = await proc.communicate()
        assert proc.returncode is not None
        return proc.returncode, out.decode(errors="replace").strip()

    def logs(self) -> str:
        return "\n".join(f"--- {p.name} (port {p.port}, workers {p.workers})\n{p.log_tail()}"
                         for p in self.processes)

    # ---- ports ----------------------------------------------------------------
    def next_process(self) -> Serve:
        """The next living process, round-robin."""
        living = self.living
        p = living[self._next % len(living)]
        self._next += 1
        return p

    @property
    def living(self) -> list[Serve]:
        return [p for p in self.processes if not p.dead]

    # ---- apps and users (through the public API and the CLI) ------------------
    async def create_app(self, name: str = "Fleet") -> App:
        code, out = await self.cli("apps", "create", "--name", name, "--origin", ORIGIN,
                                   "--json")
        if code != 0:
            raise RuntimeError(out)
        created = json.loads(out.splitlines()[-1])
        return App(created["appId"], created["secretKey"])

    async def session(self, app: App, user: str, via: Serve | None = None) -> str:
        via = via or self.next_process()
        assert self.http is not None
        async with self.http.post(via.api + "/sessions", json={"appUserId": user},
                                  headers={"Authorization": f"Bearer {app.secret_key}"}) as r:
            body = await r.json()
            if r.status != 200:
                raise RuntimeError(f"POST /sessions on {via.name}: {r.status} {body}")
            return str(body["token"])

    async def connect(self, app: App, user: str, cap_usd: Any,
                      key: str | None = None, via: Serve | None = None) -> None:
        token = await self.session(app, user, via)
        via = via or self.next_process()
        assert self.http is not None
        async with self.http.post(via.api + "/connections",
                                  json={"monthlyUsd": cap_usd,
                                        "fundingKey": key or funding_key(user)},
                                  headers={"Authorization": f"Bearer {token}"}) as r:
            if r.status != 200:
                raise RuntimeError(f"POST /connections on {via.name}: {await r.text()}")

    async def revoke(self, app: App, user: str, via: Serve) -> int:
        token = await self.session(app, user, via)
        assert self.http is not None
        async with self.http.delete(via.api + "/connections",
                                    headers={"Authorization": f"Bearer {token}"}) as r:
            await r.read()
            return r.status

    async def mint_grant(self, app: App, requests: int, key: str,
                         via: Serve | None = None) -> str:
        token = await self.session(app, "visitor", via)
        via = via or self.next_process()
        assert self.http is not None
        async with self.http.post(via.api + "/grants",
                                  json={"requests": requests, "fundingKey": key},
                                  headers={"Authorization": f"Bearer {token}"}) as r:
            body = await r.json()
            if r.status != 200:
                raise RuntimeError(f"POST /grants on {via.name}: {body}")
            return str(body["grantToken"])

    async def status(self, app: App, user: str, via: Serve | None = None) -> dict[str, Any]:
        via = via or self.next_process()
        assert self.http is not None
        async with self.http.get(via.api + "/status", params={"appUserId": user},
                                 headers={"Authorization": f"Bearer {app.secret_key}"}) as r:
            body = await r.json()
            if r.status != 200:
                raise RuntimeError(f"GET /status on {via.name}: {r.status} {body}")
            return dict(body)

    # ---- calls ----------------------------------------------------------------
    async def chat(self, app: App | str, *, user: str | None = None, grant: str | None = None,
                   model: str = "openai/gpt-4o-mini", stream: bool = False,
                   content: str = "hello fleet", max_tokens: int | None = 32,
                   via: Serve | None = None) -> Answer:
        """One chat call on the next process (or ``via``); what the client saw."""
        via = via or self.next_process()
        secret = app if isinstance(app, str) else app.secret_key
        headers = {"Authorization": f"Bearer {secret}"}
        if user is not None:
            headers["x-wattfare-user"] = user
        if grant is not None:
            headers["x-wattfare-grant"] = grant
        body: dict[str, Any] = {"model": model, "stream": stream,
                                "messages": [{"role": "user", "content": content}]}
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        assert self.http is not None
        async with self.http.post(via.api + "/chat/completions", json=body,
                                  headers=headers,
                                  timeout=aiohttp.ClientTimeout(total=60)) as r:
            text = await r.text()
            try:
                parsed: Any = json.loads(text)
            except ValueError:
                parsed = text
            return Answer(r.status, parsed, dict(r.headers), via.port)

    # ---- the ledger, as an operator reads it ----------------------------------
    async def ledger(self, app: App) -> dict[str, LedgerRow]:
        """``wattgate usage export``: generation id → its row."""
        code, out = await self.cli("usage", "export", "--app", app.app_id, "--format", "jsonl")
        if code != 0:
            raise RuntimeError(f"wattgate usage export: {out}")
        rows: dict[str, LedgerRow] = {}
        for line in out.splitlines():
            if not line.startswith("{"):
                continue
            r = json.loads(line)
            assert r["generation_id"] not in rows, f"{r['generation_id']} recorded twice"
            rows[r["generation_id"]] = LedgerRow(usd_to_nanos(Decimal(r["cost_usd"])),
                                                 r["state"] == "provisional", r["user_id"],
                                                 r["grant_id"])
        return rows

    async def reconcile(self, passes: int = 50) -> list[str]:
        """``wattgate ledger reconcile`` until it corrects nothing more."""
        lines = []
        for _ in range(passes):
            code, out = await self.cli("ledger", "reconcile")
            lines.append(out)
            if code != 0:
                raise RuntimeError(f"wattgate ledger reconcile: {out}")
            if "corrected 0" in out:
                break
        return lines

    async def wait_unheld(self, app: App, users: list[str], timeout: float = 30) -> list[str]:
        """Wait until no call of these users holds budget on any process; users still held."""
        deadline = time.monotonic() + timeout
        while True:
            held = []
            for user in users:
                s = await self.status(app, user)
                if usd_to_nanos(s["heldUsd"]):
                    held.append(user)
            if not held or time.monotonic() > deadline:
                return held
            await asyncio.sleep(0.2)

    def billed(self, keys: set[str] | None = None) -> dict[str, int]:
        """What the fake OpenRouter billed: generation id → nano-dollars (for these keys)."""
        return {g: usd_to_nanos(c.cost) for g, c in self.fake.generations.items()
                if c.cost > 0 and (keys is None
                                   or c.authorization.removeprefix("Bearer ") in keys)}


def differences(billed: dict[str, int], ledger: dict[str, LedgerRow]) -> dict[str, Any]:
    """Every way the ledger disagrees with the upstream's bill (empty when exact)."""
    out: dict[str, Any] = {}
    missing = sorted(set(billed) - set(ledger))
    if missing:
        out["billed upstream, not in the ledger"] = missing
    mismatched = {g: (billed[g], ledger[g].cost_nanos) for g in billed.keys() & ledger.keys()
                  if billed[g] != ledger[g].cost_nanos}
    if mismatched:
        out["amounts differ (upstream, ledger)"] = mismatched
    foreign = sorted(g for g in set(ledger) - set(billed) if ledger[g].cost_nanos)
    if foreign:
        out["in the ledger, never billed upstream"] = foreign
    provisional = sorted(g for g, r in ledger.items() if r.provisional)
    if provisional:
        out["still provisional"] = provisional
    return out
