"""The paced-stream load generator: N streamed calls held open at once, in its own process.

    python bench/paced.py --url URL --auth AUTH --user USER --n 400 --body JSON

A real model streams a few hundred small events over several seconds and a
gateway holds many such streams at once; this is that load. It opens ``n``
connections spread evenly over ``--ramp`` seconds, each sending one streamed
call (``Connection: close``), and reads every answer to its end with plain
asyncio protocols (no HTTP library: the client's own cost stays small and
out of the server's process). The pacing is the upstream's: the fake serves
each answer as ``--pieces`` events ``--delay`` seconds apart.

It prints ``OPEN <seconds>`` on its own line once every stream has its status
line and none has ended yet, or ``NOT-ALL-OPEN`` if the first stream ended
before the last one began (``run.py`` samples the server's RSS throughout and
keeps the peak); then one JSON line: answers delivered (HTTP 200 ending with
``data: [DONE]``), failures, ``data:`` events counted per answer, the most
streams open at once, seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from urllib.parse import urlsplit


class Stream(asyncio.Protocol):
    """One call: sends the request, counts the answer's events, notes how it ended."""

    def __init__(self, request: bytes, load: Load) -> None:
        self.request, self.load = request, load
        self.head = b""
        self.status = 0
        self.events = 0
        self.tail = b""      # the last bytes seen: [DONE] and events cut across reads
        self.ended = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(self.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        if not self.status:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            self.status = int(self.head[9:12])
            data = self.head[end + 4:]
            self.head = b""
            self.load.opened()
        seen = self.tail + data
        self.events += seen.count(b"data:")
        tail = seen[-32:]
        cut = tail.rfind(b"data:")  # counted now: kept out of the next count
        self.tail = tail[cut + 5:] if cut >= 0 else tail

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ended.done():
            self.ended.set_result(None)


class Load:
    def __init__(self, n: int) -> None:
        self.n = n
        self.open = 0
        self.closed = 0
        self.max_open = 0
        self.t0 = time.perf_counter()
        self.announced = False

    def opened(self) -> None:
        self.open += 1
        self.max_open = max(self.max_open, self.open - self.closed)
        if self.open == self.n and not self.announced:
            self.announced = True
            ok = self.closed == 0
            print(f"OPEN {time.perf_counter() - self.t0:.3f}" if ok else "NOT-ALL-OPEN",
                  flush=True)


async def run(args: argparse.Namespace) -> dict[str, object]:
    parts = urlsplit(args.url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    body = args.body.encode()
    head = [f"POST {parts.path} HTTP/1.1", f"Host: {host}:{port}",
            "Content-Type: application/json", f"Content-Length: {len(body)}",
            "Connection: close"]
    if args.auth:
        head.append(f"Authorization: {args.auth}")
    if args.user:
        head.append(f"x-wattfare-user: {args.user}")
    request = ("\r\n".join(head) + "\r\n\r\n").encode() + body
    loop = asyncio.get_running_loop()
    load = Load(args.n)
    streams: list[Stream] = []
    failures: list[str] = []

    async def one(i: int) -> None:
        await asyncio.sleep(args.ramp * i / args.n)
        stream = Stream(request, load)
        streams.append(stream)
        try:
            await loop.create_connection(lambda: stream, host, port)
        except OSError as e:
            failures.append(f"connect: {e}")
            stream.ended.set_result(None)
        await stream.ended
        load.closed += 1

    await asyncio.gather(*(one(i) for i in range(args.n)))
    seconds = time.perf_counter() - load.t0
    delivered = [s for s in streams if s.status == 200 and b"[DONE]" in s.tail]
    failures += [f"HTTP {s.status}" if s.status != 200 else "no [DONE]"
                 for s in streams if s not in delivered]
    counts = sorted(s.events for s in delivered) or [0]
    if not load.announced:
        print("NOT-ALL-OPEN", flush=True)
    return {"calls": args.n, "delivered": len(delivered), "seconds": round(seconds, 3),
            "events_min": counts[0], "events_max": counts[-1], "max_open": load.max_open,
            "failures": sorted(set(failures))[:5], "failed": len(failures)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--auth", default="")
    parser.add_argument("--user", default="")
    parser.add_argument("--n", type=int, default=400)
    parser.add_argument("--ramp", type=float, default=1.0,
                        help="seconds over which the streams start")
    parser.add_argument("--body", required=True)
    args = parser.parse_args()
    try:
        import uvloop  # the client's own loop: cheaper, and never the server's
        result = uvloop.run(run(args))
    except ImportError:
        result = asyncio.run(run(args))
    print(json.dumps(result), flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
