"""Redaction: the one point every log record passes before it is written.

``configure`` (``wattgate.logs``) puts ``Redactor`` on every handler of the root
logger, so a record from our code or from any library (aiohttp's parser
errors quote the bytes they choked on) has its message, exception text, stack
and structured fields rewritten by ``redact`` before any formatter sees it.

What is removed: app secret keys (``sk_live_…``), funding keys (``sk-or-…``),
grant tokens (``wfg_…``), anything after ``Bearer``, JWTs (``eyJ…``), the
value of an ``Authorization``, ``Cookie``, ``Set-Cookie`` or
``x-wattfare-grant`` header, and the value of our cookies wherever they
appear. Each becomes ``[redacted]``; what stays says which kind it was. It is
a backstop, not a licence: code still never logs a secret on purpose.
"""

from __future__ import annotations

import logging
import re

REDACTED = "[redacted]"
# A value ends at a line break, a quote, or a backslash (``\r\n`` inside a repr of bytes).
_VALUE = r"[^\r\n\"'\\]*"
_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"(?i)\b((?:proxy-)?authorization|(?:set-)?cookie|x-wattfare-grant)"
                r"(\s*[:=]\s*)" + _VALUE), r"\1\2" + REDACTED),
    (re.compile(r"(?i)\b(bearer)(\s+)[^\s\"'\\,;]+"), r"\1\2" + REDACTED),
    (re.compile(r"(?i)\b(basic)(\s+)[A-Za-z0-9+/]{8,}=*"), r"\1\2" + REDACTED),
    (re.compile(r"\bsk_(live|test)_[A-Za-z0-9_\-]*"), r"sk_\1_" + REDACTED),
    (re.compile(r"\bsk-or-[A-Za-z0-9_\-]*"), "sk-or-" + REDACTED),
    (re.compile(r"\bwfg_[A-Za-z0-9_\-]*"), "wfg_" + REDACTED),
    (re.compile(r"\beyJ[A-Za-z0-9_\-]*(?:\.[A-Za-z0-9_\-]*){0,2}"), "eyJ" + REDACTED),
    (re.compile(r"\b(wg_presence|wattgate_admin)=[^;\s\"'\\]*"), r"\1=" + REDACTED),
)
_QUICK = re.compile(r"(?i)sk_|sk-or-|wfg_|eyJ|bearer|basic|authorization|cookie|x-wattfare-grant"
                    r"|wg_presence|wattgate_admin")
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message", "asctime"}
_TRACEBACKS = logging.Formatter()


def redact(text: str) -> str:
    """``text`` with every secret it holds replaced by ``[redacted]``."""
    if not _QUICK.search(text):  # the common line: one scan, no rewriting
        return text
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def _clean(value: object) -> object:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (int, float, bool)) or value is None:
        return value
    return redact(repr(value))


class Redactor(logging.Filter):
    """A handler filter: rewrites the record in place, never drops it."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # a bad format string: keep what can be shown
            message = f"{record.msg!r} {record.args!r}"
        record.msg, record.args = redact(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = _TRACEBACKS.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
            record.exc_info = None  # the text above is what gets written, not a re-render
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        for key, value in list(record.__dict__.items()):
            if key not in _STANDARD:
                record.__dict__[key] = _clean(value)
        return True
