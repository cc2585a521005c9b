"""Session tokens: the short-lived HS256 JWTs an app's backend mints for its browser.

Claims: ``appId``, ``appUserId``, ``limits`` (``{"monthlyUsd": n}`` or null),
``sv`` (a tag of the app's secret at minting, so rotating the secret also ends
the tokens minted with the old one), ``iss`` (the gateway's public origin),
``aud`` (``wattgate:session``), ``iat``, ``exp``, ``jti``. Verification pins HS256, requires every claim, checks
``exp`` with a small leeway for clock skew, and checks issuer and audience.
A session token proves which app asked, never that the end user consented.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import jwt

from .errors import AuthError

AUDIENCE = "wattgate:session"
LEEWAY_SECONDS = 5


@dataclass(frozen=True)
class Session:
    app_id: str
    app_user_id: str
    limit_nanos: int | None  # the cap the app asks the user to approve
    has_limit: bool          # False: the app requested no cap at all
    expires_at: int
    secret_tag: str = ""     # the app secret's tag when minted ("sv")


class SessionCodec:
    def __init__(self, secret: str, issuer: str, ttl_seconds: int) -> None:
        self._secret = secret
        self.issuer = issuer
        self.ttl_seconds = ttl_seconds

    def mint(self, app_id: str, app_user_id: str, limit_usd: Decimal | None,
             has_limit: bool, *, now: float, secret_tag: str = "") -> tuple[str, int]:
        iat = int(now)
        exp = iat + self.ttl_seconds
        limits: dict[str, Any] | None = None
        if has_limit:
            limits = {"monthlyUsd": None if limit_usd is None else str(limit_usd)}
        claims = {
            "iss": self.issuer, "aud": AUDIENCE, "iat": iat, "exp": exp,
            "jti": secrets.token_urlsafe(9),
            "appId": app_id, "appUserId": app_user_id, "limits": limits, "sv": secret_tag,
        }
        return jwt.encode(claims, self._secret, algorithm="HS256"), exp

    def verify(self, token: str, *, now: float) -> Session:
        from .money import usd_to_nanos

        try:
            claims = jwt.decode(
                token, self._secret, algorithms=["HS256"], audience=AUDIENCE,
                issuer=self.issuer, leeway=LEEWAY_SECONDS,
                options={"require": ["exp", "iat", "iss", "aud"], "verify_exp": False,
                         "verify_iat": False, "verify_nbf": False},
            )
        except jwt.PyJWTError:
            raise AuthError("Invalid session token.") from None
        # Times are checked against the injected clock, not PyJWT's wall clock.
        exp, iat = claims.get("exp"), claims.get("iat")
        if not isinstance(exp, int) or not isinstance(iat, int) \
                or iat > now + LEEWAY_SECONDS:
            raise AuthError("Invalid session token.")
        if exp + LEEWAY_SECONDS < now:
            raise AuthError("Session token expired.")
        app_id, user = claims.get("appId"), claims.get("appUserId")
        if not isinstance(app_id, str) or not isinstance(user, str):
            raise AuthError("Invalid session token.")
        limits = claims.get("limits")
        limit_nanos = None
        has_limit = isinstance(limits, dict)
        if isinstance(limits, dict) and limits.get("monthlyUsd") is not None:
            limit_nanos = usd_to_nanos(limits["monthlyUsd"])
        tag = claims.get("sv", "")
        return Session(app_id, user, limit_nanos, has_limit, claims["exp"],
                       tag if isinstance(tag, str) else "")
