"""Usage export: the CLI and the console download give one row per call, summing to the ledger."""

from __future__ import annotations

import asyncio
import csv
import io
import json
from decimal import Decimal

import pytest
from test_admin_functional import close_consoles, sign_in  # noqa: F401 (fixture)

from wattgate.cli import main
from wattgate.export import COLUMNS, parse_bound, usd_text
from wattgate.ledger import period_of
from wattgate.money import usd_to_nanos

MODELS = ("openai/gpt-4o-mini", "anthropic/claude-sonnet-4", "fake/flat-3c")


async def chat(h, app, user: str, model: str, *, stream: bool = False, text: str = "hi") -> None:
    async with h.http.post(h.api + "/chat/completions",
                           json={"model": model, "stream": stream,
                                 "messages": [{"role": "user", "content": text}]},
                           headers={"Authorization": f"Bearer {app.secret_key}",
                                    "x-wattfare-user": user}) as r:
        assert r.status == 200, await r.text()
        await r.read()


async def ledger_total(h, app_id: str) -> int:
    """The ledger's own aggregates (spend per connection and period), not the usage rows."""
    periods = {period_of(h.started), period_of(h.clock())}
    total = 0
    for c in await h.gw.store.connections_for_app(app_id):
        for period in periods:
            total += await h.gw.store.period_spent(c.connection_id, period)
    return total


@pytest.fixture
async def traffic(make_harness):
    h = await make_harness({"WATTGATE_LIMITS__CHAT_PER_MINUTE": "1000"})
    h.started = h.clock()
    app = await h.create_app("Exported")
    other = await h.create_app("Other")
    for user in ("ann", "=cmd|' /C calc'!A0"):
        await h.connect(app, user, monthly_usd=20)
    await h.connect(other, "zed", monthly_usd=20)
    n = 0
    for i in range(9):
        await chat(h, app, "ann" if i % 3 else "=cmd|' /C calc'!A0", MODELS[i % 3],
                   stream=i % 2 == 0, text=f"prompt words number {i} kumquat")
        n += 1
        h.clock.advance(3600)
    await chat(h, other, "zed", MODELS[0])
    return h, app, n


async def export_cli(h, capsys, monkeypatch, *args: str) -> str:
    """``wattgate usage export`` as a separate reader of the same database, as in real use."""
    for name, value in h.db.env.items():
        if name.startswith("WATTGATE_"):
            monkeypatch.setenv(name, value)
    assert await asyncio.to_thread(main, ["usage", "export", *args]) == 0
    return capsys.readouterr().out


async def test_cli_csv_has_one_row_per_call_summing_to_the_ledger(traffic, capsys, monkeypatch):
    h, app, n = traffic
    out = await export_cli(h, capsys, monkeypatch, "--app", app.app_id, "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert len(rows) == n
    assert {r["app_id"] for r in rows} == {app.app_id}
    total = sum(Decimal(r["cost_usd"]) for r in rows)
    ledger = await ledger_total(h, app.app_id)
    assert usd_to_nanos(total) == ledger > 0
    assert total == Decimal(ledger) / 10**9  # exact, not rounded
    assert {r["model"] for r in rows} == set(MODELS)
    assert {r["state"] for r in rows} == {"final"}
    assert rows[0]["time"].endswith("Z") and rows[0]["time"] < rows[-1]["time"]
    # A formula-looking user id is defused for spreadsheets; a plain one is kept as is.
    assert {r["user_id"] for r in rows} == {"ann", "'=cmd|' /C calc'!A0"}
    assert "kumquat" not in out


async def test_cli_jsonl_and_date_range(traffic, capsys, monkeypatch):
    h, app, n = traffic
    out = await export_cli(h, capsys, monkeypatch, "--app", app.app_id, "--format", "jsonl")
    rows = [json.loads(line) for line in out.splitlines()]
    assert len(rows) == n
    assert sum(Decimal(r["cost_usd"]) for r in rows) * 10**9 == await ledger_total(h, app.app_id)
    # Nine calls an hour apart: a range of whole days keeps only those inside it.
    day = rows[0]["time"][:10]
    out = await export_cli(h, capsys, monkeypatch, "--app", app.app_id, "--format", "jsonl",
                     "--from", day, "--to", day)
    inside = [json.loads(line) for line in out.splitlines()]
    assert [r["generation_id"] for r in inside] == \
        [r["generation_id"] for r in rows if r["time"][:10] == day]


async def test_cli_refuses_unknown_app_and_bad_dates(traffic, capsys, monkeypatch):
    h, app, _ = traffic
    for name, value in h.db.env.items():
        if name.startswith("WATTGATE_"):
            monkeypatch.setenv(name, value)
    assert await asyncio.to_thread(main, ["usage", "export", "--app", "app0000000000000000"]) == 1
    assert "unknown app" in capsys.readouterr().err
    assert await asyncio.to_thread(
        main, ["usage", "export", "--app", app.app_id, "--from", "yesterday"]) == 1
    assert "--from/--to" in capsys.readouterr().err


async def test_console_download_matches_the_cli(traffic, capsys, monkeypatch):
    h, app, n = traffic
    c = await sign_in(h)
    async with c.http.get(f"{h.url}/admin/apps/{app.app_id}/usage",
                          params={"format": "csv"}) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/csv")
        assert "attachment" in r.headers["Content-Disposition"]
        body = await r.text()
    assert body == await export_cli(h, capsys, monkeypatch, "--app", app.app_id, "--format", "csv")
    assert len(list(csv.DictReader(io.StringIO(body)))) == n


async def test_console_download_needs_a_session(traffic):
    h, app, _ = traffic
    async with h.http.get(f"{h.url}/admin/apps/{app.app_id}/usage", allow_redirects=False) as r:
        assert r.status == 303
        assert r.headers["Location"] == "/admin"


def test_bounds_and_amounts():
    assert usd_text(12345) == "0.000012345"
    assert usd_text(30_000_000) == "0.030000000"
    assert parse_bound("2026-11-01") == parse_bound("2026-10-31", end=True)
    assert parse_bound("2026-11-01T12:00:00Z") == parse_bound("2026-11-01") + 43200
    with pytest.raises(ValueError):
        parse_bound("last week")


async def test_pages_cover_every_call_once_in_order(traffic):
    h, app, n = traffic
    for size, shape in ((4, [4, 4, 1]), (3, [3, 3, 3]), (100, [9])):
        pages = [p async for p in h.gw.store.usage_lines(app.app_id, page=size)]
        assert [len(p) for p in pages] == shape
        lines = [line for p in pages for line in p]
        assert len({line.generation_id for line in lines}) == n
        assert [line.created_at for line in lines] == sorted(line.created_at for line in lines)


async def test_an_app_without_calls_exports_a_header_only(traffic, capsys, monkeypatch):
    h, _, _ = traffic
    quiet = await h.create_app("Quiet")
    out = await export_cli(h, capsys, monkeypatch, "--app", quiet.app_id, "--format", "csv")
    assert out.splitlines() == [",".join(COLUMNS)]
    assert await export_cli(h, capsys, monkeypatch, "--app", quiet.app_id,
                            "--format", "jsonl") == ""
