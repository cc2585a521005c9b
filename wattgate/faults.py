"""Fault drills: a real ``wattgate serve`` process, the fake OpenRouter, injected faults.

Used by ``scripts/reliability.py`` (the figures in docs/reliability.md) and by
the slow tests in ``tests/test_faults_functional.py``. A drill runs the fake
OpenRouter in the caller's event loop (so its exact ``charged`` total and its
per-generation costs can be read), the gateway as a subprocess (so it can be
killed with SIGKILL and restarted on the same database), drives mixed traffic
through it, and compares, generation by generation, what the upstream charged
with what the ledger recorded.

Fault kinds (``KINDS``): a normal call, a streamed one, a client that leaves
mid-stream, a client that gives up before a slow answer, an upstream that cuts
the stream, an error event mid-stream, an upstream 5xx, a stream with no usage
object, a slow stream.

Not here: the gateway's own logic. Everything is read through the CLI
(``ledger reconcile``, ``ledger check``) and the store's public methods.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from .fakeupstream import FakeModel, FakeOpenRouter, create_fake_openrouter
from .ledger import period_of
from .money import usd_to_nanos
from .config import load_config
from .store import Ledger, open_store

FUNDING_KEY = "sk-or-v1-" + "d" * 48

# kind: (weight, model, stream)
KINDS: dict[str, tuple[int, str, bool]] = {
    "ok": (24, "openai/gpt-4o-mini", False),
    "stream": (20, "anthropic/claude-sonnet-4", True),
    "client_disconnect": (10, "fake/slow", True),
    "client_gives_up": (5, "fake/slow", False),
    "upstream_cut": (9, "fake/cut", True),
    "midstream_error": (9, "fake/midstream-error", True),
    "upstream_5xx": (8, "fake/fail-500", False),
    "no_usage": (5, "fake/no-usage", True),
    "slow_stream": (10, "fake/slow", True),
}
SLOW_DELAY = 0.05  # seconds between chunks of fake/slow
# Headers sent this long before the kill must have reached the ledger (a turn of the
# gateway's loop and one commit take milliseconds; the grace is for a loaded machine).
NAMING_GRACE = 0.05
# On PostgreSQL the naming is an UPDATE sent to the server, group-committed with the
# other calls' names (store/pg_batch.py) on the same 2 cores as the gateway, the fake
# and the load. 0.25 s before group commit; at SQLite's 0.05 s the drill failed 1 run
# in 9 on this machine (load average ~8), at 0.1 s it passed 5 runs of 5: a name
# older than this must have survived.
NAMING_GRACE_POSTGRES = 0.1
SOAK_RSS_BOUND_KIB = 8 * 1024  # 3 SQLite connections x 2 MiB page cache, plus slack


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def drill_fake() -> FakeOpenRouter:
    fake = FakeOpenRouter()
    fake.models["fake/slow"] = FakeModel(delay=SLOW_DELAY)
    return fake


async def start_fake(fake: FakeOpenRouter) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(create_fake_openrouter(fake), access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}/api/v1"


@dataclass
class GatewayProcess:
    """``python -m wattgate serve`` on loopback, with its own database folder."""

    data_dir: Path
    upstream_url: str
    extra_env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api(self) -> str:
        return self.url + "/api/v1"

    @property
    def database(self) -> Path:
        return self.data_dir / "wattgate.db"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("WATTGATE_")}
        env.update({
            "WATTGATE_DATABASE__PATH": str(self.database),
            "WATTGATE_SERVER__PORT": str(self.port),
            "WATTGATE_SERVER__PUBLIC_URL": self.url,
            "WATTGATE_UPSTREAM__BASE_URL": self.upstream_url,
            "WATTGATE_LIMITS__CHAT_PER_MINUTE": "1000000",
            "WATTGATE_LIMITS__SESSIONS_PER_MINUTE": "1000000",
            "WATTGATE_METERING__RECONCILE_INTERVAL": "3600",  # the drill reconciles by hand
            "WATTGATE_LOG__LEVEL": "warning",
        })
        env.update(self.extra_env)
        return env

    async def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with (self.data_dir / "serve.log").open("ab") as log:  # the child keeps its copy
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "wattgate", "serve", env=self.env(),
                stdout=asyncio.subprocess.DEVNULL, stderr=log)
        deadline = time.monotonic() + 20
        async with aiohttp.ClientSession() as http:
            while time.monotonic() < deadline:
                if self.proc.returncode is not None:
                    raise RuntimeError("wattgate serve exited: "
                                       + (self.data_dir / "serve.log").read_text()[-2000:])
                try:
                    async with http.get(self.url + "/healthz") as r:
                        if r.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
        raise RuntimeError("wattgate serve did not answer /healthz in 20 s")

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 40)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        elif self.proc is not None:
            await self.proc.wait()

    async def cli(self, *args: str) -> tuple[int, str]:
        """Run ``wattgate ARGS`` on this gateway's database; (exit code, output)."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "wattgate", *args, env=self.env(),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        out, _ = await proc.communicate()
        assert proc.returncode is not None
        return proc.returncode, out.decode(errors="replace").strip()

    def rss_kib(self) -> int:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def fds(self) -> int:
        assert self.proc is not None
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))


@dataclass
class Tenant:
    app_id: str
    secret_key: str
    users: list[str]


async def create_tenant(gw: GatewayProcess, users: int, cap_usd: int = 100_000) -> Tenant:
    code, out = await gw.cli("apps", "create", "--name", "Drill", "--origin",
                             "http://localhost:3000", "--json")
    if code != 0:
        raise RuntimeError(out)
    created = json.loads(out.splitlines()[-1])
    tenant = Tenant(created["appId"], created["secretKey"], [f"user{i}" for i in range(users)])
    auth = {"Authorization": f"Bearer {tenant.secret_key}"}
    async with aiohttp.ClientSession() as http:
        for user in tenant.users:
            async with http.post(gw.api + "/sessions", json={"appUserId": user},
                                 headers=auth) as r:
                token = (await r.json())["token"]
            async with http.post(gw.api + "/connections",
                                 json={"monthlyUsd": cap_usd, "fundingKey": FUNDING_KEY},
                                 headers={"Authorization": f"Bearer {token}"}) as r:
                if r.status != 200:
                    raise RuntimeError(await r.text())
    return tenant


async def one_call(http: aiohttp.ClientSession, api: str, tenant: Tenant, user: str,
                   kind: str) -> str:
    """Make one call of this fault kind; answer what the client saw."""
    _, model, stream = KINDS[kind]
    body: dict[str, Any] = {"model": model, "stream": stream, "max_tokens": 64,
                            "messages": [{"role": "user", "content": f"drill {kind}"}]}
    headers = {"Authorization": f"Bearer {tenant.secret_key}", "x-wattfare-user": user}
    timeout = aiohttp.ClientTimeout(total=SLOW_DELAY * 2 if kind == "client_gives_up" else 60)
    try:
        async with http.post(api + "/chat/completions", json=body, headers=headers,
                             timeout=timeout) as r:
            if r.status != 200:
                await r.read()
                return str(r.status)
            if kind == "client_disconnect":
                async for chunk in r.content.iter_any():
                    if b'"content"' in chunk:
                        break
                r.close()  # leave mid-stream
                return "left"
            await r.read()
            return "200"
    except TimeoutError:
        return "gave_up"
    except aiohttp.ClientError:
        return "connection_error"


def plan(calls: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    kinds = list(KINDS)
    return rng.choices(kinds, weights=[KINDS[k][0] for k in kinds], k=calls)


async def run_load(api: str, tenant: Tenant, kinds: list[str], *, concurrency: int,
                   stop: asyncio.Event | None = None,
                   waiting: Counter[str] | None = None) -> Counter[tuple[str, str]]:
    """Run the planned calls, ``concurrency`` at a time; Counter of (kind, outcome).

    ``waiting`` counts, by kind, the calls whose answer the client is waiting for.
    """
    waiting = Counter() if waiting is None else waiting
    seen: Counter[tuple[str, str]] = Counter()
    queue = list(enumerate(kinds))
    queue.reverse()
    connector = aiohttp.TCPConnector(limit=concurrency * 2, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as http:
        async def worker() -> None:
            while queue and not (stop is not None and stop.is_set()):
                i, kind = queue.pop()
                user = tenant.users[i % len(tenant.users)]
                waiting[kind] += 1
                try:
                    seen[(kind, await one_call(http, api, tenant, user, kind))] += 1
                finally:
                    waiting[kind] -= 1
        await asyncio.gather(*[worker() for _ in range(concurrency)])
    return seen


async def _ledger(gw: GatewayProcess) -> Ledger:
    """The drilled gateway's ledger (SQLite, or PostgreSQL at its database URL), opened
    the way the gateway opens it."""
    return await open_store(load_config(None, env=gw.env()))


async def wait_for_holds(gw: GatewayProcess, timeout: float = 30) -> int:
    """Wait until the running gateway has settled every call (drains included)."""
    store = await _ledger(gw)
    try:
        deadline = time.monotonic() + timeout
        while (held := await store.open_holds()) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        return held
    finally:
        await store.close()


@dataclass
class Comparison:
    charged_nanos: int             # what the fake upstream billed, in total
    ledger_nanos: int              # sum of the ledger's rows
    aggregate_nanos: int           # sum of the per-period aggregates
    upstream_calls: int            # generations the upstream billed
    ledger_rows: int
    provisional: int               # rows still at their estimate
    unknown: list[str]             # billed upstream, absent from the ledger
    mismatched: list[str]          # in both, different amounts
    foreign: list[str]             # in the ledger, never billed upstream (excl. wg- ids)
    open_holds: int

    def unknown_nanos(self, fake: FakeOpenRouter) -> int:
        return sum(usd_to_nanos(fake.generations[g].cost) for g in self.unknown)

    def unknown_streamed(self, fake: FakeOpenRouter) -> int:
        return sum(1 for g in self.unknown if fake.generations[g].body.get("stream"))

    @property
    def exact(self) -> bool:
        return self.charged_nanos == self.ledger_nanos == self.aggregate_nanos \
            and not (self.unknown or self.mismatched or self.foreign or self.open_holds)


async def compare(fake: FakeOpenRouter, gw: GatewayProcess, tenant: Tenant) -> Comparison:
    store = await _ledger(gw)
    try:
        rows: dict[str, int] = {}
        provisional = aggregate = 0
        for c in await store.connections_for_app(tenant.app_id):
            periods = {period_of(time.time())}
            for u in await store.recent_usage(c.connection_id, 10**9):
                assert u.generation_id not in rows, "a generation recorded twice"
                rows[u.generation_id] = u.cost_nanos
                provisional += u.provisional
                periods.add(period_of(u.created_at))  # a call is dated in its period
            for period in periods:  # a drill that crossed a month boundary counts both
                aggregate += await store.period_spent(c.connection_id, period)
        holds = await store.open_holds()
    finally:
        await store.close()
    billed = {g: usd_to_nanos(c.cost) for g, c in fake.generations.items() if c.cost > 0}
    return Comparison(
        charged_nanos=usd_to_nanos(fake.charged), ledger_nanos=sum(rows.values()),
        aggregate_nanos=aggregate, upstream_calls=len(billed), ledger_rows=len(rows),
        provisional=provisional,
        unknown=sorted(set(billed) - set(rows)),
        mismatched=sorted(g for g in billed.keys() & rows.keys() if billed[g] != rows[g]),
        foreign=sorted(g for g in set(rows) - set(billed) if rows[g]),
        open_holds=holds)


async def reconcile(gw: GatewayProcess, passes: int = 100) -> list[str]:
    """``wattgate ledger reconcile`` until nothing is left to correct; its output lines.

    One run corrects at most one batch of provisional rows, hence the loop.
    """
    lines = []
    for _ in range(passes):
        code, out = await gw.cli("ledger", "reconcile")
        lines.append(out)
        if code != 0 or "corrected 0" in out:
            break
    return lines


def dollars(nanos: int) -> str:
    return f"${Decimal(nanos) / Decimal(10**9):.9f}"


# ---- the drills -------------------------------------------------------------
async def settle_and_compare(fake: FakeOpenRouter, gw: GatewayProcess, tenant: Tenant
                             ) -> tuple[int, Comparison, list[str], Comparison, tuple[int, str]]:
    """Wait for every call to settle, compare, reconcile, compare again, check."""
    held = await wait_for_holds(gw)
    before = await compare(fake, gw, tenant)
    reconciled = await reconcile(gw)
    after = await compare(fake, gw, tenant)
    return held, before, reconciled, after, await gw.cli("ledger", "check")


def _database_env(database_url: str) -> dict[str, str]:
    """The gateway's ledger: PostgreSQL at ``database_url``, or (empty) its SQLite file."""
    return {"WATTGATE_DATABASE__URL": database_url} if database_url else {}


async def mixed_faults(calls: int, seed: int, *, database_url: str = "") -> dict[str, Any]:
    fake = drill_fake()
    runner, url = await start_fake(fake)
    gw = GatewayProcess(Path(tempfile.mkdtemp(prefix="wattgate-drill-")), url,
                        _database_env(database_url))
    try:
        await gw.start()
        tenant = await create_tenant(gw, users=8)
        t0 = time.monotonic()
        seen = await run_load(gw.api, tenant, plan(calls, seed), concurrency=16)
        seconds = time.monotonic() - t0
        held, before, reconciled, after, check = await settle_and_compare(fake, gw, tenant)
    finally:
        await gw.stop()
        await runner.cleanup()
    ok = after.exact and check[0] == 0 and held == 0
    return {"calls": calls, "seen": seen, "seconds": seconds, "before": before, "after": after,
            "reconcile": reconciled, "check": check, "ok": ok}


async def kill_nine(calls: int, kill_after: float, seed: int, *,
                    database_url: str = "") -> dict[str, Any]:
    fake = drill_fake()
    runner, url = await start_fake(fake)
    data = Path(tempfile.mkdtemp(prefix="wattgate-kill-"))
    gw = GatewayProcess(data, url, _database_env(database_url))
    try:
        await gw.start()
        tenant = await create_tenant(gw, users=8)
        kinds = plan(calls, seed)
        stop = asyncio.Event()
        waiting: Counter[str] = Counter()
        load = asyncio.ensure_future(run_load(gw.api, tenant, kinds, concurrency=32,
                                              stop=stop, waiting=waiting))
        await asyncio.sleep(kill_after)
        in_flight = sum(1 for c in fake.calls if not c.finished)
        waiting_at_kill = sum(waiting.values())
        # Calls the gateway may still be working on though the client is gone: a client
        # that gave up on a non-streamed answer the upstream has not sent yet.
        exposed = waiting_at_kill + sum(1 for c in fake.calls
                                        if not c.finished and not c.body.get("stream"))
        killed_at = time.monotonic()
        gw.kill9()
        stop.set()
        first = await load
        assert gw.proc is not None
        await gw.proc.wait()
        done_before = sum(first.values())
        gw = GatewayProcess(data, url, gw.extra_env, port=gw.port)
        await gw.start()  # sweeps the dead process's holds at start
        rest = await run_load(gw.api, tenant, kinds[done_before:], concurrency=16)
        held, before, reconciled, after, check = await settle_and_compare(fake, gw, tenant)
    finally:
        await gw.stop()
        await runner.cleanup()
    # A billed generation the ledger lacks must be a call the gateway was still working
    # on at the kill: an answered call was settled (and committed) before its answer.
    explained = len(after.unknown) <= exposed
    # A generation id reaches the ledger within a turn of the gateway's event loop of
    # the upstream's response headers (a streamed answer's hold row is committed
    # before its first byte; a whole answer is streamed upstream and assembled). So
    # the only generations a kill may lose are those the upstream had not named to
    # the gateway yet: no headers sent, or sent in the last moments before the kill.
    grace = NAMING_GRACE_POSTGRES if database_url else NAMING_GRACE
    unnamed = [g for g in after.unknown
               if (answered := fake.generations[g].answered_at) is None
               or answered > killed_at - grace]
    named_lost = sorted(set(after.unknown) - set(unnamed))
    # SQLite: the restarted server sweeps every hold at start. PostgreSQL: the dead
    # process's holds wait out OWNER_GRACE (a lifeline outage is not a death) and are
    # swept by the next reconcile pass (the drill's, by hand): ``after.open_holds``.
    settled = held == 0 or bool(database_url)
    ok = (check[0] == 0 and settled and after.open_holds == 0 and not after.mismatched
          and not after.foreign and explained and not named_lost
          and after.ledger_nanos + after.unknown_nanos(fake) == after.charged_nanos
          and after.ledger_nanos == after.aggregate_nanos)
    return {"calls": calls, "first": first, "rest": rest, "in_flight": in_flight,
            "waiting": waiting_at_kill, "exposed": exposed, "unknown_streamed": after.unknown_streamed(fake),
            "unnamed": len(unnamed), "named_lost": named_lost,
            "before": before, "after": after,
            "unknown_nanos": after.unknown_nanos(fake), "explained": explained,
            "reconcile": reconciled, "check": check, "ok": ok}


async def soak(seconds: float, sample_every: float = 5.0) -> dict[str, Any]:
    fake = drill_fake()
    runner, url = await start_fake(fake)
    gw = GatewayProcess(Path(tempfile.mkdtemp(prefix="wattgate-soak-")), url)
    samples: list[tuple[float, int, int, int]] = []
    try:
        await gw.start()
        tenant = await create_tenant(gw, users=8)
        fds_idle = gw.fds()
        stop = asyncio.Event()
        kinds = plan(10**7, 3)  # more than any soak gets through
        load = asyncio.ensure_future(
            run_load(gw.api, tenant, kinds, concurrency=8, stop=stop))
        t0 = time.monotonic()
        while time.monotonic() - t0 < seconds:
            await asyncio.sleep(sample_every)
            samples.append((time.monotonic() - t0, gw.rss_kib(), gw.fds(), len(fake.calls)))
        stop.set()
        seen = await load
        await wait_for_holds(gw)
        await asyncio.sleep(35)  # idle upstream keep-alive connections close 15-30 s later
        fds_after = gw.fds()
        rss_after = gw.rss_kib()
        before = await compare(fake, gw, tenant)
        reconciled = await reconcile(gw)
        after = await compare(fake, gw, tenant)
        check = await gw.cli("ledger", "check")
    finally:
        await gw.stop()
        await runner.cleanup()
    warm = [s for s in samples if s[0] >= seconds * 0.25] or samples
    rss_warm, rss_end = warm[0][1], warm[-1][1]
    growth = rss_end - rss_warm
    # SQLite's page cache (2 MiB per connection by default) fills as the ledger grows;
    # past that bound, growth would be a leak (heap_growth checks the Python side).
    ok = growth <= SOAK_RSS_BOUND_KIB and fds_after <= fds_idle + 2 \
        and after.exact and check[0] == 0
    return {"seconds": seconds, "calls": sum(seen.values()), "samples": samples,
            "fds_idle": fds_idle, "fds_after": fds_after, "rss_after": rss_after,
            "rss_warm": rss_warm, "rss_end": rss_end, "growth": growth,
            "max_fds": max(s[2] for s in samples), "before": before, "after": after,
            "reconcile": reconciled,
            "check": check, "ok": ok}


async def heap_growth(warmup: int, calls: int) -> dict[str, Any]:
    """Python heap growth of an in-process gateway over ``calls`` calls after a warm-up.

    RSS also counts SQLite's page cache (up to 2 MiB per connection by default),
    which fills as the ledger grows; tracemalloc sees only Python objects, where
    a leak of per-call state would show.
    """
    import gc
    import tracemalloc

    from .app import create_app
    from .credentials import mint_credentials
    from .server import ClientLimits, ServerRunner
    from .views.state import gateway_key

    fake = drill_fake()
    fake.record_calls = False
    runner, url = await start_fake(fake)
    data, port = Path(tempfile.mkdtemp(prefix="wattgate-heap-")), free_port()
    config = load_config(None, env={
        "WATTGATE_DATABASE__PATH": str(data / "wattgate.db"),
        "WATTGATE_SERVER__PUBLIC_URL": f"http://127.0.0.1:{port}",
        "WATTGATE_UPSTREAM__BASE_URL": url, "WATTGATE_LIMITS__CHAT_PER_MINUTE": "1000000",
        "WATTGATE_METERING__RECONCILE_INTERVAL": "3600"})
    app = create_app(config)
    gateway = ServerRunner(app, limits=ClientLimits.from_config(config), access_log=None)
    await gateway.setup()
    await web.TCPSite(gateway, "127.0.0.1", port).start()
    try:
        gw, api = app[gateway_key], f"http://127.0.0.1:{port}/api/v1"
        creds = mint_credentials()
        await gw.store.create_app(creds.app_id, "Heap", gw.hash(creds.secret),
                                  ["http://localhost:3000"], now=gw.clock())
        tenant = Tenant(creds.app_id, creds.secret_key, [f"user{i}" for i in range(8)])
        async with aiohttp.ClientSession() as http:
            for user in tenant.users:
                async with http.post(api + "/sessions", json={"appUserId": user},
                                     headers={"Authorization": f"Bearer {creds.secret_key}"}) as r:
                    token = (await r.json())["token"]
                async with http.post(api + "/connections",
                                     json={"monthlyUsd": 100_000, "fundingKey": FUNDING_KEY},
                                     headers={"Authorization": f"Bearer {token}"}) as r:
                    assert r.status == 200, await r.text()
        await run_load(api, tenant, plan(warmup, 5), concurrency=8)
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        growth = []
        for seed, n in ((6, calls), (7, 2 * calls)):  # after calls, then after 3 x calls
            await run_load(api, tenant, plan(n, seed), concurrency=8)
            await asyncio.sleep(1)
            gc.collect()
            growth.append(tracemalloc.get_traced_memory()[0] - before)
        tracemalloc.stop()
    finally:
        await gateway.cleanup()
        await runner.cleanup()
    return {"warmup": warmup, "calls": calls, "growth": growth[0], "growth_3x": growth[1]}
