"""map_failure: the one translation of upstream HTTP errors, Retry-After included; and
reading a key's own limit from ``GET /key``."""

from __future__ import annotations

import pytest

from wattgate.errors import (
    BudgetExceeded, FundingInvalid, RateLimited, UpstreamError, UpstreamTimeout,
)
from wattgate.upstream import KeyLimit, key_limit_of, map_failure, retry_after_seconds

NOW = 1_790_000_000.0
BODY = b'{"error":{"code":429,"message":"Rate limit exceeded"}}'


@pytest.mark.parametrize("header,seconds", [
    ("17", 17), ("2.5", 3), ("0", 1), ("-4", 1), (None, 1), ("", 1), ("soon", 1),
    ("nan", 1), ("1e999", 1), ("999999999", 86_400),
    ("Mon, 21 Sep 2026 14:13:40 GMT", 20), ("Mon, 21 Sep 2026 14:12:00 GMT", 1),
])
def test_retry_after_in_seconds_or_as_a_date(header, seconds):
    # NOW is 2026-09-21 14:13:20 UTC.
    assert retry_after_seconds(header, NOW) == seconds


def test_an_upstream_429_stays_a_429_that_says_when():
    error = map_failure(429, BODY, {"Retry-After": "30"}, now=NOW)
    assert isinstance(error, RateLimited) and error.status == 429
    assert error.headers() == {"Retry-After": "30"}
    assert "Rate limit exceeded" in error.message
    assert map_failure(429, b"", None).headers() == {"Retry-After": "1"}


@pytest.mark.parametrize("status,kind", [(401, FundingInvalid), (402, FundingInvalid),
                                         (408, UpstreamTimeout), (400, UpstreamError),
                                         (403, UpstreamError), (500, UpstreamError),
                                         (503, UpstreamError)])
def test_other_failures_keep_their_mapping(status, kind):
    assert type(map_failure(status, b"{}")) is kind


def test_openrouters_key_limit_refusal_is_a_spent_budget_not_a_broken_key():
    body = b'{"error":{"code":403,"message":"Key limit exceeded (monthly limit). Manage it ' \
           b'using https://openrouter.ai/settings/keys"}}'
    error = map_failure(403, body)
    assert isinstance(error, BudgetExceeded) and not isinstance(error, FundingInvalid)
    assert "own credit limit" in str(error)
    assert isinstance(map_failure(403, b'{"error":{"message":"Flagged by moderation"}}'),
                      UpstreamError)


@pytest.mark.parametrize("body,limit", [
    (b'{"data":{"label":"Notes","limit":0.1,"limit_reset":"monthly","usage":0}}',
     KeyLimit(100_000_000, "monthly", "Notes")),  # exact: 0.1 is ten cents, not a float's
    (b'{"data":{"label":"k","limit":null,"limit_reset":null}}', KeyLimit(None, None, "k")),
    (b'{"data":{"limit":12345678.123456789}}', KeyLimit(12_345_678_123_456_789, None, None)),
    (b'{"data":{"limit":-1}}', None), (b'{"data":{"limit":1e999}}', None),
    (b'{"data":{"limit":"lots"}}', None), (b'{"data":{"limit":true}}', None),
    (b'{"data":[]}', None), (b'{}', None), (b'not json', None),
])
def test_a_keys_own_limit_is_read_exactly_or_not_at_all(body, limit):
    assert key_limit_of(body) == limit
