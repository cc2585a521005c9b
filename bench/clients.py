"""Load clients the benchmark runs in their own processes, beside wrk.

    python bench/clients.py ttfb  --target NAME URL AUTH USER ... --n 300
    python bench/clients.py fetch --target NAME URL AUTH USER --body JSON
    python bench/clients.py burst --target NAME URL AUTH USER --n 256

``ttfb`` times, per request over a kept-alive connection, the first body
byte, the first ``data:`` event and the last byte of a streamed answer; it
alternates between the targets request by request so that machine noise
falls on all of them alike. ``fetch`` reads one (large) answer to its end and
throws it away. ``burst`` starts N calls at the same instant and times until
every one has finished. Each prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import statistics
import sys
import time
from urllib.parse import urlsplit

DEFAULT_BODY = json.dumps({"model": "openai/gpt-4o-mini", "stream": True,
                           "messages": [{"role": "user", "content": "Hello"}]})


class Target:
    def __init__(self, name: str, url: str, auth: str, user: str) -> None:
        self.name, self.url = name, url
        parts = urlsplit(url)
        self.host, self.port, self.path = parts.hostname or "127.0.0.1", parts.port, parts.path
        self.headers = {"Content-Type": "application/json"}
        if auth:
            self.headers["Authorization"] = auth
        if user:
            self.headers["x-wattfare-user"] = user


def percentiles(values: list[float]) -> dict[str, float]:
    s = sorted(values)

    def pick(q: float) -> float:
        return round(s[min(len(s) - 1, int(q * len(s)))], 1)
    return {"n": len(s), "p50": round(statistics.median(s), 1), "p90": pick(0.90),
            "p99": pick(0.99), "mean": round(statistics.fmean(s), 1), "min": round(s[0], 1)}


def timed_stream(conn: http.client.HTTPConnection, t: Target, body: bytes
                 ) -> tuple[int, float, float, float, int]:
    """(status, µs to first body byte, µs to first data event, µs to end, bytes)."""
    t0 = time.perf_counter()
    conn.request("POST", t.path, body=body, headers=t.headers)
    resp = conn.getresponse()
    first = resp.read1(65536)
    t_first = time.perf_counter()
    seen, t_data, size = first, None, len(first)
    if b"data:" in seen:
        t_data = t_first
    while True:
        chunk = resp.read1(65536)
        if not chunk:
            break
        size += len(chunk)
        if t_data is None:
            seen = seen[-8:] + chunk
            if b"data:" in seen:
                t_data = time.perf_counter()
    t_end = time.perf_counter()
    t_data = t_data if t_data is not None else t_end
    return (resp.status, (t_first - t0) * 1e6, (t_data - t0) * 1e6, (t_end - t0) * 1e6, size)


def cmd_ttfb(args: argparse.Namespace) -> dict:
    targets = [Target(*spec) for spec in args.target]
    body = args.body.encode()
    conns = {t.name: http.client.HTTPConnection(t.host, t.port, timeout=30) for t in targets}
    samples: dict[str, dict[str, list[float]]] = {
        t.name: {"first_byte": [], "first_data": [], "total": []} for t in targets}
    errors = {t.name: 0 for t in targets}
    for i in range(args.warmup + args.n):
        for t in (targets if i % 2 == 0 else targets[::-1]):
            status, fb, fd, total, _ = timed_stream(conns[t.name], t, body)
            if status != 200:
                errors[t.name] += 1
                continue
            if i >= args.warmup:
                samples[t.name]["first_byte"].append(fb)
                samples[t.name]["first_data"].append(fd)
                samples[t.name]["total"].append(total)
    return {name: {"errors": errors[name], **{k: percentiles(v) for k, v in s.items() if v}}
            for name, s in samples.items()}


def cmd_fetch(args: argparse.Namespace) -> dict:
    t = Target(*args.target[0])
    conn = http.client.HTTPConnection(t.host, t.port, timeout=120)
    status, _, _, total, size = timed_stream(conn, t, args.body.encode())
    return {"status": status, "bytes": size, "seconds": round(total / 1e6, 3)}


def cmd_burst(args: argparse.Namespace) -> dict:
    import aiohttp

    t = Target(*args.target[0])

    async def main() -> dict:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as http:
            async def one() -> int:
                async with http.post(t.url, data=args.body, headers=t.headers) as r:
                    await r.read()
                    return r.status
            t0 = time.perf_counter()
            statuses = await asyncio.gather(*(one() for _ in range(args.n)),
                                            return_exceptions=True)
            seconds = time.perf_counter() - t0
        ok = sum(1 for s in statuses if s == 200)
        return {"calls": args.n, "ok": ok, "seconds": round(seconds, 4),
                "failures": sorted({str(s) for s in statuses if s != 200})[:5]}
    return asyncio.run(main())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=("ttfb", "fetch", "burst"))
    parser.add_argument("--target", nargs=4, action="append", required=True,
                        metavar=("NAME", "URL", "AUTH", "USER"))
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--body", default=DEFAULT_BODY)
    args = parser.parse_args()
    result = {"ttfb": cmd_ttfb, "fetch": cmd_fetch, "burst": cmd_burst}[args.command](args)
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
