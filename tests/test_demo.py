"""``wattgate demo`` as a newcomer runs it: one command, a URL printed, Ctrl-C stops it."""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import sys
from pathlib import Path

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


async def read_banner(proc: asyncio.subprocess.Process) -> str:
    assert proc.stdout is not None
    printed = ""
    while "Ctrl-C stops" not in printed:
        line = await asyncio.wait_for(proc.stdout.readline(), timeout=30)
        assert line, printed
        printed += line.decode()
    return printed


async def test_the_demo_prints_the_console_and_its_token_and_sigterm_removes_its_data():
    ports = [free_port() for _ in range(3)]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "wattgate", "demo", "--port", str(ports[0]),
        "--app-port", str(ports[1]), "--fake-port", str(ports[2]),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        printed = await read_banner(proc)
        console = re.search(r"operator console:\s+(\S+)", printed).group(1)  # type: ignore[union-attr]
        token = re.search(r"console admin token:\s+(\S+)", printed).group(1)  # type: ignore[union-attr]
        data = Path(re.search(r"data:\s+(\S+) \(deleted on exit\)", printed).group(1))  # type: ignore[union-attr]
        assert console == f"http://127.0.0.1:{ports[0]}/admin"
        assert data.is_dir() and (data / "wattgate.db").exists()
        # The printed token signs in to the printed console.
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
            async with http.post(console + "/login", data={"token": token},
                                 allow_redirects=False) as r:
                assert r.status == 303
            async with http.get(console) as r:
                assert r.status == 200 and "Overview" in await r.text()
        proc.send_signal(signal.SIGTERM)  # as a service manager or `docker stop` stops it
        rest = (await asyncio.wait_for(proc.stdout.read(), timeout=30)).decode()  # type: ignore[union-attr]
        assert await asyncio.wait_for(proc.wait(), timeout=30) == 0
        assert f"removed {data}" in rest
        assert not data.exists()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_a_busy_port_is_named_with_the_flag_that_changes_it():
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    busy = taken.getsockname()[1]
    try:
        for flag in ("--port", "--app-port", "--fake-port"):
            ports = {"--port": free_port(), "--app-port": free_port(),
                     "--fake-port": free_port(), flag: busy}
            args = [str(x) for pair in ports.items() for x in pair]
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "wattgate", "demo", *args,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
            assert proc.returncode == 1, out
            message = err.decode()
            assert f"port {busy} (" in message and "already in use" in message
            assert f"pick another with {flag} PORT" in message
            assert "Traceback" not in message
    finally:
        taken.close()
