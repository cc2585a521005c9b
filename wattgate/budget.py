"""The two rules of money, written once: the cap rule and the grant rule.

Every backend of the ledger (``store/contract.py``) performs the atomic
check-and-hold these rules ask for (SQLite: with no await between the check and
the add on the one event loop; PostgreSQL: inside one transaction holding the
row lock), but neither decides them: the numbers go in, a refusal or nothing
comes out. Views and reports ask the same functions what a grant's state is.
Nothing here touches a database or aiohttp.
"""

from __future__ import annotations

from .errors import BudgetExceeded, GrantInvalid, NotConnected, Shortfall
from .store.records import ACTIVE, Connection, Grant

__all__ = ["cap_refusal", "check_cap", "check_connection", "check_grant", "grant_state",
           "grant_usable", "grant_fits"]


def cap_refusal(cap_nanos: int | None, spent: int, held: int, amount: int) -> Shortfall | None:
    """The cap rule: spent + held + this call's worst case must stay within the cap.

    ``spent`` is the period's committed debits, ``held`` the worst cases of
    every call in flight admitted in the same period, on every process. None
    when the call fits (or the connection has no cap: the dev switch).

    The PostgreSQL ledger evaluates this same inequality inside its admission
    function (``wattgate_admit``, ``store/pg_migrations.py``) so that a check
    and its hold are one round trip; it returns the numbers and the refusal
    is worded here. ``test_admission_decides_as_budget_cap_refusal_at_the_boundary``
    (``tests/test_store_contract.py``) fails if the two ever disagree.
    """
    if cap_nanos is None or spent + held + amount <= cap_nanos:
        return None
    return Shortfall(amount, cap_nanos, spent, held)


def check_cap(cap_nanos: int | None, spent: int, held: int, amount: int) -> None:
    """``cap_refusal`` as an exception (402 budget_exceeded)."""
    shortfall = cap_refusal(cap_nanos, spent, held, amount)
    if shortfall is not None:
        raise BudgetExceeded(shortfall=shortfall)


def check_connection(state: str | None, sealed_key: str | None) -> None:
    """A call may be paid by a connection only while it is active with a key."""
    if state != ACTIVE or sealed_key is None:
        raise NotConnected()


def connection_pays(connection: Connection | None) -> bool:
    return connection is not None and connection.connected


def grant_usable(grant: Grant, now: float) -> bool:
    """The grant rule's time and count part: not expired and a request left.

    A grant that is not usable can never take a call again (nothing un-expires
    it; only a refund of a request that never reached the model gives one
    back), which is also what lets ``erase_revoked_keys`` erase its typed key.
    """
    return grant.expires_at > now and grant.used < grant.requests


def grant_fits(grant: Grant, amount: int) -> Shortfall | None:
    """The grant rule's dollar part: spent + held + this call within ``maxUsd``."""
    if grant.max_nanos is None or \
            grant.spent_nanos + grant.held_nanos + amount <= grant.max_nanos:
        return None
    return Shortfall(amount, grant.max_nanos, grant.spent_nanos, grant.held_nanos)


def check_grant(grant: Grant | None, app_id: str, now: float, amount: int) -> None:
    """The whole grant rule for one call of ``app_id`` costing at most ``amount``.

    Refuses (402 grant_invalid) a grant that is unknown, another app's,
    expired, used up, or whose dollar cap this call could pass. The funding
    connection's state and cap are checked by the caller with
    ``check_connection`` and ``check_cap``.
    """
    if grant is None or grant.app_id != app_id or not grant_usable(grant, now):
        raise GrantInvalid()
    shortfall = grant_fits(grant, amount)
    if shortfall is not None:
        raise GrantInvalid("The grant's dollar cap would be passed by this request.",
                           shortfall=shortfall)


def grant_state(grant: Grant, now: float) -> str:
    """"spent", "expired" or "live", as the console and ``grants/current`` show it.

    "spent" also when the dollar cap has no room for even the cheapest call
    (spent and held reach ``maxUsd``).
    """
    if grant.used >= grant.requests or (
            grant.max_nanos is not None
            and grant.spent_nanos + grant.held_nanos >= grant.max_nanos):
        return "spent"
    if grant.expires_at <= now:
        return "expired"
    return "live"
