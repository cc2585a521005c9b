"""A backend that uses the public wattgate.sdk surface, checked with ``mypy --strict``
by tests/test_sdk_typed.py against the installed package. The ``type: ignore`` lines
are mistakes the annotations must catch: with --strict an ignore that silences
nothing is itself an error, so a surface typed as ``Any`` fails the check."""

from __future__ import annotations

from decimal import Decimal

import openai
from aiohttp import web
from fastapi import FastAPI
from starlette.requests import Request

from wattgate.sdk import (
    DEFAULT_BASE_URL,
    GRANT_HEADER,
    GRANT_REMAINING_HEADER,
    USER_HEADER,
    ConnectionStatus,
    CreatedSession,
    Limits,
    Usage,
    Wattfare,
    WattfareAuthError,
    WattfareBudgetError,
    WattfareError,
    WattfareFundingError,
    WattfareGrant,
    WattfareGrantError,
    WattfareInvalidRequestError,
    WattfareNotConnectedError,
    WattfarePaymentError,
    WattfareRateLimitError,
    WattfareUpstreamError,
    WattfareUser,
    to_wattfare_error,
)

wf = Wattfare("sk_live_app_secret", base_url=DEFAULT_BASE_URL, timeout=10.0)
headers: tuple[str, str, str] = (USER_HEADER, GRANT_HEADER, GRANT_REMAINING_HEADER)


async def summarise(user_id: str | int, text: str) -> str:
    user: WattfareUser = wf.user(user_id)
    async with user.openai(max_retries=0) as client:
        reply = await client.chat.completions.create(
            model="openai/gpt-4o-mini", messages=[{"role": "user", "content": text}])
    return reply.choices[0].message.content or ""


def summarise_blocking(grant_token: str, text: str) -> str:
    grant: WattfareGrant = wf.grant(grant_token)
    client: openai.OpenAI = grant.openai_sync()
    reply = client.chat.completions.create(
        model="openai/gpt-4o-mini", messages=[{"role": "user", "content": text}])
    return reply.choices[0].message.content or ""


async def budget(user_id: str) -> Decimal | None:
    status: ConnectionStatus = await wf.user(user_id).status()
    limits: Limits | None = status.limits
    usage: Usage = status.usage
    spent: Decimal = usage.monthly_usd
    cap: Decimal | None = None if limits is None else limits.monthly_usd
    assert status.to_dict()["connected"] == status.connected and spent >= 0 and cap != 0
    return status.remaining_usd


async def token_for(user_id: str) -> dict[str, object]:
    created: CreatedSession = await wf.create_session(user_id, {"requestLimit": {"monthlyUsd": 20}})
    expires: int = created.expires_at
    return {**created.to_dict(), "expires": expires}


def what_went_wrong(err: BaseException) -> str:
    wf_err = to_wattfare_error(err)
    if wf_err is None:
        return "not the gateway"
    if isinstance(wf_err, WattfareRateLimitError) and wf_err.retry_after is not None:
        return f"retry in {wf_err.retry_after + 0} s"
    kinds: tuple[type[WattfareError], ...] = (
        WattfareAuthError, WattfareInvalidRequestError, WattfarePaymentError,
        WattfareNotConnectedError, WattfareBudgetError, WattfareGrantError,
        WattfareFundingError, WattfareUpstreamError)
    named = next((kind.__name__ for kind in kinds if isinstance(wf_err, kind)), "other")
    status: int = wf_err.status
    return f"{named} {wf_err.code} {status}: {wf_err.message} {wf_err.to_dict()['error']}"


def current_user(request: web.Request) -> str | None:
    return request.headers.get("x-user")


def asgi_user(request: Request) -> str | None:
    return request.headers.get("x-user")


app = web.Application()
app.router.add_post("/api/wattfare-token", wf.session_handler(current_user))
api = FastAPI()
api.post("/api/wattfare-token")(wf.asgi_session_handler(asgi_user, {"requestLimit": {"monthlyUsd": 5}}))
options = wf.user("u").openai_options()


def mistakes() -> None:
    wf.user(4.5)  # type: ignore[arg-type]
    wf.grant(None)  # type: ignore[arg-type]
    Wattfare(secret_key=b"sk_bytes")  # type: ignore[arg-type]
    flag: bool = wf.user("u").status()  # type: ignore[assignment]
    remaining: Decimal = ConnectionStatus(True, None, Usage(Decimal(0)), None).remaining_usd  # type: ignore[assignment]
    del flag, remaining
