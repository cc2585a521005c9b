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


def summarise(text: str, top: int = 15) -> str:
    total = 0
    self_time: Counter[str] = Counter()
    by_pkg: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [_parse(f) for f in stack.split(";") if f]
        frames = [f for f in frames if f[1]] or frames  # drop the "process"/"thread" roots
        fn, path = frames[-1]
        self_time[_short(fn, path)] += n
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
    out = [f"{total} samples (active threads only).", "",
           "Self time by package (leaf frame): " + ", ".join(
               f"{k} {pct(v)}" for k, v in by_pkg.most_common(10)), "",
           "| self | function |", "|---|---|"]
    out += [f"| {pct(v)} | `{k}` |" for k, v in self_time.most_common(top)]
    out += ["", "| inclusive | wattgate function |", "|---|---|"]
    out += [f"| {pct(v)} | `{k}` |" for k, v in inclusive.most_common(top)]
    return "\n".join(out)


if __name__ == "__main__":
    for name in sys.argv[1:]:
        print(f"## {name}\n")
        print(summarise(open(name).read()))
