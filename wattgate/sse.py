"""Reading the final usage out of an upstream answer without slowing the stream.

``StreamReader.feed`` sees every byte the client sees, in the same chunks, and
keeps only what metering needs: the generation id, the usage object of the
last event whose ``usage`` is not null (whatever ``choices`` holds) and the
model that event names (with ``models`` fallbacks, the one billed), and
whether an event carried a top-level ``error``. Comment lines (``:`` such as
``: OPENROUTER PROCESSING``) are skipped; lines may end in ``\n``, ``\r\n`` or
``\r`` and events may be cut at any byte. It never raises on garbage.

Speed: a chunk is scanned with three C-level substring searches; only a chunk
containing ``"usage"``, ``"error"`` or ``[DONE]`` is split into lines and
JSON-parsed, so the text chunks of a long answer cost almost nothing. A chunk
that ends a line with nothing left over from the last one (what upstreams send:
whole events) is scanned as it is, never copied nor joined. A JSON string cannot
contain an unescaped quote, so ``"usage"`` in answer text never matches.

The same reader serves the Responses API: its stream has no ``[DONE]`` and no
top-level ``usage``; the terminal event (``response.completed``,
``response.incomplete`` or ``response.failed``) carries the final response,
whose ``usage`` (``input_tokens``/``output_tokens``, with ``cost``) is read
as a chat usage (``usage_of``), and an ``error`` event or a failed response is
an error. Chat chunks have no top-level ``type``, so one reader tells them apart.

``parse_json_body`` does the same for a non-streamed JSON answer: a
``chat.completion``, a Responses ``response`` or an embeddings ``list``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from .jsonread import loads_exact

_ID = re.compile(rb'"id"\s*:\s*"([^"\\]{1,200})"')
MAX_PARTIAL = 8 * 1024 * 1024  # a single SSE line longer than this is not metadata


@dataclass
class Outcome:
    """What an answer said about itself."""

    generation_id: str | None = None
    usage: dict[str, Any] | None = None
    error: str | None = None      # message of an in-stream error event
    done: bool = False            # saw ``data: [DONE]`` (or a complete JSON body)
    model: str | None = None      # the model that answered (a ``models`` fallback bills its own)


def split_complete(partial: bytes, chunk: bytes) -> tuple[bytes, bytes]:
    """(complete lines, the unfinished rest) of what arrived so far.

    A line ends at ``\r\n``, ``\n`` or a lone ``\r``, as the SSE spec allows (split
    the complete part with ``bytes.splitlines``, which knows exactly those three; a
    ``\r\n`` cut between two chunks only adds an empty line). An unfinished line
    longer than ``MAX_PARTIAL`` is dropped: it is not metadata.
    """
    data = partial + chunk if partial else chunk
    end = max(data.rfind(b"\n"), data.rfind(b"\r"))
    if end < 0:
        return b"", (data if len(data) <= MAX_PARTIAL else b"")
    rest = data[end + 1:]
    return data[:end + 1], (rest if len(rest) <= MAX_PARTIAL else b"")


def _loads(raw: bytes) -> Any:
    try:
        return loads_exact(raw)
    except (ValueError, RecursionError):
        return None


def error_message(error: Any) -> str:
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return error["message"][:500]
    return "error reported inside the stream"


_MARKERS = (b'"usage"', b'"error"', b"[DONE]")


def _marked_lines(data: bytes) -> list[bytes]:
    """The lines of ``data`` (whole lines, ending in \n, \r\n or a lone \r) that hold
    one of the markers, in order, each once: a chunk of many events is searched in C
    instead of being split into every one of its lines."""
    spans = set()
    for marker in _MARKERS:
        at = data.find(marker)
        while at >= 0:
            start = max(data.rfind(b"\n", 0, at), data.rfind(b"\r", 0, at)) + 1
            end = min((e for e in (data.find(b"\n", at), data.find(b"\r", at)) if e >= 0),
                      default=len(data))
            spans.add((start, end))
            at = data.find(marker, end)
    return [data[start:end] for start, end in sorted(spans)]


class StreamReader:
    def __init__(self, generation_id: str | None = None) -> None:
        self.outcome = Outcome(generation_id=generation_id)
        self._partial = b""

    def feed(self, chunk: bytes) -> bool:
        """Read one chunk; True once the answer is done (``[DONE]`` or a terminal event)."""
        if not self._partial and chunk.endswith(b"\n"):
            complete = chunk  # the usual chunk: whole events, nothing to join or split
        else:
            complete, self._partial = split_complete(self._partial, chunk)
            if not complete:
                return self.outcome.done
        if self.outcome.generation_id is None:
            m = _ID.search(complete)
            if m:
                self.outcome.generation_id = m.group(1).decode("ascii", "replace")
        if b'"usage"' in complete or b'"error"' in complete or b"[DONE]" in complete:
            for line in _marked_lines(complete):
                self._line(line)
        return self.outcome.done

    def _line(self, line: bytes) -> None:
        if not line.startswith(b"data:"):
            return  # comments (":"), event:, id:, blank lines
        payload = line[5:].strip()
        if payload == b"[DONE]":
            self.outcome.done = True
            return
        if b'"usage"' not in payload and b'"error"' not in payload:
            return
        event = _loads(payload)
        if not isinstance(event, dict):
            return
        kind = event.get("type")
        if isinstance(kind, str) and (kind == "error" or kind.startswith("response.")):
            self._response_event(kind, event)
            return
        if "error" in event:
            self.outcome.error = error_message(event["error"])
        usage = event.get("usage")
        if isinstance(usage, dict):
            self.outcome.usage = usage
            self.outcome.model = answering_model(event, self.outcome.model)

    def _response_event(self, kind: str, event: dict[str, Any]) -> None:
        """One event of a Responses stream: only the terminal ones and errors matter."""
        if kind == "error":
            self.outcome.error = error_message(event.get("error", event))
            return
        if kind not in TERMINAL_RESPONSE_EVENTS:
            return
        response = event.get("response")
        if not isinstance(response, dict):
            return
        self.outcome.done = True
        if kind == "response.failed":
            self.outcome.error = error_message(response.get("error"))
        usage = usage_of(response)
        if usage is not None:
            self.outcome.usage = usage
            self.outcome.model = answering_model(response, self.outcome.model)

    def close(self) -> Outcome:
        if self._partial:
            if self.outcome.generation_id is None:
                m = _ID.search(self._partial)
                if m:
                    self.outcome.generation_id = m.group(1).decode("ascii", "replace")
            self._line(self._partial.rstrip(b"\r"))
            self._partial = b""
        return self.outcome


def parse_json_body(body: bytes, generation_id: str | None = None) -> Outcome:
    outcome = Outcome(generation_id=generation_id)
    data = _loads(body)
    if not isinstance(data, dict):
        return outcome
    outcome.done = True
    if outcome.generation_id is None and isinstance(data.get("id"), str):
        outcome.generation_id = data["id"][:200]
    # A Responses object always carries ``"error": null``; only a value is an error.
    if "error" in data and (data.get("object") != "response" or data["error"] is not None):
        outcome.error = error_message(data["error"])
    outcome.usage = usage_of(data)
    outcome.model = answering_model(data, None)
    return outcome


TERMINAL_RESPONSE_EVENTS = frozenset(("response.completed", "response.incomplete",
                                      "response.failed"))


def usage_of(answer: dict[str, Any]) -> dict[str, Any] | None:
    """An answer's ``usage`` in chat's terms (``prompt_tokens``, ``completion_tokens``,
    ``cost``…), whichever endpoint sent it; None when it carries none.

    A Responses usage counts ``input_tokens``/``output_tokens``; an embeddings usage
    has no completion, which is 0 tokens, not a missing count.
    """
    usage = answer.get("usage")
    if not isinstance(usage, dict):
        return None
    kind = answer.get("object")
    if kind == "response":
        usage = {**usage, "prompt_tokens": usage.get("input_tokens"),
                 "completion_tokens": usage.get("output_tokens")}
    elif kind == "list" and "completion_tokens" not in usage:
        usage = {**usage, "completion_tokens": 0}
    return usage


def answering_model(event: dict[str, Any], default: str | None) -> str | None:
    model = event.get("model")
    return model[:200] if isinstance(model, str) and model else default
