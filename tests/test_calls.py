"""The call service without HTTP on our side: a fake client sink, a real ledger, and the
fake OpenRouter on loopback as the only stand-in.

Every test runs against the ``ledger`` fixture: SQLite, or PostgreSQL with
``--backend postgresql`` (``tests/conftest.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping
from decimal import Decimal
from typing import Any

import pytest

from wattgate import admission
from wattgate.calls import Ask, Call, CallService
from wattgate.config import load_config
from wattgate.credentials import mint_credentials
from wattgate.errors import UpstreamError, WattgateError
from wattgate.estimate import CHAT, EMBEDDINGS
from wattgate.gateway import Gateway
from wattgate.keyfile import load_keys
from wattgate.ledger import period_of
from wattgate.money import usd_to_nanos
from wattgate.sealing import connection_aad, grant_aad
from wattgate.sse import Outcome
from wattgate.store import ACTIVE, SQLiteStore
from wattgate.upstream import Upstream

FUNDING_KEY = "sk-or-v1-" + "c" * 48
GRANT_TOKEN = "wfg_" + "g" * 40
CAP_USD = 1000


@pytest.fixture
async def ledger(tmp_path, backend, request) -> AsyncIterator[Any]:  # type: ignore[no-untyped-def]
    """The store under test: SQLite, or with ``--backend postgresql`` a fresh PostgreSQL
    database (the same tests, the group-committed hot path under them)."""
    if backend == "postgresql":
        from wattgate.store.postgres import PostgresStore

        store: Any = await PostgresStore.open(request.getfixturevalue("make_pg_url")())
    else:
        store = SQLiteStore.open(tmp_path / "calls.db")
    yield store
    await store.close()


class FakeSink:
    """The client's end: records what it was sent; leaves when told to."""

    def __init__(self, *, leave_after_writes: int | None = None,
                 leave_at_start: bool = False) -> None:
        self.leave_after_writes = leave_after_writes
        self.leave_at_start = leave_at_start
        self.status: int | None = None
        self.headers: dict[str, str] = {}
        self.body = bytearray()
        self.writes = 0
        self.finished = False
        self.on_first_write: Any = None  # async callback, run while the call is in flight

    async def start(self, status: int, headers: Mapping[str, str]) -> None:
        if self.leave_at_start:
            raise ConnectionResetError("the client left before the headers")
        self.status, self.headers = status, dict(headers)

    async def write(self, data: bytes) -> None:
        assert self.status is not None, "a body byte before the headers"
        if self.leave_after_writes is not None and self.writes >= self.leave_after_writes:
            raise ConnectionResetError("the client left")
        if self.writes == 0 and self.on_first_write is not None:
            await self.on_first_write()
        self.writes += 1
        self.body += data

    async def finish(self) -> None:
        self.finished = True


class World:
    """A gateway on the ``ledger`` with one app and one connected user, and its service."""

    def __init__(self, gw: Gateway, service: CallService, fake: Any, app_id: str,
                 secret_key: str, connection_id: int) -> None:
        self.gw, self.service, self.fake = gw, service, fake
        self.app_id, self.secret_key, self.connection_id = app_id, secret_key, connection_id

    @property
    def store(self) -> Any:
        return self.gw.store

    def ask(self, body: dict[str, Any], *, user: str | None = "u1",
            grant: str | None = None) -> Ask:
        headers = {}
        if user is not None:
            headers["x-wattfare-user"] = user
        if grant is not None:
            headers["x-wattfare-grant"] = grant
        raw = json.dumps(body).encode()

        async def read_body() -> bytes:
            return raw
        return Ask(self.secret_key, headers, read_body)

    async def rows(self) -> list[Any]:
        """Every ledger row of the app, whoever paid (a typed-key grant has no connection)."""
        return [line async for page in self.store.usage_lines(self.app_id) for line in page]

    async def spent(self) -> int:
        return await self.store.period_spent(self.connection_id, period_of(self.gw.clock()))

    async def no_hold_left(self) -> None:
        """What a user would see as budget stuck in flight: none, anywhere."""
        await self.service.close()  # background drains settle first
        # PostgreSQL: an admission whose caller left is released once its batch answers
        # (and a settle lands) in the store's own background writes: wait for them.
        while getattr(self.store, "_writes", None):
            await asyncio.wait(list(self.store._writes))
        assert await self.store.held(self.connection_id) == 0
        assert await self.store.open_holds() == 0

    def charged_nanos(self) -> int:
        return usd_to_nanos(self.fake.charged)

    async def typed_grant(self, requests: int) -> int:
        grant = await self.store.create_grant(
            self.app_id, self.gw.hash(GRANT_TOKEN), requests, None, sealed_key=None,
            connection_id=None, now=self.gw.clock(), expires_at=self.gw.clock() + 3600,
            seal=lambda gid: self.gw.sealer.seal(FUNDING_KEY, grant_aad(gid)))
        return grant.grant_id


@pytest.fixture
async def world(ledger, fake_upstream, tmp_path, clock) -> AsyncIterator[World]:  # type: ignore[no-untyped-def]
    config = load_config(None, env={
        "WATTGATE_DATABASE__PATH": str(tmp_path / "calls.db"),
        "WATTGATE_UPSTREAM__BASE_URL": fake_upstream.base_url,
        "WATTGATE_LIMITS__CHAT_PER_MINUTE": "1000000",
    })
    gw = Gateway(config=config, keys=load_keys(tmp_path / "keys.toml", env={}), store=ledger,
                 clock=clock)
    creds = mint_credentials()
    await ledger.create_app(creds.app_id, "calls", gw.hash(creds.secret),
                            ["http://localhost:3000"], now=clock())
    connection = await ledger.save_connection(
        creds.app_id, "u1", state=ACTIVE, cap_nanos=CAP_USD * 10**9, sealed_key=None,
        browser_hash=None, now=clock(),
        seal=lambda cid: gw.sealer.seal(FUNDING_KEY, connection_aad(cid)))
    upstream = Upstream.from_config(config, clock=clock)
    await upstream.start()
    service = CallService(gw, upstream)
    yield World(gw, service, fake_upstream, creds.app_id, creds.secret_key,
                connection.connection_id)
    await service.close()
    await upstream.close()


def chat(model: str = "openai/gpt-4o-mini", *, stream: bool = True) -> dict[str, Any]:
    return {"model": model, "stream": stream,
            "messages": [{"role": "user", "content": "Say something."}]}


async def test_a_streamed_call_holds_while_in_flight_then_settles_at_the_bill(world):
    world.fake.chunk_delay = 0.01  # the usage comes after the first bytes
    sink = FakeSink()
    held_in_flight: list[int] = []

    async def look() -> None:
        held_in_flight.append(await world.store.held(world.connection_id))
    sink.on_first_write = look

    await world.service.serve(CHAT, world.ask(chat()), sink)

    assert sink.status == 200 and sink.finished
    assert sink.headers["Content-Type"] == "text/event-stream"
    assert sink.body.endswith(b"data: [DONE]\n\n")
    assert held_in_flight[0] > 0  # the hold narrowed the cap while the model answered
    [row] = await world.rows()
    assert row.generation_id == sink.headers["X-Generation-Id"]
    assert (row.cost_nanos, row.provisional, row.status) == (world.charged_nanos(), False, "ok")
    assert await world.spent() == world.charged_nanos()
    await world.no_hold_left()


async def test_a_whole_answer_is_settled_before_it_is_sent_with_its_length(world):
    sink = FakeSink()
    await world.service.serve(EMBEDDINGS, world.ask(
        {"model": "openai/text-embedding-3-small", "input": "hello"}), sink)
    assert sink.status == 200 and sink.finished
    assert int(sink.headers["Content-Length"]) == len(sink.body)
    assert json.loads(sink.body)["object"] == "list"
    [row] = await world.rows()
    assert (row.cost_nanos, row.provisional) == (world.charged_nanos(), False)
    await world.no_hold_left()


async def test_a_client_gone_mid_stream_is_drained_and_settled_at_the_real_cost(world):
    world.fake.chunk_delay = 0.01  # the model is still answering when the client leaves
    sink = FakeSink(leave_after_writes=2)
    await world.service.serve(CHAT, world.ask(chat()), sink)  # no error: the client is gone
    assert not sink.finished and b"[DONE]" not in sink.body
    await world.no_hold_left()  # awaits the drain
    [row] = await world.rows()
    assert world.charged_nanos() > 0
    assert (row.cost_nanos, row.provisional, row.status) == \
        (world.charged_nanos(), False, "client_gone")


async def test_a_client_gone_before_the_headers_is_drained_too(world):
    await world.service.serve(CHAT, world.ask(chat()), FakeSink(leave_at_start=True))
    await world.no_hold_left()
    [row] = await world.rows()
    assert (row.cost_nanos, row.provisional) == (world.charged_nanos(), False)


async def test_an_upstream_error_before_the_first_byte_releases_the_hold_and_refunds_the_grant(
        world):
    grant_id = await world.typed_grant(requests=1)
    sink = FakeSink()
    with pytest.raises(UpstreamError):
        await world.service.serve(CHAT, world.ask(chat("fake/fail-500"), user=None,
                                                  grant=GRANT_TOKEN), sink)
    assert sink.status is None  # the client gets the error, not a started stream
    grant = await world.store.get_grant_by_id(grant_id)
    assert (grant.used, grant.held_nanos, grant.spent_nanos) == (0, 0, 0)
    await world.no_hold_left()
    # The one request is still there: the grant pays for a call that reaches the model.
    ok = FakeSink()
    await world.service.serve(CHAT, world.ask(chat(), user=None, grant=GRANT_TOKEN), ok)
    assert ok.status == 200
    grant = await world.store.get_grant_by_id(grant_id)
    assert (grant.used, grant.spent_nanos) == (1, world.charged_nanos())


async def test_an_error_inside_a_200_stream_is_recorded_once_never_below_the_bill(world):
    sink = FakeSink()
    await world.service.serve(CHAT, world.ask(chat("fake/midstream-error")), sink)
    assert sink.status == 200 and b"Provider disconnected" in sink.body
    [row] = await world.rows()
    # No usage came: the call stays provisional at its worst case, for reconciliation.
    assert row.status == "upstream_error" and row.provisional
    assert row.cost_nanos >= world.charged_nanos() > 0
    assert await world.spent() == row.cost_nanos
    await world.no_hold_left()


async def test_a_client_gone_right_after_the_usage_is_not_counted_twice(world):
    # The usage event settles the call; the client leaving on the last write ([DONE])
    # must neither drain nor write a second row.
    probe = FakeSink()
    await world.service.serve(CHAT, world.ask(chat()), probe)
    writes = probe.writes
    first = world.charged_nanos()
    sink = FakeSink(leave_after_writes=writes - 1)
    await world.service.serve(CHAT, world.ask(chat()), sink)
    await world.no_hold_left()
    rows = await world.rows()
    assert len(rows) == 2 and {r.status for r in rows} == {"ok"}
    assert await world.spent() == world.charged_nanos() == 2 * first


async def test_settle_and_release_take_effect_exactly_once(world):
    payer = admission.identify("u1", None)
    admitted = await admission.admit(world.gw, world.app_id, payer, 50_000_000,
                                     now=world.gw.clock())
    call = Call(world.service, admitted, 50_000_000, "openai/gpt-4o-mini",
                world.gw.clock(), CHAT)
    usage = {"prompt_tokens": 3, "completion_tokens": 4, "cost": Decimal("0.000123")}
    outcome = Outcome("gen-once", usage, done=True)
    await asyncio.gather(call.settle(outcome, "ok"), call.settle(outcome, "ok"))
    await call.settle(Outcome("gen-other"), "client_gone")
    await call.release()
    [row] = await world.rows()
    assert (row.generation_id, row.cost_nanos) == ("gen-once", 123_000)
    assert await world.spent() == 123_000
    await world.no_hold_left()


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
@pytest.mark.parametrize("payer", ["user", "grant"])
async def test_cancellation_at_any_await_leaves_no_hold(world, stream, payer):
    """Cancel the call after 0, 1, 2, … turns of the loop until it completes on its own:
    whichever await it was parked at, no hold is left and the call is in the ledger at
    most once, and surely once the client saw its answer begin."""
    ask = world.ask(chat(stream=stream), user="u1" if payer == "user" else None,
                    grant=GRANT_TOKEN if payer == "grant" else None)
    grant_id = None
    if payer == "grant":
        grant_id = await world.typed_grant(requests=10_000)
    cancelled = 0
    for turns in range(2_000):
        before = len(await world.rows())
        sink = FakeSink()
        task = asyncio.ensure_future(world.service.serve(CHAT, ask, sink))
        for _ in range(turns):
            await asyncio.sleep(0)
            if task.done():
                break
        finished = task.done()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, WattgateError):
            await task
        await world.no_hold_left()
        added = len(await world.rows()) - before
        assert added in (0, 1), f"cancelled after {turns} turns: {added} rows"
        if sink.status is not None:
            assert added == 1, f"cancelled after {turns} turns: the answer began, no row"
        if finished:
            assert sink.finished and added == 1
            break
        cancelled += 1
    else:
        pytest.fail("the call never completed")
    assert cancelled > 5  # the sweep really stopped the call at several awaits
    rows = await world.rows()
    if grant_id is None:
        assert await world.spent() == sum(r.cost_nanos for r in rows)
    else:  # and every request of a call released before the model was given back
        grant = await world.store.get_grant_by_id(grant_id)
        assert (grant.used, grant.spent_nanos, grant.held_nanos) == \
            (len(rows), sum(r.cost_nanos for r in rows), 0)


def test_the_service_never_loads_the_web_layer():
    """The lifecycle is domain code: importing it pulls in no part of aiohttp.web."""
    probe = ("import sys, wattgate.calls; "
             "print(sorted(m for m in sys.modules if m.startswith('aiohttp.web')))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"
