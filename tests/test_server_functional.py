"""Slow clients against the real runner (``wattgate.server``): what they send is bounded in
time, and so is each write of ours they do not take; how long we stream to them is not."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time

import aiohttp

from wattgate.money import usd_to_nanos

LIMITS = {"WATTGATE_SERVER__HEADER_TIMEOUT": "1.5", "WATTGATE_SERVER__BODY_TIMEOUT": "1.5",
          "WATTGATE_LIMITS__CHAT_PER_MINUTE": "1000"}
CHAT = json.dumps({"model": "openai/gpt-4o-mini",
                   "messages": [{"role": "user", "content": "hello " * 50}]}).encode()


async def trickle(port: int, head: bytes, body: bytes, *, every: float, piece: int = 1,
                  whole_head: bool = False) -> tuple[bytes, int, float]:
    """Send the first line (or with ``whole_head`` the whole head) at once, the rest
    ``piece`` bytes every ``every`` seconds; read the answer until the server closes.
    (answer, bytes sent, seconds taken)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    data = head + body
    first = len(head) if whole_head else data.index(b"\r\n") + 2
    sent = 0
    try:
        writer.write(data[:first])
        sent = first
        while sent < len(data) and not reader.at_eof():
            try:
                answer = await asyncio.wait_for(reader.read(65536), every)
            except TimeoutError:
                answer = b""
            if answer or reader.at_eof():
                rest = await asyncio.wait_for(reader.read(), 10) if answer else b""
                return answer + rest, sent, time.monotonic() - started
            writer.write(data[sent:sent + piece])
            await writer.drain()
            sent += piece
        answer = await asyncio.wait_for(reader.read(), 10)
        return answer, sent, time.monotonic() - started
    except ConnectionResetError:
        return b"", sent, time.monotonic() - started
    finally:
        writer.close()


def port_of(h) -> int:  # type: ignore[no-untyped-def]
    return int(h.url.rsplit(":", 1)[1])


def chat_head(app, user: str, length: int) -> bytes:
    return (f"POST /api/v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {app.secret_key}\r\nx-wattfare-user: {user}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {length}\r\n"
            f"Connection: close\r\n\r\n").encode()


def status_and_body(answer: bytes) -> tuple[int, dict]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body) if body else {}


async def test_headers_trickled_a_byte_a_second_are_cut_at_the_header_timeout(make_harness):
    h = await make_harness(LIMITS)
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nUser-Agent: " + b"s" * 40 + b"\r\n\r\n"
    answer, sent, took = await trickle(port_of(h), head, b"", every=1.0)
    assert sent < len(head)  # closed before the client finished
    assert 1.5 <= took < 4.5
    if answer:  # the 408 goes out when nothing else is being answered on the connection
        status, body = status_and_body(answer)
        assert status == 408 and body["error"]["code"] == "request_timeout"


async def test_a_body_slower_than_the_body_timeout_gets_408_and_holds_nothing(make_harness):
    h = await make_harness(LIMITS)
    app = await h.create_app()
    await h.connect(app, "lena", monthly_usd=5)
    task = asyncio.create_task(trickle(port_of(h), chat_head(app, "lena", len(CHAT)),
                                       CHAT, every=0.25, piece=4, whole_head=True))
    await asyncio.sleep(1.0)
    assert await h.gw.store.open_holds() == 0  # reading the body holds no budget
    answer, sent, took = await task
    assert sent < len(chat_head(app, "lena", len(CHAT))) + len(CHAT)
    assert 1.5 <= took < 4.5
    status, body = status_and_body(answer)
    assert status == 408 and body["error"] == {
        "code": "request_timeout", "message": "The request body did not arrive in time."}
    assert await h.gw.store.open_holds() == 0 and h.fake.calls == []
    assert (await h.status(app, "lena"))["remainingUsd"] == 5
    # The gateway still serves the next client at once.
    async with h.http.get(h.url + "/healthz") as r:
        assert r.status == 200


async def test_a_slowish_client_within_the_limits_is_served(make_harness):
    h = await make_harness(LIMITS)
    app = await h.create_app()
    await h.connect(app, "lena", monthly_usd=5)
    head = chat_head(app, "lena", len(CHAT))
    # Six pieces 0.3 s apart: head and body each take under their 1.5 s.
    answer, _, took = await trickle(port_of(h), head, CHAT,
                                    every=0.3, piece=(len(head) + len(CHAT)) // 5 + 1)
    status, body = status_and_body(answer)
    assert status == 200 and body["object"] == "chat.completion", answer[:300]
    assert took >= 0.9


async def test_a_long_streamed_answer_is_not_cut_by_the_client_timeouts(make_harness):
    h = await make_harness(LIMITS)
    app = await h.create_app()
    await h.connect(app, "lena", monthly_usd=5)
    h.fake.chunk_delay, h.fake.pieces = 0.5, 8  # ~4 s of streaming, past both timeouts
    started = time.monotonic()
    async with aiohttp.ClientSession() as http, http.post(h.api + "/chat/completions",
                         json={"model": "openai/gpt-4o-mini", "stream": True,
                               "messages": [{"role": "user", "content": "hi"}]},
                         headers={"Authorization": f"Bearer {app.secret_key}",
                                  "x-wattfare-user": "lena"}) as r:
        assert r.status == 200
        text = (await r.read()).decode()
    assert time.monotonic() - started > 3.0
    assert text.rstrip().endswith("data: [DONE]")
    assert (await h.status(app, "lena"))["usage"]["monthlyUsd"] > 0


async def test_keep_alive_requests_each_get_their_own_header_window(make_harness):
    # The header clock starts at a request's first byte, not at the connection's start.
    h = await make_harness(LIMITS)
    async with aiohttp.ClientSession() as http:
        for _ in range(3):
            async with http.get(h.url + "/healthz") as r:
                assert r.status == 200
            await asyncio.sleep(0.8)


async def test_a_head_stalled_behind_a_streaming_answer_does_not_cut_that_answer(make_harness):
    # A pipelining client that sends half of its next request while an answer streams: the
    # header timeout ends the connection only after that answer has been sent in full.
    h = await make_harness(LIMITS)
    app = await h.create_app()
    await h.connect(app, "lena", monthly_usd=5)
    h.fake.chunk_delay, h.fake.pieces = 0.5, 8
    body = json.dumps({"model": "openai/gpt-4o-mini", "stream": True,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    head = chat_head(app, "lena", len(body)).replace(b"Connection: close", b"X-A: b")
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(h))
    started = time.monotonic()
    writer.write(head + body)
    await asyncio.sleep(0.5)
    writer.write(b"GET /healthz HTTP/1.1\r\nHo")  # and nothing more
    answer = await asyncio.wait_for(reader.read(-1), 20)  # until the server closes
    writer.close()
    assert time.monotonic() - started > 3.0
    assert answer.startswith(b"HTTP/1.1 200") and b"data: [DONE]" in answer
    assert b"/healthz" not in answer and answer.count(b"HTTP/1.1 ") == 1


async def test_a_slow_body_nobody_reads_ends_quietly(make_harness, caplog):
    # Refused before its body is read (a wrong key): the answer leaves at once, and the
    # body deadline passing later is no error of the gateway's.
    caplog.set_level(logging.DEBUG)
    h = await make_harness(LIMITS)
    app = await h.create_app()
    app.secret_key = app.secret_key[:-4] + "XXXX"
    answer, _, took = await trickle(port_of(h), chat_head(app, "lena", len(CHAT)), CHAT,
                                    every=0.25, piece=4, whole_head=True)
    assert status_and_body(answer)[0] == 401, (answer, took)
    await asyncio.sleep(2.0)  # past the body timeout
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], \
        [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


STREAM = json.dumps({"model": "openai/gpt-4o-mini", "stream": True, "max_tokens": 64,
                     "messages": [{"role": "user", "content": "hi"}]}).encode()


async def open_stream(h, app, user: str,  # type: ignore[no-untyped-def]
                      rcvbuf: int = 4096, body: bytes = STREAM) -> socket.socket:
    """A (streamed) chat call on a socket with a small receive buffer, nothing read yet."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", port_of(h)))
    await loop.sock_sendall(sock, chat_head(app, user, len(body)) + body)
    return sock


async def read_to_end(sock: socket.socket, *, piece: int = 65536, every: float = 0.0,
                      within: float = 20.0) -> bytes:
    """Read until the server closes, ``piece`` bytes at most every ``every`` seconds."""
    loop, data = asyncio.get_running_loop(), bytearray()
    async with asyncio.timeout(within):
        while True:
            try:
                got = await loop.sock_recv(sock, piece)
            except ConnectionResetError:
                break
            if not got:
                break
            data += got
            if every:
                await asyncio.sleep(every)
    return bytes(data)


async def test_a_client_that_stops_reading_is_cut_at_the_write_timeout_and_billed(make_harness):
    h = await make_harness({**LIMITS, "WATTGATE_SERVER__WRITE_TIMEOUT": "1",
                            "WATTGATE_METERING__DRAIN_SECONDS": "10"})
    app = await h.create_app()
    await h.connect(app, "lena", monthly_usd=5)
    h.fake.pieces, h.fake.piece_bytes = 32, 256 * 1024  # 8 MiB: more than socket buffers
    started = time.monotonic()
    sock = await open_stream(h, app, "lena")
    try:
        while not (h.fake.calls and h.fake.calls[-1].finished and await h.billed()):
            assert time.monotonic() - started < 8, "the stalled client still holds its call"
            await asyncio.sleep(0.1)
        assert time.monotonic() - started >= 1.0  # not before the client had its second
        # The connection is closed: what was already on its way arrives, then the end.
        answer = await read_to_end(sock, within=10)
    finally:
        sock.close()
    assert answer.startswith(b"HTTP/1.1 200") and b"data: [DONE]" not in answer
    # The background drain learnt the real cost: billed exactly, nothing held.
    assert list((await h.billed()).values()) == [(usd_to_nanos(h.fake.charged), False)]
    assert await h.gw.store.open_holds() == 0


async def test_a_client_reading_slowly_but_steadily_gets_the_whole_stream(make_harness):
    # Each write is taken well within the 1 s write timeout, the whole stream is not:
    # the bound is per write, never per answer.
    h = await make_harness({**LIMITS, "WATTGATE_SERVER__WRITE_TIMEOUT": "1"})
    app = await h.create_app()
    await h.connect(app, "lena", monthly_usd=5)
    h.fake.pieces, h.fake.piece_bytes = 64, 64 * 1024  # 4 MiB in 64 writes
    started = time.monotonic()
    sock = await open_stream(h, app, "lena")
    try:
        answer = await read_to_end(sock, piece=8 * 1024, every=0.01)  # < 800 KB/s
    finally:
        sock.close()
    took = time.monotonic() - started
    assert took > 2.0, took  # longer than two write timeouts
    assert answer.startswith(b"HTTP/1.1 200") and b"data: [DONE]" in answer
    assert len(answer) > 16 * 256 * 1024
    assert list((await h.billed()).values()) == [(usd_to_nanos(h.fake.charged), False)]
    assert await h.gw.store.open_holds() == 0


async def test_a_whole_answer_its_client_does_not_read_is_cut_too(make_harness):
    # The write deadline is the connection's, not the proxy's: a whole JSON answer (settled
    # before it is sent) to a client that takes none of it does not hold the connection.
    h = await make_harness({**LIMITS, "WATTGATE_SERVER__WRITE_TIMEOUT": "1"})
    app = await h.create_app()
    await h.connect(app, "lena", monthly_usd=5)
    h.fake.pieces, h.fake.piece_bytes = 32, 256 * 1024  # an 8 MiB answer
    sock = await open_stream(h, app, "lena",
                             body=STREAM.replace(b'"stream": true', b'"stream": false'))
    try:
        await asyncio.sleep(4)  # the answer is ready within a second; then 1 s unread
        answer = await read_to_end(sock, within=10)  # what was on its way, then the end
    finally:
        sock.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    assert head.startswith(b"HTTP/1.1 200") and 0 < len(body) < length
    assert list((await h.billed()).values()) == [(usd_to_nanos(h.fake.charged), False)]
