"""What the fake OpenRouter's model says: it restates the prompt and counts its words.

A demo or a test then shows an answer that visibly belongs to what was asked
("You wrote 4 words: “what is a cap”. …"), instead of one canned sentence cut
wherever the piece count fell. One word is one token, so the usage the fake
reports is exactly the pieces it sent; ``max_tokens`` cuts the reply there, as a
real model's limit would (``finish_reason: "length"``).

Pure: no aiohttp. ``wattgate.fakeupstream`` streams these words.
"""

from __future__ import annotations

from typing import Any

QUOTED_WORDS = 40  # a longer prompt is quoted up to here, then "…"
SIGNATURE = "I am wattgate's fake model: I restate what I am sent and count its words."


def _text_of(content: Any) -> str:
    """A message's text: a string, or the text parts of a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p["text"] for p in content if isinstance(p, dict)
                        and p.get("type") in ("text", "input_text")
                        and isinstance(p.get("text"), str))
    return ""


def chat_prompt(body: dict[str, Any]) -> str:
    """The last user message of a chat request (what a person just asked)."""
    for message in reversed(body.get("messages") or []):
        if isinstance(message, dict) and message.get("role") == "user":
            return _text_of(message.get("content"))
    return ""


def responses_prompt(body: dict[str, Any]) -> str:
    """The Responses API's ``input``: a string, or its last user item."""
    given = body.get("input")
    if isinstance(given, str):
        return given
    for item in reversed(given if isinstance(given, list) else []):
        if isinstance(item, dict) and item.get("role", "user") == "user":
            return _text_of(item.get("content"))
    return ""


def reply_words(prompt: str) -> list[str]:
    """The answer, a word (one token) per item, each but the last followed by a space."""
    words = prompt.split()
    if not words:
        text = "You wrote nothing. " + SIGNATURE
    else:
        quoted = " ".join(words[:QUOTED_WORDS]) + (" …" if len(words) > QUOTED_WORDS else "")
        count = f"{len(words)} word{'s' if len(words) != 1 else ''}"
        text = f"You wrote {count}: “{quoted}”. {SIGNATURE}"
    out = text.split(" ")
    return [w + " " for w in out[:-1]] + out[-1:]


def pieces_for(prompt: str, limit: int | None, *, length: int | None = None,
               words: tuple[str, ...] | None = None) -> tuple[list[str], bool]:
    """(the pieces sent, whether ``limit`` cut the reply short).

    ``length`` forces the number of pieces (tests and the benchmark that need a
    stream of a given size: the reply repeats); ``words`` replaces the reply's
    words (tests of unusual text).
    """
    reply = [w + " " for w in words] if words else reply_words(prompt)
    wanted = length if length is not None else len(reply)
    n = max(1, min(wanted, limit if limit is not None else wanted))
    if n > len(reply) and not reply[-1].endswith(" "):
        reply = reply[:-1] + [reply[-1] + " "]
    return [reply[i % len(reply)] for i in range(n)], n < wanted
