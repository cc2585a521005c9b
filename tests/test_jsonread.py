"""Reading outside JSON exactly and safely (wattgate/jsonread.py)."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest
from hypothesis import given, settings, strategies as st

from wattgate.jsonread import exact_number, loads_exact, too_deep


def test_numbers_are_exact_decimals():
    assert loads_exact(b'{"cost":0.000015750000000000001}') == {
        "cost": Decimal("0.000015750000000000001")}
    assert loads_exact('{"n":18446744073709551617}') == {"n": 18446744073709551617}


@pytest.mark.parametrize("number", ["1e9999999999999999999", "-1e-9999999999999999999"])
def test_a_number_decimal_cannot_hold_is_a_value_error(number):
    with pytest.raises(ValueError):
        exact_number(number)
    with pytest.raises(ValueError):
        loads_exact(('{"x":%s}' % number).encode())


@settings(max_examples=200, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.text(max_size=5) | st.integers()
                    | st.floats(allow_nan=False),
                    lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=3), inner, max_size=3), max_leaves=10))
def test_it_reads_what_json_loads_reads(value):
    raw = json.dumps(value).encode()
    assert loads_exact(raw) == json.loads(raw, parse_float=Decimal)


def nested(depth: int) -> bytes:
    return b'{"a":' * depth + b"1" + b"}" * depth


def test_too_deep_measures_nesting_not_brackets():
    assert not too_deep(nested(64), 64)
    assert too_deep(nested(65), 64)
    assert too_deep(b"[" * 200_000 + b"]" * 200_000, 64)
    # Brackets inside strings and many siblings are not depth.
    assert not too_deep(b'{"a":"' + b"[" * 500 + b'"}', 64)
    assert not too_deep(b"[" + b"[]," * 500 + b"[]]", 64)
    assert not too_deep(b"[" * 10 + b"]", 64)  # unbalanced: the parser refuses it
