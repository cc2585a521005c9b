"""SIGTERM: stop accepting, let running streams finish, settle them, exit cleanly."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import sys

import aiohttp

from conftest import FUNDING_KEY, free_port
from wattgate.money import usd_to_nanos


async def run(*args: str, env: dict[str, str]) -> str:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "wattgate", *args, env=env,
                                                stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    return out.decode()


async def test_sigterm_lets_a_running_stream_finish_and_settle(fake_upstream, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "WATTGATE_DATABASE__PATH": str(tmp_path / "wg.db"),
           "WATTGATE_SERVER__PORT": str(port), "WATTGATE_SERVER__PUBLIC_URL": url,
           "WATTGATE_UPSTREAM__BASE_URL": fake_upstream.base_url,
           "WATTGATE_SERVER__SHUTDOWN_TIMEOUT": "20"}
    creds = json.loads(await run("apps", "create", "--name", "T", "--origin",
                                 "http://localhost:3000", "--json", env=env))
    server = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "wattgate", "serve", env=env, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    try:
        line = await asyncio.wait_for(server.stdout.readline(), 20)
        assert b"listening" in line
        auth = {"Authorization": f"Bearer {creds['secretKey']}"}
        async with aiohttp.ClientSession() as http:
            async with http.post(url + "/api/v1/sessions", json={"appUserId": "u1"},
                                 headers=auth) as r:
                token = (await r.json())["token"]
            async with http.post(url + "/api/v1/connections",
                                 json={"monthlyUsd": 5, "fundingKey": FUNDING_KEY},
                                 headers={"Authorization": f"Bearer {token}"}) as r:
                assert r.status == 200
            fake_upstream.chunk_delay = 0.2
            fake_upstream.pieces = 10
            async with http.post(url + "/api/v1/chat/completions",
                                 json={"model": "openai/gpt-4o-mini", "stream": True,
                                       "messages": [{"role": "user", "content": "hi"}]},
                                 headers={**auth, "x-wattfare-user": "u1"}) as r:
                first = await r.content.readany()
                assert first
                server.send_signal(signal.SIGTERM)
                rest = await r.content.read()
            body = first + rest
            assert body.rstrip().endswith(b"data: [DONE]")
            assert b'"usage"' in body
        code = await asyncio.wait_for(server.wait(), 30)
        assert code == 0
    finally:
        if server.returncode is None:
            server.kill()
            await server.wait()
    db = sqlite3.connect(tmp_path / "wg.db")
    total, provisional = db.execute(
        "SELECT SUM(cost_nanos), SUM(provisional) FROM usage").fetchone()
    holds = db.execute("SELECT COUNT(*) FROM holds").fetchone()[0]
    db.close()
    assert total == usd_to_nanos(fake_upstream.charged) and provisional == 0 and holds == 0
