"""The benchmark: wattgate against a bare aiohttp proxy hop, in one run.

    python bench/run.py                 # the full run, about 3–4 minutes
    python bench/run.py --quick         # a few seconds per phase: proves the harness
    python bench/run.py --profile       # also samples wattgate under load with py-spy

It starts on loopback a fake OpenRouter (``python -m wattgate.fakeupstream``),
the bare pass-through proxy (``bench/bare_proxy.py``) and wattgate
(``bench/wattgate_server.py``: ``create_app`` on a temporary database, one
app, one connected user whose cap never trips) on each ledger: SQLite
(``wattgate``), PostgreSQL (``wattgate-pg``) and PostgreSQL served by
``wattgate serve --workers 2`` (``wattgate-pg×2``). PostgreSQL is
``WATTGATE_BENCH_DATABASE_URL`` when set (a server the run may create databases
on), else a throwaway cluster from the installed server binaries with the
server's defaults but ``synchronous_commit=off`` (like SQLite's
``synchronous=NORMAL``: no fsync per commit). ``--no-postgres`` leaves it out. Each is its own process, and
so is every load generator: ``wrk`` for throughput and latency, the clients
in ``bench/clients.py`` for first byte, large answers and bursts.

Only ratios from one run mean anything on a shared 2-core machine, so the
targets are measured round by round in alternation (direct, bare, wattgate,
then the next round in another order) and each figure is the best of its
rounds: noise only ever makes a server slower.

Results are printed and written to ``bench/results.md`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
PY = sys.executable
FUNDING_KEY = "sk-or-v1-" + "b" * 48
USER = "bench_user"
MODEL = "openai/gpt-4o-mini"
BIG_PIECE = 1024 * 1024        # bytes per content chunk of the large answer
PACED_EVENTS = 100             # content events per paced answer...
PACED_DELAY = 0.020            # ...this many seconds apart, as a real model streams
PACED_MAX_TOKENS = 1000        # above PACED_EVENTS: the fake's answer is never cut
BASE_PORT = 18780              # fixed ports from here on; a taken one is replaced by a free one


def body(stream: bool, max_tokens: int | None = None) -> str:
    b: dict[str, Any] = {"model": MODEL, "stream": stream,
                         "messages": [{"role": "user", "content": "Hello, how are you?"}]}
    if max_tokens is not None:
        b["max_tokens"] = max_tokens
    return json.dumps(b)


# ---- processes ---------------------------------------------------------------

def port_free(port: int) -> bool:
    with socket.socket() as s:
        # As the servers bind: a port left in TIME_WAIT by the last run is free.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def pick_ports(base: int, n: int) -> list[int]:
    ports = []
    for p in range(base, base + n):
        if not port_free(p):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                p = s.getsockname()[1]
        ports.append(p)
    return ports


@dataclass
class Server:
    name: str
    port: int
    proc: subprocess.Popen
    chat_path: str = "/api/v1/chat/completions"
    auth: str = f"Bearer {FUNDING_KEY}"
    user: str = ""
    db: Path | None = None        # the SQLite ledger, when it is one
    db_pid: int | None = None     # the PostgreSQL server's main process, when known

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def chat_url(self) -> str:
        return self.base + self.chat_path

    @property
    def pid(self) -> int:
        return self.proc.pid


class Fleet:
    """The processes this run started; each is stopped by its own pid."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.servers: list[Server] = []

    def start(self, name: str, port: int, argv: list[str], env: dict[str, str] | None = None,
              ready_path: str = "/", **kw: Any) -> Server:
        log = open(self.tmp / f"{name}.log", "wb")
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})})
        server = Server(name, port, proc, **kw)
        self.servers.append(server)
        deadline = time.monotonic() + 20
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited at start; see {self.tmp / (name + '.log')}:\n"
                                   + (self.tmp / f"{name}.log").read_text()[-2000:])
            try:
                urllib.request.urlopen(server.base + ready_path, timeout=2).read()
                break
            except urllib.error.HTTPError:
                break  # it answers: ready
            except (urllib.error.URLError, ConnectionError, OSError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name} did not start on port {port}") from None
                time.sleep(0.05)
        return server

    def stop(self, server: Server) -> None:
        if server.proc.poll() is None:
            server.proc.terminate()
            try:
                server.proc.wait(10)
            except subprocess.TimeoutExpired:
                server.proc.kill()
                server.proc.wait()
        if server in self.servers:
            self.servers.remove(server)

    def stop_all(self) -> None:
        for server in list(reversed(self.servers)):
            self.stop(server)


def start_fake(fleet: Fleet, name: str, port: int, *extra: str) -> Server:
    return fleet.start(name, port, [PY, "-m", "wattgate.fakeupstream", "--port", str(port),
                                    *extra], ready_path="/api/v1/models")


EVENT_LOOP = {"name": "auto"}   # server.event_loop of every gate and of the bare hop


def start_bare(fleet: Fleet, name: str, port: int, upstream: Server,
               loop: str | None = None) -> Server:
    return fleet.start(name, port, [PY, str(BENCH / "bare_proxy.py"), "--port", str(port),
                                    "--upstream", upstream.base + "/api/v1",
                                    "--loop", loop or EVENT_LOOP["name"]],
                       ready_path="/api/v1/chat/completions")


def post_json(url: str, data: dict[str, Any], auth: str) -> dict[str, Any]:
    req = urllib.request.Request(url, data=json.dumps(data).encode(), method="POST",
                                 headers={"Content-Type": "application/json",
                                          "Authorization": auth})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


class Postgres:
    """The PostgreSQL server the PostgreSQL gates use, and a fresh database per gate."""

    def __init__(self) -> None:
        sys.path.insert(0, str(ROOT / "tests"))
        import pg  # tests/pg.py: the throwaway cluster the tests use

        self.cluster = None
        url = os.environ.get("WATTGATE_BENCH_DATABASE_URL", "").strip()
        if not url:
            bindir = pg.server_binaries()
            if bindir is None:
                raise RuntimeError("no PostgreSQL server binaries (apt-get install postgresql) "
                                   "and no WATTGATE_BENCH_DATABASE_URL; or run --no-postgres")
            self.cluster = pg.Cluster(bindir, settings="-c synchronous_commit=off "
                                                       "-c max_connections=200")
            self.cluster.start()
            url = self.cluster.url
        self.url = url
        self.pid = self.cluster.postmaster_pid() if self.cluster else None
        self._n = 0

    def new_database(self) -> str:
        import asyncio

        import asyncpg

        self._n += 1
        name = f"wgbench_{os.getpid()}_{self._n}"

        async def create() -> None:
            con = await asyncpg.connect(self.url)
            try:
                await con.execute(f"DROP DATABASE IF EXISTS {name}")
                await con.execute(f"CREATE DATABASE {name}")
            finally:
                await con.close()
        asyncio.run(create())
        parts = urllib.parse.urlsplit(self.url)
        return urllib.parse.urlunsplit(parts._replace(path="/" + name))

    def close(self) -> None:
        if self.cluster is not None:
            self.cluster.stop()


def start_wattgate(fleet: Fleet, name: str, port: int, upstream: Server,
                   variant: str = "", *, database_url: str = "", workers: int = 1,
                   db_pid: int | None = None, loop: str | None = None) -> Server:
    """A wattgate on a fresh database with one app and one connected user.

    ``variant`` names a prototype of ``bench/variants.py`` to apply first;
    ``database_url`` serves a PostgreSQL ledger instead of SQLite, by ``workers``
    processes (``wattgate serve --workers``) when more than one.
    """
    db = fleet.tmp / f"{name}.db"
    env = {
        "BENCH_VARIANT": variant,
        "WATTGATE_DATABASE__PATH": str(db),
        "WATTGATE_SERVER__HOST": "127.0.0.1",
        "WATTGATE_SERVER__PORT": str(port),
        "WATTGATE_UPSTREAM__BASE_URL": upstream.base + "/api/v1",
        # The per-user rate limit would refuse a load test after 30 calls; it
        # still runs on every call, with a bucket that never empties.
        "WATTGATE_LIMITS__CHAT_PER_MINUTE": "1000000000",
        "WATTGATE_DATABASE__URL": database_url,
        "WATTGATE_SERVER__EVENT_LOOP": loop or EVENT_LOOP["name"],
    }
    created = subprocess.run([PY, "-m", "wattgate", "apps", "create", "--name", "bench",
                              "--origin", "http://localhost:3000", "--json"],
                             cwd=ROOT, env={**os.environ, **env}, capture_output=True,
                             text=True, check=True)
    secret = json.loads(created.stdout.strip().splitlines()[-1])["secretKey"]
    argv = [PY, str(BENCH / "wattgate_server.py")]
    if workers > 1:
        argv = [PY, "-m", "wattgate", "serve", "--workers", str(workers)]
    server = fleet.start(name, port, argv, env=env, ready_path="/healthz",
                         auth=f"Bearer {secret}", user=USER,
                         db=None if database_url else db, db_pid=db_pid)
    token = post_json(server.base + "/api/v1/sessions", {"appUserId": USER},
                      server.auth)["token"]
    post_json(server.base + "/api/v1/connections",
              {"monthlyUsd": 1000000, "fundingKey": FUNDING_KEY}, f"Bearer {token}")
    return server


def proxy_ready(server: Server) -> str | None:
    """None when the chat endpoint answers a streamed and a plain call; else why not."""
    for stream in (False, True):
        req = urllib.request.Request(server.chat_url, data=body(stream).encode(),
                                     method="POST", headers=headers_of(server))
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                data = r.read()
        except urllib.error.HTTPError as e:
            return f"{server.name}: HTTP {e.code} {e.read()[:200]!r}"
        if stream and b"[DONE]" not in data:
            return f"{server.name}: streamed answer without [DONE]"
        if b'"cost"' not in data:
            return f"{server.name}: answer without usage"
    return None


def headers_of(server: Server) -> dict[str, str]:
    h = {"Content-Type": "application/json", "Authorization": server.auth}
    if server.user:
        h["x-wattfare-user"] = server.user
    return h


# ---- measurements ----------------------------------------------------------------

def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (a supervisor's workers, a database's backends)."""
    pids, i = [pid], 0
    while i < len(pids):
        for task in Path(f"/proc/{pids[i]}/task").glob("*"):
            try:
                pids += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
        i += 1
    return pids


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its descendants (all threads), in seconds."""
    ticks = 0
    for p in process_tree(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def wrk(server: Server, *, conns: int, seconds: float, stream: bool) -> dict[str, Any]:
    cpu0 = cpu_seconds(server.pid)
    db0 = cpu_seconds(server.db_pid) if server.db_pid else 0.0
    env = {**os.environ, "BENCH_BODY": body(stream), "BENCH_AUTH": server.auth,
           "BENCH_USER": server.user}
    argv = ["wrk", "-t1", f"-c{conns}", f"-d{max(1, round(seconds))}s", "--timeout", "10s",
            "-s", str(BENCH / "post.lua"), server.chat_url]
    out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=seconds + 60)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("BENCH_JSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no result:\n{out.stdout}\n{out.stderr}")
    r = json.loads(line.removeprefix("BENCH_JSON "))
    r["rps"] = r["requests"] / (r["duration_us"] / 1e6)
    # CPU the server process spent per answered call: steadier than req/s on a
    # shared machine, since time the scheduler gives to others is not counted.
    r["cpu_us"] = (cpu_seconds(server.pid) - cpu0) * 1e6 / max(1, r["requests"])
    if server.db_pid:  # the database server's share of each call
        r["db_cpu_us"] = (cpu_seconds(server.db_pid) - db0) * 1e6 / max(1, r["requests"])
    r["errors"] = sum(r[k] for k in ("connect_errors", "read_errors", "write_errors",
                                     "status_errors", "timeouts"))
    return r


def client(command: str, servers: list[Server], *args: str, timeout: float = 300) -> Any:
    argv = [PY, str(BENCH / "clients.py"), command, *args]
    for s in servers:
        argv += ["--target", s.name, s.chat_url, s.auth, s.user]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"clients.py {command} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout)


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in kB."""
    values = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":")
                values[key] = int(value.split()[0])
    return values


def reset_hwm(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def rss_while(server: Server, answer_mb: int) -> dict[str, Any]:
    """Stream an answer of ``answer_mb`` MB through ``server``; sample its RSS meanwhile."""
    pid = server.pid
    before = proc_status(pid)["VmRSS"]
    reset_hwm(pid)
    peak = [before]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            try:
                peak[0] = max(peak[0], proc_status(pid)["VmRSS"])
            except OSError:
                return
            time.sleep(0.005)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        fetched = client("fetch", [server], "--body", body(True, answer_mb))
    finally:
        stop.set()
        sampler.join()
    after = proc_status(pid)
    top = max(peak[0], after["VmHWM"])
    return {"answer_mb": fetched["bytes"] / 1e6, "seconds": fetched["seconds"],
            "status": fetched["status"], "rss_before_mb": before / 1024,
            "rss_peak_mb": top / 1024, "growth_mb": (top - before) / 1024}


def commits_of(server: Server) -> int:
    with urllib.request.urlopen(server.base + "/_bench/stats", timeout=10) as r:
        return int(json.loads(r.read())["commits"])


def debits_of(server: Server) -> int:
    assert server.db is not None
    db = sqlite3.connect(f"file:{server.db}?mode=ro", uri=True)
    try:
        return db.execute("SELECT COUNT(*) FROM usage").fetchone()[0]
    finally:
        db.close()


def rss_kb(pid: int) -> int:
    """VmRSS of a process and its descendants (a supervisor's workers), in kB."""
    total = 0
    for p in process_tree(pid):
        try:
            total += proc_status(p)["VmRSS"]
        except (OSError, KeyError):
            pass
    return total


def paced(server: Server, n: int, *, ramp: float) -> dict[str, Any]:
    """``n`` paced streamed calls held open at once through ``server`` (bench/paced.py,
    its own process); the server's CPU over the whole load, its RSS once all are open."""
    argv = [PY, str(BENCH / "paced.py"), "--url", server.chat_url, "--auth", server.auth,
            "--user", server.user, "--n", str(n), "--ramp", str(ramp),
            "--body", body(True, PACED_MAX_TOKENS)]
    rss0 = rss_kb(server.pid)
    peak = [rss0]
    stop = threading.Event()

    def sample() -> None:  # from this process: the server's RSS at its highest
        while not stop.wait(0.05):
            peak[0] = max(peak[0], rss_kb(server.pid))
    sampler = threading.Thread(target=sample, daemon=True)
    cpu0 = cpu_seconds(server.pid)
    db0 = cpu_seconds(server.db_pid) if server.db_pid else 0.0
    sampler.start()
    try:
        out = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=300)
    finally:
        stop.set()
        sampler.join()
    cpu = cpu_seconds(server.pid) - cpu0
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("{")), None)
    if line is None:
        raise RuntimeError(f"bench/paced.py printed no result:\n{out.stderr[-3000:]}")
    result = json.loads(line)
    result["all_open"] = "OPEN" in out.stdout.split()
    answers = max(1, result["delivered"])
    result["cpu_ms"] = cpu * 1000 / answers
    if server.db_pid:
        result["db_cpu_ms"] = (cpu_seconds(server.db_pid) - db0) * 1000 / answers
    result["rss_before_mb"] = rss0 / 1024
    result["rss_open_mb"] = peak[0] / 1024
    # Memory each open stream holds (the first, cold round is the one reported: later
    # rounds reuse what the first one grew).
    result["kb_per_stream"] = (peak[0] - rss0) / max(1, result["max_open"])
    return result


# ---- the run -------------------------------------------------------------------------

@dataclass
class Plan:
    seconds: float = 4          # per wrk throughput run
    lat_seconds: float = 3      # per wrk latency run
    rounds: int = 4             # short interleaved rounds: a burst of outside load spoils one
    warmup: float = 2
    ttfb_n: int = 300
    burst: int = 256
    rss_sizes: tuple[int, ...] = (10, 100)   # MB
    profile_seconds: float = 0
    steps_n: int = 1500         # calls per bench/steps.py run
    variant: str = ""           # a prototype of bench/variants.py, measured beside stock
    postgres: bool = True       # also wattgate on PostgreSQL, one worker and two
    paced_sizes: tuple[int, ...] = (400, 2000)   # paced streams held open at once, each a load
    paced_rounds: int = 4
    paced_ramp: float = 1.0     # seconds over which they start (all open well before the first ends)
    short: bool = True          # the short-call figures (throughput, latency, first byte...)

    @classmethod
    def quick(cls) -> "Plan":
        return cls(seconds=1, lat_seconds=1, rounds=1, warmup=1, ttfb_n=20, burst=32,
                   rss_sizes=(2, 8), steps_n=100, paced_sizes=(40,), paced_rounds=1,
                   paced_ramp=0.5)


@dataclass
class Results:
    targets: list[str] = field(default_factory=list)
    machine: dict[str, str] = field(default_factory=dict)
    throughput: dict[str, dict[str, list[dict[str, Any]]]] = field(default_factory=dict)
    latency: dict[str, dict[str, list[dict[str, Any]]]] = field(default_factory=dict)
    ttfb: dict[str, Any] = field(default_factory=dict)
    burst: dict[str, Any] = field(default_factory=dict)
    rss: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    profile: str = ""
    steps: dict[str, dict[str, float]] = field(default_factory=dict)
    # streams open at once → target → rounds
    paced: dict[int, dict[str, list[dict[str, Any]]]] = field(default_factory=dict)


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def machine() -> dict[str, str]:
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import aiohttp
    wrk_v = subprocess.run(["wrk", "-v"], capture_output=True, text=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "nproc": str(os.cpu_count()), "cpu": cpu,
            "kernel": platform.release(), "python": platform.python_version(),
            "aiohttp": aiohttp.__version__,
            "event loop (server.event_loop)": f"{EVENT_LOOP['name']}: " + loop_in_use(),
            "wrk": (wrk_v.stdout + wrk_v.stderr).split("\n")[0].strip(),
            "load average at start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
            "commit": commit,
            "wattgate files changed but not committed": subprocess.run(
                ["git", "status", "--porcelain", "--", "wattgate"], cwd=ROOT,
                capture_output=True, text=True).stdout.replace("\n", " ").strip() or "none"}


def loop_in_use() -> str:
    sys.path.insert(0, str(ROOT))
    from wattgate.server import new_event_loop

    loop = new_event_loop(EVENT_LOOP["name"])
    try:
        kind = type(loop).__module__.split(".")[0]
        if kind == "uvloop":
            import uvloop
            return f"uvloop {uvloop.__version__}"
        return "asyncio"
    finally:
        loop.close()


def rotate(items: list[Server], k: int) -> list[Server]:
    k %= len(items)
    return items[k:] + items[:k] if k % 2 == 0 else (items[k:] + items[:k])[::-1]


def measure(plan: Plan, fleet: Fleet, res: Results, profile_dir: Path | None,
            pg: "Postgres | None") -> None:
    ports = pick_ports(BASE_PORT + 1, 23)
    if plan.short:
        measure_short(plan, fleet, res, profile_dir, pg, ports)
    if plan.paced_sizes:
        measure_paced(plan, fleet, res, profile_dir, pg, ports[16:])


def measure_short(plan: Plan, fleet: Fleet, res: Results, profile_dir: Path | None,
                  pg: "Postgres | None", ports: list[int]) -> None:
    """The short calls: throughput, latency, first byte, steps, burst, large answers."""
    say(f"starting fake upstream, bare proxy and wattgate on 127.0.0.1:{ports[:3]}")
    fake = start_fake(fleet, "upstream", ports[0])
    direct = Server("direct", fake.port, fake.proc)
    bare = start_bare(fleet, "bare", ports[1], fake)
    for s in (direct, bare):
        problem = proxy_ready(s)
        if problem:
            raise RuntimeError(problem)
    variants = [v for v in plan.variant.split(",") if v]
    gates = [start_wattgate(fleet, "wattgate", ports[2], fake)]
    for i, v in enumerate(variants):
        try:
            gates.append(start_wattgate(fleet, f"wattgate+{v}", ports[3 + i], fake, v))
        except RuntimeError as e:
            res.notes.append(f"prototype {v} not measured: {str(e).strip().splitlines()[-1]}")
            say(f"prototype {v} skipped")
    if pg is not None:
        say(f"wattgate on PostgreSQL, 1 and 2 workers, on 127.0.0.1:{ports[12:14]}")
        gates.append(start_wattgate(fleet, "wattgate-pg", ports[12], fake,
                                    database_url=pg.new_database(), db_pid=pg.pid))
        gates.append(start_wattgate(fleet, "wattgate-pg×2", ports[13], fake,
                                    database_url=pg.new_database(), workers=2, db_pid=pg.pid))
    for g in list(gates):
        why = proxy_ready(g)
        if why:
            res.notes.append(f"{g.name}'s proxy is not answering ({why}); its line is empty.")
            say(f"{g.name} skipped: {why}")
            gates.remove(g)
    targets = [direct, bare, *gates]
    res.targets = [t.name for t in targets]

    for stream in (False, True):
        mode = "streaming" if stream else "non-streaming"
        say(f"throughput at 32 connections, {mode}")
        for s in targets:
            wrk(s, conns=32, seconds=plan.warmup, stream=stream)
        runs: dict[str, list[dict[str, Any]]] = {s.name: [] for s in targets}
        for r in range(plan.rounds):
            for s in rotate(targets, r):
                runs[s.name].append(wrk(s, conns=32, seconds=plan.seconds, stream=stream))
        res.throughput[mode] = runs

    for stream in (False, True):
        mode = "streaming" if stream else "non-streaming"
        say(f"latency at 1 connection, {mode}")
        runs = {s.name: [] for s in targets}
        for r in range(plan.rounds):
            for s in rotate(targets, r):
                runs[s.name].append(wrk(s, conns=1, seconds=plan.lat_seconds, stream=stream))
        res.latency[mode] = runs

    say("metering steps in-process (bench/steps.py)")
    for r in range(2):
        for g in (gates if r == 0 else gates[::-1]):
            v = g.name.partition("+")[2]
            argv = [PY, str(BENCH / "steps.py"), "--n", str(plan.steps_n), "--variant", v]
            if g.name == "wattgate-pg" and pg is not None:  # the ledger in-process: one worker
                argv += ["--database-url", pg.new_database()]
            elif g.name.startswith("wattgate-pg"):
                continue
            out = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
            if out.returncode != 0:
                res.notes.append(f"bench/steps.py failed for {g.name}: "
                                 f"{out.stderr.strip().splitlines()[-1:]}")
                continue
            got = json.loads(out.stdout)
            best = res.steps.setdefault(g.name, got)
            for k, x in got.items():
                best[k] = min(best[k], x)

    say("time to first byte of a streamed answer")
    res.ttfb = client("ttfb", targets, "--n", str(plan.ttfb_n), "--body", body(True))

    say(f"burst of {plan.burst} concurrent streamed calls")
    for s in (bare, *gates):
        before = (commits_of(s), debits_of(s)) if s.db else None
        out = client("burst", [s], "--n", str(plan.burst), "--body", body(True))
        if before is not None:
            out["commits"] = commits_of(s) - before[0]
            out["debits"] = debits_of(s) - before[1]
        res.burst[s.name] = out

    if gates and profile_dir is not None and plan.profile_seconds > 0:
        res.profile = profile(gates[0], plan, profile_dir)

    say("large answers: RSS while streaming")
    for s in (bare, *gates, fake):
        fleet.stop(s)
    big = start_fake(fleet, "upstream-big", ports[6], "--pieces", str(max(plan.rss_sizes)),
                     "--piece-bytes", str(BIG_PIECE))
    big_targets = [start_bare(fleet, "bare", ports[7], big)]
    for i, g in enumerate(g for g in gates if g.db is not None):  # the SQLite ones
        big_targets.append(start_wattgate(fleet, g.name, ports[8 + i], big,
                                          g.name.partition("+")[2]))
    for s in big_targets:
        res.rss[s.name] = [rss_while(s, mb) for mb in plan.rss_sizes]
    for s in (*big_targets, big):
        fleet.stop(s)


def measure_paced(plan: Plan, fleet: Fleet, res: Results, profile_dir: Path | None,
                  pg: "Postgres | None", ports: list[int]) -> None:
    """The load users have: each of ``paced_sizes`` streams open at once, each PACED_EVENTS
    events PACED_DELAY apart, through the bare hop and each gate, rounds alternating."""
    say(f"paced streams: {', '.join(map(str, plan.paced_sizes))} at once, {PACED_EVENTS} "
        f"events {PACED_DELAY * 1000:g} ms apart, on 127.0.0.1:{ports}")
    fake = start_fake(fleet, "upstream-paced", ports[0], "--pieces", str(PACED_EVENTS),
                      "--delay", str(PACED_DELAY))
    targets = [start_bare(fleet, "bare", ports[1], fake),
               start_wattgate(fleet, "wattgate", ports[2], fake)]
    if pg is not None:
        targets.append(start_wattgate(fleet, "wattgate-pg", ports[3], fake,
                                      database_url=pg.new_database(), db_pid=pg.pid))
        targets.append(start_wattgate(fleet, "wattgate-pg×2", ports[4], fake,
                                      database_url=pg.new_database(), workers=2,
                                      db_pid=pg.pid))
    if loop_in_use() != "asyncio":  # the same pair on asyncio's loop: what the loop changes
        targets.append(start_bare(fleet, "bare@asyncio", ports[5], fake, loop="asyncio"))
        targets.append(start_wattgate(fleet, "wattgate@asyncio", ports[6], fake,
                                      loop="asyncio"))
    for s in targets:
        problem = proxy_ready(s)
        if problem:
            raise RuntimeError(problem)
    for n in plan.paced_sizes:
        runs: dict[str, list[dict[str, Any]]] = {s.name: [] for s in targets}
        for r in range(plan.paced_rounds):
            for s in rotate(targets, r):
                say(f"  {n} streams, round {r + 1}: {s.name}")
                runs[s.name].append(paced(s, n, ramp=plan.paced_ramp))
        res.paced[n] = runs
    if profile_dir is not None and plan.profile_seconds > 0:
        for s in targets[:2]:  # the bare hop too: the same load's floor, function by function
            res.profile += "\n\n" + profile_paced(s, plan, profile_dir)
    for s in (*targets, fake):
        fleet.stop(s)


def profile(wg: Server, plan: Plan, out_dir: Path) -> str:
    """Sample wattgate with py-spy under 32-connection load; summarise the stacks."""
    if shutil.which("py-spy") is None:
        return "py-spy is not installed (pip install py-spy): no profile taken."
    sys.path.insert(0, str(BENCH))
    from flame_summary import summarise

    out_dir.mkdir(parents=True, exist_ok=True)
    parts = []
    for stream in (False, True):
        mode = "streaming" if stream else "non-streaming"
        say(f"profiling wattgate with py-spy, {mode}")
        raw = out_dir / f"wattgate-{mode}.txt"
        spy = subprocess.Popen(["py-spy", "record", "--pid", str(wg.pid), "--rate", "250",
                                "--nonblocking", "--threads", "--format", "raw",
                                "--output", str(raw),
                                "--duration", str(int(plan.profile_seconds) + 1)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        wrk(wg, conns=32, seconds=plan.profile_seconds, stream=stream)
        spy.wait(60)
        if raw.exists():
            text = summarise(raw.read_text(), seconds=plan.profile_seconds + 1, rate=250)
            parts.append(f"### {mode} (32 connections)\n\n{text}")
        else:
            parts.append(f"### {mode}\n\npy-spy wrote nothing (ptrace not permitted?).")
    return "\n\n".join(parts)


def profile_paced(wg: Server, plan: Plan, out_dir: Path) -> str:
    """Sample a server with py-spy through one paced load."""
    if shutil.which("py-spy") is None:
        return ""
    sys.path.insert(0, str(BENCH))
    from flame_summary import summarise

    out_dir.mkdir(parents=True, exist_ok=True)
    raw = out_dir / f"{wg.name}-paced.txt"
    seconds = 6
    say(f"profiling {wg.name} with py-spy, paced streams")
    spy = subprocess.Popen(["py-spy", "record", "--pid", str(wg.pid), "--rate", "250",
                            "--nonblocking", "--threads", "--format", "raw",
                            "--output", str(raw), "--duration", str(seconds)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    paced(wg, plan.paced_sizes[0], ramp=plan.paced_ramp)
    spy.wait(60)
    if not raw.exists():
        return f"### {wg.name}, paced streams\n\npy-spy wrote nothing (ptrace not permitted?)."
    text = summarise(raw.read_text(), seconds=seconds, rate=250)
    return f"### {wg.name}, paced streams ({plan.paced_sizes[0]} open at once)\n\n{text}"


# ---- report ---------------------------------------------------------------------------

def answered(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rounds in which calls were answered (a round with none has no latency)."""
    return [r for r in runs if r["requests"] > 0] or runs


def best_rps(runs: list[dict[str, Any]]) -> float:
    return max(r["rps"] for r in runs)


def best_pct(runs: list[dict[str, Any]], key: str) -> float:
    return min(r[key] for r in answered(runs)) / 1000.0   # ms


def best_cpu(runs: list[dict[str, Any]]) -> float:
    return min(r["cpu_us"] for r in answered(runs))


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("**yes**" if ok else "**NO**")


def paced_rows(res: Results, size: int, ramp: float, gates: list[str], add: Any) -> None:
    """The paced-stream figures of one load (``size`` streams open at once) against
    their targets."""
    p = {n: rs for n, rs in res.paced[size].items() if rs}
    cpu = {n: min(r["cpu_ms"] for r in rs) for n, rs in p.items()}

    def floor(g: str) -> str:  # each gate against the bare hop on its own loop
        return "bare@asyncio" if g.endswith("@asyncio") else "bare"
    ratio = {g: cpu[g] / cpu[floor(g)] for g in gates if g in cpu and floor(g) in cpu}
    add(f"paced streams ({size} open): CPU per answer (ms, server processes)",
        {n: f"{x:.2f}" for n, x in cpu.items()},
        {g: f"{x:.2f}×" + (f" (bare@asyncio {cpu[floor(g)]:.2f})" if floor(g) != "bare" else "")
         for g, x in ratio.items()},
        "≤ 1.15× (stretch 1.05×)", ratio["wattgate"] <= 1.15 if "wattgate" in ratio else None)
    if "wattgate" in cpu and "wattgate-pg" in cpu:
        r = cpu["wattgate-pg"] / cpu["wattgate"]
        add(f"paced streams ({size}): CPU per answer, PostgreSQL ÷ SQLite (gateway process)",
            {"wattgate": f"{cpu['wattgate']:.2f} ms", "wattgate-pg": f"{cpu['wattgate-pg']:.2f} ms"},
            {"wattgate-pg": f"{r:.2f}×"}, "≤ 1.3×", r <= 1.3)
    db = {n: min(r["db_cpu_ms"] for r in rs) for n, rs in p.items()
          if all("db_cpu_ms" in r for r in rs)}
    if db:
        add(f"paced streams ({size}): database server's CPU per answer (ms)",
            {n: f"{x:.2f}" for n, x in db.items()}, {}, "(info)", None)
    delivered = {n: min(r["delivered"] for r in rs) for n, rs in p.items()}
    add(f"paced streams ({size}): answers delivered (worst round)",
        {n: f"{d}/{size}" for n, d in delivered.items()},
        {"wattgate": ", ".join(f"{n} {d}" for n, d in delivered.items()
                               if n not in gates and n != "bare")}, "all, equal",
        all(d == size for d in delivered.values()))
    # The load as paced takes its ramp plus 100 events × 20 ms: longer means the
    # machine could not keep the pace (fake, gateway and load generator share its cores).
    took = {n: min(r["seconds"] for r in rs) for n, rs in p.items()}
    add(f"paced streams ({size}): seconds until the last answer, best round · most open at "
        "once",
        {n: f"{took[n]:.1f} s · {max(r['max_open'] for r in p[n])}" for n in p},
        {}, f"(info: {PACED_EVENTS * PACED_DELAY + ramp:g} s if kept at pace)", None)
    opened = {n: max(r["rss_open_mb"] for r in rs) for n, rs in p.items()}
    per = {n: rs[0]["kb_per_stream"] for n, rs in p.items()}
    above = {g: per[g] - per[floor(g)] for g in gates if g in per and floor(g) in per}
    add(f"paced streams ({size}): peak RSS (MB) · growth per open stream, first round (KB)",
        {n: f"{opened[n]:.0f} · {per[n]:.1f}" for n in p},
        {g: f"{x:+.1f} KB/stream" for g, x in above.items()}, "≤ +30 KB/stream",
        above["wattgate"] <= 30 if "wattgate" in above else None)


def report(res: Results, plan: Plan) -> str:
    paced_names = [n for runs in res.paced.values() for n in runs]
    names = res.targets + [n for n in dict.fromkeys(paced_names) if n not in res.targets]
    gates = [n for n in names if n.startswith("wattgate")]
    head = (["measure", "upstream direct", "bare hop", *gates]
            + [f"{g} vs bare" for g in gates] + ["target", "met"])
    rows: list[list[str]] = []
    checks: list[bool] = []

    def add(label: str, values: dict[str, str], rel: dict[str, str], target: str,
            ok: bool | None) -> None:
        rows.append([label, values.get("direct", "–"), values.get("bare", "–"),
                     *(values.get(g, "–") for g in gates), *(rel.get(g, "–") for g in gates),
                     target, verdict(ok)])
        if ok is not None:
            checks.append(ok)

    for mode, runs in res.throughput.items():
        v = {n: best_rps(rs) for n, rs in runs.items()}
        ratio = {g: v[g] / v["bare"] for g in gates if g in v}
        add(f"throughput, {mode}, 32 conns (req/s)", {n: f"{x:,.0f}" for n, x in v.items()},
            {g: f"{x:.2f}×" for g, x in ratio.items()}, "≥ 0.6× (stretch 0.85×)",
            ratio["wattgate"] >= 0.6 if "wattgate" in ratio else None)
    for mode, runs in res.throughput.items():
        v = {n: best_cpu(rs) for n, rs in runs.items()}
        add(f"CPU per call, {mode}, 32 conns (µs, server processes)",
            {n: f"{x:,.0f}" for n, x in v.items()},
            {g: f"{v['bare'] / v[g]:.2f}× (bare/this)" for g in gates if g in v},
            "(info)", None)
    for mode, runs in res.throughput.items():
        v = {n: best_cpu(rs) for n, rs in runs.items()}
        if "wattgate" in v and "wattgate-pg" in v:
            ratio = v["wattgate-pg"] / v["wattgate"]
            add(f"CPU per metered call, {mode}: PostgreSQL ÷ SQLite (gateway process)",
                {"wattgate": f"{v['wattgate']:,.0f} µs",
                 "wattgate-pg": f"{v['wattgate-pg']:,.0f} µs"},
                {"wattgate-pg": f"{ratio:.2f}×"}, "≤ 1.3×", ratio <= 1.3)
        db = {n: min(r["db_cpu_us"] for r in rs) for n, rs in runs.items()
              if all("db_cpu_us" in r for r in rs)}
        if db:
            add(f"database server's CPU per call, {mode} (µs, PostgreSQL backends)",
                {n: f"{x:,.0f}" for n, x in db.items()},
                {n: f"{(v[n] + x) / v['wattgate']:.2f}× SQLite's, with the server's"
                 for n, x in db.items() if "wattgate" in v}, "(info)", None)
    for mode, runs in res.latency.items():
        for pct, limit in (("p50", 0.5), ("p99", 2.0)):
            v = {n: best_pct(rs, f"lat_{pct}_us") for n, rs in runs.items()}
            added = {g: v[g] - v["bare"] for g in gates if g in v}
            add(f"latency {pct}, {mode}, 1 conn (ms)", {n: f"{x:.3f}" for n, x in v.items()},
                {g: f"{x:+.3f} ms" for g, x in added.items()}, f"≤ +{limit} ms",
                added["wattgate"] <= limit if "wattgate" in added else None)
    if res.ttfb:
        for key, label, limit in (("first_byte", "first body byte", 1.0),
                                  ("first_data", "first `data:` event", None)):
            v = {n: res.ttfb[n][key]["p50"] / 1000 for n in names if key in res.ttfb.get(n, {})}
            added = {g: v[g] - v["bare"] for g in gates if g in v}
            ok = (added["wattgate"] <= limit) if limit and "wattgate" in added else None
            add(f"time to {label}, streamed, p50 (ms)", {n: f"{x:.3f}" for n, x in v.items()},
                {g: f"{x:+.3f} ms" for g, x in added.items()},
                f"≤ +{limit} ms" if limit else "(info)", ok)
    for i, mb in enumerate(plan.rss_sizes if res.rss else ()):
        v = {n: rs[i] for n, rs in res.rss.items()}
        ok = None
        if "wattgate" in v:
            ok = v["wattgate"]["growth_mb"] < 20 and v["wattgate"]["status"] == 200
        add(f"RSS growth streaming {mb} MB (MB)", {n: f"{r['growth_mb']:.1f}"
                                                  for n, r in v.items()},
            {g: f"peak {v[g]['rss_peak_mb']:.0f} MB" for g in gates if g in v}, "< 20 MB", ok)
    if res.burst:
        b = res.burst
        add(f"burst of {plan.burst} streamed calls, until all settled (s)",
            {n: f"{r['seconds']:.3f}" for n, r in b.items()},
            {g: f"{b['bare']['seconds'] / b[g]['seconds']:.2f}× bare's rate"
             for g in gates if g in b}, "(info)", None)
        counted = [g for g in gates if "commits" in b.get(g, {})]  # SQLite's counter
        add("ledger transactions committed in that burst (SQLite)",
            {g: f"{b[g]['commits']} for {b[g]['debits']} debits" for g in counted},
            {g: f"{b[g]['debits'] / max(1, b[g]['commits']):.1f} debits/commit"
             for g in counted}, "(info)", None)
        add("ledger commits/s · debits/s in that burst (SQLite)",
            {g: f"{b[g]['commits'] / b[g]['seconds']:,.0f} · "
                f"{b[g]['debits'] / b[g]['seconds']:,.0f}" for g in counted},
            {}, "(info)", None)

    for size in res.paced:
        paced_rows(res, size, plan.paced_ramp, gates, add)

    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    table = "\n".join(lines)
    if res.steps:
        cols = list(res.steps)
        steps = ["| step (median µs, best of 2 runs) | " + " | ".join(cols) + " |",
                 "|" + "---|" * (len(cols) + 1)]
        for k in res.steps[cols[0]]:
            steps.append(f"| {k} | " + " | ".join(f"{res.steps[c].get(k, 0):.1f}"
                                                  for c in cols) + " |")
        table += ("\n\nThe metering steps alone, in-process (`bench/steps.py`: the proxy's own "
                  "functions on a real store, no HTTP):\n\n" + "\n".join(steps))

    raw = []
    for kind, data in (("throughput", res.throughput), ("latency", res.latency)):
        for mode, runs in data.items():
            for name, rs in runs.items():
                cells = ", ".join(
                    f"{r['rps']:,.0f} req/s p50 {r['lat_p50_us'] / 1000:.2f} ms "
                    f"p99 {r['lat_p99_us'] / 1000:.2f} ms {r['cpu_us']:.0f} µs CPU/call"
                    + (f" + {r['db_cpu_us']:.0f} µs database" if "db_cpu_us" in r else "")
                    + (f" ({r['errors']} errors)" if r["errors"] else "") for r in rs)
                raw.append(f"- {kind}, {mode}, {name}: {cells}")
                if any(r["errors"] for r in rs):
                    res.notes.append(f"{kind} {mode} {name}: wrk counted errors; its figure "
                                     "is not a valid measurement.")
                if any(r["requests"] == 0 for r in rs):
                    res.notes.append(f"{kind} {mode} {name}: a round answered no call in "
                                     "its time; it is left out of the best figures.")
    for name, rs in res.rss.items():
        raw.append(f"- RSS, {name}: " + ", ".join(
            f"{r['answer_mb']:.0f} MB in {r['seconds']:.2f} s, RSS {r['rss_before_mb']:.1f} → "
            f"{r['rss_peak_mb']:.1f} MB (HTTP {r['status']})" for r in rs))
    for name, r in res.burst.items():
        raw.append(f"- burst, {name}: {json.dumps(r)}")
    for size, runs in res.paced.items():
        for name, rs in runs.items():
            raw.append(f"- paced streams ({size}), {name}: " + ", ".join(
                f"{r['delivered']}/{r['calls']} answers ({r['events_min']}–{r['events_max']} "
                f"events) in {r['seconds']:.2f} s, {r['cpu_ms']:.2f} ms CPU/answer"
                + (f" + {r['db_cpu_ms']:.2f} ms database" if "db_cpu_ms" in r else "")
                + f", RSS {r['rss_before_mb']:.1f} → {r['rss_open_mb']:.1f} MB with "
                f"{r['max_open']} open" + ("" if r["all_open"] else " (never all at once)")
                + (f", failures {r['failures']}" if r["failed"] else "") for r in rs))
    for name, r in res.ttfb.items():
        raw.append(f"- first byte / first data / whole answer, {name} (µs): {json.dumps(r)}")

    verdict_line = ("all targets met" if checks and all(checks) else
                    f"{sum(checks)} of {len(checks)} targets met" if checks else
                    "no wattgate figures")
    mach = "\n".join(f"- {k}: {v}" for k, v in res.machine.items())
    plan_line = (f"wrk -t1, throughput {plan.seconds:g} s × {plan.rounds} rounds per target "
                 f"(after {plan.warmup:g} s warm-up), latency {plan.lat_seconds:g} s × "
                 f"{plan.rounds} rounds, rounds alternating between targets, best round "
                 f"reported; CPU per call is the server process's user+system time over a "
                 f"run divided by the calls answered; first byte over {plan.ttfb_n} requests "
                 f"per target, alternating; burst of {plan.burst} calls started at once. "
                 f"Paced streams: {' and '.join(map(str, plan.paced_sizes))} streamed calls "
                 f"(one load each) started over "
                 f"{plan.paced_ramp:g} s by bench/paced.py (its own process, raw asyncio "
                 f"sockets), each {PACED_EVENTS} content events {PACED_DELAY * 1000:g} ms "
                 f"apart from the fake, {plan.paced_rounds} rounds alternating between "
                 f"targets; CPU per answer is the server processes' user+system time from "
                 f"/proc over the whole load ÷ answers delivered, best round; RSS sampled from "
                 f"/proc every 50 ms, its peak (every stream open), per stream from the first "
                 f"(cold) round over the most streams open at once. "
                 f"Event loop of every server: {EVENT_LOOP['name']}.")
    out = [f"# wattgate benchmark results\n\n{verdict_line} (stock wattgate).\n\n"
           f"## Machine\n\n{mach}\n", f"## Figures\n\n{table}\n\n{plan_line}\n"]
    if res.notes:
        out.append("## Notes\n\n" + "\n".join(f"- {n}" for n in res.notes) + "\n")
    out.append("## Every run\n\n" + "\n".join(raw) + "\n")
    if res.profile:
        out.append("## Profile (py-spy)\n\n" + res.profile.strip() + "\n")
    analysis = BENCH / "analysis.md"
    if analysis.exists():  # hand-written reading of a past run; dated inside
        out.append(analysis.read_text())
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="wattgate vs a bare aiohttp hop, in one run.")
    parser.add_argument("--quick", action="store_true", help="seconds, not minutes: a smoke run")
    parser.add_argument("--profile", action="store_true",
                        help="also sample wattgate with py-spy under load (adds ~20 s)")
    parser.add_argument("--seconds", type=float, help="seconds per throughput run")
    parser.add_argument("--rounds", type=int, help="rounds per target")
    parser.add_argument("--variant", default="",
                        help="also measure wattgate with prototypes of bench/variants.py "
                        "(comma-separated names, at most 3)")
    parser.add_argument("--no-postgres", action="store_true",
                        help="leave out the PostgreSQL ledger (wattgate-pg, wattgate-pg×2)")
    parser.add_argument("--paced-streams", default="400,2000",
                        help="paced streams held open at once, one load per number "
                        "(400,2000; 0 leaves them out)")
    parser.add_argument("--only-paced", action="store_true",
                        help="only the paced streams (no short-call figures)")
    parser.add_argument("--loop", default="auto", choices=("auto", "uvloop", "asyncio"),
                        help="server.event_loop of wattgate and of the bare hop alike")
    parser.add_argument("--out", default=str(BENCH / "results.md"))
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        print("bench: wrk is not installed (apt-get install wrk)", file=sys.stderr)
        return 1
    plan = Plan.quick() if args.quick else Plan()
    if args.seconds:
        plan.seconds = args.seconds
    if args.rounds:
        plan.rounds = args.rounds
    plan.variant = args.variant
    if args.profile:
        plan.profile_seconds = 2 if args.quick else 8
    plan.postgres = not args.no_postgres
    if not args.quick:
        try:
            plan.paced_sizes = tuple(int(n) for n in args.paced_streams.split(",")
                                     if int(n) > 0)
        except ValueError:
            parser.error(f"--paced-streams: numbers joined by commas, not "
                         f"{args.paced_streams!r}")
    plan.short = not args.only_paced
    EVENT_LOOP["name"] = args.loop
    tmp = Path(tempfile.mkdtemp(prefix="wattgate-bench-"))
    fleet = Fleet(tmp)
    res = Results(machine=machine())
    t0 = time.monotonic()
    pg = None
    try:
        if plan.postgres:
            say("starting PostgreSQL")
            pg = Postgres()
            res.machine["PostgreSQL"] = ("WATTGATE_BENCH_DATABASE_URL" if pg.cluster is None
                                         else "throwaway cluster, synchronous_commit=off")
        measure(plan, fleet, res, tmp / "profiles" if args.profile else None, pg)
    finally:
        fleet.stop_all()
        if pg is not None:
            pg.close()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    res.machine["run took"] = f"{time.monotonic() - t0:.0f} s"
    text = report(res, plan)
    Path(args.out).write_text(text)
    print()
    print(text)
    say(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
