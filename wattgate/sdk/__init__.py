"""wattgate's server SDK for Python: the reference ``wattfare/server`` surface.

    from wattgate.sdk import Wattfare, to_wattfare_error

    wf = Wattfare(os.environ["WATTFARE_SECRET_KEY"], base_url="https://gateway.example")
    client = wf.user("user_123").openai()          # an openai.AsyncOpenAI
    reply = await client.chat.completions.create(model="openai/gpt-4o-mini", messages=[...])

Importing it starts nothing and needs only aiohttp; model access needs the
``openai`` extra (``pip install 'wattgate[openai]'``) and the ASGI token route
needs Starlette. Everything public is listed in ``__all__``; the modules
behind it are private. See docs/sdk.md.
"""

from ._client import (
    DEFAULT_BASE_URL,
    GRANT_HEADER,
    GRANT_REMAINING_HEADER,
    USER_HEADER,
    ConnectionStatus,
    CreatedSession,
    Limits,
    Usage,
    Wattfare,
    WattfareGrant,
    WattfareUser,
)
from ._errors import (
    WattfareAuthError,
    WattfareBudgetError,
    WattfareError,
    WattfareFundingError,
    WattfareGrantError,
    WattfareInvalidRequestError,
    WattfareNotConnectedError,
    WattfarePaymentError,
    WattfareRateLimitError,
    WattfareUpstreamError,
    to_wattfare_error,
)
from ._webhooks import SIGNATURE_HEADER, WattfareWebhookError, verify_webhook

__all__ = [
    "DEFAULT_BASE_URL",
    "GRANT_HEADER",
    "GRANT_REMAINING_HEADER",
    "SIGNATURE_HEADER",
    "USER_HEADER",
    "ConnectionStatus",
    "CreatedSession",
    "Limits",
    "Usage",
    "Wattfare",
    "WattfareAuthError",
    "WattfareBudgetError",
    "WattfareError",
    "WattfareFundingError",
    "WattfareGrant",
    "WattfareGrantError",
    "WattfareInvalidRequestError",
    "WattfareNotConnectedError",
    "WattfarePaymentError",
    "WattfareRateLimitError",
    "WattfareUpstreamError",
    "WattfareUser",
    "WattfareWebhookError",
    "to_wattfare_error",
    "verify_webhook",
]
