"""Attacks on the merged fixes of issue 14 (review/attack): each test fails on the merged code.

Every test runs a real gateway on loopback against the fake OpenRouter, through a real
HTTP client, like the rest of the suite.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from wattgate.money import usd_to_nanos



async def chat(h, app, user: str, body: dict[str, Any],  # type: ignore[no-untyped-def]
               headers: dict[str, str] | None = None) -> tuple[int, Any]:
    payload = {"messages": [{"role": "user", "content": "hi"}], **body}
    hdrs = {"Authorization": f"Bearer {app.secret_key}", "x-wattfare-user": user}
    hdrs.update(headers or {})
    async with h.http.post(h.api + "/chat/completions", json=payload, headers=hdrs) as r:
        if r.content_type == "text/event-stream":
            return r.status, await r.text()
        return r.status, await r.json()


async def test_web_plugin_without_engine_is_pinned_to_the_priced_engine(make_harness):
    """The hold prices the web plugin at Exa's $4 per 1000 results + 2,000 tokens each, and
    ``_web_results`` accepts ``engine`` absent as if it were "exa". But OpenRouter picks
    *native* search when no engine is named for Anthropic, OpenAI, Perplexity and xAI models
    (docs: "The web search plugin is powered by native search for Anthropic, OpenAI,
    Perplexity, and xAI models"), billed per search-context size, not per Exa result. The
    forwarded body must name the engine the hold priced (or the call be refused)."""
    h = await make_harness()
    app = await h.create_app()
    await h.connect(app, "ann", monthly_usd=10)
    status, answer = await chat(h, app, "ann", {"model": "anthropic/claude-sonnet-4",
                                                "max_tokens": 8, "plugins": [{"id": "web"}]})
    if status == 400:
        assert "plugins[0].engine" in answer["error"]["message"], answer
        return
    assert status == 200, answer
    sent = h.fake.calls[-1].body["plugins"][0]
    assert sent.get("engine") == "exa", f"web plugin forwarded without the priced engine: {sent}"


async def test_an_app_deletion_leaves_no_call_at_an_estimate_the_upstream_could_correct(
        harness):
    """Issue 14 item 6's rule (keep the key while the upstream may still correct a call)
    holds for a revocation, but ``SQLiteStore.delete_app`` erases every funding key at once:
    a call of the deleted app that ended without usage stays at its worst-case estimate for
    ever, in the user's spend and the export, though OpenRouter knows its exact cost."""
    from wattgate.reconcile import Reconciler
    from wattgate.views.state import upstream_key

    app = await harness.create_app()
    await harness.connect(app, "ann", monthly_usd=5)
    status, _ = await chat(harness, app, "ann", {"model": "fake/no-usage", "stream": True})
    assert status == 200
    [(row, _)] = await harness.gw.store.provisional_usage()
    assert row.cost_nanos > usd_to_nanos(harness.fake.charged)  # at the estimate
    assert await harness.gw.store.delete_app(app.app_id, now=harness.clock())
    await Reconciler(harness.gw, harness.app[upstream_key]).run_once(force=True)
    assert await harness.gw.store.provisional_usage() == [], \
        "the deleted app's call stays at its estimate: its key was erased before it was asked"
    connection = await harness.gw.store.get_connection_by_id(row.connection_id)
    assert sum(u.cost_nanos for u in await harness.gw.store.recent_usage(
        connection.connection_id)) == usd_to_nanos(harness.fake.charged)


async def test_a_usage_without_cost_is_never_held_below_what_the_call_may_have_billed(
        make_harness):
    """``metering.bill``: a usage with token counts but no ``cost`` is recorded provisional
    "at the model's price for the token counts", ``Price.cost_nanos`` = tokens + request
    price. It leaves out what the hold priced beside tokens (web results, per-image fees),
    so each such call settles far below what it billed, frees its hold, and the next call
    is admitted on room that was already spent: once reconciled, the month is over its cap.
    A provisional call must count at least what the hold covered until the upstream says."""
    from wattgate.reconcile import Reconciler
    from wattgate.views.state import upstream_key

    cap = "0.10"
    h = await make_harness({"WATTGATE_LIMITS__CHAT_PER_MINUTE": "1000"})
    app = await h.create_app()
    await h.connect(app, "ann", monthly_usd=float(cap))
    h.fake.usage_text = '{"prompt_tokens":10,"completion_tokens":5}'  # no cost
    for _ in range(20):
        status, _ = await chat(h, app, "ann", {"model": "fake/flat-half-c", "max_tokens": 8,
                                               "stream": True, "plugins": [{"id": "web"}]})
        if status != 200:
            break
    h.fake.usage_text = None
    await Reconciler(h.gw, h.app[upstream_key]).run_once(force=True)
    assert h.fake.charged <= Decimal(cap), \
        f"the upstream billed ${h.fake.charged} on a ${cap} cap"
    spent = (await h.status(app, "ann"))["usage"]["monthlyUsd"]
    assert usd_to_nanos(str(spent)) <= usd_to_nanos(cap), f"${spent} spent on a ${cap} cap"


async def test_the_fake_bills_a_disabled_web_plugin_as_openrouter_does_not(harness):
    """Fidelity of the fake against the new field table: ``estimate._web_results`` holds
    nothing for ``{"id": "web", "enabled": false}`` (OpenRouter: "Set to false to disable
    the web-search plugin for this request"), but ``fakeupstream.chat`` bills 5 results
    ($0.02) for it, so against the fake such a call bills above its hold and racing calls
    pass the cap. The fake must skip a disabled plugin as the gateway (and OpenRouter) do."""
    app = await harness.create_app()
    await harness.connect(app, "ann", monthly_usd=5)
    body = {"model": "fake/flat-half-c", "max_tokens": 8, "stream": True}
    assert (await chat(harness, app, "ann", body))[0] == 200
    plain = harness.fake.calls[-1].cost
    assert (await chat(harness, app, "ann", {**body, "plugins": [
        {"id": "web", "enabled": False}]}))[0] == 200
    assert harness.fake.calls[-1].cost == plain, \
        f"a disabled web plugin billed ${harness.fake.calls[-1].cost - plain} more"


async def test_a_typed_grant_key_is_erased_once_the_grant_can_no_longer_need_it(harness):
    """Item 6's rule for funding keys (kept only while a call may still be corrected, then
    erased) covers revoked connections only. A key the user typed into a one-time grant
    popup ("2 requests") stays sealed in the database for ever once the grant is used up
    and expired; nothing but ``apps delete`` erases it. After the reconciliation give-up,
    the background pass must erase it as it does a revoked connection's."""
    from tests.test_grants_functional import mint_grant, redeem
    from wattgate.reconcile import Reconciler
    from wattgate.views.state import upstream_key

    app = await harness.create_app()
    status, grant = await mint_grant(harness, app, requests=1)
    assert status == 200, grant
    assert (await redeem(harness, app, grant["grantToken"]))[0] == 200
    config = harness.gw.config
    harness.clock.advance(config.grants_ttl_seconds + config.metering_reconcile_give_up + 60)
    reconciler = Reconciler(harness.gw, harness.app[upstream_key])
    await reconciler.sweep()  # the background pass, as ``Reconciler.loop`` runs it
    await reconciler.run_once()
    await reconciler.erase_revoked_keys()
    [stored] = await harness.gw.store.grants_for_app(app.app_id)
    assert stored.used == stored.requests and stored.expires_at < harness.clock()
    assert stored.sealed_key is None, "a used-up, expired grant still holds the user's key"


async def test_a_client_that_stops_reading_a_stream_does_not_hold_it_open_for_ever(
        make_harness):
    """Item 15 bounded what a client *sends* (header_timeout, body_timeout) but nothing
    bounds a client that stops *reading*: ``_Call._stream`` awaits ``out.write`` with no
    deadline, so a client that accepts no byte keeps the handler, the upstream stream and
    the connection open indefinitely (the same slowloris, on the answer's side). A client
    that takes nothing for far longer than the configured client timeouts must be treated
    as gone (the call handed to the drain and billed), and its connection closed."""
    import asyncio
    import socket
    import time

    h = await make_harness({"WATTGATE_SERVER__HEADER_TIMEOUT": "1",
                            "WATTGATE_SERVER__BODY_TIMEOUT": "1",
                            "WATTGATE_SERVER__KEEPALIVE_TIMEOUT": "1",
                            "WATTGATE_SERVER__WRITE_TIMEOUT": "1",
                            "WATTGATE_METERING__DRAIN_SECONDS": "1"})
    app = await h.create_app()
    await h.connect(app, "ann", monthly_usd=5)
    h.fake.pieces, h.fake.piece_bytes = 64, 256 * 1024  # 16 MiB: more than any socket buffers
    body = ('{"model":"openai/gpt-4o-mini","stream":true,"max_tokens":64,'
            '"messages":[{"role":"user","content":"hi"}]}').encode()
    host, port = h.url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, (host, int(port)))
    await loop.sock_sendall(sock, (
        f"POST /api/v1/chat/completions HTTP/1.1\r\nHost: {host}\r\n"
        f"Authorization: Bearer {app.secret_key}\r\nx-wattfare-user: ann\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body)
    try:
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline and not (h.fake.calls and h.fake.calls[-1].finished):
            await asyncio.sleep(0.2)
        await asyncio.sleep(0.5)
        assert h.fake.calls and h.fake.calls[-1].finished, \
            "8 s after the client stopped reading, the gateway still waits to write to it"
        rows = await h.billed()
        assert len(rows) == 1, "the call of the client that stopped reading is not settled"
    finally:
        sock.close()
