"""Input hardening through the running app: sizes, headers, JSON depth, upstream timeouts.

Every hostile or broken input must end as the reference error body with a 4xx
or a 5xx the client can act on (502/504), never a 500 or a hung request, and
every refused call must give its budget hold back.
"""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
from conftest import FUNDING_KEY

from wattgate.views.inputs import MAX_JSON_DEPTH
from wattgate.views.state import upstream_key


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def chat_body(**extra: object) -> dict:
    body = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    body.update(extra)
    return body


async def post(h, path: str, *, data: bytes | str | None = None, json: object = None,
               headers: dict[str, str] | None = None) -> tuple[int, dict, dict]:
    async with h.http.post(h.api + path, data=data, json=json, headers=headers or {}) as r:
        body = await r.json(content_type=None) if r.content_type == "application/json" \
            else {"text": await r.text()}
        return r.status, body, dict(r.headers)


def auth(app, user: str | None = None) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {app.secret_key}", "Content-Type": "application/json"}
    if user is not None:
        headers["x-wattfare-user"] = user
    return headers


async def test_body_over_the_limit_is_413_json(make_harness):
    h = await make_harness({"WATTGATE_SERVER__MAX_BODY_BYTES": "10000"})
    app = await h.create_app()
    await h.connect(app, "ann")
    status, body, _ = await post(h, "/chat/completions", headers=auth(app, "ann"),
                                 json=chat_body(messages=[{"role": "user",
                                                           "content": "x" * 20000}]))
    assert (status, body["error"]["code"]) == (413, "payload_too_large")
    status, body, _ = await post(h, "/sessions", headers=auth(app),
                                 json={"appUserId": "u" * 20000})
    assert (status, body["error"]["code"]) == (413, "payload_too_large")
    assert await h.gw.store.open_holds() == 0


async def test_deeply_nested_json_is_refused_before_parsing(harness):
    app = await harness.create_app()
    await harness.connect(app, "bea")
    deep = '{"model":"openai/gpt-4o-mini","messages":[],"tools":%s}' % nested(MAX_JSON_DEPTH)
    status, body, _ = await post(harness, "/chat/completions", data=deep,
                                 headers=auth(app, "bea"))
    assert (status, body["error"]["code"]) == (400, "invalid_request")
    assert "nests deeper" in body["error"]["message"]
    # Deeper than Python's own recursion limit: still a clean 400, fast.
    t0 = time.monotonic()
    status, body, _ = await post(harness, "/chat/completions", data=nested(200_000),
                                 headers=auth(app, "bea"))
    assert (status, body["error"]["code"]) == (400, "invalid_request")
    assert time.monotonic() - t0 < 2
    status, body, _ = await post(harness, "/sessions", headers=auth(app),
                                 data='{"appUserId":"x","requestLimit":%s}' % nested(100))
    assert (status, body["error"]["code"]) == (400, "invalid_request")
    # Brackets inside strings are text, not nesting.
    status, _, _ = await post(harness, "/chat/completions", headers=auth(app, "bea"),
                              json=chat_body(messages=[{"role": "user",
                                                        "content": "[{" * 500 + '\\"'}]))
    assert status == 200
    assert harness.fake.calls, "a legitimate body must still reach the model"
    assert await harness.gw.store.open_holds() == 0


async def test_json_that_nests_exactly_to_the_limit_is_accepted(harness):
    app = await harness.create_app()
    await harness.connect(app, "cy")
    # chat body: {} > response_format {} > json_schema [...] : 2 levels before ours (a
    # field passed through; content parts must be typed objects the gateway can price)
    schema = nested(MAX_JSON_DEPTH - 2)
    data = ('{"model":"openai/gpt-4o-mini","messages":[{"role":"user","content":"hi"}],'
            '"response_format":{"type":"json_schema","json_schema":%s}}' % schema)
    status, _, _ = await post(harness, "/chat/completions", data=data, headers=auth(app, "cy"))
    assert status == 200


async def test_long_and_many_headers_answer_400_not_500(harness):
    app = await harness.create_app()
    # Within aiohttp's field limit: reaches the handler, which answers JSON.
    status, body, _ = await post(harness, "/chat/completions", json=chat_body(),
                                 headers=auth(app, "u" * 10_000))
    assert (status, body["error"]["code"]) == (400, "invalid_request")
    # Past the parser's field limit: refused by the HTTP parser, never a 500.
    status, _, _ = await post(harness, "/chat/completions", json=chat_body(),
                              headers={**auth(app, "x"), "X-Big": "b" * 70_000})
    assert 400 <= status < 500
    many = {f"X-H{i}": "v" for i in range(300)}
    status, body, _ = await post(harness, "/chat/completions", json=chat_body(),
                                 headers={**auth(app, "nobody"), **many})
    assert status in (400, 402, 431)
    status, body, _ = await post(harness, "/chat/completions", json=chat_body(),
                                 headers={"Authorization": "Bearer " + "sk_" + "a" * 20_000})
    assert (status, body["error"]["code"]) == (401, "auth")
    # The server is still healthy afterwards.
    async with harness.http.get(harness.url + "/healthz") as r:
        assert r.status == 200


async def test_first_byte_timeout_is_504_and_releases_the_hold(make_harness):
    h = await make_harness({"WATTGATE_UPSTREAM__FIRST_BYTE_TIMEOUT": "0.3"})
    app = await h.create_app()
    await h.connect(app, "dee")
    h.fake.header_delay = 1.6  # the model is queued: no response headers for 1.6 s
    t0 = time.monotonic()
    status, body, _ = await post(h, "/chat/completions", json=chat_body(),
                                 headers=auth(app, "dee"))
    assert (status, body["error"]["code"]) == (504, "upstream_timeout")
    assert time.monotonic() - t0 < 1.5
    assert await h.gw.store.open_holds() == 0
    assert (await h.status(app, "dee"))["usage"]["monthlyUsd"] == 0


async def test_a_long_whole_answer_is_not_a_first_byte_timeout(make_harness):
    """The first-byte bound is for the upstream's headers: a non-streamed answer that
    takes longer than it to write (streamed upstream, assembled here) still arrives."""
    h = await make_harness({"WATTGATE_UPSTREAM__FIRST_BYTE_TIMEOUT": "0.3"})
    app = await h.create_app()
    await h.connect(app, "dot")
    h.fake.chunk_delay = 0.1  # 8 pieces: 0.8 s of answer, each gap under idle_timeout
    status, body, _ = await post(h, "/chat/completions", json=chat_body(),
                                 headers=auth(app, "dot"))
    assert status == 200 and body["choices"][0]["message"]["content"]
    assert (await h.status(app, "dot"))["usage"]["monthlyUsd"] == float(h.fake.charged) > 0


async def test_idle_timeout_mid_stream_ends_the_stream_and_records_the_call(make_harness):
    h = await make_harness({"WATTGATE_UPSTREAM__IDLE_TIMEOUT": "0.3"})
    app = await h.create_app()
    await h.connect(app, "eve")
    h.fake.chunk_delay = 0.6  # keep-alive comes at once, then silence longer than idle
    t0 = time.monotonic()
    async with h.http.post(h.api + "/chat/completions", json=chat_body(stream=True),
                           headers=auth(app, "eve")) as r:
        assert r.status == 200
        text = b""
        async for chunk in r.content.iter_any():  # ends cleanly, not with an error
            text += chunk
    assert time.monotonic() - t0 < 3
    assert b"OPENROUTER PROCESSING" in text
    assert b'"error"' not in text  # never an error body written into a started stream
    conn = (await h.gw.store.connections_for_app(app.app_id))[0]
    rows = await h.gw.store.recent_usage(conn.connection_id)
    assert [r.status for r in rows] == ["upstream_cut"]
    assert rows[0].provisional and rows[0].cost_nanos > 0
    assert await h.gw.store.open_holds() == 0


@pytest.fixture
def blackhole():
    """A listening socket that never accepts, with its backlog full: connects hang."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    fillers = []
    for _ in range(8):
        s = socket.socket()
        s.setblocking(False)
        try:
            s.connect(server.getsockname())
        except BlockingIOError:
            pass
        fillers.append(s)
    yield "http://%s:%d/api/v1" % server.getsockname()
    for s in fillers:
        s.close()
    server.close()


async def test_connect_timeout_is_504_and_releases_the_hold(make_harness, blackhole):
    h = await make_harness({"WATTGATE_UPSTREAM__CONNECT_TIMEOUT": "0.3"})
    app = await h.create_app()
    await h.connect(app, "fin")
    assert (await post(h, "/chat/completions", json=chat_body(),
                       headers=auth(app, "fin")))[0] == 200  # prices now cached
    h.app[upstream_key].base_url = blackhole.rstrip("/")
    t0 = time.monotonic()
    status, body, _ = await post(h, "/chat/completions", json=chat_body(),
                                 headers=auth(app, "fin"))
    assert (status, body["error"]["code"]) == (504, "upstream_timeout")
    assert time.monotonic() - t0 < 2
    assert await h.gw.store.open_holds() == 0


async def test_unreachable_upstream_is_502_and_releases_the_hold(harness):
    app = await harness.create_app()
    await harness.connect(app, "gil")
    assert (await post(harness, "/chat/completions", json=chat_body(),
                       headers=auth(app, "gil")))[0] == 200
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed on exit: nothing listens there
    harness.app[upstream_key].base_url = f"http://127.0.0.1:{port}/api/v1"
    status, body, _ = await post(harness, "/chat/completions", json=chat_body(),
                                 headers=auth(app, "gil"))
    assert (status, body["error"]["code"]) == (502, "upstream")
    assert await harness.gw.store.open_holds() == 0
    await asyncio.sleep(0)


async def test_absurd_max_tokens_is_400_not_an_overflow(harness):
    """Found by schemathesis: max_tokens=10**18 on an uncapped grant overflowed int64 (500)."""
    app = await harness.create_app()
    token = await harness.session(app, "hil")
    async with harness.http.post(harness.api + "/grants",
                                 json={"requests": 3, "fundingKey": FUNDING_KEY},
                                 headers={"Authorization": f"Bearer {token}"}) as r:
        grant = (await r.json())["grantToken"]
    for name in ("max_tokens", "max_completion_tokens"):
        status, body, _ = await post(harness, "/chat/completions",
                                     json=chat_body(**{name: 10**18}),
                                     headers={**auth(app), "x-wattfare-grant": grant})
        assert (status, body["error"]["code"]) == (400, "invalid_request")
    assert await harness.gw.store.open_holds() == 0


async def test_a_number_decimal_cannot_hold_is_a_400_not_a_traceback(harness):
    """``Decimal("1e9999999999999999999")`` raises InvalidOperation, not ValueError: every
    reader of outside JSON turns it into 'not valid JSON'."""
    app = await harness.create_app()
    status, body, _ = await post(harness, "/sessions", headers=auth(app),
                                 data='{"appUserId":"x","requestLimit":1e9999999999999999999}')
    assert (status, body["error"]["code"]) == (400, "invalid_request")
