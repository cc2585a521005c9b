"""Model prices and the worst-case estimate behind every hold."""

from __future__ import annotations

from decimal import Decimal

import pytest

from wattgate.errors import InvalidRequest
from wattgate.pricing import PriceList


def price_list(**pricing):  # type: ignore[no-untyped-def]
    prices = PriceList(ttl=60)
    prices.load({"data": [{"id": "m", "pricing": pricing},
                          {"id": "router", "pricing": {"prompt": "-1", "completion": "-1"}},
                          {"id": "broken"}]}, now=0)
    return prices


def test_estimate_bounds_prompt_by_body_bytes_and_output_by_max_tokens():
    p = price_list(prompt="0.000001", completion="0.000002", request="0.01").get("m")
    # 1000 bytes × $1e-6 + 500 tokens × $2e-6 + $0.01 = $0.012
    assert p.worst_cost_nanos(1000, 500) == 12_000_000


def test_reasoning_priced_apart_raises_the_output_bound():
    p = price_list(prompt="0", completion="0.000001", internal_reasoning="0.000004").get("m")
    assert p.worst_cost_nanos(0, 1000) == 4_000_000


def test_estimate_rounds_up_to_the_nano_dollar():
    p = price_list(prompt="0.0000000001", completion="0").get("m")
    assert p.worst_cost_nanos(1, 0) == 1


def test_unpriced_or_variable_models_are_refused():
    prices = price_list(prompt="0", completion="0")
    for model in ("router", "broken", "unknown/model"):
        with pytest.raises(InvalidRequest, match="no known price"):
            prices.get(model)


def test_stale_after_ttl():
    prices = price_list(prompt="0", completion="0")
    assert not prices.stale(59) and prices.stale(60)
    assert prices.get("m").request == Decimal(0)


def test_a_price_out_of_all_range_is_a_clear_upstream_error_not_an_overflow():
    """A model list pricing a token at 1e999999 USD (or 1e12) cannot be metered: the
    call is refused with 502 upstream, never a traceback or an int64 overflow."""
    import pytest

    from wattgate.errors import UpstreamError
    from wattgate.money import usd_to_nanos

    for absurd in ("1e999999", "1e12"):
        prices = PriceList(ttl=60)
        prices.load({"data": [{"id": "m/x", "pricing": {"prompt": absurd,
                                                        "completion": "0"}}]}, now=0)
        with pytest.raises(UpstreamError):
            prices.get("m/x").worst_cost_nanos(1000, 10)
    for amount in ("1e999999", "-1e999999", "1e20", "1000000000.000000001"):
        with pytest.raises(ValueError):
            usd_to_nanos(amount)
    assert usd_to_nanos("1000000000") == 10**18 < 2**63
