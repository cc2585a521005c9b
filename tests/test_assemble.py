"""Assembling a whole chat.completion from the stream the upstream sent instead."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest

from hypothesis import given, settings, strategies as st

from wattgate.assemble import Assembler, finish, merge_delta


def sse(*events: object, done: bool = True) -> bytes:
    out = [b": OPENROUTER PROCESSING\n\n"]
    out += [b"data: " + json.dumps(e).encode() + b"\n\n" for e in events]
    return b"".join(out) + (b"data: [DONE]\n\n" if done else b"")


HEAD = {"id": "gen-1", "provider": "Fake", "model": "m/x", "object": "chat.completion.chunk",
        "created": 1700000000}
USAGE = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5, "cost": 0.000093}


def chunk(delta: dict, finish: str | None = None, index: int = 0, **extra: object) -> dict:
    return {**HEAD, "choices": [{"index": index, "delta": delta, "finish_reason": finish,
                                 **extra}]}


PLAIN = sse(chunk({"role": "assistant", "content": "Hel"}),
            chunk({"role": "assistant", "content": "lo!"}),  # OpenRouter repeats the role
            chunk({"content": ""}, "stop", native_finish_reason="stop"),
            {**HEAD, "choices": [], "usage": USAGE})


def assemble(data: bytes, sizes: list[int] | None = None) -> dict:
    a = Assembler()
    if sizes is None:
        a.feed(data)
    else:
        pos = 0
        for n in sizes:
            a.feed(data[pos:pos + n])
            pos += n
        a.feed(data[pos:])
    return a.answer()


def test_a_plain_answer_becomes_one_chat_completion():
    assert assemble(PLAIN) == {
        "id": "gen-1", "provider": "Fake", "model": "m/x", "object": "chat.completion",
        "created": 1700000000,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello!"},
                     "finish_reason": "stop", "native_finish_reason": "stop",
                     "logprobs": None}],
        "usage": USAGE}


def test_tool_calls_merge_by_index_and_lose_it():
    data = sse(
        chunk({"role": "assistant", "content": None, "tool_calls": [
            {"index": 0, "id": "call_a", "type": "function",
             "function": {"name": "get_weather", "arguments": ""}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{\"city\":"}}]}),
        chunk({"tool_calls": [{"index": 1, "id": "call_b", "type": "function",
                               "function": {"name": "get_time", "arguments": "{}"}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": "\"Paris\"}"}}]}),
        chunk({}, "tool_calls"))
    message = assemble(data)["choices"][0]["message"]
    assert message == {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_a", "type": "function",
         "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}},
        {"id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]}
    assert assemble(data)["choices"][0]["finish_reason"] == "tool_calls"


def test_reasoning_logprobs_and_several_choices():
    lp = lambda t: {"token": t, "logprob": -0.1, "bytes": None, "top_logprobs": []}  # noqa: E731
    data = sse(
        chunk({"role": "assistant", "reasoning": "Think"}, index=0),
        chunk({"role": "assistant", "content": "B"}, index=1, logprobs={"content": [lp("B")]}),
        chunk({"reasoning": "ing.", "content": "A"}, index=0, logprobs={"content": [lp("A")]}),
        chunk({"content": "!"}, "stop", index=1, logprobs={"content": [lp("!")]}),
        chunk({}, "length", index=0))
    first, second = assemble(data)["choices"]
    assert first["message"] == {"role": "assistant", "reasoning": "Thinking.", "content": "A"}
    assert first["finish_reason"] == "length"
    assert second["message"] == {"role": "assistant", "content": "B!"}
    assert [t["token"] for t in second["logprobs"]["content"]] == ["B", "!"]


def test_merge_delta_replaces_discriminators_and_concatenates_text():
    acc = merge_delta({}, {"role": "assistant", "type": "x", "content": "a", "n": 1})
    merge_delta(acc, {"role": "assistant", "type": "y", "content": "b", "n": 2, "extra": None})
    merge_delta(acc, {"content": "c"})
    assert finish(acc) == {"role": "assistant", "type": "y", "content": "abc", "n": 2, "extra": None}


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=40), max_size=30))
def test_any_split_of_the_stream_gives_the_same_answer(sizes):
    assert assemble(PLAIN, sizes) == assemble(PLAIN)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_garbage_never_raises(noise):
    a = Assembler()
    a.feed(noise)
    a.feed(b"\ndata: {\"choices\": [1, {\"index\": \"x\"}, {\"delta\": 5}]}\n\ndata: [1]\n")
    a.feed(PLAIN)
    answer = a.answer()
    assert answer["object"] == "chat.completion"
    assert answer["usage"] == USAGE


def test_a_long_answer_assembles_in_linear_time():
    import time

    piece = chunk({"content": "x" * 100})
    data = sse(*([piece] * 20_000))  # 2 MB of text in 20,000 events
    t0 = time.process_time()
    answer = assemble(data)
    assert answer["choices"][0]["message"]["content"] == "x" * 2_000_000
    assert time.process_time() - t0 < 5  # quadratic concatenation would copy ~20 GB


ERRORED = sse(chunk({"role": "assistant", "content": "Hel"}),
              {**HEAD, "error": {"code": 502, "message": "Provider disconnected"},
               "choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": "error"}]},
              done=False)


@settings(max_examples=100, deadline=None)
@given(st.sampled_from([PLAIN, ERRORED, PLAIN[:-20]]),
       st.lists(st.integers(min_value=0, max_value=60), max_size=20))
def test_the_outcome_is_what_the_stream_reader_reads(data, sizes):
    """Metering a whole answer by the assembler bills exactly what StreamReader would."""
    from wattgate.sse import StreamReader

    a, r = Assembler(), StreamReader("gen-h")
    pos = 0
    for n in sizes:
        a.feed(data[pos:pos + n])
        r.feed(data[pos:pos + n])
        pos += n
    a.feed(data[pos:])
    r.feed(data[pos:])
    assert a.outcome("gen-h") == r.close()


@settings(max_examples=100, deadline=None)
@given(st.sampled_from([b"\r\n", b"\r"]), st.lists(st.integers(min_value=0, max_value=40),
                                                   max_size=30))
def test_crlf_and_lone_cr_line_endings_give_the_same_answer(newline, sizes):
    assert assemble(PLAIN.replace(b"\n", newline), sizes) == assemble(PLAIN)


def test_numbers_json_cannot_carry_become_null_in_the_answer():
    """A hostile usage (1e999999, NaN, Infinity) must not make the answer invalid JSON."""
    import json

    a = Assembler()
    a.feed(PLAIN.replace(b"data: [DONE]", b'data: {"choices":[],"usage":{"cost":1e999999,'
                         b'"prompt_tokens":NaN,"completion_tokens":Infinity,"x":0.5}}\n\n'
                         b"data: [DONE]"))
    answer = a.answer()
    assert answer["usage"] == {"cost": None, "prompt_tokens": None, "completion_tokens": None,
                               "x": 0.5}
    json.loads(json.dumps(answer, allow_nan=False))


def test_an_assembled_answer_is_written_as_json_whatever_its_numbers():
    """orjson writes the answer; an integer it refuses (wider than 64 bits) still goes out."""
    from decimal import Decimal

    from wattgate.assemble import encode, finish

    answer = finish({"id": "gen-1", "choices": [{"message": {"content": "“quoted” ✓"}}],
                     "usage": {"cost": Decimal("0.0000165"), "prompt_tokens": 10,
                               "bad": Decimal("1e999999")}})
    wide = {**answer, "usage": {**answer["usage"], "huge": 10**30}}
    for body in (encode(answer), encode(wide)):
        back = json.loads(body)
        assert back["usage"]["cost"] == 0.0000165 and back["usage"]["bad"] is None
        assert back["choices"][0]["message"]["content"] == "“quoted” ✓"
    assert json.loads(encode(wide))["usage"]["huge"] == 10**30


# The events are read with orjson (fast) and, where orjson could change a number, with
# ``json`` exactly: the answer and the bill must be what the exact reading gives.

def _exact_assembler() -> Assembler:
    a = Assembler()
    a._exact = True  # every event read with json, numbers as Decimal: the reference
    return a


def _both(data: bytes) -> tuple[tuple[dict, object], tuple[dict, object]]:
    fast, exact = Assembler(), _exact_assembler()
    fast.feed(data)
    exact.feed(data)
    return ((fast.outcome("g"), fast.answer()), (exact.outcome("g"), exact.answer()))


_JSON = st.recursive(
    st.none() | st.booleans() | st.text(max_size=8)
    | st.integers(min_value=-2**70, max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["content", "role", "index", "type", "x", "usage", "cost"]),
        inner, max_size=3),
    max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.fixed_dictionaries(
    {"choices": st.lists(st.fixed_dictionaries(
        {"index": st.integers(0, 2) | _JSON, "delta": _JSON,
         "finish_reason": st.none() | st.text(max_size=5)},
        optional={"logprobs": _JSON}), max_size=2)},
    optional={"id": _JSON, "created": _JSON, "usage": _JSON, "model": _JSON}), max_size=6))
def test_the_fast_reading_gives_exactly_what_the_exact_reading_gives(events):
    data = sse(*events)
    (fast_outcome, fast_answer), (exact_outcome, exact_answer) = _both(data)
    assert fast_outcome == exact_outcome
    assert json.dumps(fast_answer, sort_keys=True) == json.dumps(exact_answer, sort_keys=True)


def test_integers_wider_than_64_bits_reach_the_client_exactly():
    """orjson would read 2**64 as the float 1.8446744073709552e+19: the answer is then
    read again exactly, so no digit the upstream sent is changed."""
    from wattgate.assemble import encode

    wide = 2**64 + 1
    data = sse({**HEAD, "created": wide, "choices": [{"index": 0, "delta": {
        "content": "hi", "x": [-2**63 - 1, 2**64 - 1]}, "finish_reason": "stop"}]},
        {"choices": [], "usage": USAGE})
    answer = assemble(data)
    assert answer["created"] == wide and type(answer["created"]) is int
    assert answer["choices"][0]["message"]["x"] == [-2**63 - 1, 2**64 - 1]
    assert json.loads(encode(answer))["created"] == wide


def test_the_usage_is_read_exactly_even_on_the_fast_path():
    """A cost orjson would round through a float stays the decimal the upstream sent."""
    from decimal import Decimal

    usage = b'{"prompt_tokens":13,"completion_tokens":23,"cost":0.000015750000000000001}'
    data = sse(chunk({"role": "assistant", "content": "Hi"}, "stop")) \
        .replace(b"data: [DONE]", b'data: {"choices":[],"usage":' + usage + b"}\n\ndata: [DONE]")
    a = Assembler()
    a.feed(data)
    assert a.outcome("g").usage["cost"] == Decimal("0.000015750000000000001")


def test_lone_surrogates_nan_and_garbage_lines_are_read_as_before():
    bad = (b'data: {"choices":[{"index":0,"delta":{"content":"\\ud800"}}]}\n\n'
           b'data: {"choices":[{"index":0,"delta":{"content":"a"}}],"x":NaN}\n\n'
           b'data: {"choices":[]}, {"usage":{"cost":9}}\n\n'
           b"data: {not json\n\n")
    (fast_outcome, fast_answer), (exact_outcome, exact_answer) = _both(PLAIN.replace(
        b"data: [DONE]", bad + b"data: [DONE]"))
    assert fast_outcome == exact_outcome
    assert fast_answer == exact_answer
    assert fast_answer["choices"][0]["message"]["content"] == "Hello!\ud800a"
    from decimal import Decimal

    # The comma-joined line is garbage, not a usage.
    assert fast_outcome.usage == {**USAGE, "cost": Decimal("0.000093")}


def test_each_line_is_one_event_however_the_lines_would_join():
    """Lines that are garbage alone but JSON once joined (``{"a":[1`` then ``2]}``) are
    garbage, and a usage line after them is read, as StreamReader reads line by line."""
    from wattgate.sse import StreamReader

    lines = (b'data: {"a":[1\n\ndata: 2]}\n\n'
             b'data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2,'
             b'"cost":0.5}}\n\ndata: 3,4\n\n')
    data = PLAIN.replace(b"data: [DONE]", lines + b"data: [DONE]")
    a, reader = Assembler(), StreamReader("g")
    a.feed(data)
    reader.feed(data)
    assert a.outcome("g") == reader.close()
    assert a.outcome("g").usage["completion_tokens"] == 2
    assert "a" not in a.answer()


# What an attacker's review found: an upstream line that is deeply nested, a number no
# Decimal holds, or an escaped key must never crash the gateway, raise out of the
# assembler, or bill otherwise than StreamReader bills the same bytes.

_BILLED = (b'data: {"id":"g","choices":[],"usage":{"prompt_tokens":10,'
           b'"completion_tokens":20,"cost":0.25}}\n\ndata: [DONE]\n\n')


def _read_both(data: bytes):
    from wattgate.sse import StreamReader

    a, r = Assembler(), StreamReader()
    a.feed(data)
    r.feed(data)
    return a, r.close()


@pytest.mark.parametrize("depth", [600, 995, 3000, 200_000])
def test_a_deeply_nested_line_is_dropped_and_the_call_billed_as_streamed(depth):
    """orjson before 3.9.15 overflowed the C stack here (the whole gateway died); a depth
    json refuses but orjson reads reached the recursive merge and raised."""
    deep = b"[" * depth + b"]" * depth
    for line in (b'data: {"id":"g","choices":[{"index":0,"delta":{"content":"x",'
                 b'"tool_calls":' + deep + b"}}]}\n\n",
                 b'data: {"id":"g","error":{"message":"boom"},"deep":' + deep + b"}\n\n"):
        a, streamed = _read_both(b'data: {"id":"g","choices":[{"index":0,"delta":'
                                 b'{"content":"hi"}}]}\n\n' + line + _BILLED)
        assert a.outcome(None) == streamed
        assert streamed.usage["cost"] == Decimal("0.25")
        answer = a.answer()
        assert answer["choices"][0]["message"]["content"] == "hi"
        assert "deep" not in answer


def test_a_number_no_decimal_holds_is_a_garbage_line_not_an_exception():
    a, streamed = _read_both(b'data: {"id":"g","choices":[{"delta":{"content":"hi"}}],'
                             b'"x":1e9999999999999999999}\n\n' + _BILLED)
    assert a.outcome(None) == streamed and streamed.usage["cost"] == Decimal("0.25")
    assert "x" not in a.answer()
    a, streamed = _read_both(b'data: {"id":"g","usage":{"prompt_tokens":1,'
                             b'"cost":1e9999999999999999999}}\n\ndata: [DONE]\n\n')
    assert a.outcome(None) == streamed and streamed.usage is None


@pytest.mark.parametrize("lines", [
    b'data: {"id":"g","\\u0075sage":{"prompt_tokens":1,"cost":9}}\n\n',
    b'data: {"usage":{"prompt_tokens":1,"cost":0.25}}\n\ndata: {"usage":5}\n\n',
    b'data: {"error":{"message":"A"}}\n\ndata: {"error":null}\n\n',
    '{"usage":{"cost":7}}'.encode("utf-16-le").join([b"data: ", b"\n\n"]),
])
def test_the_bill_is_what_the_stream_reader_reads_whatever_the_lines(lines):
    a, streamed = _read_both(lines + b"data: [DONE]\n\n")
    assert a.outcome(None) == streamed
