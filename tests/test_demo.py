"""``wattgate demo`` as a newcomer runs it: one command, a URL printed, Ctrl-C stops it."""

from __future__ import annotations

import asyncio
import re
import signal
import sys

import aiohttp
from conftest import free_port


async def test_demo_command_prints_a_working_url_and_stops_on_ctrl_c(tmp_path):
    ports = [free_port() for _ in range(3)]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "wattgate", "demo", "--port", str(ports[0]),
        "--app-port", str(ports[1]), "--fake-port", str(ports[2]), "--data", str(tmp_path / "d"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        assert proc.stdout is not None
        printed = ""
        while "Ctrl-C stops" not in printed:
            line = await asyncio.wait_for(proc.stdout.readline(), timeout=20)
            assert line, printed
            printed += line.decode()
        url = re.search(r"Open the example app:\s+(\S+)", printed).group(1)  # type: ignore[union-attr]
        assert url == f"http://localhost:{ports[1]}"
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{ports[1]}/") as r:
                assert r.status == 200
                page = await r.text()
            assert "Connect AI budget" in page and f"http://127.0.0.1:{ports[0]}" in page
            async with http.get(f"http://127.0.0.1:{ports[0]}/sdk/client.js") as r:
                assert r.status == 200
            async with http.get(f"http://127.0.0.1:{ports[2]}/api/v1/models") as r:
                assert "wattgate/demo-chat" in await r.text()
        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), timeout=15) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
