"""How ``serve --workers`` should share a port: one socket bound by the supervisor and
inherited by every worker, or one SO_REUSEPORT socket per worker.

Both variants run the real supervisor (``wattgate.supervisor``) and the real server
runner (``wattgate.server.run``) with 2 workers; only the app is a stand-in (each call
burns a fixed CPU time, as metering plus the proxy hop would, and answers its worker's
pid so the split can be counted). The load generator runs in its own process. Rounds
alternate between variants; each figure is printed per round.

    python bench/workers.py [--seconds 5] [--rounds 2]

Scenarios:
- ``close``: 16 clients, a new connection per call: how calls spread, calls/s.
- ``skew``: as ``close``, but one call in 10 is slow (40 ms of CPU): the p50 and p99
  of the fast calls, which suffer when they queue behind a busy worker.
- ``keepalive``: 32 kept-alive connections opened at once: how connections spread.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import signal
import socket
import statistics
import subprocess
import sys
import time

from aiohttp import web

from wattgate.config import load_config
from wattgate.server import run
from wattgate.supervisor import Supervisor, listen


def burn(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def make_app() -> web.Application:
    async def call(request: web.Request) -> web.Response:
        burn(0.040 if request.query.get("slow") else 0.0005)
        return web.Response(text=str(os.getpid()))
    app = web.Application()
    app.router.add_get("/", call)
    return app


def serve(variant: str, port: int) -> None:
    config = load_config(env={}).replace(**{"server.port": port, "log.level": "warning"})
    if variant == "shared":
        sockets = listen("127.0.0.1", port)
    else:
        sockets = []

    def worker(inherited, ready):  # type: ignore[no-untyped-def]
        socks = inherited
        if variant == "reuseport":  # what TCPSite(reuse_port=True) does in each worker
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            s.bind(("127.0.0.1", port))
            s.listen(128)
            s.setblocking(False)
            socks = [s]
        run(make_app(), config, ready, sockets=socks)
        return 0
    code = Supervisor(2, worker, sockets, ready=lambda: print("ready", flush=True)).run()
    sys.exit(code)


async def load(port: int, scenario: str, seconds: float) -> dict:
    import aiohttp
    url = f"http://127.0.0.1:{port}/"
    by_pid: collections.Counter[str] = collections.Counter()
    fast: list[float] = []
    end = time.monotonic() + seconds
    calls = 0

    async def client(i: int, http: aiohttp.ClientSession) -> None:
        nonlocal calls
        n = 0
        while time.monotonic() < end:
            n += 1
            slow = scenario == "skew" and (n + i) % 10 == 0
            t = time.perf_counter()
            async with http.get(url, params={"slow": "1"} if slow else None) as r:
                pid = await r.text()
            if not slow:
                fast.append(time.perf_counter() - t)
            by_pid[pid] += 1
            calls += 1

    if scenario == "keepalive":
        conns: collections.Counter[str] = collections.Counter()
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            sessions = [aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1))
                        for _ in range(32)]
            try:
                for s in sessions:  # one connection each, kept for the whole run
                    async with s.get(url) as r:
                        conns[await r.text()] += 1
                await asyncio.gather(*(client(i, s) for i, s in enumerate(sessions)))
            finally:
                for s in sessions:
                    await s.close()
        return {"connections per worker": sorted(conns.values()),
                "calls per worker": sorted(by_pid.values()), "calls/s": round(calls / seconds)}
    connector = aiohttp.TCPConnector(force_close=True, limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:
        await asyncio.gather(*(client(i, http) for i in range(16)))
    fast.sort()
    out = {"calls per worker": sorted(by_pid.values()), "calls/s": round(calls / seconds)}
    if scenario == "skew":
        out["fast p50 ms"] = round(statistics.median(fast) * 1000, 2)
        out["fast p99 ms"] = round(fast[int(len(fast) * 0.99)] * 1000, 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--load", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port)
        return
    if args.load:
        print(asyncio.run(load(args.port, args.load, args.seconds)), flush=True)
        return
    print(f"2 workers, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}")
    for rnd in range(args.rounds):
        for variant in ("shared", "reuseport"):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            server = subprocess.Popen([sys.executable, __file__, "--serve", variant,
                                       "--port", str(port)], stdout=subprocess.PIPE, text=True)
            try:
                assert server.stdout is not None and server.stdout.readline().strip() == "ready"
                for scenario in ("close", "skew", "keepalive"):
                    out = subprocess.run([sys.executable, __file__, "--load", scenario,
                                          "--port", str(port), "--seconds", str(args.seconds)],
                                         capture_output=True, text=True, check=True).stdout
                    print(f"round {rnd + 1} {variant:9} {scenario:9} {out.strip()}", flush=True)
            finally:
                server.send_signal(signal.SIGTERM)
                server.wait(30)


if __name__ == "__main__":
    main()
