"""Verifying a wattgate webhook in one call (the receiver's side).

    from wattgate.sdk import verify_webhook, WattfareWebhookError

    try:
        event = verify_webhook(raw_body, request.headers.get("Wattgate-Signature"),
                               os.environ["WATTGATE_WEBHOOK_SECRET"])
    except WattfareWebhookError as e:
        return Response(status=400)      # e.message says why, in one line
    if seen_before(event["id"]):          # delivered at least once: drop duplicates
        return Response(status=200)

The signature is ``t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<raw body>">``
(``wattgate.webhooks``); a timestamp more than ``tolerance`` seconds (300 by
default) from now is refused, so a captured delivery cannot be replayed.
"""

from __future__ import annotations

import time
from typing import Any

from .. import webhooks
from ._errors import WattfareError

SIGNATURE_HEADER = webhooks.SIGNATURE_HEADER


class WattfareWebhookError(WattfareError):
    """A delivery whose signature does not hold (code ``webhook_signature``, 400)."""

    def __init__(self, message: str) -> None:
        super().__init__("webhook_signature", 400, message)


def verify_webhook(body: bytes | str, signature: str | None, secret: str, *,
                   tolerance: float = webhooks.TOLERANCE,
                   now: float | None = None) -> dict[str, Any]:
    """The event (``{"id", "type", "created", "data"}``) once ``signature`` (the
    ``Wattgate-Signature`` header) proves ``body`` (the raw bytes received) was
    signed with ``secret`` within ``tolerance`` seconds of ``now``; else raises
    ``WattfareWebhookError``."""
    try:
        return webhooks.verify(secret, body, signature,
                               now=time.time() if now is None else now, tolerance=tolerance)
    except webhooks.SignatureError as e:
        raise WattfareWebhookError(str(e)) from None
