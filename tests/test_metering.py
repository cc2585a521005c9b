"""What a call cost, from the stream's usage or from GET /generation: one rule, and
hostile or broken usage never believed, never raised, never billed as a silent $0."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest

from wattgate.metering import MAX_CALL_NANOS, bill, generation_charge, usage_charge
from wattgate.money import usd_to_nanos
from wattgate.pricing import Price
from wattgate.sse import Outcome, StreamReader

PRICE = Price(Decimal("0.000001"), Decimal("0.000002"), Decimal(0))
ESTIMATE = 50_000_000  # $0.05


def outcome(usage_text: str) -> Outcome:
    """What the stream reader makes of a final event carrying this raw usage JSON."""
    reader = StreamReader()
    reader.feed(b'data: {"id":"gen-1","choices":[],"usage":%s}\n\ndata: [DONE]\n\n'
                % usage_text.encode())
    return reader.close()


def test_byok_counts_the_provider_cost_from_either_source():
    usage = {"cost": Decimal("0.0001"), "is_byok": True,
             "cost_details": {"upstream_inference_cost": Decimal("0.002")}}
    generation = {"total_cost": Decimal("0.0001"), "is_byok": True,
                  "upstream_inference_cost": Decimal("0.002"), "usage": Decimal("0.0001")}
    assert usage_charge(usage) == generation_charge(generation) == (usd_to_nanos("0.0021"), None)
    # Not BYOK: upstream_inference_cost is already inside cost / total_cost.
    usage["is_byok"] = generation["is_byok"] = False
    assert usage_charge(usage) == generation_charge(generation) == (usd_to_nanos("0.0001"), None)


def test_byok_without_the_provider_cost_is_not_believed():
    cost, problem = usage_charge({"cost": Decimal("0.0001"), "is_byok": True})
    assert cost is None and "upstream_inference_cost" in problem


@pytest.mark.parametrize("usage_text", [
    '{"cost":1e999999,"prompt_tokens":0,"completion_tokens":0}',
    '{"cost":-1e999999}', '{"cost":1e20}', '{"cost":20000}', '{"cost":-0.5}',
    '{"cost":"0.001"}', '{"cost":NaN}', '{"cost":Infinity}', '{"cost":-Infinity}',
    '{"cost":true}', '{"cost":null}', '{}', '{"cost":{"usd":1}}', '[]', 'null', '"0.1"',
])
def test_hostile_cost_is_provisional_at_the_estimate(usage_text):
    got = bill(outcome(usage_text), ESTIMATE)
    assert got.provisional and got.cost_nanos == ESTIMATE
    assert got.cost_nanos < 2**63


def test_a_cost_above_the_one_call_bound_is_flagged_and_provisional():
    over = bill(outcome('{"cost":10000.000000001}'), ESTIMATE)
    assert over.provisional and over.cost_nanos == ESTIMATE and "$10000" in over.problem
    at = bill(outcome('{"cost":10000}'), ESTIMATE)
    assert not at.provisional and at.cost_nanos == MAX_CALL_NANOS and at.problem is None


@pytest.mark.parametrize("tokens", ["1e30", "-5", "2.5", "true", "99999999999999999999999",
                                    '"12"', "NaN", "1e999999"])
def test_bad_token_counts_never_reach_the_row(tokens):
    text = '{"cost":0.25,"prompt_tokens":%s,"completion_tokens":%s}' % (tokens, tokens)
    got = bill(outcome(text), ESTIMATE)
    assert got.cost_nanos == usd_to_nanos("0.25") and not got.provisional
    assert (got.prompt_tokens, got.completion_tokens) == (0, 0)
    assert got.problem  # logged, so an operator sees the upstream misbehave
    # Without a cost, nonsense counts cannot price the call: the estimate it is.
    got = bill(outcome('{"prompt_tokens":%s,"completion_tokens":%s}' % (tokens, tokens)),
               ESTIMATE)
    assert got.provisional and got.cost_nanos == ESTIMATE


def test_tokens_without_cost_are_held_at_the_estimate_until_reconciled():
    """Tokens do not show what the hold also covered (web results, images, a dearer
    fallback): a row at their price would free room the call may already have spent."""
    got = bill(outcome('{"prompt_tokens":1000,"completion_tokens":500}'), ESTIMATE)
    assert got.provisional and got.cost_nanos == ESTIMATE
    assert (got.prompt_tokens, got.completion_tokens) == (1000, 500)


def test_integral_float_token_counts_are_whole_numbers():
    got = bill(outcome('{"cost":0.001,"prompt_tokens":12.0,"completion_tokens":3E1}'),
               ESTIMATE)
    assert (got.prompt_tokens, got.completion_tokens, got.problem) == (12, 30, None)


def test_no_usage_at_all_is_the_estimate_provisional():
    assert bill(Outcome("gen-1"), ESTIMATE) == bill(outcome("null"), ESTIMATE)
    assert bill(Outcome("gen-1"), ESTIMATE).provisional


@pytest.mark.parametrize("data", ['{"total_cost":1e999999}', '{"total_cost":NaN}',
                                  '{"total_cost":"0.1"}', '{"total_cost":1e20}', '{}', 'null',
                                  '{"total_cost":0.1,"is_byok":true}', '[1]'])
def test_hostile_generation_answers_are_not_believed(data):
    cost, problem = generation_charge(json.loads(data, parse_float=Decimal))
    assert cost is None and problem
