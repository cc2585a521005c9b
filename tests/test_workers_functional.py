"""``wattgate serve --workers N`` and the one-server lock, with real processes on loopback.

SQLite refuses N > 1, so on SQLite the supervisor's restart and drain are proven with
one supervised worker (the real supervisor and worker code, started through
``SUPERVISED_SQLITE``). ``restart_check`` and ``drain_check`` take a database URL: on
PostgreSQL (``WATTGATE_TEST_DATABASE_URL``, a fresh database per test) they run
``wattgate serve --workers 2``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import signal
import sys
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import aiohttp

from conftest import FUNDING_KEY, free_port

STARTED = re.compile(rb"worker (\d+) started \(pid (\d+)\)")

# The real supervisor around the real worker of `serve --workers`, with one worker: the
# only count the SQLite ledger allows (the CLI refuses more before it gets here).
SUPERVISED_SQLITE = """
import sys
from wattgate.cli import _guarded, serve_worker
from wattgate.config import load_config
from wattgate.logs import configure
from wattgate.supervisor import Supervisor, listen
import logging
config = load_config()
logging.basicConfig(level="INFO")
configure(config.log_level, config.log_format)
sockets = listen(config.server_host, config.server_port)
ready = lambda: print("wattgate listening (supervised)", flush=True)
sys.exit(_guarded(lambda: Supervisor(1, lambda s, up: serve_worker(config, s, up), sockets,
                                     ready=ready).run()))
"""


def gateway_env(tmp_path: Path, fake_url: str, database_url: str | None = None,
                **extra: str) -> dict[str, str]:
    port = free_port()
    env = {**os.environ, "WATTGATE_DATABASE__PATH": str(tmp_path / "wg.db"),
           "WATTGATE_KEYS__FILE": str(tmp_path / "keys.json"),
           "WATTGATE_SERVER__PORT": str(port),
           "WATTGATE_SERVER__PUBLIC_URL": f"http://127.0.0.1:{port}",
           "WATTGATE_UPSTREAM__BASE_URL": fake_url, "WATTGATE_LOG__FORMAT": "text",
           "WATTGATE_SERVER__SHUTDOWN_TIMEOUT": "20", **extra}
    if database_url:
        env["WATTGATE_DATABASE__URL"] = database_url
    return env


def url_of(env: dict[str, str]) -> str:
    return env["WATTGATE_SERVER__PUBLIC_URL"]


async def wattgate(*args: str, env: dict[str, str], cwd: Path | None = None,
                   ) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "wattgate", *args, env=env, cwd=cwd,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


class Server:
    """A running `wattgate serve` (or supervisor): its stdout's first line, its stderr log."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.log = b""
        self._reader = asyncio.get_running_loop().create_task(self._read_log())

    async def _read_log(self) -> None:
        assert self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            self.log += line

    async def listening(self) -> str:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), 30)
        assert b"listening" in line, self.log.decode()
        return line.decode()

    def started(self) -> list[tuple[int, int]]:
        return [(int(n), int(p)) for n, p in STARTED.findall(self.log)]

    async def wait_for_log(self, predicate, what: str) -> None:  # type: ignore[no-untyped-def]
        for _ in range(600):
            if predicate(self.log):
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"never logged {what}:\n{self.log.decode()}")

    async def stop(self) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(self.proc.wait(), 60)
        await self._reader
        return code

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        self._reader.cancel()


async def start(args: list[str], env: dict[str, str], cwd: Path | None = None) -> Server:
    proc = await asyncio.create_subprocess_exec(
        *args, env=env, cwd=cwd, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    return Server(proc)


async def start_fleet(env: dict[str, str], database_url: str | None) -> Server:
    """`serve --workers 2` on PostgreSQL; on SQLite, one supervised worker."""
    if database_url:
        return await start([sys.executable, "-m", "wattgate", "serve", "--workers", "2"], env)
    return await start([sys.executable, "-c", SUPERVISED_SQLITE], env)


async def healthz(url: str) -> int:
    async with aiohttp.ClientSession() as http, http.get(url + "/healthz") as r:
        return r.status


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# ---- the checks, for any ledger -------------------------------------------------------
async def restart_check(tmp_path: Path, fake_url: str, database_url: str | None) -> None:
    """Every worker killed with SIGKILL is started again, and the port keeps answering."""
    env = gateway_env(tmp_path, fake_url, database_url)
    fleet = await start_fleet(env, database_url)
    try:
        await fleet.listening()
        first = fleet.started()
        assert first and len({p for _, p in first}) == len(first)
        assert await healthz(url_of(env)) == 200
        for _, pid in first:
            os.kill(pid, signal.SIGKILL)
        count = len(first)
        await fleet.wait_for_log(lambda log: len(STARTED.findall(log)) >= 2 * count,
                                 "the killed workers started again")
        again = fleet.started()[count:]
        assert sorted(n for n, _ in again) == sorted(n for n, _ in first)
        assert not {p for _, p in again} & {p for _, p in first}
        assert b"was killed by SIGKILL; restarting it in" in fleet.log
        # The old workers are gone: whatever answers now is a new one.
        assert not any(alive(p) for _, p in first)
        for _ in range(200):
            try:
                if await healthz(url_of(env)) == 200:
                    break
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the restarted workers never answered /healthz")
        assert all(alive(p) for _, p in again)
        assert await fleet.stop() == 0
        assert not any(alive(p) for _, p in again)
    finally:
        await fleet.kill()


async def drain_check(tmp_path: Path, fake, database_url: str | None) -> None:  # type: ignore[no-untyped-def]
    """SIGTERM on the parent: a running stream finishes and is billed, then all exit 0."""
    env = gateway_env(tmp_path, fake.base_url, database_url)
    code, out, err = await wattgate("apps", "create", "--name", "T", "--origin",
                                    "http://localhost:3000", "--json", env=env)
    assert code == 0, err
    creds = json.loads(out)
    fleet = await start_fleet(env, database_url)
    try:
        await fleet.listening()
        url = url_of(env)
        auth = {"Authorization": f"Bearer {creds['secretKey']}"}
        async with aiohttp.ClientSession() as http:
            async with http.post(url + "/api/v1/sessions", json={"appUserId": "u1"},
                                 headers=auth) as r:
                token = (await r.json())["token"]
            async with http.post(url + "/api/v1/connections",
                                 json={"monthlyUsd": 5, "fundingKey": FUNDING_KEY},
                                 headers={"Authorization": f"Bearer {token}"}) as r:
                assert r.status == 200
            fake.chunk_delay = 0.2
            fake.pieces = 10
            async with http.post(url + "/api/v1/chat/completions",
                                 json={"model": "openai/gpt-4o-mini", "stream": True,
                                       "messages": [{"role": "user", "content": "hi"}]},
                                 headers={**auth, "x-wattfare-user": "u1"}) as r:
                first = await r.content.readany()
                assert first
                fleet.proc.send_signal(signal.SIGTERM)
                rest = await r.content.read()
        body = first + rest
        assert body.rstrip().endswith(b"data: [DONE]") and b'"usage"' in body
        workers = [p for _, p in fleet.started()]
        assert await fleet.stop() == 0, fleet.log.decode()
        assert b"draining" in fleet.log
        assert not any(alive(p) for p in workers)
    finally:
        await fleet.kill()
    code, out, err = await wattgate("usage", "export", "--app", creds["appId"], "--format",
                                    "jsonl", env=env)
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["state"] for r in rows] == ["final"]
    assert Decimal(rows[0]["cost_usd"]) == fake.charged > 0
    code, out, err = await wattgate("ledger", "check", env=env)
    assert code == 0 and "ledger ok (0 provisional" in out, out + err


# ---- SQLite -----------------------------------------------------------------------------
async def test_sqlite_ledger_refuses_more_than_one_worker(tmp_path, fake_upstream):
    env = gateway_env(tmp_path, fake_upstream.base_url)
    for args, extra in ((["--workers", "2"], {}), ([], {"WATTGATE_SERVER__WORKERS": "3"})):
        code, out, err = await wattgate("serve", *args, env={**env, **extra})
        n = args[1] if args else "3"
        assert code == 1 and out == ""
        assert err.splitlines() == [
            f"wattgate: error: server.workers = {n} needs the PostgreSQL ledger (database.url): "
            "the SQLite ledger is served by one process"]
    assert not (tmp_path / "wg.db").exists()  # refused before anything was opened


async def test_one_worker_is_one_process_as_today(tmp_path, fake_upstream):
    env = gateway_env(tmp_path, fake_upstream.base_url)
    server = await start([sys.executable, "-m", "wattgate", "serve", "--workers", "1"], env)
    try:
        line = await server.listening()
        assert line.startswith(f"wattgate listening on http://127.0.0.1:{env['WATTGATE_SERVER__PORT']} ")
        assert await healthz(url_of(env)) == 200
        pid = server.proc.pid
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        assert children == []  # no supervisor, no worker: the server itself
        assert b"worker" not in server.log
        assert await server.stop() == 0
    finally:
        await server.kill()


async def test_a_worker_killed_with_sigkill_is_started_again(tmp_path, fake_upstream):
    await restart_check(tmp_path, fake_upstream.base_url, None)


async def test_sigterm_drains_the_workers_and_exits_0(tmp_path, fake_upstream):
    await drain_check(tmp_path, fake_upstream, None)


async def test_a_worker_that_cannot_start_stops_the_supervisor(tmp_path, fake_upstream):
    env = gateway_env(tmp_path, fake_upstream.base_url)
    holder = await start([sys.executable, "-m", "wattgate", "serve", "--port", "0"], env)
    try:
        await holder.listening()  # holds the database: the supervised worker is refused
        code, out, err = await asyncio.wait_for(_run_python(SUPERVISED_SQLITE, env), 60)
        assert code == 1, err
        assert "another wattgate server is using the database" in err
        assert "before it listened; stopping" in err
        assert "listening" not in out
        assert len(STARTED.findall(err.encode())) == 1  # no restart loop
    finally:
        await holder.kill()


async def _run_python(source: str, env: dict[str, str]) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", source, env=env,
                                                stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


# ---- the one-server lock holds by the file's identity ----------------------------------
async def test_a_second_server_through_any_other_path_is_refused(tmp_path, fake_upstream):
    env = gateway_env(tmp_path, fake_upstream.base_url)
    first = await start([sys.executable, "-m", "wattgate", "serve"], env)
    try:
        await first.listening()
        db = tmp_path / "wg.db"
        (tmp_path / "sym.db").symlink_to(db)
        os.link(db, tmp_path / "hard.db")
        (tmp_path / "elsewhere").mkdir()
        routes = [(tmp_path / "sym.db", None), (tmp_path / "hard.db", None),
                  (Path("../wg.db"), tmp_path / "elsewhere")]
        for path, cwd in routes:
            other = {**env, "WATTGATE_DATABASE__PATH": str(path),
                     "WATTGATE_SERVER__PORT": str(free_port())}
            code, out, err = await wattgate("serve", env=other, cwd=cwd)
            assert code == 1, (path, out, err)
            assert err.splitlines() == [
                f"wattgate: error: another wattgate server is using the database {path} "
                "(through this path or another link to the same file); one process serves a "
                "SQLite ledger, since its budget holds live in memory"]
            assert "listening" not in out
            assert await healthz(url_of(env)) == 200  # the first keeps serving
        # Refused before SQLite opened the file: no journal beside the hard link.
        assert not (tmp_path / "hard.db-wal").exists()
        assert await first.stop() == 0
    finally:
        await first.kill()
    # Once the first has gone, the same file serves through a link.
    again = await start([sys.executable, "-m", "wattgate", "serve"],
                        {**env, "WATTGATE_DATABASE__PATH": str(tmp_path / "sym.db")})
    try:
        await again.listening()
        assert await again.stop() == 0
    finally:
        await again.kill()


# ---- PostgreSQL: `serve --workers 2`, the same checks -----------------------------------
PG_SERVER = os.environ.get("WATTGATE_TEST_DATABASE_URL",
                           "postgresql://postgres@127.0.0.1:5432/postgres")


@contextlib.asynccontextmanager
async def fresh_pg_database() -> AsyncIterator[str]:
    import asyncpg

    name = "wg_workers_" + secrets.token_hex(6)
    con = await asyncpg.connect(PG_SERVER)
    try:
        await con.execute(f"CREATE DATABASE {name}")
    finally:
        await con.close()
    try:
        yield PG_SERVER.rsplit("/", 1)[0] + "/" + name
    finally:
        con = await asyncpg.connect(PG_SERVER)
        try:
            await con.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        finally:
            await con.close()


async def test_workers_postgresql_restart(tmp_path, fake_upstream):
    async with fresh_pg_database() as url:
        await restart_check(tmp_path, fake_upstream.base_url, url)


async def test_workers_postgresql_drain(tmp_path, fake_upstream):
    async with fresh_pg_database() as url:
        await drain_check(tmp_path, fake_upstream, url)
