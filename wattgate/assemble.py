"""A non-streamed answer, assembled from the stream the upstream sent instead.

wattgate asks the upstream to stream even when the client did not
(``upstream.stream_whole_answers``): a stream names its generation in its
response headers at once, so the call's hold row can name it while the model
is still working. A whole JSON answer names it only at the end, and a gateway
that crashes in between could not tell which generation to reconcile (for
non-streamed calls OpenRouter bills the whole answer even when the caller
has gone). The client still receives one ``chat.completion`` JSON object.

The assembly follows the rules the ``openai`` SDKs use to accumulate deltas
(``_accumulate_delta``): strings are concatenated, objects merged key by key,
lists of objects carrying an ``index`` merged by that index (tool calls), other
lists extended (logprobs), and ``index``, ``type`` and ``role`` replaced rather
than concatenated. Each choice's ``delta`` becomes its ``message``; a choice
keeps its last non-null ``finish_reason`` (and any other field the chunks
carry); top-level fields (``id``, ``model``, ``provider``, ``created``,
``system_fingerprint``…) keep their last value; ``object`` becomes
``chat.completion``; ``usage`` is the last non-null one. Comment lines and
``[DONE]`` are skipped, and garbage lines are ignored, never raised.

A whole Responses API answer needs no merging: its stream ends in an event
(``response.completed``, ``response.incomplete`` or ``response.failed``) that
carries the final ``response`` object, which ``ResponseAssembler`` returns as
it came. Nothing here imports aiohttp.
"""

from __future__ import annotations

import json
import math
from decimal import Decimal
from typing import Any

import orjson

from .jsonread import loads_exact, too_deep
from .sse import TERMINAL_RESPONSE_EVENTS, Outcome, StreamReader, split_complete

# Replaced, never concatenated: discriminators and the speaker.
_REPLACED = frozenset(("index", "type", "role"))


class _Text(list):  # type: ignore[type-arg]
    """Pieces of a string being concatenated, joined once at the end (no quadratic copy)."""


def merge_delta(acc: dict[str, Any], delta: dict[str, Any]) -> dict[str, Any]:
    """Accumulate one delta into ``acc`` (strings may stay as ``_Text`` until ``finish``)."""
    for key, value in delta.items():
        if key not in acc or acc[key] is None:
            acc[key] = _copy(value)
            continue
        if value is None or key in _REPLACED:
            if value is not None:
                acc[key] = value
            continue
        current = acc[key]
        if isinstance(value, str) and isinstance(current, (str, _Text)):
            if isinstance(current, _Text):
                current.append(value)
            else:
                acc[key] = _Text((current, value))
        elif isinstance(current, dict) and isinstance(value, dict):
            merge_delta(current, value)
        elif isinstance(current, list) and not isinstance(current, _Text) \
                and isinstance(value, list):
            _merge_list(current, value)
        else:
            acc[key] = _copy(value)
    return acc


def finish(value: Any) -> Any:
    """``value`` in plain JSON types: every ``_Text`` joined, every ``Decimal`` a float.

    A number JSON cannot carry (``NaN``, ``Infinity``, or ``1e999999``, which no float
    holds) becomes null: the client's answer stays valid JSON whatever the upstream sent.
    """
    if isinstance(value, _Text):
        return "".join(value)
    if isinstance(value, (Decimal, float)):
        number = float(value)
        return number if math.isfinite(number) else None
    if isinstance(value, dict):
        return {k: finish(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finish(v) for v in value]
    return value


def encode(answer: Any) -> bytes:
    """An assembled answer (``finish``'s plain types) as the JSON body the client gets.

    orjson writes it ~10× faster than ``json.dumps`` (UTF-8 as it is, no spaces); an
    integer wider than 64 bits, which orjson refuses, falls back to ``json``.
    """
    try:
        return orjson.dumps(answer)
    except orjson.JSONEncodeError:
        return json.dumps(answer).encode()


def _merge_list(acc: list[Any], items: list[Any]) -> None:
    for item in items:
        if isinstance(item, dict) and isinstance(item.get("index"), int):
            for existing in acc:
                if isinstance(existing, dict) and existing.get("index") == item["index"]:
                    merge_delta(existing, item)
                    break
            else:
                acc.append(_copy(item))
        else:
            acc.append(_copy(item))


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


_GARBAGE = object()
_fast = orjson.loads
# An event nested deeper is garbage: a chat chunk nests ~6 deep, and the merge and
# ``finish`` below recurse once per level.
MAX_EVENT_DEPTH = 64
_ZERO_DIGITS = bytes.maketrans(b"123456789", b"000000000")
_DIGITS_19 = b"0" * 19


def _exact(payload: bytes) -> Any:
    """One event, numbers as ``Decimal`` and integers of any width; ``_GARBAGE`` if
    it is not JSON (a garbage line is ignored, never raised)."""
    try:
        return loads_exact(payload)
    except (ValueError, RecursionError):
        return _GARBAGE


class Assembler:
    """Feed it the stream's bytes in any chunks; ``answer()`` gives the JSON object.

    ``feed`` cuts lines and keeps the events' JSON text; ``answer`` parses them (the
    answer is whole only at the end anyway) and merges. What the call is billed is
    ``outcome()``: a ``StreamReader`` fed the same bytes, so a whole answer is metered
    by exactly the rules of a streamed one, whatever the merge makes of the events.
    """

    def __init__(self) -> None:
        self._reader = StreamReader()  # the bill: the stream's own rules
        self._outcome: Outcome | None = None
        self._partial = b""
        self._payloads: list[bytes] = []
        self._top: dict[str, Any] = {}
        self._choices: dict[int, dict[str, Any]] = {}
        self._exact = False  # read every event with ``json`` (numbers as Decimal)

    def feed(self, chunk: bytes) -> None:
        self._reader.feed(chunk)
        complete, self._partial = split_complete(self._partial, chunk)
        self._keep(complete)

    def _keep(self, complete: bytes) -> None:
        for line in complete.splitlines():  # \n, \r\n or a lone \r, as in sse
            if line.startswith(b"data:"):
                payload = line[5:].strip()
                if payload and payload != b"[DONE]":
                    self._payloads.append(payload)

    def _events(self) -> list[Any]:
        if self._partial:  # the last line, unended (the reader closes its own)
            complete, self._partial = self._partial, b""
            self._keep(complete)
        payloads, self._payloads = self._payloads, []
        # orjson reads an event ~3× faster than ``json``, but it reads an integer wider
        # than 64 bits as a float: a run of 19 digits anywhere (in a string too; 2**63
        # has 19) sends every event the exact way. One C-speed pass, ~3 µs.
        exact = self._exact or _DIGITS_19 in b"".join(payloads).translate(_ZERO_DIGITS)
        events = []
        for payload in payloads:  # one line, one event, as StreamReader reads them
            if too_deep(payload, MAX_EVENT_DEPTH):
                continue
            event: Any = _GARBAGE
            if not exact:
                try:
                    event = _fast(payload)
                except orjson.JSONDecodeError:  # NaN, a lone surrogate…
                    pass
            if event is _GARBAGE:  # what orjson refused, json may read
                event = _exact(payload)
            if event is not _GARBAGE:
                events.append(event)
        return events

    def _event(self, event: dict[str, Any]) -> None:
        top = self._top
        for key, value in event.items():
            if key != "choices" and (value is not None or key not in top):
                top[key] = value
        choices = event.get("choices")
        if not isinstance(choices, list):
            return
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            index = choice.get("index", 0)
            if not isinstance(index, int):
                continue
            acc = self._choices.get(index)
            if acc is None:
                acc = self._choices[index] = {"index": index, "message": {}}
            for key, value in choice.items():
                if key == "delta":
                    if isinstance(value, dict):
                        merge_delta(acc["message"], value)
                elif key == "index":
                    continue
                elif key == "logprobs" and isinstance(value, dict):
                    if not isinstance(acc.get("logprobs"), dict):
                        acc["logprobs"] = {}
                    merge_delta(acc["logprobs"], value)
                elif value is not None or key not in acc:
                    acc[key] = value

    def outcome(self, generation_id: str | None) -> Outcome:
        """What metering needs, read by ``sse.StreamReader`` from the same bytes: the last
        dict usage, the stream's error, whether ``[DONE]`` came, the billed model. The
        generation is ``generation_id`` (the header's) or the one the stream named."""
        if self._outcome is None:
            self._outcome = self._reader.close()
        if generation_id is not None:
            self._outcome.generation_id = generation_id
        return self._outcome

    def _parse(self) -> None:
        for event in self._events():
            if isinstance(event, dict):
                self._event(event)

    def answer(self) -> dict[str, Any]:
        self._parse()
        top = dict(self._top)
        top.pop("error", None)
        usage = top.pop("usage", None)
        answer: dict[str, Any] = {}
        for key in ("id", "provider", "model"):
            if key in top:
                answer[key] = top.pop(key)
        answer["object"] = "chat.completion"
        top.pop("object", None)
        answer.update(top)
        choices = []
        for index in sorted(self._choices):
            choice = self._choices[index]
            message = choice["message"]
            message.setdefault("role", "assistant")
            message.setdefault("content", None)
            for call in message.get("tool_calls") or []:
                if isinstance(call, dict):
                    call.pop("index", None)  # a streaming field: whole answers have none
            out = {"index": index, "message": message}
            out.update({k: v for k, v in choice.items() if k not in ("index", "message")})
            out.setdefault("finish_reason", None)
            out.setdefault("logprobs", None)
            choices.append(out)
        answer["choices"] = choices
        answer["usage"] = usage
        return finish(answer)


_TERMINAL = tuple(b'"%s"' % kind.encode() for kind in TERMINAL_RESPONSE_EVENTS)


class ResponseAssembler:
    """A whole Responses API ``response``, from its stream: the terminal event's."""

    def __init__(self) -> None:
        self._reader = StreamReader()  # the usage, by the stream's own rules
        self._partial = b""
        self._final: bytes | None = None

    def feed(self, chunk: bytes) -> None:
        self._reader.feed(chunk)
        complete, self._partial = split_complete(self._partial, chunk)
        # Quotes inside the answer's text are escaped: only an event's type matches.
        if any(kind in complete for kind in _TERMINAL):
            for line in complete.splitlines():
                if line.startswith(b"data:") and any(kind in line for kind in _TERMINAL):
                    self._final = line[5:].strip()

    def outcome(self, generation_id: str | None) -> Outcome:
        if self._partial:
            self.feed(b"\n")
        outcome = self._reader.close()
        if generation_id is not None:
            outcome.generation_id = generation_id
        return outcome

    def answer(self) -> dict[str, Any] | None:
        """The final response object, or None when the stream ended without one."""
        if self._partial:
            self.feed(b"\n")
        try:
            event = loads_exact(self._final or b"null")
        except (ValueError, RecursionError):
            return None
        response = event.get("response") if isinstance(event, dict) else None
        return finish(response) if isinstance(response, dict) else None
