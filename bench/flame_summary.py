"""Summarise py-spy's raw (collapsed) stacks as tables a reader can act on.

    python bench/flame_summary.py wattgate-streaming.txt

Each input line is ``frame;frame;…;leaf COUNT`` with frames written
``function (path:line)``. The summary gives the share of samples by package
(wattgate, aiohttp, asyncio, …, judged by the leaf frame), the functions with
the most self time, and the wattgate functions with the most inclusive time.
"""

from __future__ import annotations

import re
import sys
from collections import Counter

_FRAME = re.compile(r"^(?P<fn>.*?) \((?P<path>.*?)(?::(?P<line>\d+))?\)$")


def _parse(frame: str) -> tuple[str, str]:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip(), ""
    return m["fn"], m["path"]


def _where(path: str) -> str:
    if not path.isprintable():  # a native frame py-spy could not name
        return "(unnamed native frame)"
    p = path.replace("\\", "/")
    for key in ("wattgate/", "aiohttp/", "multidict/", "yarl/", "asyncio/", "json/",
                "sqlite3/", "concurrent/", "selectors", "ssl", "socket", "threading"):
        if key in p:
            return key.strip("/")
    if "site-packages/" in p:
        return p.split("site-packages/", 1)[1].split("/", 1)[0]
    return p.rsplit("/", 1)[-1] or "?"


def _short(fn: str, path: str) -> str:
    p = path.replace("\\", "/")
    for key in ("site-packages/", "lib/python3.11/", "/main/"):
        if key in p:
            p = p.split(key, 1)[1]
    return f"{fn} ({p})"


def _thread_of(stack: str) -> tuple[str, str]:
    """Split py-spy's ``--threads`` root frame off: (thread name, rest of the stack)."""
    head, _, rest = stack.partition(";")
    if head.startswith("thread ("):
        name = head.split(":", 1)[-1].strip()
        return ("writer" if "writer" in name else name), rest
    return "", stack


def summarise(text: str, top: int = 15, seconds: float | None = None,
              rate: int | None = None) -> str:
    threads: Counter[str] = Counter()
    self_time: dict[str, Counter[str]] = {}
    by_pkg: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        thread, stack = _thread_of(stack)
        thread = thread or "all threads"
        threads[thread] += n
        frames = [_parse(f) for f in stack.split(";") if f]
        if not frames:
            continue
        fn, path = frames[-1]
        self_time.setdefault(thread, Counter())[_short(fn, path)] += n
        by_pkg[_where(path)] += n
        seen = set()
        for f, p in frames:
            if "wattgate/" in p.replace("\\", "/"):
                key = _short(f, p)
                if key not in seen:
                    seen.add(key)
                    inclusive[key] += n
    if total == 0:
        return "no samples"

    def pct(n: int) -> str:
        return f"{100 * n / total:.1f}%"
    busy = ""
    if seconds and rate:
        busy = " Share of the run each thread was busy: " + ", ".join(
            f"{k} {100 * v / (seconds * rate):.0f}%" for k, v in threads.most_common()) + "."
    out = [f"{total} samples of busy threads (percentages below are of these).{busy}", "",
           "Self time by package (leaf frame): " + ", ".join(
               f"{k} {pct(v)}" for k, v in by_pkg.most_common(10)), ""]
    for thread, counts in sorted(self_time.items(), key=lambda kv: -threads[kv[0]]):
        out += [f"| self ({thread}) | function |", "|---|---|"]
        out += [f"| {pct(v)} | `{k}` |" for k, v in counts.most_common(top)]
        out.append("")
    out += ["| inclusive | wattgate function |", "|---|---|"]
    out += [f"| {pct(v)} | `{k}` |" for k, v in inclusive.most_common(top)]
    return "\n".join(out)


if __name__ == "__main__":
    for name in sys.argv[1:]:
        print(f"## {name}\n")
        print(summarise(open(name).read()))
