"""The database behind a test gateway, whichever backend serves it: SQL and CLI access.

A functional test that looks under the gateway (to tamper with a row as a bug or
an attacker would, to read what was stored, or to run ``wattgate`` commands on
the same ledger) goes through a ``LedgerDatabase`` instead of opening the SQLite
file, so the same test runs on SQLite and on PostgreSQL: the two schemas mirror
each other, and ``?`` placeholders are rewritten to ``$1, $2, …`` for PostgreSQL.
What differs (PostgreSQL's holds have an owner, its ids are identity columns) is
for the test to say, reading ``backend``.

It does not own the database: the harness (``tests/conftest.py``) made it and
drops it.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


def numbered(sql: str) -> str:
    """``?`` placeholders (outside quoted text) as PostgreSQL's ``$1, $2, …``."""
    out, n, quote = [], 0, ""
    for ch in sql:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "?":
            n += 1
            out.append(f"${n}")
            continue
        out.append(ch)
    return "".join(out)


@dataclass(frozen=True)
class LedgerDatabase:
    """A gateway's ledger: the SQLite file at ``path``, or the PostgreSQL database at
    ``url`` when set (``path`` is then only the name the harness knows it by)."""

    path: Path
    url: str = ""

    @property
    def backend(self) -> str:
        return "postgresql" if self.url else "sqlite"

    @property
    def env(self) -> dict[str, str]:
        """Environment for a ``wattgate`` command on this ledger."""
        env = {"WATTGATE_DATABASE__PATH": str(self.path), "PATH": "/usr/bin:/bin"}
        if self.url:
            env["WATTGATE_DATABASE__URL"] = self.url
        return env

    async def query(self, sql: str, *params: object) -> list[tuple[object, ...]]:
        """One statement (``?`` placeholders), committed at once; its rows, if any."""
        if not self.url:
            return await asyncio.to_thread(self._sqlite, sql, params)
        import asyncpg

        con = await asyncpg.connect(self.url)
        try:
            return [tuple(r) for r in await con.fetch(numbered(sql), *params)]
        finally:
            await con.close()

    async def one(self, sql: str, *params: object) -> object:
        """The first column of the first row."""
        rows = await self.query(sql, *params)
        assert rows, f"no row: {sql}"
        return rows[0][0]

    def _sqlite(self, sql: str, params: Sequence[object]) -> list[tuple[object, ...]]:
        db = sqlite3.connect(self.path, isolation_level=None, timeout=30)
        try:
            return [tuple(r) for r in db.execute(sql, params).fetchall()]
        finally:
            db.close()

    async def stored_bytes(self) -> bytes:
        """Everything the ledger stores, as bytes to search for what must never be there.

        SQLite: the database file and its journal/WAL, raw. PostgreSQL: every row of
        every table of the ledger's database, as text (all columns); not the server's
        data directory, which may not be ours (``$WATTGATE_TEST_DATABASE_URL``).
        """
        if not self.url:
            return b"".join(p.read_bytes() for p in sorted(self.path.parent.glob(
                self.path.name + "*")))
        tables = await self.query("SELECT table_name FROM information_schema.tables "
                                  "WHERE table_schema = 'public' AND table_type = 'BASE TABLE'")
        assert tables, "no tables in the ledger's database"
        out = []
        for (table,) in tables:
            for (row,) in await self.query(f'SELECT t::text FROM "{table}" t'):
                out.append(str(row).encode())
        return b"\n".join(out)
