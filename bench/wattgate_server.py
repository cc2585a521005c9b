"""wattgate as ``wattgate serve`` runs it, plus one read-only route for the benchmark.

The app is built by the same ``create_app(config)`` and served by the same
runner as ``python -m wattgate serve`` (``wattgate.server.run``: its client
read and write deadlines included, shutdown_timeout 5 s); configuration comes
from ``WATTGATE_*`` variables. The only addition is ``GET /_bench/stats``,
which answers the store's commit counter (``SQLiteStore.commits``) so the
benchmark can count ledger transactions from outside the process.
With ``BENCH_VARIANT=NAME`` in the environment it first applies one of the
prototypes of ``bench/variants.py`` (``run.py --variant NAME``).

    WATTGATE_DATABASE__PATH=/tmp/x/wg.db ... python bench/wattgate_server.py
"""

from __future__ import annotations

import json
import os

from aiohttp import web

from wattgate.app import create_app
from wattgate.config import load_config
from wattgate.server import run
from wattgate.views.state import gateway_key


async def stats(request: web.Request) -> web.Response:
    store = request.app[gateway_key].store
    return web.Response(text=json.dumps({"commits": store.commits}),
                        content_type="application/json")


def main() -> None:
    if os.environ.get("BENCH_VARIANT"):
        import variants  # bench/, beside this file: prototypes measured against stock

        variants.apply(os.environ["BENCH_VARIANT"])
    config = load_config(None)
    app = create_app(config)
    app.router.add_get("/_bench/stats", stats)
    run(app, config.replace(server__shutdown_timeout=5), lambda: None)


if __name__ == "__main__":
    main()
