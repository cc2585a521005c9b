"""Fleet-wide state through the ledger contract, on SQLite: the keys fingerprint,
rate-limit buckets, admin console sessions and the lead of background work, each
as a caller of ``Ledger`` sees it; and through a running gateway, the console's
sessions and RL_SESSIONS kept by the store."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from conftest import free_port
from wattgate.app import create_app
from wattgate.config import load_config
from wattgate.errors import ConfigError, KeysMismatch
from wattgate.gateway import open_gateway
from wattgate.keyfile import add_master_key, load_keys
from wattgate.reconcile import LEAD_TASK, Reconciler
from wattgate.server import ClientLimits, ServerRunner
from wattgate.store import ACTIVE, Ledger, SQLiteStore, open_store
from wattgate.upstream import Upstream

T = 1_800_000_000.0
APP = "app0123456789abcdef"


@pytest.fixture
async def store(tmp_path):  # type: ignore[no-untyped-def]
    s = SQLiteStore.open(tmp_path / "w.db")
    yield s
    await s.close()


# ---- the contract's fleet methods on SQLite -----------------------------------------
async def test_sqlite_is_a_ledger_opened_from_the_config(tmp_path):
    config = load_config(None, env={"WATTGATE_DATABASE__PATH": str(tmp_path / "c.db")})
    store = await open_store(config)
    try:
        assert isinstance(store, Ledger) and store.kind == "sqlite"
        assert await store.ping() is True
        assert await store.holds_apps() is False
        await store.create_app(APP, "A", "h", [], now=T)
        assert await store.holds_apps() is True
        assert await store.lead(LEAD_TASK) is True  # one server per file leads everything
    finally:
        await store.close()
    assert (tmp_path / "c.db").exists()


async def test_bind_keys_records_the_first_and_refuses_another(tmp_path):
    path = tmp_path / "k.db"
    store = SQLiteStore.open(path)
    try:
        await store.bind_keys("sha256:first")
        await store.bind_keys("sha256:first")  # the same keys again: fine
        with pytest.raises(KeysMismatch, match="keys file differs") as e:
            await store.bind_keys("sha256:other")
        assert "\n" not in str(e.value) and "sha256" not in str(e.value)
    finally:
        await store.close()
    store = SQLiteStore.open(path)  # kept in the ledger, not in memory
    try:
        with pytest.raises(KeysMismatch):
            await store.bind_keys("sha256:other")
        await store.bind_keys("sha256:first")
    finally:
        await store.close()


async def test_rate_take_counts_per_limiter_and_key(store):
    for _ in range(3):
        assert await store.rate_take("RL_SESSIONS", "a", 3, now=T) is None
    wait = await store.rate_take("RL_SESSIONS", "a", 3, now=T)
    assert wait == 20  # 3 a minute: one token back in 20 s
    assert await store.rate_take("RL_SESSIONS", "b", 3, now=T) is None  # another key
    assert await store.rate_take("RL_CHAT", "a", 3, now=T) is None  # another limiter
    assert await store.rate_take("RL_SESSIONS", "a", 3, now=T + 20) is None
    assert await store.rate_take("RL_SESSIONS", "a", 3, now=T + 20) is not None


async def test_rate_take_without_take_only_checks(store):
    for _ in range(5):
        assert await store.rate_take("RL_ADMIN_LOGIN", "peer", 2, now=T, take=False) is None
    assert await store.rate_take("RL_ADMIN_LOGIN", "peer", 2, now=T) is None
    assert await store.rate_take("RL_ADMIN_LOGIN", "peer", 2, now=T) is None
    assert await store.rate_take("RL_ADMIN_LOGIN", "peer", 2, now=T, take=False) == 30


async def test_admin_sessions_are_kept_by_their_hash_until_they_expire(tmp_path):
    path = tmp_path / "s.db"
    store = SQLiteStore.open(path)
    try:
        await store.open_admin_session("h1", "csrf1", expires_at=T + 100, now=T)
        await store.open_admin_session("h2", "csrf2", expires_at=T + 10, now=T)
        assert await store.find_admin_session("h1", now=T) == ("csrf1", T + 100)
        assert await store.find_admin_session("h2", now=T + 10) is None  # expired
        assert await store.find_admin_session("nope", now=T) is None
        # Opening a session drops the expired ones.
        await store.open_admin_session("h3", "csrf3", expires_at=T + 200, now=T + 50)
        await store.close_admin_session("h1")
        assert await store.find_admin_session("h1", now=T + 50) is None
    finally:
        await store.close()
    store = SQLiteStore.open(path)  # a restart keeps them
    try:
        assert await store.find_admin_session("h3", now=T + 60) == ("csrf3", T + 200)
    finally:
        await store.close()
    db = sqlite3.connect(path)
    try:
        assert [r[0] for r in db.execute("SELECT session_hash FROM admin_sessions")] == ["h3"]
    finally:
        db.close()


# ---- the keys fingerprint -------------------------------------------------------------
def test_the_fingerprint_names_the_hash_and_jwt_keys_but_not_the_master_keys(tmp_path):
    keys = load_keys(tmp_path / "a.keys.json")
    fp = keys.fingerprint()
    assert fp.startswith("sha256:") and len(fp) == len("sha256:") + 64
    raw = json.loads((tmp_path / "a.keys.json").read_text())
    for secret in (raw["hash_key"], raw["jwt_secret"], keys.hash_key.hex()):
        assert secret not in fp
    add_master_key(keys)  # rotating the sealing keys keeps the fingerprint
    assert load_keys(tmp_path / "a.keys.json").fingerprint() == fp
    assert load_keys(tmp_path / "b.keys.json").fingerprint() != fp


async def test_a_gateway_with_other_keys_refuses_to_start(tmp_path):
    env = {"WATTGATE_DATABASE__PATH": str(tmp_path / "g.db")}
    gw = await open_gateway(load_config(None, env=env))
    await gw.store.close()
    other = {**env, "WATTGATE_KEYS__FILE": str(tmp_path / "other.keys.json")}
    with pytest.raises(ConfigError, match="keys file differs from the one the ledger"):
        await open_gateway(load_config(None, env=other))
    gw = await open_gateway(load_config(None, env=env))  # the right keys still start
    await gw.store.close()


def _cli(tmp_path: Path, *args: str, keys: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
           "WATTGATE_DATABASE__PATH": str(tmp_path / "cli.db"),
           "WATTGATE_KEYS__FILE": str(tmp_path / keys)}
    return subprocess.run([sys.executable, "-m", "wattgate", *args], env=env,
                          capture_output=True, text=True, timeout=120)


def test_the_cli_with_another_keys_file_refuses_in_one_line(tmp_path):
    made = _cli(tmp_path, "apps", "create", "--name", "A", "--origin",
                "http://localhost:3000", "--json", keys="first.keys.json")
    assert made.returncode == 0, made.stderr
    load_keys(tmp_path / "second.keys.json")  # another host's keys file, present
    refused = _cli(tmp_path, "apps", "list", "--json", keys="second.keys.json")
    assert refused.returncode == 1
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "keys file differs from the one the ledger" in lines[0]
    assert refused.stdout == ""
    listed = _cli(tmp_path, "apps", "list", "--json", keys="first.keys.json")
    assert [a["name"] for a in json.loads(listed.stdout)] == ["A"]


# ---- the lead of background work --------------------------------------------------------
class FollowerStore(SQLiteStore):
    """A real SQLite ledger whose process does not lead until told (as when another
    process of a fleet holds the lead)."""

    leading = False
    asked = 0

    async def lead(self, task: str) -> bool:
        self.asked += 1
        return self.leading


async def test_the_reconciler_works_only_while_it_leads(tmp_path, fake_upstream):
    config = load_config(None, env={"WATTGATE_DATABASE__PATH": str(tmp_path / "l.db"),
                                    "WATTGATE_UPSTREAM__BASE_URL": fake_upstream.base_url,
                                    "WATTGATE_METERING__RECONCILE_INTERVAL": "0.1"})
    gw = await open_gateway(config)
    await gw.store.close()
    store = FollowerStore(config.database_file)
    gw.store = store
    upstream = Upstream.from_config(config, clock=gw.clock)
    await upstream.start()
    task = None
    try:
        await store.create_app(APP, "A", "h", [], now=T)
        conn = await store.save_connection(APP, "u", state=ACTIVE, cap_nanos=10**12,
                                           sealed_key="sealed", browser_hash=None, now=T)
        old = gw.clock() - 3600
        hold = await store.admit(conn.connection_id, "2027-01", 1000, now=old,
                                 expires_at=old + 60)
        await store.note_generation(hold, "gen-left-behind", APP, "m")
        assert await store.open_holds() == 1
        task = asyncio.get_running_loop().create_task(Reconciler(gw, upstream).loop())
        while store.asked < 5:
            await asyncio.sleep(0.01)
        assert await store.open_holds() == 1  # a follower sweeps nothing
        store.leading = True
        for _ in range(2000):
            if not await store.open_holds():
                break
            await asyncio.sleep(0.01)
        assert await store.open_holds() == 0
        assert await store.provisional_count() == 1  # swept to a row at its estimate
    finally:
        if task is not None:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        await upstream.close()
        await store.close()


# ---- through a running gateway --------------------------------------------------------
async def _serve(config, clock):  # type: ignore[no-untyped-def]
    app = create_app(config, clock=clock)
    runner = ServerRunner(app, limits=ClientLimits.from_config(config), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", config.server_port).start()
    return app, runner


async def test_console_sessions_live_in_the_ledger_and_outlast_a_restart(
        tmp_path, fake_upstream, clock):
    from wattgate.views.state import gateway_key

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config = load_config(None, env={"WATTGATE_DATABASE__PATH": str(tmp_path / "c.db"),
                                    "WATTGATE_SERVER__PORT": str(port),
                                    "WATTGATE_SERVER__PUBLIC_URL": url,
                                    "WATTGATE_UPSTREAM__BASE_URL": fake_upstream.base_url})
    app, runner = await _serve(config, clock)
    http = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
    try:
        token = app[gateway_key].keys.admin_token
        async with http.post(url + "/admin/login", data={"token": token},
                             allow_redirects=False) as r:
            assert r.status == 303
        cookie = next(c.value for c in http.cookie_jar if c.key == "wattgate_admin")
        db = sqlite3.connect(tmp_path / "c.db")
        try:
            stored = [r[0] for r in db.execute("SELECT session_hash FROM admin_sessions")]
        finally:
            db.close()
        assert stored == [hashlib.sha256(cookie.encode()).hexdigest()]  # never the cookie
        await runner.cleanup()
        app, runner = await _serve(config, clock)  # the server restarts
        async with http.get(url + "/admin/apps", allow_redirects=False) as r:
            body = await r.text()
            assert r.status == 200 and "Sign out" in body
        csrf = re.search(r'name="csrf" value="([^"]+)"', body).group(1)  # type: ignore[union-attr]
        async with http.post(url + "/admin/logout", data={"csrf": csrf},
                             allow_redirects=False) as r:
            assert r.status == 303
        async with http.get(url + "/admin/apps", allow_redirects=False) as r:
            assert r.status == 303  # signed out: sent to the sign-in page
    finally:
        await http.close()
        await runner.cleanup()


async def test_rl_sessions_and_the_login_limiter_count_through_the_store(make_harness):
    h = await make_harness({"WATTGATE_LIMITS__SESSIONS_PER_MINUTE": "2"})
    app = await h.create_app()
    headers = {"Authorization": f"Bearer {app.secret_key}"}
    statuses = []
    for _ in range(3):
        async with h.http.post(h.api + "/sessions", json={"appUserId": "u1"},
                               headers=headers) as r:
            statuses.append(r.status)
            retry = r.headers.get("Retry-After")
            body = await r.json()
    assert statuses == [200, 200, 429] and retry == "30"
    assert body["error"]["code"] == "rate_limited" and "RL_SESSIONS" in body["error"]["message"]
    # The bucket is the ledger's: asking it directly finds it empty too.
    assert await h.gw.store.rate_take("RL_SESSIONS", app.app_id, 2, now=h.clock(),
                                      take=False) == 30
    for _ in range(10):
        async with h.http.post(h.url + "/admin/login", data={"token": "guess"}) as r:
            assert r.status == 401
    async with h.http.post(h.url + "/admin/login", data={"token": "guess"}) as r:
        assert r.status == 429
    async with h.http.get(h.url + "/metrics") as r:
        text = await r.text()
    assert 'wattgate_rate_limit_rejections_total{limit="RL_SESSIONS"} 1.0' in text
    assert 'wattgate_rate_limit_rejections_total{limit="RL_ADMIN_LOGIN"} 1.0' in text
    assert 'wattgate_rate_limit_rejections_total{limit="RL_CHAT"} 0.0' in text
