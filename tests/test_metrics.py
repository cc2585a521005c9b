"""GET /metrics through the running app: parses as Prometheus text, moves with traffic, guarded."""

from __future__ import annotations

from decimal import Decimal

import openai
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from wattgate.app import create_app
from wattgate.config import load_config
from wattgate.errors import ConfigError
from wattgate.money import usd_to_nanos


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(snap, name: str, **labels: str) -> float:
    return snap.get((name, tuple(sorted(labels.items()))), 0.0)


async def scrape(h, **kw) -> dict:
    async with h.http.get(h.url + "/metrics", **kw) as r:
        assert r.status == 200, await r.text()
        assert r.headers["Content-Type"].startswith("text/plain")
        return samples(await r.text())


async def test_counters_move_with_traffic(make_harness):
    h = await make_harness({"WATTGATE_LIMITS__CHAT_PER_MINUTE": "3"})
    app = await h.create_app()
    await h.connect(app, "mia", monthly_usd=5)
    before = await scrape(h)
    assert value(before, "wattgate_holds_open") == 0
    chat = "/api/v1/chat/completions"
    async with openai.AsyncOpenAI(base_url=h.api, api_key=app.secret_key, max_retries=0,
                                  default_headers={"x-wattfare-user": "mia"}) as oa:
        await oa.chat.completions.create(model="fake/flat-3c",
                                         messages=[{"role": "user", "content": "hi"}])
        stream = await oa.chat.completions.create(
            model="fake/flat-2c", stream=True, messages=[{"role": "user", "content": "hi"}])
        async for _ in stream:
            pass
        stream = await oa.chat.completions.create(
            model="fake/no-usage", stream=True, messages=[{"role": "user", "content": "hi"}])
        async for _ in stream:
            pass
        with pytest.raises(openai.RateLimitError):
            await oa.chat.completions.create(model="fake/flat-3c",
                                             messages=[{"role": "user", "content": "hi"}])
    after = await scrape(h)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("wattgate_http_requests_total", route=chat, method="POST", status="200") == 3
    assert moved("wattgate_http_requests_total", route=chat, method="POST", status="429") == 1
    assert moved("wattgate_rate_limit_rejections_total", limit="RL_CHAT") == 1
    assert moved("wattgate_upstream_ttfb_seconds_count") == 3
    assert moved("wattgate_upstream_latency_seconds_count") == 3
    assert moved("wattgate_metered_calls_total", app=app.app_id, state="final") == 2
    assert moved("wattgate_metered_calls_total", app=app.app_id, state="provisional") == 1
    # Dollars whose real cost is known: the two flat-priced calls, not the estimate
    # recorded for the one with no usage...
    ledger = sum([u.cost_nanos async for page in h.gw.store.usage_lines(app.app_id) for u in page])
    assert ledger > usd_to_nanos(Decimal("0.05"))
    assert moved("wattgate_metered_usd_total", app=app.app_id) == pytest.approx(0.05)
    assert value(after, "wattgate_reconciliation_backlog") == 1
    assert value(after, "wattgate_holds_open") == 0
    # The scrape itself is counted, under its route pattern, never a raw path.
    assert moved("wattgate_http_requests_total", route="/metrics", method="GET", status="200") == 1
    # ...until reconciliation learns that one's real cost: then the counter equals the ledger.
    from wattgate.reconcile import Reconciler
    from wattgate.views.state import upstream_key
    assert (await Reconciler(h.gw, h.app[upstream_key]).run_once(force=True)).corrected == 1
    ledger = sum([u.cost_nanos async for page in h.gw.store.usage_lines(app.app_id) for u in page])
    assert usd_to_nanos(h.fake.charged) == ledger
    final = await scrape(h)
    assert value(final, "wattgate_metered_usd_total", app=app.app_id) - \
        value(before, "wattgate_metered_usd_total", app=app.app_id) == pytest.approx(ledger / 1e9)
    assert value(final, "wattgate_reconciliation_backlog") == 0


async def test_unmatched_paths_share_one_label(harness):
    for path in ("/nope/1", "/nope/2", "/api/v1/secret-sk_live_x"):
        async with harness.http.get(harness.url + path) as r:
            assert r.status == 404
    for method in ("PROPFIND", "MKCOL", "LOCK"):  # other methods share one label value
        async with harness.http.request(method, harness.url + "/pot") as r:
            assert r.status in (404, 405)
    snap = await scrape(harness)
    assert value(snap, "wattgate_http_requests_total", route="unmatched", method="GET",
                 status="404") == 3
    assert value(snap, "wattgate_http_requests_total", route="unmatched", method="OTHER",
                 status="404") == 3
    assert not any("secret" in str(labels) for _, labels in snap)


async def test_proxied_request_is_not_loopback(harness):
    async with harness.http.get(harness.url + "/metrics",
                                headers={"X-Forwarded-For": "203.0.113.9"}) as r:
        assert r.status == 403
        assert (await r.json())["error"]["code"] == "forbidden"


SCRAPE_TOKEN = "scrape-token-Q7vX2mK9pL4wR8tZ3nB6cY1d"


async def test_a_guessable_metrics_token_refuses_to_start(tmp_path):
    # No limiter stands before this comparison: the token's strength is the defence.
    token_file = tmp_path / "metrics.token"
    token_file.write_text("scrape-token-0123456789\n")
    config = load_config(None, env={"WATTGATE_DATABASE__PATH": str(tmp_path / "w.db"),
                                    "WATTGATE_METRICS__TOKEN_FILE": str(token_file)})
    runner = web.AppRunner(create_app(config))
    try:
        with pytest.raises(ConfigError, match="metrics.token_file .* too weak") as e:
            await runner.setup()
        assert "0123456789" not in str(e.value)
    finally:
        await runner.cleanup()


async def test_token_lets_a_remote_scraper_in(make_harness, tmp_path):
    token_file = tmp_path / "metrics.token"
    token_file.write_text(SCRAPE_TOKEN + "\n")
    h = await make_harness({"WATTGATE_METRICS__TOKEN_FILE": str(token_file)})
    remote = {"Forwarded": "for=203.0.113.9"}
    async with h.http.get(h.url + "/metrics", headers=remote) as r:
        assert r.status == 401
    async with h.http.get(h.url + "/metrics", headers={
            **remote, "Authorization": "Bearer wrong-token-0123456789"}) as r:
        assert r.status == 401
    await scrape(h, headers={**remote, "Authorization": f"Bearer {SCRAPE_TOKEN}"})


async def test_allow_remote_and_disabled(make_harness):
    h = await make_harness({"WATTGATE_METRICS__ALLOW_REMOTE": "true"})
    await scrape(h, headers={"X-Forwarded-For": "203.0.113.9"})
    h2 = await make_harness({"WATTGATE_METRICS__ENABLED": "false"})
    async with h2.http.get(h2.url + "/metrics") as r:
        assert r.status == 404


async def test_two_gateways_in_one_process_count_apart(make_harness):
    a = await make_harness()
    b = await make_harness()
    async with a.http.get(a.url + "/healthz") as r:
        assert r.status == 200
    sa, sb = await scrape(a), await scrape(b)
    assert value(sa, "wattgate_http_requests_total", route="/healthz", method="GET",
                 status="200") == 1
    assert value(sb, "wattgate_http_requests_total", route="/healthz", method="GET",
                 status="200") == 0


async def test_holds_open_counts_calls_in_flight(harness):
    import asyncio

    app = await harness.create_app()
    await harness.connect(app, "ned", monthly_usd=5)
    harness.fake.chunk_delay = 0.1
    harness.fake.pieces = 8
    hdrs = {"Authorization": f"Bearer {app.secret_key}", "x-wattfare-user": "ned"}
    async with harness.http.post(harness.api + "/chat/completions", headers=hdrs, json={
            "model": "fake/flat-2c", "stream": True,
            "messages": [{"role": "user", "content": "hi"}]}) as r:
        await r.content.readline()  # the answer has started: its hold is open
        during = await scrape(harness)
        await r.read()
    for _ in range(50):
        if await harness.gw.store.open_holds() == 0:
            break
        await asyncio.sleep(0.02)
    after = await scrape(harness)
    assert value(during, "wattgate_holds_open") == 1
    assert value(after, "wattgate_holds_open") == 0
    assert value(during, "wattgate_upstream_ttfb_seconds_count") == 1
    assert value(during, "wattgate_upstream_latency_seconds_count") == 0
    assert value(after, "wattgate_upstream_latency_seconds_count") == 1
    # The call took at least its eight chunk delays, and the histogram says so.
    buckets = {dict(labels)["le"]: v for (name, labels), v in after.items()
               if name == "wattgate_upstream_latency_seconds_bucket"}
    assert buckets["0.5"] == 0 and buckets["+Inf"] == 1
