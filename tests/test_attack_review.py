"""Attacks on the merged fixes of issue 14 (review/attack): each test fails on the merged code.

Every test runs a real gateway on loopback against the fake OpenRouter, through a real
HTTP client, like the rest of the suite.
"""

from __future__ import annotations

from typing import Any

from wattgate.money import usd_to_nanos

from tests.conftest import FUNDING_KEY


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
