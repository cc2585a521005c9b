"""Reading JSON that comes from outside (clients, the upstream) exactly and safely.

Two rules every reader of outside JSON follows:

- numbers with a fraction or an exponent are read as ``Decimal`` (money stays exact),
  and a number ``Decimal`` cannot hold (``1e9999999999999999999``: its exponent is past
  what the decimal module can represent) is refused as ``ValueError``, like any other
  malformed JSON, never raised as ``decimal.InvalidOperation``;
- nesting is measured before a parser walks it (``too_deep``): deep nesting is cheap to
  send and costly to walk, and recursive code after the parser would pay for it again.

Nothing here imports aiohttp.
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any


def exact_number(text: str) -> Decimal:
    """``parse_float`` for json: the number as ``Decimal``, or ValueError."""
    try:
        return Decimal(text)
    except ArithmeticError:  # decimal.InvalidOperation: an exponent out of range
        raise ValueError(f"a number out of range: {text[:40]}") from None


# ``json.loads(raw, parse_float=…)`` builds a decoder at every call; this one is built once.
_EXACT = json.JSONDecoder(parse_float=exact_number)


def loads_exact(raw: bytes | str) -> Any:
    """``raw`` as JSON (bytes decoded as ``json.loads`` decodes them), numbers as
    ``Decimal``; raises ValueError (or RecursionError) as ``json.loads`` does."""
    if isinstance(raw, bytes):
        raw = raw.decode(json.detect_encoding(raw), "surrogatepass")
    return _EXACT.decode(raw)


_BRACKETS_ONLY = bytes.maketrans(b"{}", b"[]")
_NOT_BRACKETS = bytes(c for c in range(256) if c not in b"[]{}")


def too_deep(raw: bytes, limit: int) -> bool:
    """Whether ``raw`` nests deeper than ``limit`` levels, measured with C-speed byte
    operations only: drop escapes, drop string contents (quotes now alternate), keep the
    brackets, then peel innermost pairs off one level at a time. Unbalanced input is not
    too deep (the parser refuses it)."""
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False  # the usual case: too few brackets to nest that deep
    s = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    s = b"".join(s.split(b'"')[::2]).translate(_BRACKETS_ONLY, _NOT_BRACKETS)
    deepest = b"[" * (limit + 1)
    for _ in range(limit + 1):
        if deepest in s:
            return True
        size = len(s)
        s = s.replace(b"[]", b"")
        if len(s) == size:  # empty, or unbalanced
            return False
    return True
