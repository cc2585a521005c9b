"""Shared fixtures: a fake OpenRouter and a real wattgate on loopback, as factories;
PostgreSQL (``tests/pg.py``) for the tests that need it.

``--backend postgresql`` (or ``WATTGATE_TEST_BACKEND=postgresql``) serves the
functional harness from a fresh PostgreSQL database instead of a SQLite file,
and keeps only the tests that run on a ledger the option chooses (those using
the ``backend`` fixture, which the harness does, and the contract suite's
PostgreSQL cases); the others, which would run exactly as on SQLite, are
deselected. Without it, everything runs, the contract suite on every backend.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
import pytest

from wattgate.app import create_app
from wattgate.config import load_config
from wattgate.credentials import mint_credentials
from wattgate.fakeupstream import FakeOpenRouter, create_fake_openrouter
from wattgate.server import ClientLimits, ServerRunner
from wattgate.views.state import gateway_key
from pg import NoServer, Server

FUNDING_KEY = "sk-or-v1-" + "f" * 48
BACKENDS = ("sqlite", "postgresql")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--backend", choices=BACKENDS, default=os.environ.get("WATTGATE_TEST_BACKEND", "sqlite"),
        help="the ledger the functional harness serves from (default: sqlite, or "
             "$WATTGATE_TEST_BACKEND); PostgreSQL is $WATTGATE_TEST_DATABASE_URL or a "
             "throwaway cluster")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--backend") != "postgresql":
        return
    keep, drop = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        on_postgres = ("backend" in getattr(item, "fixturenames", ())
                       or params.get("ledger") == "postgresql")
        (keep if on_postgres else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(scope="session")
def pg_server() -> Iterator[Server]:
    """The session's PostgreSQL server; a test that needs it FAILS when there is none."""
    try:
        server = Server.get()
    except NoServer as e:
        pytest.fail(f"PostgreSQL is needed and none can be had: {e}", pytrace=False)
    yield server
    server.close()


@pytest.fixture
def make_pg_url(pg_server: Server) -> Iterator[Callable[[], str]]:
    """Factory: the URL of a fresh, migrated, empty database, dropped after the test."""
    made: list[str] = []

    def make() -> str:
        made.append(pg_server.new_database())
        return made[-1]

    yield make
    for url in made:
        pg_server.drop_database(url)


@pytest.fixture
def pg_url(make_pg_url: Callable[[], str]) -> str:
    """A fresh database of its own for this test."""
    return make_pg_url()


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> str:
    """"sqlite" or "postgresql": the ledger ``--backend`` asks functional tests to use."""
    return str(request.config.getoption("--backend"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Clock:
    """A clock tests move by hand: expiry and periods without sleeping."""

    def __init__(self, now: float | None = None) -> None:
        self.now = time.time() if now is None else now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class AppCreds:
    app_id: str
    publishable_key: str
    secret_key: str
    origin: str


@dataclass
class Harness:
    url: str
    http: aiohttp.ClientSession
    fake: FakeOpenRouter
    app: Any
    tmp_path: Any
    clock: Clock
    apps: list[AppCreds] = field(default_factory=list)

    @property
    def api(self) -> str:
        return self.url + "/api/v1"

    @property
    def gw(self):  # type: ignore[no-untyped-def]
        return self.app[gateway_key]

    async def create_app(self, name: str = "Demo", origin: str = "http://localhost:3000") -> AppCreds:
        creds = mint_credentials()
        await self.gw.store.create_app(creds.app_id, name, self.gw.hash(creds.secret), [origin],
                                       now=self.clock())
        app = AppCreds(creds.app_id, creds.publishable_key, creds.secret_key, origin)
        self.apps.append(app)
        return app

    async def session(self, app: AppCreds, user: str, monthly_usd: Any = None) -> str:
        body: dict[str, Any] = {"appUserId": user}
        if monthly_usd is not None:
            body["requestLimit"] = {"monthlyUsd": monthly_usd}
        async with self.http.post(self.api + "/sessions", json=body,
                                  headers={"Authorization": f"Bearer {app.secret_key}"}) as r:
            assert r.status == 200, await r.text()
            return (await r.json())["token"]

    async def connect(self, app: AppCreds, user: str, monthly_usd: Any = 10,
                      funding_key: str = FUNDING_KEY) -> dict[str, Any]:
        token = await self.session(app, user)
        async with self.http.post(self.api + "/connections",
                                  json={"monthlyUsd": monthly_usd, "fundingKey": funding_key},
                                  headers={"Authorization": f"Bearer {token}"}) as r:
            assert r.status == 200, await r.text()
            return await r.json()

    async def billed(self) -> dict[str, tuple[int, bool]]:
        """The first app's ledger rows: generation id → (cost in nano-dollars, provisional)."""
        out = {}
        for c in await self.gw.store.connections_for_app(self.apps[0].app_id):
            for r in await self.gw.store.recent_usage(c.connection_id, 10_000):
                out[r.generation_id] = (r.cost_nanos, r.provisional)
        return out

    async def status(self, app: AppCreds, user: str) -> dict[str, Any]:
        async with self.http.get(self.api + "/status", params={"appUserId": user},
                                 headers={"Authorization": f"Bearer {app.secret_key}"}) as r:
            assert r.status == 200, await r.text()
            return await r.json()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def fake_upstream(aiohttp_server):  # type: ignore[no-untyped-def]
    fake = FakeOpenRouter()
    server = await aiohttp_server(create_fake_openrouter(fake))
    fake.base_url = str(server.make_url("/api/v1"))  # type: ignore[attr-defined]
    fake.origin = str(server.make_url("")).rstrip("/")  # type: ignore[attr-defined]
    return fake


@pytest.fixture
async def make_harness(aiohttp_server, fake_upstream, tmp_path, clock, backend, request):  # type: ignore[no-untyped-def]
    """Factory: start a wattgate with config overrides, return a Harness.

    With ``--backend postgresql`` each database path a harness would use names a
    fresh PostgreSQL database instead (the same path, the same database).
    """
    sessions: list[aiohttp.ClientSession] = []
    databases: dict[str, str] = {}
    # Set up before (so dropped after) every gateway this factory starts.
    make_pg_url = request.getfixturevalue("make_pg_url") if backend == "postgresql" else None

    async def make(env: dict[str, str] | None = None, *,
                   clock_fn: Callable[[], float] | None = None) -> Harness:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        values = {
            # One gateway per database (it keeps the holds of its calls in memory).
            "WATTGATE_DATABASE__PATH": str(tmp_path / f"wattgate{len(sessions) or ''}.db"),
            "WATTGATE_SERVER__PUBLIC_URL": url,
            "WATTGATE_UPSTREAM__BASE_URL": fake_upstream.base_url,
        }
        values.update(env or {})
        if make_pg_url is not None and "WATTGATE_DATABASE__URL" not in values:
            path = values["WATTGATE_DATABASE__PATH"]
            if path not in databases:
                databases[path] = make_pg_url()
            values["WATTGATE_DATABASE__URL"] = databases[path]
        config = load_config(None, env=values)
        app = create_app(config, clock=clock_fn or clock)
        # Served as `wattgate serve` serves it (its runner and client limits): a handler
        # runs on when its client disconnects. (aiohttp's test server would cancel it.)
        runner = ServerRunner(app, limits=ClientLimits.from_config(config), access_log=None)
        await runner.setup()
        runners.append(runner)
        await web.TCPSite(runner, "127.0.0.1", port).start()
        http = aiohttp.ClientSession()
        sessions.append(http)
        return Harness(url, http, fake_upstream, app, tmp_path, clock)

    runners: list[web.AppRunner] = []
    yield make
    for s in sessions:
        await s.close()
    for runner in reversed(runners):
        await runner.cleanup()


@pytest.fixture
async def harness(make_harness):  # type: ignore[no-untyped-def]
    return await make_harness()


@pytest.fixture
async def browser():  # type: ignore[no-untyped-def]
    """Headless Debian Chromium (see tests/chromium.py), for tests marked ``browser``."""
    from chromium import launched

    async for b in launched():
        yield b


@pytest.fixture
async def demo(tmp_path):  # type: ignore[no-untyped-def]
    """``wattgate demo``'s three servers (gateway, fake OpenRouter, the example app)."""
    from wattgate.demo import start_demo

    d = await start_demo(data_dir=tmp_path / "demo", chunk_delay=0.05)
    yield d
    await d.close()


@pytest.fixture
async def context(browser):  # type: ignore[no-untyped-def]
    """A fresh browser profile; ``context.seen_urls`` lists every URL it requested."""
    ctx = await browser.new_context(viewport={"width": 1100, "height": 760})
    ctx.set_default_timeout(10_000)
    urls: list[str] = []
    ctx.on("request", lambda request: urls.append(request.url))
    ctx.seen_urls = urls
    yield ctx
    await ctx.close()
