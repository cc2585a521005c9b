"""Consent integrity: what a session token alone may change, and what needs the user.

An app holds its secret key and can mint any session token, so a token proves
only which app asks. With a token alone an app may read status, lower a cap
and revoke. Creating a funded connection, attaching or replacing a funding
key, or raising a cap (including to unlimited) needs proof that the end user
acted, one of:

- the funding key itself, sent in the same request (only the user has it), or
- the presence cookie ``wg_presence`` (``__Host-wg_presence`` on https):
  HttpOnly, SameSite=Strict, set on the gateway's origin when the user
  approved a connection in the consent popup, and accepted only on
  same-origin requests from the gateway's own pages (see
  ``views.control.is_same_origin``), and only for a connection that this same
  browser approved.

The gateway never adopts a presence value the browser brought: every approval
that binds a connection to a browser mints a fresh value, and moves the
connections of the value it replaces to it. A value planted in the user's
browser before the approval (by another port of the same host, or a sibling
subdomain's ``Domain=`` cookie) therefore proves nothing afterwards, to its
planter or anyone. The ``__Host-`` prefix (Secure, ``Path=/``, no ``Domain``)
stops a sibling subdomain from planting one at all on https.

This module decides; it never touches HTTP or SQL.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ConsentRequired, InvalidRequest, NotConnected
from .store.records import Connection

PRESENCE_COOKIE = "wg_presence"
HOST_PREFIX = "__Host-"


def presence_cookie_name(public_origin: str) -> str:
    """The presence cookie's name: ``__Host-``-prefixed when the gateway is served on https.

    Browsers accept a ``__Host-`` cookie only from a secure origin, for ``Path=/``
    and without ``Domain``, so no other host or subdomain can set or shadow it.
    """
    return HOST_PREFIX + PRESENCE_COOKIE if public_origin.startswith("https://") \
        else PRESENCE_COOKIE
UNSET = object()


@dataclass(frozen=True)
class Change:
    cap_nanos: int | None
    needs_key_check: bool  # a funding key was given: verify it upstream, then seal it
    keep_key: bool         # reuse the stored sealed key


def decide(existing: Connection | None, *, requested_cap: object, token_cap: object,
           has_funding_key: bool, user_present: bool, allow_unlimited: bool) -> Change:
    """The change a POST /connections may make, or the error that refuses it.

    ``requested_cap`` is the body's ``monthlyUsd`` (UNSET when absent, None for
    unlimited); ``token_cap`` the cap the app asked for in the session token.
    """
    if requested_cap is None and not allow_unlimited:
        raise InvalidRequest("monthlyUsd: null (unlimited) is only allowed in development mode.")
    connected = existing is not None and existing.connected
    if not connected:
        if not has_funding_key:
            raise ConsentRequired("A new connection needs the user's funding key, "
                                  "collected by the consent popup.")
        cap = requested_cap if requested_cap is not UNSET else token_cap
        if cap is UNSET:
            raise InvalidRequest("monthlyUsd is required: neither the body nor the "
                                 "session token names a cap.")
        if cap is None and not allow_unlimited:
            raise InvalidRequest("monthlyUsd: null (unlimited) is only allowed in development mode.")
        return Change(cap, needs_key_check=True, keep_key=False)  # type: ignore[arg-type]

    assert existing is not None
    cap = existing.cap_nanos if requested_cap is UNSET else requested_cap
    if has_funding_key:
        return Change(cap, needs_key_check=True, keep_key=False)  # type: ignore[arg-type]
    if _raises(existing.cap_nanos, cap) and not user_present:  # type: ignore[arg-type]
        raise ConsentRequired("Raising a cap needs the user's approval in the consent popup.")
    return Change(cap, needs_key_check=False, keep_key=True)  # type: ignore[arg-type]


def _raises(old: int | None, new: int | None) -> bool:
    if old is None:
        return False  # nothing is above unlimited
    return new is None or new > old


def require_connected(connection: Connection | None) -> Connection:
    if connection is None or not connection.connected:
        raise NotConnected()
    return connection
