"""The consent rule as a pure decision: what a session token alone may change."""

from __future__ import annotations

import pytest

from wattgate.consent import UNSET, decide, require_connected
from wattgate.errors import ConsentRequired, InvalidRequest, NotConnected
from wattgate.store.records import ACTIVE, NEEDS_RECONNECT, REVOKED, Connection

USD = 1_000_000_000


def conn(cap: int | None = 10 * USD, state: str = ACTIVE, key: str | None = "v1.k1.x",
         browser: str | None = "b1") -> Connection:
    return Connection(1, "app0123456789abcdef", "u", state, cap, key, browser, 0.0, 0.0)


def run(existing, requested=UNSET, token=UNSET, key=False, present=False, unlimited=False):  # type: ignore[no-untyped-def]
    return decide(existing, requested_cap=requested, token_cap=token, has_funding_key=key,
                  user_present=present, allow_unlimited=unlimited)


@pytest.mark.parametrize("existing", [None, conn(state=REVOKED, key=None),
                                      conn(state=NEEDS_RECONNECT), conn(key=None)])
def test_a_new_or_dead_connection_needs_the_funding_key(existing):
    with pytest.raises(ConsentRequired):
        run(existing, requested=5 * USD)
    with pytest.raises(ConsentRequired):
        run(existing, requested=5 * USD, present=True)  # presence alone funds nothing
    change = run(existing, requested=5 * USD, key=True)
    assert change.cap_nanos == 5 * USD and change.needs_key_check and not change.keep_key


def test_new_connection_cap_comes_from_body_then_token():
    assert run(None, token=7 * USD, key=True).cap_nanos == 7 * USD
    assert run(None, requested=3 * USD, token=7 * USD, key=True).cap_nanos == 3 * USD
    with pytest.raises(InvalidRequest, match="monthlyUsd is required"):
        run(None, key=True)


def test_raising_needs_the_user():
    with pytest.raises(ConsentRequired):
        run(conn(), requested=11 * USD)
    assert run(conn(), requested=11 * USD, present=True).cap_nanos == 11 * USD
    assert run(conn(), requested=11 * USD, key=True).cap_nanos == 11 * USD


def test_unlimited_is_a_raise_and_a_dev_switch():
    with pytest.raises(InvalidRequest, match="development"):
        run(conn(), requested=None, present=True)
    with pytest.raises(ConsentRequired):
        run(conn(), requested=None, unlimited=True)
    assert run(conn(), requested=None, present=True, unlimited=True).cap_nanos is None
    with pytest.raises(InvalidRequest, match="development"):
        run(None, token=None, key=True)


def test_lowering_keeping_and_leaving_unlimited_need_nothing():
    assert run(conn(), requested=2 * USD).cap_nanos == 2 * USD
    assert run(conn(), requested=10 * USD).cap_nanos == 10 * USD
    same = run(conn())
    assert same.cap_nanos == 10 * USD and same.keep_key and not same.needs_key_check
    assert run(conn(cap=None), requested=1 * USD, unlimited=True).cap_nanos == 1 * USD


def test_token_cap_never_raises_an_existing_connection():
    # The app names a higher cap in the token; without the body asking, nothing changes.
    assert run(conn(), token=100 * USD).cap_nanos == 10 * USD


def test_require_connected():
    assert require_connected(conn()).connection_id == 1
    for dead in (None, conn(state=REVOKED), conn(key=None)):
        with pytest.raises(NotConnected):
            require_connected(dead)
