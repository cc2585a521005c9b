"""Admission: who pays for a call, and the budget hold that lets it leave.

A call is paid by a connection (``x-wattfare-user``) or a one-time grant
(``x-wattfare-grant``), never both. Admission is one atomic store operation
that refuses when spent + held + this call's worst-case cost would pass the
cap (or the grant is spent) and otherwise records a hold; the hold is settled
to the real cost or released on every path out of the call. Nothing here
imports aiohttp.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .credentials import keyed_hash
from .errors import AuthError, GrantInvalid, InvalidRequest, NotConnected
from .gateway import Gateway
from .ledger import period_of
from .sealing import SealError, connection_aad, grant_aad
from .store import Connection, Hold


@dataclass(frozen=True)
class PayerRef:
    user: str | None
    grant_token: str | None

    @property
    def rate_key(self) -> str:
        return f"u:{self.user}" if self.user is not None else f"g:{self.grant_token}"


@dataclass(frozen=True)
class Admitted:
    app_id: str
    connection_id: int | None
    grant_id: int | None
    hold: Hold
    period: str  # period_of(admitted_at): the call is this period's wherever it settles
    admitted_at: float
    funding_key: str = field(repr=False)  # unsealed for this call only; never logged
    grant_remaining: int | None = None


def identify(user: str | None, grant: str | None) -> PayerRef:
    if user is not None and grant is not None:
        raise InvalidRequest("Send x-wattfare-user or x-wattfare-grant, not both.")
    if grant is not None:
        grant = grant.strip()
        if not grant:
            raise AuthError("Empty grant token.")
        if not grant.startswith("wfg_") or len(grant) > 200:
            raise GrantInvalid()
        return PayerRef(None, grant)
    if user is None:
        raise InvalidRequest("Missing x-wattfare-user header (or x-wattfare-grant for a grant).")
    if not user or len(user) > 256 or any(ord(c) < 32 or ord(c) == 127 for c in user):
        raise InvalidRequest("x-wattfare-user must be your user id (1-256 printable characters).")
    return PayerRef(user, None)


async def precheck(gw: Gateway, app_id: str, payer: PayerRef) -> Connection | None:
    """Cheap refusals before any price lookup: unknown or revoked user.

    Returns the user's connection, which ``admit`` re-checks atomically.
    """
    if payer.user is None:
        return None
    connection = await gw.store.get_connection(app_id, payer.user)
    if connection is None or not connection.connected:
        raise NotConnected()
    return connection


async def admit(gw: Gateway, app_id: str, payer: PayerRef, estimate_nanos: int, *,
                now: float, connection: Connection | None = None) -> Admitted:
    """One atomic hold; ``connection`` is precheck's read (state and cap are re-read inside)."""
    period = period_of(now)
    expires = now + gw.config.metering_hold_ttl_seconds
    if payer.user is not None:
        if connection is None:
            connection = await gw.store.get_connection(app_id, payer.user)
        if connection is None or not connection.connected:
            raise NotConnected()
        hold = await gw.store.admit(connection.connection_id, period, estimate_nanos,
                                    now=now, expires_at=expires)
        sealed, aad = connection.sealed_key, connection_aad(connection.connection_id)
        admitted = Admitted(app_id, connection.connection_id, None, hold, period, now, "",
                            None)
    else:
        assert payer.grant_token is not None
        token_hash = keyed_hash(gw.keys.hash_key, payer.grant_token)
        grant, hold = await gw.store.admit_grant(token_hash, app_id, period, estimate_nanos,
                                                 now=now, expires_at=expires)
        if grant.sealed_key is not None:
            sealed, aad = grant.sealed_key, grant_aad(grant.grant_id)
        else:
            connection = (await gw.store.get_connection_by_id(grant.connection_id)
                          if grant.connection_id is not None else None)
            if connection is None or not connection.connected:  # revoked meanwhile
                await gw.store.release(hold, refund_request=True)
                raise GrantInvalid("The connection funding this grant was revoked.")
            sealed, aad = connection.sealed_key, connection_aad(connection.connection_id)
        admitted = Admitted(app_id, grant.connection_id, grant.grant_id, hold, period, now, "",
                            grant.requests - grant.used)
    try:
        key = gw.sealer.unseal(sealed or "", aad)
    except SealError:
        await gw.store.release(hold, refund_request=payer.grant_token is not None)
        raise NotConnected("The stored funding key cannot be opened; the user must reconnect.") \
            from None
    return Admitted(admitted.app_id, admitted.connection_id, admitted.grant_id, hold, period,
                    now, key, admitted.grant_remaining)
