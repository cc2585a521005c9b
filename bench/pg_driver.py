"""asyncpg against psycopg 3 on the PostgreSQL ledger's hot path, no HTTP.

    python bench/pg_driver.py [--url postgresql://postgres@127.0.0.1:5432/postgres]
                              [--calls 3000] [--tasks 32] [--pool 8]

One metered call is what ``PostgresStore`` does for it: admit (one transaction:
the connection row ``FOR UPDATE`` with its period's spent and held, then the
hold's row), note the generation (one UPDATE), settle (one transaction: drop the
hold, insert the usage row, move the period aggregate). ``--tasks`` calls run at
once on one connection's cap through a pool of ``--pool`` connections. Each
driver runs twice, alternating, on a throwaway database; printed per driver:
calls per second (best round) and this process's CPU per call (the driver's
own cost, which is what a gateway process pays on top of the bare hop).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import time
from typing import Any, Awaitable, Callable

SCHEMA = """
CREATE TABLE connections (connection_id BIGINT PRIMARY KEY, state TEXT NOT NULL,
    sealed_key TEXT, cap_nanos BIGINT);
CREATE TABLE periods (connection_id BIGINT, period TEXT, spent_nanos BIGINT NOT NULL,
    PRIMARY KEY (connection_id, period));
CREATE TABLE holds (hold_id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    connection_id BIGINT, period TEXT NOT NULL, amount_nanos BIGINT NOT NULL,
    generation_id TEXT, owner BIGINT NOT NULL, created_at DOUBLE PRECISION NOT NULL);
CREATE INDEX holds_by_connection ON holds (connection_id, period);
CREATE TABLE usage (usage_id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    generation_id TEXT NOT NULL UNIQUE, connection_id BIGINT, period TEXT NOT NULL,
    cost_nanos BIGINT NOT NULL, created_at DOUBLE PRECISION NOT NULL);
INSERT INTO connections VALUES (1, 'active', 'sealed', 1000000000000000);
"""
ADMIT_READ = ("SELECT c.state, c.sealed_key, c.cap_nanos, COALESCE(p.spent_nanos, 0), "
              "(SELECT COALESCE(SUM(h.amount_nanos), 0) FROM holds h "
              " WHERE h.connection_id = c.connection_id AND h.period = {p}) "
              "FROM connections c LEFT JOIN periods p ON p.connection_id = c.connection_id "
              "AND p.period = {p} WHERE c.connection_id = {c} FOR UPDATE OF c")
ADMIT_HOLD = ("INSERT INTO holds (connection_id, period, amount_nanos, owner, created_at) "
              "VALUES ({c}, {p}, {n}, 7, {t}) RETURNING hold_id")
NOTE = "UPDATE holds SET generation_id = {g} WHERE hold_id = {h}"
DROP = "DELETE FROM holds WHERE hold_id = {h}"
USAGE = ("INSERT INTO usage (generation_id, connection_id, period, cost_nanos, created_at) "
         "VALUES ({g}, {c}, {p}, {n}, {t}) ON CONFLICT (generation_id) DO NOTHING "
         "RETURNING usage_id")
SPEND = ("INSERT INTO periods (connection_id, period, spent_nanos) VALUES ({c}, {p}, {n}) "
         "ON CONFLICT (connection_id, period) DO UPDATE "
         "SET spent_nanos = periods.spent_nanos + EXCLUDED.spent_nanos")


def dollar(sql: str, names: list[str]) -> str:
    return sql.format(**{n: f"${i + 1}" for i, n in enumerate(names)})


def percent(sql: str, names: list[str]) -> str:
    return sql.format(**{n: "%s" for n in names})


async def asyncpg_call_factory(url: str, pool_size: int) -> tuple[Callable[[int], Awaitable[None]],
                                                                  Callable[[], Awaitable[None]]]:
    import asyncpg
    pool = await asyncpg.create_pool(url, min_size=pool_size, max_size=pool_size)
    assert pool is not None
    admit_read = dollar(ADMIT_READ, ["p", "c"])
    admit_hold = dollar(ADMIT_HOLD, ["c", "p", "n", "t"])
    note = dollar(NOTE, ["g", "h"])
    drop = dollar(DROP, ["h"])
    usage = dollar(USAGE, ["g", "c", "p", "n", "t"])
    spend = dollar(SPEND, ["c", "p", "n"])

    async def call(i: int) -> None:
        async with pool.acquire() as con:
            async with con.transaction():
                row = await con.fetchrow(admit_read, "2026-01", 1)
                assert row[0] == "active" and row[3] + row[4] + 1000 <= row[2]
                hold = await con.fetchval(admit_hold, 1, "2026-01", 1000, time.time())
        gen = f"gen-{i}-{secrets.token_hex(4)}"
        async with pool.acquire() as con:
            await con.execute(note, gen, hold)
        async with pool.acquire() as con:
            async with con.transaction():
                await con.execute(drop, hold)
                if await con.fetchval(usage, gen, 1, "2026-01", 900, time.time()) is not None:
                    await con.execute(spend, 1, "2026-01", 900)
    return call, pool.close


async def psycopg_call_factory(url: str, pool_size: int) -> tuple[Callable[[int], Awaitable[None]],
                                                                  Callable[[], Awaitable[None]]]:
    from psycopg_pool import AsyncConnectionPool  # type: ignore[import-not-found]
    pool = AsyncConnectionPool(url, min_size=pool_size, max_size=pool_size, open=False)
    await pool.open(wait=True)
    admit_read = percent(ADMIT_READ, ["p", "p", "c"])
    admit_hold = percent(ADMIT_HOLD, ["c", "p", "n", "t"])
    note = percent(NOTE, ["g", "h"])
    drop = percent(DROP, ["h"])
    usage = percent(USAGE, ["g", "c", "p", "n", "t"])
    spend = percent(SPEND, ["c", "p", "n"])

    async def call(i: int) -> None:
        async with pool.connection() as con:
            async with con.transaction():
                cur = await con.execute(admit_read, ("2026-01", "2026-01", 1), prepare=True)
                row: Any = await cur.fetchone()
                assert row[0] == "active" and row[3] + row[4] + 1000 <= row[2]
                cur = await con.execute(admit_hold, (1, "2026-01", 1000, time.time()),
                                        prepare=True)
                hold = (await cur.fetchone())[0]  # type: ignore[index]
        gen = f"gen-{i}-{secrets.token_hex(4)}"
        async with pool.connection() as con:
            await con.execute(note, (gen, hold), prepare=True)
        async with pool.connection() as con:
            async with con.transaction():
                await con.execute(drop, (hold,), prepare=True)
                cur = await con.execute(usage, (gen, 1, "2026-01", 900, time.time()),
                                        prepare=True)
                if await cur.fetchone() is not None:
                    await con.execute(spend, (1, "2026-01", 900), prepare=True)
    return call, pool.close


async def round_(factory: Any, url: str, calls: int, tasks: int, pool: int) -> tuple[float, float]:
    call, close = await factory(url, pool)
    await asyncio.gather(*(call(-i - 1) for i in range(tasks)))  # warm: prepare, connect
    queue = iter(range(calls))

    async def worker() -> None:
        for i in queue:
            await call(i)
    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(tasks)))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    await close()
    return calls / wall, cpu / calls * 1e6


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--tasks", type=int, default=32)
    parser.add_argument("--pool", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    import asyncpg
    name = "wg_bench_" + secrets.token_hex(4)
    admin = await asyncpg.connect(args.url)
    await admin.execute(f"CREATE DATABASE {name}")
    url = args.url.rsplit("/", 1)[0] + "/" + name
    results: dict[str, list[tuple[float, float]]] = {"asyncpg": [], "psycopg": []}
    try:
        setup = await asyncpg.connect(url)
        await setup.execute(SCHEMA)
        await setup.close()
        for _ in range(args.rounds):
            for driver, factory in (("asyncpg", asyncpg_call_factory),
                                    ("psycopg", psycopg_call_factory)):
                results[driver].append(await round_(factory, url, args.calls, args.tasks,
                                                    args.pool))
    finally:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.close()
    print(json.dumps({d: {"calls_per_s": round(max(r[0] for r in rs)),
                          "cpu_us_per_call": round(min(r[1] for r in rs)),
                          "rounds": [[round(a), round(b)] for a, b in rs]}
                      for d, rs in results.items()}, indent=1))


if __name__ == "__main__":
    asyncio.run(main())
