"""Property tests of the SSE reader: chunking never changes what metering learns.

The proxy feeds ``StreamReader`` the upstream's bytes in whatever pieces TCP
delivered them. Whatever the split, the reader must find the same usage,
generation id and in-stream error as when it reads the stream whole; and no
byte sequence at all may raise out of it (a raise would lose the settle).
"""

from __future__ import annotations

import json
from decimal import Decimal

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wattgate.sse import StreamReader, parse_json_body

texts = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)
# Text that looks like metadata must not be read as metadata: quotes are escaped in JSON.
tricky = st.sampled_from(['"usage"', '"error"', "data: [DONE]", '"id":"gen-fake"', "\n\n",
                          "data: {\"usage\":{}}", "\r\n", ": comment"])
contents = st.lists(st.one_of(texts, tricky), min_size=1, max_size=12)
costs = st.decimals(min_value=0, max_value=5, places=10, allow_nan=False)


@st.composite
def openrouter_streams(draw):  # type: ignore[no-untyped-def]
    """An OpenRouter stream as documented in upstream-notes.md, and what it says."""
    gen = "gen-" + draw(st.text(alphabet="0123456789abcdef", min_size=4, max_size=24))
    newline = draw(st.sampled_from(["\n", "\r\n", "\r"]))  # the SSE spec allows all three
    head = {"id": gen, "provider": "Fake", "model": "openai/gpt-4o-mini",
            "object": "chat.completion.chunk", "created": 1}
    events = [": OPENROUTER PROCESSING"] * draw(st.integers(0, 3))
    for i, piece in enumerate(draw(contents)):
        delta = {"role": "assistant", "content": piece} if i == 0 else {"content": piece}
        events.append("data: " + json.dumps({**head, "choices": [{"index": 0, "delta": delta}]}))
        if draw(st.integers(0, 5)) == 0:
            events.append(": OPENROUTER PROCESSING")
    error = None
    if draw(st.booleans()):
        error = draw(st.text(min_size=1, max_size=60))
        events.append("data: " + json.dumps({**head, "error": {"code": 502, "message": error},
                                             "choices": [{"index": 0, "delta": {"content": ""},
                                                          "finish_reason": "error"}]}))
    usage = None
    if draw(st.booleans()):
        cost = draw(costs)
        usage = {"prompt_tokens": draw(st.integers(0, 10**6)),
                 "completion_tokens": draw(st.integers(0, 10**6)), "cost": cost,
                 "is_byok": False, "cost_details": {"upstream_inference_cost": cost}}
        usage_json = json.dumps({**usage, "cost": "COST", "cost_details": {
            "upstream_inference_cost": "COST"}}).replace('"COST"', format(cost, "f"))
        events.append("data: " + json.dumps({**head, "choices": []})[:-1]
                      + ', "usage": ' + usage_json + "}")
    done = draw(st.booleans())
    if done:
        events.append("data: [DONE]")
    raw = "".join(e + newline + newline for e in events).encode()
    if draw(st.booleans()):  # the connection may end without the final blank line
        raw = raw.rstrip(b"\r\n")
    return raw, gen, usage, error, done


def read(chunks: list[bytes]):  # type: ignore[no-untyped-def]
    reader = StreamReader()
    for chunk in chunks:
        reader.feed(chunk)
    return reader.close()


def split(raw: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(raw) + 1) for c in cuts})
    return [raw[a:b] for a, b in zip([0, *points], [*points, len(raw)])]


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(openrouter_streams(), st.lists(st.integers(min_value=0), max_size=40))
def test_any_split_reads_the_same_usage_id_and_error(stream, cuts):  # type: ignore[no-untyped-def]
    raw, gen, usage, error, done = stream
    whole = read([raw])
    assert whole.generation_id == gen
    assert whole.usage == usage
    assert (whole.error is not None) == (error is not None)
    if error is not None:
        assert whole.error == error[:500]
    assert whole.done == done
    pieces = read(split(raw, cuts))
    assert (pieces.generation_id, pieces.usage, pieces.error, pieces.done) == \
        (whole.generation_id, whole.usage, whole.error, whole.done)


@given(openrouter_streams())
def test_byte_by_byte_reads_the_same(stream):  # type: ignore[no-untyped-def]
    raw = stream[0]
    whole, bytewise = read([raw]), read([raw[i:i + 1] for i in range(len(raw))])
    assert (bytewise.generation_id, bytewise.usage, bytewise.error, bytewise.done) == \
        (whole.generation_id, whole.usage, whole.error, whole.done)


@given(openrouter_streams())
def test_usage_cost_stays_an_exact_decimal(stream):  # type: ignore[no-untyped-def]
    raw, _, usage, _, _ = stream
    outcome = read([raw])
    if usage is not None:
        assert isinstance(outcome.usage["cost"], Decimal)  # never a binary float
        assert outcome.usage["cost"] == usage["cost"]


metadata_like = st.sampled_from([b"data:", b"data: ", b'"usage"', b'"error"', b"[DONE]", b"{",
                                 b"}", b"[", b"]", b"\n", b"\r", b":", b'"id":"', b'"', b"\\",
                                 b"null", b"1e999999", b"NaN", b"-", b"\xff", b"\x00"])
garbage = st.lists(st.one_of(st.binary(max_size=64), metadata_like), max_size=60)


@settings(max_examples=500)
@given(garbage, st.lists(st.integers(min_value=0), max_size=20))
def test_garbage_never_raises_out_of_the_reader(parts, cuts):  # type: ignore[no-untyped-def]
    raw = b"".join(parts)
    outcome = read(split(raw, cuts))
    assert outcome.usage is None or isinstance(outcome.usage, dict)
    assert outcome.error is None or isinstance(outcome.error, str)
    assert outcome.generation_id is None or isinstance(outcome.generation_id, str)


@given(st.lists(st.one_of(st.binary(max_size=64), metadata_like), max_size=40))
def test_garbage_json_body_never_raises(parts):  # type: ignore[no-untyped-def]
    outcome = parse_json_body(b"".join(parts))
    assert outcome.usage is None or isinstance(outcome.usage, dict)


def test_deeply_nested_event_does_not_raise():
    reader = StreamReader()
    reader.feed(b'data: {"usage":' + b"[" * 100_000 + b"]" * 100_000 + b"}\n\n")
    assert reader.close().usage is None


def responses_stream(gen: str, text: str, cost: str, final: str = "response.completed") -> bytes:
    """A Responses API stream as OpenRouter sends it (event: lines, usage only at the end)."""
    def event(kind: str, fields: dict) -> bytes:  # type: ignore[type-arg]
        data = json.dumps({"type": kind, **fields}).replace(f'"cost": "{cost}"',
                                                             f'"cost": {cost}')
        return f"event: {kind}\ndata: {data}\n\n".encode()

    shell = {"id": gen, "object": "response", "model": "openai/gpt-4o-mini", "error": None,
             "usage": None, "status": "in_progress", "output": []}
    done = {**shell, "status": "completed", "model": "openai/gpt-4o",
            "usage": {"input_tokens": 9, "output_tokens": 4, "total_tokens": 13,
                      "cost": cost, "is_byok": False}}
    if final == "response.failed":
        done = {**shell, "status": "failed", "error": {"code": "server_error",
                                                        "message": "Provider disconnected"}}
    return (b": OPENROUTER PROCESSING\n\n" + event("response.created", {"response": shell})
            + event("response.output_text.delta", {"delta": text, "item_id": "msg_1"})
            + event(final, {"response": done}))


@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(texts, tricky), st.lists(st.integers(min_value=0, max_value=2000),
                                          max_size=6))
def test_a_responses_stream_is_read_from_its_completed_event(text, cuts):  # type: ignore[no-untyped-def]
    raw = responses_stream("gen-abc", text, "0.00012345")
    reader = StreamReader()
    last = 0
    for cut in sorted(c % (len(raw) + 1) for c in cuts) + [len(raw)]:
        reader.feed(raw[last:cut])
        last = cut
    outcome = reader.close()
    assert outcome.generation_id == "gen-abc" and outcome.done and outcome.error is None
    assert outcome.usage is not None and outcome.usage["cost"] == Decimal("0.00012345")
    # In chat's terms, for metering: the billed model is the final response's.
    assert (outcome.usage["prompt_tokens"], outcome.usage["completion_tokens"]) == (9, 4)
    assert outcome.model == "openai/gpt-4o"


def test_a_failed_response_is_an_error():
    outcome = StreamReader()
    outcome.feed(responses_stream("gen-x", "hi", "0.1", final="response.failed"))
    assert outcome.close().error == "Provider disconnected"
    error_event = StreamReader()
    error_event.feed(b'data: {"type":"error","code":"rate_limit","message":"Slow down"}\n\n')
    assert error_event.close().error == "Slow down"


def test_whole_responses_and_embeddings_answers_are_read():
    response = parse_json_body(json.dumps({
        "id": "gen-r", "object": "response", "error": None, "model": "m",
        "usage": {"input_tokens": 3, "output_tokens": 5, "cost": 0.5}}).encode())
    assert response.error is None  # "error": null is no error
    assert (response.usage["prompt_tokens"], response.usage["completion_tokens"]) == (3, 5)
    vectors = parse_json_body(json.dumps({
        "id": "gen-e", "object": "list", "data": [{"embedding": [0.1]}],
        "usage": {"prompt_tokens": 7, "total_tokens": 7, "cost": 0.25}}).encode())
    assert vectors.usage["completion_tokens"] == 0 and vectors.generation_id == "gen-e"
