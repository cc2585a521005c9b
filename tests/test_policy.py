"""The policy's rules on their own: patterns, operator input, requests, caps."""

from __future__ import annotations

import json

import pytest

from wattgate.errors import PolicyRefused
from wattgate.estimate import CHAT, EMBEDDINGS, RESPONSES, read_request
from wattgate.policy import (check_cap, check_grant_cap, check_request, default_max_tokens,
                             describe, make_policy, model_allowed)
from wattgate.store import AppPolicy

USD = 1_000_000_000


@pytest.mark.parametrize("model, allowed", [
    ("openai/gpt-4o", True),
    ("openai/gpt-4o-mini:free", True),
    ("OpenAI/GPT-4o", True),
    ("anthropic/claude-3.5-sonnet", True),
    ("anthropic/claude-3.5-sonnet-20240620", False),
    ("anthropic/claude-3-5-sonnet", False),  # "." is a dot, not any character
    ("anthropic/claude-3.5-sonnet:beta", False),
    ("openai/", True),  # * may be empty; OpenRouter answers no such model
    ("openai", False),
    ("openai/a/b", False),
    ("xopenai/gpt-4o", False),
    ("openai/gpt 4o", False),
    ("openai/gpt-4o\t", False),
    ("openai/gpt-4\u212ao", False),
    ("", False),
    ("openrouter/auto", False),
])
def test_patterns(model, allowed):
    policy = make_policy(models=["openai/*", "anthropic/claude-3.5-sonnet"])
    assert model_allowed(policy, model) is allowed


def test_an_empty_list_allows_every_model():
    assert model_allowed(AppPolicy(), "anything/at-all")
    assert model_allowed(make_policy(models=["", "  "]), "x/y")


def test_operator_input_is_validated_and_exact():
    p = make_policy(models=[" OpenAI/* ", "openai/*"], max_cap_usd="0.1",
                    max_tokens=4096, suggested_cap_usd="0.05")
    assert p == AppPolicy(("openai/*",), USD // 10, 4096, USD // 20)
    assert describe(p) == {"models": ["openai/*"], "maxCapUsd": 0.1, "maxTokens": 4096,
                           "suggestedCapUsd": 0.05}
    assert AppPolicy.from_text(p.to_text()) == p and AppPolicy().to_text() is None
    for bad, words in (({"max_cap_usd": "0"}, r"more than \$0"),
                       ({"max_cap_usd": "-5"}, r"more than \$0"),
                       ({"max_cap_usd": "abc"}, "amount of USD"),
                       ({"max_cap_usd": "1e999"}, "amount of USD"),
                       ({"max_cap_usd": "5", "suggested_cap_usd": "5.01"}, "must not be above"),
                       ({"max_tokens": 0}, "max tokens"),
                       ({"models": ["open ai/*"]}, "model pattern"),
                       ({"models": ["openai/[a]"]}, "model pattern"),
                       ({"models": [f"m/{i}" for i in range(101)]}, "at most 100")):
        with pytest.raises(ValueError, match=words):
            make_policy(**bad)  # type: ignore[arg-type]


def read(body, endpoint=CHAT, policy=AppPolicy()):
    return read_request(json.dumps(body).encode(),
                        default_max_tokens=default_max_tokens(policy, 4096), endpoint=endpoint)


def test_max_tokens_bounds_every_output_limit():
    policy = AppPolicy(max_tokens=100)
    msgs = [{"role": "user", "content": "hi"}]
    for body, field in (({"max_tokens": 101}, "max_tokens 101"),
                        ({"max_completion_tokens": 101}, "max_completion_tokens 101"),
                        ({"max_tokens": 10, "max_completion_tokens": 101}, "max_completion"),
                        ({"max_tokens": 90, "reasoning": {"max_tokens": 11}}, "reasoning")):
        with pytest.raises(PolicyRefused, match=field):
            check_request(policy, read({"model": "a/b", "messages": msgs, **body}, CHAT, policy))
    with pytest.raises(PolicyRefused, match="max_output_tokens"):
        check_request(policy, read({"model": "a/b", "input": "x", "max_output_tokens": 500},
                                   RESPONSES, policy))
    # Absent: the policy's bound is injected, less any reasoning budget.
    req = check_request(policy, read({"model": "a/b", "messages": msgs}, CHAT, policy))
    assert (req.inject_max_tokens, req.output_tokens) == (100, 100)
    req = check_request(policy, read({"model": "a/b", "messages": msgs,
                                      "reasoning": {"max_tokens": 70}}, CHAT, policy))
    assert (req.inject_max_tokens, req.output_tokens) == (30, 100)
    with pytest.raises(PolicyRefused, match="reasoning"):  # no room left for an answer
        check_request(policy, read({"model": "a/b", "messages": msgs,
                                    "reasoning": {"max_tokens": 100}}, CHAT, policy))
    # Embeddings have no output to bound.
    check_request(policy, read({"model": "a/b", "input": "x"}, EMBEDDINGS, policy))


def test_every_billable_model_is_judged():
    policy = make_policy(models=["a/*"])
    msgs = [{"role": "user", "content": "hi"}]
    check_request(policy, read({"model": "a/x", "models": ["a/y"], "messages": msgs}))
    with pytest.raises(PolicyRefused, match="'b/y' in models"):
        check_request(policy, read({"model": "a/x", "models": ["a/y", "b/y"],
                                    "messages": msgs}))


def test_caps():
    policy = AppPolicy(max_cap_nanos=20 * USD)
    check_cap(policy, 20 * USD)
    check_cap(AppPolicy(), None)
    check_cap(policy, 50 * USD, kept=True)  # approved before the bound was lowered
    with pytest.raises(PolicyRefused,
                       match=r"\$20\.000000001 is above .* at most \$20\.00 a month"):
        check_cap(policy, 20 * USD + 1)  # exact: never shown as if it fitted
    with pytest.raises(PolicyRefused, match="An unlimited cap"):
        check_cap(policy, None)
    check_grant_cap(policy, 20 * USD)
    check_grant_cap(AppPolicy(), None)
    with pytest.raises(PolicyRefused, match="maxUsd"):
        check_grant_cap(policy, None)
    with pytest.raises(PolicyRefused, match="at most"):
        check_grant_cap(policy, 21 * USD)
