"""Session tokens: minting, and every way verification must refuse a token."""

from __future__ import annotations

import base64
import json
from decimal import Decimal

import jwt
import pytest

from wattgate.errors import AuthError
from wattgate.sessions import AUDIENCE, LEEWAY_SECONDS, SessionCodec

NOW = 1_800_000_000.0
ISSUER = "http://127.0.0.1:8787"


@pytest.fixture
def codec() -> SessionCodec:
    return SessionCodec("s" * 64, ISSUER, 600)


def claims(**changes):  # type: ignore[no-untyped-def]
    base = {"iss": ISSUER, "aud": AUDIENCE, "iat": int(NOW), "exp": int(NOW) + 600,
            "jti": "j", "appId": "app0123456789abcdef", "appUserId": "u1",
            "limits": {"monthlyUsd": "20"}}
    base.update(changes)
    return {k: v for k, v in base.items() if v is not ...}


def test_mint_then_verify(codec):
    token, exp = codec.mint("app0123456789abcdef", "user_123", Decimal("20"), True, now=NOW)
    assert exp == int(NOW) + 600
    session = codec.verify(token, now=NOW + 599)
    assert (session.app_id, session.app_user_id) == ("app0123456789abcdef", "user_123")
    assert session.limit_nanos == 20_000_000_000 and session.has_limit
    assert session.expires_at == exp
    header = json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))
    assert header["alg"] == "HS256"


def test_secret_tag_round_trips(codec):
    token, _ = codec.mint("app0123456789abcdef", "u", None, False, now=NOW, secret_tag="t1")
    assert codec.verify(token, now=NOW).secret_tag == "t1"
    old, _ = codec.mint("app0123456789abcdef", "u", None, False, now=NOW)
    assert codec.verify(old, now=NOW).secret_tag == ""


def test_no_limit_and_unlimited_are_told_apart(codec):
    none, _ = codec.mint("app0123456789abcdef", "u", None, False, now=NOW)
    unlimited, _ = codec.mint("app0123456789abcdef", "u", None, True, now=NOW)
    assert not codec.verify(none, now=NOW).has_limit
    s = codec.verify(unlimited, now=NOW)
    assert s.has_limit and s.limit_nanos is None


def test_expired_is_refused_by_the_injected_clock(codec):
    token, exp = codec.mint("app0123456789abcdef", "u", None, False, now=NOW)
    codec.verify(token, now=exp + LEEWAY_SECONDS)
    with pytest.raises(AuthError, match="expired"):
        codec.verify(token, now=exp + LEEWAY_SECONDS + 1)


def test_minted_ahead_of_the_wall_clock_still_verifies(codec):
    # The injected clock, not the wall clock, decides: a test or a skewed host.
    later = NOW + 10 * 365 * 86400
    token, _ = codec.mint("app0123456789abcdef", "u", None, False, now=later)
    assert codec.verify(token, now=later).app_user_id == "u"


def test_issued_in_the_future_is_refused(codec):
    token = jwt.encode(claims(iat=int(NOW) + 3600, exp=int(NOW) + 4000), "s" * 64)
    with pytest.raises(AuthError):
        codec.verify(token, now=NOW)


def test_alg_none_is_refused(codec):
    token = jwt.encode(claims(), None, algorithm="none")
    with pytest.raises(AuthError):
        codec.verify(token, now=NOW)


def test_other_key_is_refused(codec):
    with pytest.raises(AuthError):
        codec.verify(jwt.encode(claims(), "another-key-" * 4, algorithm="HS256"), now=NOW)


def test_other_hmac_algorithm_is_refused(codec):
    with pytest.raises(AuthError):
        codec.verify(jwt.encode(claims(), "s" * 64, algorithm="HS512"), now=NOW)


@pytest.mark.parametrize("change", [
    {"iss": "https://evil.example"}, {"aud": "someone-else"}, {"iss": ...}, {"aud": ...},
    {"exp": ...}, {"iat": ...}, {"appId": ...}, {"appUserId": 42}, {"exp": "soon"},
])
def test_wrong_or_missing_claims_are_refused(codec, change):
    with pytest.raises(AuthError):
        codec.verify(jwt.encode(claims(**change), "s" * 64, algorithm="HS256"), now=NOW)


@pytest.mark.parametrize("token", ["", "abc", "a.b.c", "eyJ.eyJ.sig"])
def test_garbage_is_refused(codec, token):
    with pytest.raises(AuthError):
        codec.verify(token, now=NOW)
