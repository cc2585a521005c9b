"""App attribution upstream: the fake OpenRouter sees which app spent, as OpenRouter would."""

from __future__ import annotations

from urllib.parse import unquote

import openai

from wattgate.attribution import MAX_VALUE, safe_value


def client(h, app, user: str, **kw) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=h.api, api_key=app.secret_key,
                              default_headers={"x-wattfare-user": user, **kw.pop("headers", {})},
                              max_retries=0, **kw)


async def ask(h, app, user: str, *, stream: bool = False, **kw) -> dict[str, str]:
    """One call through the gateway; the headers the fake OpenRouter received."""
    async with client(h, app, user, **kw) as oa:
        reply = await oa.chat.completions.create(
            model="openai/gpt-4o-mini", stream=stream,
            messages=[{"role": "user", "content": "hi"}])
        if stream:
            async for _ in reply:
                pass
    return h.fake.calls[-1].headers


async def test_each_call_names_the_app_upstream(harness):
    app = await harness.create_app(name="Demo Notes", origin="https://notes.example.com")
    await harness.connect(app, "alice")
    for stream in (False, True):
        seen = await ask(harness, app, "alice", stream=stream)
        assert seen["HTTP-Referer"] == "https://notes.example.com"
        assert seen["X-Title"] == "Demo Notes"


async def test_the_clients_own_attribution_wins(harness):
    app = await harness.create_app(name="Demo Notes", origin="https://notes.example.com")
    await harness.connect(app, "alice")
    seen = await ask(harness, app, "alice", headers={
        "HTTP-Referer": "https://mine.example.org", "X-Title": "My own title"})
    assert seen["HTTP-Referer"] == "https://mine.example.org"
    assert seen["X-Title"] == "My own title"
    # The newer spelling of the title counts as the client's choice too: no second title.
    seen = await ask(harness, app, "alice", headers={"X-OpenRouter-Title": "Mine"})
    assert seen["X-OpenRouter-Title"] == "Mine"
    assert "X-Title" not in seen
    assert seen["HTTP-Referer"] == "https://notes.example.com"


async def test_attribution_off_adds_nothing(make_harness):
    h = await make_harness({"WATTGATE_UPSTREAM__ATTRIBUTION": "false"})
    app = await h.create_app(name="Demo Notes", origin="https://notes.example.com")
    await h.connect(app, "alice")
    seen = await ask(h, app, "alice")
    assert "HTTP-Referer" not in seen and "X-Title" not in seen
    # ... but what the client sends itself still goes.
    seen = await ask(h, app, "alice", headers={"X-Title": "Client's"})
    assert seen["X-Title"] == "Client's" and "HTTP-Referer" not in seen


async def test_an_app_name_cannot_forge_or_break_a_header(harness):
    name = "Café Notes 日本\r\nX-Injected: yes\t" + "x" * 500
    app = await harness.create_app(name=name, origin="https://notes.example.com")
    await harness.connect(app, "alice")
    seen = await ask(harness, app, "alice")
    assert "X-Injected" not in seen
    title = seen["X-Title"]
    assert len(title) <= MAX_VALUE and title.isascii() and "\r" not in title
    assert unquote(title).startswith("Café Notes 日本X-Injected: yes")
    assert seen["HTTP-Referer"] == "https://notes.example.com"


async def test_an_https_origin_is_preferred_as_the_apps_url(harness):
    app = await harness.create_app(name="Notes", origin="http://localhost:3000")
    await harness.gw.store.set_origins(app.app_id, add=["https://notes.example.com"])
    await harness.connect(app, "alice")
    seen = await ask(harness, app, "alice")
    assert seen["HTTP-Referer"] == "https://notes.example.com"


def test_safe_value_cuts_on_whole_escapes():
    value = safe_value("é" * 300)
    assert len(value) <= MAX_VALUE and value.endswith("%A9")
    assert unquote(value) == "é" * (len(value) // 6)
    assert safe_value("a\r\nb\x00c\x7f") == "abc"
    assert safe_value("100% sure") == "100%25 sure"
    assert safe_value("a\udcffb") == "ab"  # a header byte that was not UTF-8: dropped
