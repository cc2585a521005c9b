"""The supervisor of ``wattgate serve --workers N``: N gateway processes on one port.

Owns the listening sockets (bound once, by the parent, before any worker
exists; every worker inherits them through ``fork``), the workers' lives and
one log line per worker start and exit. It owns no app, no store and no
request: each worker is a whole gateway (``serve_worker``) that opens its own
store and upstream session, exactly as ``wattgate serve`` does with one
process, and the parent never opens either.

- Start: N workers are forked; the parent reports ready (``ready()``) once
  every one of them listens. A worker that exits before the whole first
  generation has listened is a boot failure (a config error, the database
  refusing it): the others are drained and the parent exits 1, as one
  ``wattgate serve`` would, the worker having printed its one line.
- A worker that dies afterwards, even by SIGKILL, is forked again after a
  backoff (``Backoff``): 0.5 s, doubling while it keeps dying within 10 s of
  its start, at most 30 s, so a crash loop never spins the CPU.
- SIGTERM or SIGINT on the parent: every worker is sent SIGTERM once and
  drains as a single server does (running calls finish and settle within
  ``server.shutdown_timeout``); the parent exits when all have, 0 if every
  worker exited 0. Workers ignore SIGINT (a terminal's Ctrl-C reaches the
  whole process group; the parent is the one that answers it) and treat
  repeated SIGTERMs (a service manager signals every process) as one.
- If the parent itself dies, even by SIGKILL, the kernel sends each worker
  SIGTERM (Linux ``PR_SET_PDEATHSIG``): no orphan keeps serving unsupervised.

Why one socket shared by the workers rather than one ``SO_REUSEPORT`` socket
per worker: measured on 2 cores (``bench/workers.py``, numbers in
``docs/operations.md``), the kernel's SO_REUSEPORT hash spreads connections
evenly whatever each worker is doing, so a worker busy with a slow burst keeps
receiving its share while the other idles; with one shared accept queue, the
worker that is free accepts. The shared socket also keeps connections queued
in the kernel when a worker dies (a SO_REUSEPORT socket's queue is reset with
its worker), a busy port is reported once by the parent before anything
starts, and a second ``wattgate serve`` cannot silently join the port.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import FrameType

log = logging.getLogger("wattgate.workers")

# Connections the kernel queues before the server accepts them. aiohttp's 128 fills
# within ~60 ms of a burst of 2,000 streams opening at once (bench/run.py
# --paced-streams 2000); a connection refused there retries its SYN after a second.
# 2048, as gunicorn and uvicorn use (the kernel caps it at net.core.somaxconn).
LISTEN_BACKLOG = 2048

#: What a worker runs, in the forked child: serve on the inherited sockets, call
#: ``ready()`` once listening, return the exit code after draining.
ServeWorker = Callable[[Sequence[socket.socket], Callable[[], None]], int]


@dataclass(frozen=True)
class Backoff:
    """How long to wait before forking again a worker that died."""

    first: float = 0.5
    longest: float = 30.0
    steady: float = 10.0  # a worker that lived this long was not crash-looping

    def delay(self, quick_deaths: int) -> float:
        """The wait after the ``quick_deaths``-th death in a row within ``steady``."""
        return min(self.longest, self.first * 2 ** max(0, quick_deaths - 1))


@dataclass
class _Slot:
    index: int
    pid: int | None = None
    ready_fd: int | None = None  # read end of the worker's ready pipe
    started_at: float = 0.0
    ready: bool = False
    quick_deaths: int = 0
    due: float | None = 0.0  # when to fork it (again); None: not to be forked
    code: int = 0  # how its last worker ended


def listen(host: str, port: int, *, backlog: int = LISTEN_BACKLOG) -> list[socket.socket]:
    """Bind and listen on every address ``host`` resolves to, as aiohttp's TCPSite does.

    Port 0 picks one free port, shared by every address's socket.
    """
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    seen = set()
    try:
        for family, kind, proto, _, address in infos:
            if (family, address) in seen:
                continue
            seen.add((family, address))
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and len(sockets) > 1:  # every address on the first's free port
                address = (address[0], sockets[0].getsockname()[1], *address[2:])
            sock.bind(address)
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class Supervisor:
    """Fork ``workers`` copies of ``serve``, keep them alive, drain them on a signal."""

    def __init__(self, workers: int, serve: ServeWorker, sockets: Sequence[socket.socket], *,
                 ready: Callable[[], None] = lambda: None, backoff: Backoff = Backoff(),
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._serve = serve
        self._sockets = list(sockets)
        self._ready = ready
        self._backoff = backoff
        self._clock = clock
        self._slots = [_Slot(i + 1) for i in range(workers)]
        self._signals: list[int] = []
        self._draining = False
        self._booted = False  # every worker of the first generation has listened
        self._failed = False

    def run(self) -> int:
        """Supervise until drained; the exit code for ``wattgate serve``."""
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        previous = {s: signal.signal(s, self._on_signal)
                    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD)}
        old_wakeup = signal.set_wakeup_fd(wake_w)
        try:
            return self._loop(wake_r, wake_w)
        finally:
            signal.set_wakeup_fd(old_wakeup)
            for s, handler in previous.items():
                signal.signal(s, handler)
            os.close(wake_r)
            os.close(wake_w)
            for slot in self._slots:
                self._close_ready(slot)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals.append(signum)

    def _loop(self, wake_r: int, wake_w: int) -> int:
        while True:
            self._handle_signals()
            self._reap()
            live = [s for s in self._slots if s.pid is not None]
            if self._draining and not live:
                break
            now = self._clock()
            if not self._draining:
                for slot in self._slots:
                    if slot.pid is None and slot.due is not None and slot.due <= now:
                        self._fork(slot, (wake_r, wake_w))
            dues = [s.due for s in self._slots if s.pid is None and s.due is not None]
            timeout = None if self._draining or not dues else max(0.0, min(dues) - now)
            fds = [wake_r] + [s.ready_fd for s in self._slots if s.ready_fd is not None]
            try:
                readable, _, _ = select.select(fds, [], [], timeout)
            except InterruptedError:  # pragma: no cover (PEP 475 retries select)
                continue
            for fd in readable:
                if fd == wake_r:
                    with contextlib.suppress(BlockingIOError):
                        while os.read(wake_r, 512):
                            pass
                else:
                    self._read_ready(fd)
        if self._failed:
            return 1
        return 0 if all(s.code == 0 for s in self._slots) else 1

    def _handle_signals(self) -> None:
        signals, self._signals = self._signals, []
        if self._draining or not any(s in (signal.SIGTERM, signal.SIGINT) for s in signals):
            return
        self._drain()

    def _drain(self) -> None:
        self._draining = True
        live = [s for s in self._slots if s.pid is not None]
        log.info("draining %d workers", len(live))
        for slot in live:
            assert slot.pid is not None
            with contextlib.suppress(ProcessLookupError):
                os.kill(slot.pid, signal.SIGTERM)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            slot = next((s for s in self._slots if s.pid == pid), None)
            if slot is not None:
                self._exited(slot, status)

    def _exited(self, slot: _Slot, status: int) -> None:
        self._read_ready(slot.ready_fd)  # a ready byte it sent just before dying
        self._close_ready(slot)
        pid, slot.pid = slot.pid, None
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            how = f"was killed by {signal.Signals(sig).name}"
            # Our SIGTERM reached a worker still starting (no handler yet): it served nothing.
            clean = self._draining and sig == signal.SIGTERM and not self._failed
            slot.code = 0 if clean else 128 + sig
        else:
            slot.code = os.waitstatus_to_exitcode(status)
            how = f"exited with code {slot.code}"
        if self._draining:
            log.info("worker %d (pid %s) %s", slot.index, pid, how)
            return
        if not self._booted and not slot.ready:
            log.error("worker %d (pid %s) %s before it listened; stopping", slot.index, pid,
                      how)
            self._failed = True
            self._drain()
            return
        lived = self._clock() - slot.started_at
        slot.quick_deaths = slot.quick_deaths + 1 if lived < self._backoff.steady else 1
        delay = self._backoff.delay(slot.quick_deaths)
        slot.due = self._clock() + delay
        log.warning("worker %d (pid %s) %s; restarting it in %gs", slot.index, pid, how, delay)

    def _fork(self, slot: _Slot, wake: tuple[int, int]) -> None:
        ready_r, ready_w = os.pipe()
        parent = os.getpid()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                os.close(ready_r)
                for fd in wake:
                    os.close(fd)
                for other in self._slots:
                    self._close_ready(other)
                _become_worker(parent)

                def ready() -> None:
                    os.write(ready_w, b"r")
                code = self._serve(self._sockets, ready)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            except BaseException:
                log.exception("worker %d failed", slot.index)
            finally:
                with contextlib.suppress(Exception):
                    sys.stdout.flush()
                    sys.stderr.flush()
                os._exit(code)
        os.close(ready_w)
        os.set_blocking(ready_r, False)
        slot.pid, slot.ready_fd, slot.ready = pid, ready_r, False
        slot.started_at, slot.due = self._clock(), None
        log.info("worker %d started (pid %d)", slot.index, pid)

    def _read_ready(self, fd: int | None) -> None:
        slot = next((s for s in self._slots if fd is not None and s.ready_fd == fd), None)
        if slot is None or fd is None:
            return
        try:
            data = os.read(fd, 16)
        except BlockingIOError:  # nothing yet
            return
        except OSError:
            data = b""
        if not data:  # EOF: the worker is gone or going; waitpid says how
            self._close_ready(slot)
            return
        slot.ready = True
        if not self._booted and all(s.ready for s in self._slots):
            self._booted = True
            self._ready()

    @staticmethod
    def _close_ready(slot: _Slot) -> None:
        if slot.ready_fd is not None:
            os.close(slot.ready_fd)
            slot.ready_fd = None


def _become_worker(parent: int) -> None:
    """Signals as a worker wants them, and no life beyond its parent's."""
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent answers Ctrl-C
    with contextlib.suppress(Exception):  # Linux only; elsewhere a worker may outlive it
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)

