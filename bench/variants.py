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
