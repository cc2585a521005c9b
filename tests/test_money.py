"""Amounts for a person to read: rounded the way that never makes a refusal lie."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from wattgate.money import format_usd, usd_to_nanos


@pytest.mark.parametrize("usd,round_up,text", [
    ("0.03", False, "$0.03"), ("5", False, "$5.00"), ("0", False, "$0.00"),
    ("0.5", False, "$0.50"), ("0.1", True, "$0.10"), ("12.3", False, "$12.30"),
    ("1234", False, "$1,234.00"), ("1234567.891", False, "$1,234,567.89"),
    # below a dollar: two significant digits, never fewer than two decimals
    ("0.123", False, "$0.12"), ("0.042", False, "$0.042"), ("0.0042", False, "$0.0042"),
    ("0.000013", False, "$0.000013"), ("0.00031", False, "$0.00031"),
    ("0.0000064", False, "$0.0000064"), ("0.004", False, "$0.004"),
    # the rounding direction: down by default, up for a worst case
    ("0.039023001", True, "$0.04"), ("0.039023001", False, "$0.039"),
    ("4.995", False, "$4.99"), ("4.995", True, "$5.00"), ("0.0000123", True, "$0.000013"),
    ("0.0099999", False, "$0.0099"), ("0.0099999", True, "$0.01"),
    ("999.999", True, "$1,000.00"),
    # the smallest amount the ledger holds still shows, either way
    ("0.000000001", True, "$0.000000001"), ("0.000000001", False, "$0.000000001"),
    ("-0.5", False, "-$0.50"), ("-0.0042", False, "-$0.0042"),
])
def test_format_usd(usd, round_up, text):
    assert format_usd(usd_to_nanos(usd), round_up=round_up) == text


def test_format_usd_never_prints_a_lone_tenth_or_drops_cents():
    for nanos in range(0, 2 * 10**9, 7_777_777):
        text = format_usd(nanos)
        whole, _, decimals = text.lstrip("$").partition(".")
        assert len(decimals) >= 2, text
        assert "e" not in text.lower(), text


def test_the_pages_script_formats_money_like_the_server():
    """The consent popup and the dashboard format in the browser (ui.js fmtUsd): the same
    text as format_usd for amounts whose rounding direction does not matter."""
    cases = ["0", "0.5", "0.25", "12.3", "1234.5", "1234567.25", "0.123", "0.042", "0.0042",
             "0.000013", "0.0000064", "0.004", "-0.5", "0.000000001", "0.07", "0.1"]
    ui = Path(__file__).resolve().parent.parent / "wattgate" / "static" / "ui.js"
    script = (f"const {{ fmtUsd }} = await import({json.dumps(ui.as_uri())});"
              f"console.log(JSON.stringify({json.dumps(cases)}.map(c => fmtUsd(Number(c)))));")
    out = subprocess.run(["node", "--input-type=module", "-e", script], capture_output=True,
                         text=True, check=True, timeout=60).stdout
    assert json.loads(out) == [format_usd(usd_to_nanos(c)) for c in cases]


def test_an_amount_echoed_in_an_error_is_exact() -> None:
    from wattgate.money import format_usd_exact
    assert format_usd_exact(20_000_100_000) == "$20.0001"  # format_usd would say $20.01 or $20.00
    assert format_usd_exact(500_000_000) == "$0.50"
    assert format_usd_exact(1_234_560_000_000) == "$1,234.56"
    assert format_usd_exact(1) == "$0.000000001"
    assert format_usd_exact(0) == "$0.00"
    assert format_usd_exact(-5) == "-$0.000000005"
