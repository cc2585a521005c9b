"""Prototypes of optimisations, applied to a benchmark wattgate only (never shipped).

``bench/wattgate_server.py --variant NAME`` patches wattgate with one of these
before ``create_app``, so that ``bench/run.py --variant NAME`` measures stock
wattgate and the prototype side by side in one run; names joined with ``+``
apply several at once. A prototype that earns its keep is proposed for
wattgate itself with its figures, and removed from here once adopted.

Adopted so far (see bench/results.md for the runs that measured them): group
commit on the event loop thread instead of a writer thread, WAL checkpoints on
their own thread, ``asyncio.timeout`` instead of ``wait_for`` for the
upstream's first byte, and single-operation transactions without a savepoint.
None is pending now: add a function to ``VARIANTS`` to measure the next one.
"""

from __future__ import annotations

from typing import Callable

VARIANTS: dict[str, Callable[[], None]] = {}


def apply(names: str) -> None:
    for name in names.split("+"):
        if name not in VARIANTS:
            known = ", ".join(VARIANTS) or "none at the moment"
            raise SystemExit(f"unknown variant {name!r}; known: {known}")
        VARIANTS[name]()


# Ablations: each takes a promise out, only to measure in one run what that promise
# costs on the hot path (bench/analysis.md). Never candidates for wattgate itself.

def _no_ledger_writes() -> None:
    """The hold's row and the settle are not written (the cap check and the in-memory
    hold stay): what the two commits of a call cost."""
    import asyncio

    from wattgate.store.sqlite import SQLiteStore

    def note_generation(self, hold, generation_id, app_id, model):  # type: ignore[no-untyped-def]
        return None

    def settle(self, hold, usage, period):  # type: ignore[no-untyped-def]
        if hold is not None:
            self._meter.remove(hold)
        done = asyncio.get_running_loop().create_future()
        done.set_result(True)
        return done

    SQLiteStore.note_generation = note_generation  # type: ignore[method-assign]
    SQLiteStore.settle = settle  # type: ignore[method-assign]


def _no_whole_streaming() -> None:
    """A whole answer is asked as JSON (``stream_whole_answers = false``): what reading
    and assembling the stream that names the generation early costs."""
    import os

    os.environ["WATTGATE_UPSTREAM__STREAM_WHOLE_ANSWERS"] = "false"


VARIANTS["ablate-ledger-writes"] = _no_ledger_writes
VARIANTS["ablate-whole-streaming"] = _no_whole_streaming



# Ablations of the paced-stream overhead over the bare hop: each takes one layer of the
# streaming path out (not a promise: the cap, the ledger and the key are untouched), to
# show what that layer costs. None moved wattgate's CPU per paced answer on uvloop.

def _plain_handler() -> None:
    """aiohttp's own RequestHandler: no header/body/write deadlines."""
    from aiohttp import web

    from wattgate import server

    async def make(self):  # type: ignore[no-untyped-def]
        return await web.AppRunner._make_server(self)

    server.ServerRunner._make_server = make  # type: ignore[method-assign]


def _plain_connector() -> None:
    """aiohttp's TCPConnector: no poll of a pooled connection before reuse."""
    import aiohttp

    from wattgate import upstream

    upstream.FreshConnector._get = aiohttp.TCPConnector._get  # type: ignore[method-assign]


def _no_decompress() -> None:
    """The session without auto_decompress (as the bare hop's)."""
    import aiohttp

    original = aiohttp.ClientSession.__init__

    def init(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        kwargs["auto_decompress"] = False
        original(self, *args, **kwargs)

    aiohttp.ClientSession.__init__ = init  # type: ignore[method-assign]


def _no_watchdog() -> None:
    """No idle watchdog timer on an answer."""
    from wattgate import upstream

    original = upstream.Answer.__init__

    def init(self, resp, idle_timeout=None):  # type: ignore[no-untyped-def]
        original(self, resp, None)

    upstream.Answer.__init__ = init  # type: ignore[method-assign]


def _no_gc_freeze() -> None:
    """The collector not frozen after startup."""
    import gc

    gc.freeze = lambda: None


VARIANTS["ablate-guard"] = _plain_handler
VARIANTS["ablate-fresh"] = _plain_connector
VARIANTS["ablate-decompress"] = _no_decompress
VARIANTS["ablate-watchdog"] = _no_watchdog
VARIANTS["ablate-gcfreeze"] = _no_gc_freeze

