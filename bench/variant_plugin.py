"""pytest plugin: run wattgate's own test suite with a prototype of variants.py applied.

    PYTHONPATH=bench BENCH_VARIANT=inline-writer python -m pytest tests -q -x -p variant_plugin

A prototype that breaks a test of the ledger's guarantees is not an optimisation.
"""

from __future__ import annotations

import os


def pytest_configure(config) -> None:  # type: ignore[no-untyped-def]
    name = os.environ.get("BENCH_VARIANT", "")
    if name:
        import variants

        variants.apply(name)
