"""The supervisor of ``serve --workers``: its backoff, its sockets, a crash loop."""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import sys

from wattgate.supervisor import Backoff, listen


def test_backoff_doubles_while_a_worker_keeps_dying_and_is_capped():
    b = Backoff(first=0.5, longest=30.0)
    assert [b.delay(n) for n in (1, 2, 3, 4, 7, 8, 50)] == [0.5, 1, 2, 4, 30, 30, 30]
    assert b.delay(0) == 0.5  # a worker that lived long: the first delay again


def test_listen_binds_once_and_a_second_bind_is_refused():
    sockets = listen("127.0.0.1", 0)
    try:
        port = sockets[0].getsockname()[1]
        assert port != 0 and all(s.getsockname()[1] == port for s in sockets)
        with socket.socket() as other:
            try:
                other.bind(("127.0.0.1", port))
            except OSError:
                pass
            else:
                raise AssertionError("a second server could bind the fleet's port")
    finally:
        for s in sockets:
            s.close()


CRASHING = """
import logging, os, sys
from wattgate.supervisor import Supervisor, listen
logging.basicConfig(level="INFO", format="%(message)s")
def serve(sockets, ready):
    ready()
    return 3
sys.exit(Supervisor(1, serve, listen("127.0.0.1", 0),
                    ready=lambda: print("ready", flush=True)).run())
"""


async def test_a_crash_loop_is_slowed_down_then_drained():
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", CRASHING,
                                                stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    assert proc.stderr is not None
    log = b""
    try:
        while log.count(b"restarting it in") < 4:
            line = await asyncio.wait_for(proc.stderr.readline(), 30)
            assert line, log.decode()
            log += line
        proc.send_signal(signal.SIGTERM)
        rest = await asyncio.wait_for(proc.stderr.read(), 30)
        code = await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    delays = re.findall(rb"exited with code 3; restarting it in ([0-9.]+)s", log)
    assert delays == [b"0.5", b"1", b"2", b"4"]
    assert b"draining" in rest
    assert code == 1  # its last worker had failed
