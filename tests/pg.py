"""PostgreSQL for the tests: one server for the session, a fresh database per test.

The server is ``WATTGATE_TEST_DATABASE_URL`` when set (any database on it: the
tests create and drop their own, named ``wgtest_<run>_<n>``); otherwise a
throwaway cluster started from the installed server binaries
(``/usr/lib/postgresql/<version>/bin``) in a temporary directory, on a free
loopback port with its unix socket beside its data, trust auth, no fsync, and
removed at the end of the session. As root, ``initdb`` and the server run as the
``postgres`` user (PostgreSQL refuses to run as root).

Each test's database is a copy of a template migrated once per session
(``CREATE DATABASE … TEMPLATE``), so a test starts from an empty, migrated
ledger in milliseconds and never sees another test's rows.

When no server can be had, ``NoServer`` says why: the fixtures turn it into a
failure, never a skip.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import glob
import os
import pwd
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

ENV = "WATTGATE_TEST_DATABASE_URL"
T = TypeVar("T")
_NAME = re.compile(r"^[a-z0-9_]+$")


class NoServer(Exception):
    """No PostgreSQL server could be reached or started; the message says why."""


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_binaries() -> Path | None:
    """The bin directory of the newest PostgreSQL installed the Debian way."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: [int(x) if x.isdigit() else 0 for x in Path(p).parts[-3].split(".")])
    return Path(found[-1]).parent if found else None


class Cluster:
    """A throwaway PostgreSQL cluster, owned by this test session."""

    # Tests want speed, not durability: no fsync at all.
    TEST_SETTINGS = ("-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
                     "-c max_connections=400")

    def __init__(self, bindir: Path, settings: str = TEST_SETTINGS) -> None:
        self.bindir = bindir
        self.settings = settings
        self.root = Path(tempfile.mkdtemp(prefix="wattgate-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self.as_user: list[str] = []
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *argv: str) -> None:
        done = subprocess.run([*self.as_user, *argv], capture_output=True, text=True,
                              timeout=120, check=False)
        if done.returncode != 0:
            raise NoServer(f"{Path(argv[0]).name} failed ({done.returncode}): "
                           f"{(done.stderr or done.stdout).strip()[-800:]}")

    def start(self) -> None:
        if os.geteuid() == 0:
            # initdb and postgres refuse root: run them as the package's own user.
            try:
                user = pwd.getpwnam("postgres")
            except KeyError:
                raise NoServer("running as root and there is no 'postgres' user to run "
                               "initdb as (install Debian's postgresql package)") from None
            os.chown(self.root, user.pw_uid, user.pw_gid)
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self._run(str(self.bindir / "initdb"), "-D", str(self.data), "-U", "postgres",
                  "--auth=trust", "-E", "UTF8", "--no-sync", "--locale=C")
        options = (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 "
                   + self.settings)
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-o", options,
                  "-l", str(self.root / "server.log"), "-w", "-t", "60", "start")

    def postmaster_pid(self) -> int:
        """The server's main process (its backends are its children)."""
        return int((self.data / "postmaster.pid").read_text().split()[0])

    def stop(self) -> None:
        if self.data.exists():
            subprocess.run([*self.as_user, str(self.bindir / "pg_ctl"), "-D", str(self.data),
                            "-m", "immediate", "-w", "stop"], capture_output=True,
                           timeout=60, check=False)
        shutil.rmtree(self.root, ignore_errors=True)


def _on_a_thread(work: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine to the end on a loop of its own thread: fixtures are called
    from inside pytest-asyncio's loop, whose thread must not get a second loop."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(work())).result()


def _migrate(url: str) -> None:
    """Apply the PostgreSQL backend's migrations to ``url``."""
    async def go() -> None:
        from wattgate.store.postgres import PostgresStore  # type: ignore[import-not-found,unused-ignore]

        store = await PostgresStore.open(url)
        await store.close()
    _on_a_thread(go)


class Server:
    """The session's PostgreSQL server: hands out fresh databases, drops them after."""

    def __init__(self, url: str, cluster: Cluster | None = None) -> None:
        self.url = url
        self.cluster = cluster
        self.run = secrets.token_hex(4)
        self._n = 0
        self._template: str | None = None
        self._template_error: BaseException | None = None

    @classmethod
    def get(cls) -> "Server":
        """``WATTGATE_TEST_DATABASE_URL``, or a throwaway cluster; ``NoServer`` if neither."""
        url = os.environ.get(ENV, "").strip()
        if url:
            server = cls(url)
            try:
                server.execute("SELECT 1")
            except Exception as e:
                raise NoServer(f"{ENV} is set but its server does not answer: {e}") from e
            return server
        bindir = server_binaries()
        if bindir is None:
            raise NoServer(f"{ENV} is not set and no PostgreSQL server binaries are installed "
                           "(/usr/lib/postgresql/*/bin/initdb); install Debian's postgresql "
                           "package (scripts/test does) or point the variable at a server")
        cluster = Cluster(bindir)
        try:
            cluster.start()
        except BaseException:
            cluster.stop()
            raise
        return cls(cluster.url, cluster)

    def execute(self, sql: str) -> list[tuple[object, ...]]:
        """One statement on the server's own database, outside any transaction (asyncpg,
        the backend's driver, on a thread: the caller may be inside an event loop)."""
        async def go() -> list[tuple[object, ...]]:
            import asyncpg

            db = await asyncpg.connect(self.url, timeout=10)
            try:
                if sql.lstrip().upper().startswith("SELECT"):
                    return [tuple(r) for r in await db.fetch(sql)]
                await db.execute(sql)
                return []
            finally:
                await db.close()
        return _on_a_thread(go)

    def _template_name(self) -> str:
        """The session's migrated template (made on first use)."""
        if self._template_error is not None:
            raise self._template_error
        if self._template is None:
            name = f"wgtest_{self.run}_template"
            self.execute(f'CREATE DATABASE "{name}"')
            try:
                _migrate(_with_database(self.url, name))
            except ImportError:
                # No PostgreSQL backend in this tree: an empty template; opening a
                # store fails in the test itself, which then says so.
                pass
            except BaseException as e:
                self._template_error = e
                raise
            self._template = name
        return self._template

    def new_database(self) -> str:
        """The URL of a fresh, migrated, empty database of this session."""
        template = self._template_name()
        self._n += 1
        name = f"wgtest_{self.run}_{self._n}"
        for attempt in range(50):
            try:
                self.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
                break
            except Exception as e:
                # The template's last client may still be leaving.
                if "being accessed by other users" not in str(e) or attempt == 49:
                    raise
                self.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                             f"WHERE datname = '{template}'")
                time.sleep(0.05)
        return _with_database(self.url, name)

    def drop_database(self, url: str) -> None:
        name = urlsplit(url).path.lstrip("/")
        assert _NAME.match(name) and name.startswith(f"wgtest_{self.run}_"), name
        self.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def close(self) -> None:
        try:
            if self._template is not None:
                self.execute(f'DROP DATABASE IF EXISTS "{self._template}" WITH (FORCE)')
        finally:
            if self.cluster is not None:
                self.cluster.stop()
