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
Nothing here imports aiohttp.
"""

from __future__ import annotations

import json
from typing import Any

from .sse import split_complete

# Replaced, never concatenated: discriminators and the speaker.
_REPLACED = frozenset(("index", "type", "role"))


def merge_delta(acc: dict[str, Any], delta: dict[str, Any]) -> dict[str, Any]:
    for key, value in delta.items():
        if key not in acc or acc[key] is None:
            acc[key] = _copy(value)
            continue
        if value is None or key in _REPLACED:
            if value is not None:
                acc[key] = value
            continue
        current = acc[key]
        if isinstance(current, str) and isinstance(value, str):
            acc[key] = current + value
        elif isinstance(current, dict) and isinstance(value, dict):
            merge_delta(current, value)
        elif isinstance(current, list) and isinstance(value, list):
            _merge_list(current, value)
        else:
            acc[key] = _copy(value)
    return acc


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


class Assembler:
    """Feed it the stream's bytes in any chunks; ``answer()`` gives the JSON object."""

    def __init__(self) -> None:
        self._partial = b""
        self._top: dict[str, Any] = {}
        self._choices: dict[int, dict[str, Any]] = {}
        self.events = 0

    def feed(self, chunk: bytes) -> None:
        complete, self._partial = split_complete(self._partial, chunk)
        for line in complete.split(b"\n"):
            self._line(line)

    def _line(self, line: bytes) -> None:
        if not line.startswith(b"data:"):
            return
        payload = line[5:].strip()
        if not payload or payload == b"[DONE]":
            return
        try:
            event = json.loads(payload)
        except (ValueError, RecursionError):
            return
        if isinstance(event, dict):
            self._event(event)

    def _event(self, event: dict[str, Any]) -> None:
        self.events += 1
        for key, value in event.items():
            if key == "choices":
                continue
            if value is not None or key not in self._top:
                self._top[key] = value
        choices = event.get("choices")
        if not isinstance(choices, list):
            return
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            index = choice.get("index", 0)
            if not isinstance(index, int):
                continue
            acc = self._choices.setdefault(index, {"index": index, "message": {}})
            delta = choice.get("delta")
            if isinstance(delta, dict):
                merge_delta(acc["message"], delta)
            for key, value in choice.items():
                if key in ("index", "delta"):
                    continue
                if key == "logprobs" and isinstance(value, dict):
                    if not isinstance(acc.get("logprobs"), dict):
                        acc["logprobs"] = {}
                    merge_delta(acc["logprobs"], value)
                elif value is not None or key not in acc:
                    acc[key] = value

    def answer(self) -> dict[str, Any]:
        if self._partial:
            self._line(self._partial.rstrip(b"\r"))
            self._partial = b""
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
        return answer
