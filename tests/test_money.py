"""Amounts for a person to read: rounded the way that never makes a refusal lie."""

from __future__ import annotations

import pytest

from wattgate.money import format_usd, usd_to_nanos


@pytest.mark.parametrize("usd,round_up,text", [
    ("0.03", False, "$0.03"), ("5", False, "$5.00"), ("0", False, "$0.00"),
    ("0.039023001", True, "$0.0391"), ("0.039023001", False, "$0.039"),
    ("4.995", False, "$4.995"), ("0.0000123", True, "$0.000013"),
    ("0.000000001", True, "$0.000001"), ("0.000000001", False, "$0.00"),
])
def test_format_usd(usd, round_up, text):
    assert format_usd(usd_to_nanos(usd), round_up=round_up) == text
