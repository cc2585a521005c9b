"""Webhook delivery: the outbox's events sent to each app's endpoint, signed.

``Deliverer.loop`` runs in every gateway process but works only in the one
leading ``LEAD_TASK`` (``Ledger.lead``, as the reconciler does): on a fleet one
process delivers. Each pass claims the due events (``Ledger.claim_webhooks``:
the head of each stream, leased past the attempt's timeout, so even two
processes that both believed they led would not send one event at once) and
posts them, streams side by side, each stream one event at a time: in order per
connection.

At least once: an event is marked delivered only after a 2xx; a process killed
mid-attempt leaves it leased, and it is tried again when the lease ends. A
failed attempt (any other status, a redirect, which is never followed, a
timeout, a refused connection) is tried again after ``webhooks.retry_first``
seconds, doubling up to ``retry_max``, until ``give_up`` seconds after the
event (or its resend) have passed; then it is marked failed. Delivered and
failed events are deleted after ``webhooks.keep_days``.

Owns its own ``aiohttp.ClientSession`` (no cookie jar, its own timeouts): a
receiver is the app's server, not the model's. Nothing of a delivery is logged
but its event id, type, app and outcome: never the URL (it may carry a token),
the secret, the body or the receiver's answer.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import TYPE_CHECKING

import aiohttp

from . import __version__, webhooks
from .sealing import webhook_aad
from .store.records import DELIVERED, FAILED, PENDING, Webhook, WebhookEvent

if TYPE_CHECKING:
    from .gateway import Gateway

log = logging.getLogger("wattgate.webhooks")

LEAD_TASK = "webhooks"
PARALLEL = 16  # events claimed and posted at once (one per stream)
LEASE_MARGIN = 5.0  # seconds a claim outlasts the attempt's own timeout
PRUNE_EVERY = 3600.0  # seconds between deletions of events past webhooks.keep_days


class Deliverer:
    def __init__(self, gw: "Gateway") -> None:
        self.gw = gw
        self.config = gw.config
        self.session: aiohttp.ClientSession | None = None
        self._pruned_at: float | None = None

    async def start(self) -> None:
        timeout = aiohttp.ClientTimeout(total=self.config.webhooks_timeout)
        self.session = aiohttp.ClientSession(timeout=timeout,
                                             cookie_jar=aiohttp.DummyCookieJar())

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    async def loop(self) -> None:
        """Pass after pass while this process leads delivery; at once again after a
        pass that sent something (a burst drains without waiting a tick per event)."""
        while True:
            sent = 0
            try:
                if await self.gw.store.lead(LEAD_TASK):
                    sent = await self.run_once()
                    await self.prune()
            except Exception as e:  # the database is down: try again next tick
                log.warning("webhook delivery pass failed: %r", e)
            if not sent:
                await asyncio.sleep(self.config.webhooks_poll_interval)

    async def prune(self) -> int:
        """Once an hour: forget delivered and failed events past ``webhooks.keep_days``."""
        now = self.gw.clock()
        if self._pruned_at is not None and now - self._pruned_at < PRUNE_EVERY:
            return 0
        self._pruned_at = now
        pruned = await self.gw.store.prune_webhooks(
            before=now - self.config.webhooks_keep_days * 86400)
        if pruned:
            log.info("deleted %d webhook events older than %d days", pruned,
                     self.config.webhooks_keep_days)
        return pruned

    async def run_once(self) -> int:
        """One pass: claim what is due and post it; how many events were attempted."""
        now = self.gw.clock()
        # No more than are posted at once: every claimed event is on the wire before
        # its lease could end.
        events = await self.gw.store.claim_webhooks(
            now=now, lease_until=now + self.config.webhooks_timeout + LEASE_MARGIN,
            limit=PARALLEL)
        if not events:
            return 0
        hooks: dict[str, Webhook | None] = {}
        for app_id in {e.app_id for e in events}:
            hooks[app_id] = await self.gw.store.get_webhook(app_id)
        await asyncio.gather(*(self.deliver(e, hooks[e.app_id]) for e in events))
        return len(events)

    async def deliver(self, event: WebhookEvent, hook: Webhook | None) -> None:
        """One attempt of ``event``, and its outcome recorded."""
        code: int | None = None
        error: str | None = None
        if hook is None:
            error = "no endpoint (the app's webhook was cleared)"
        else:
            code, error = await self.post(event, hook)
        now = self.gw.clock()
        if code is not None and 200 <= code < 300:
            status, next_at = DELIVERED, now
        else:
            next_at = now + webhooks.retry_delay(event.attempts, self.config.webhooks_retry_first,
                                                 self.config.webhooks_retry_max)
            give_up = hook is None or next_at > event.since + self.config.webhooks_give_up
            status = FAILED if give_up else PENDING
        await self.gw.store.record_webhook(event.event_id, status=status, next_at=next_at,
                                           code=code, error=error, now=now)
        outcome = f"HTTP {code}" if code is not None else error
        level = logging.INFO if status == DELIVERED else logging.WARNING
        log.log(level, "webhook %s %s for app %s, attempt %d: %s (%s)", event.public_id,
                event.type, event.app_id, event.attempts, outcome, status)

    async def post(self, event: WebhookEvent, hook: Webhook) -> tuple[int | None, str | None]:
        """POST the event's body, signed now; (status code, None) or (None, why not)."""
        assert self.session is not None
        try:
            secret = self.gw.sealer.unseal(hook.sealed_secret, webhook_aad(hook.app_id))
        except Exception:
            return None, "the signing secret cannot be unsealed with this keys file"
        body = event.body.encode()
        headers = {
            "Content-Type": "application/json",
            "User-Agent": f"wattgate/{__version__} (webhooks)",
            webhooks.SIGNATURE_HEADER: webhooks.sign(secret, body, int(self.gw.clock())),
            "Wattgate-Event-Id": event.public_id,
            "Wattgate-Event-Type": event.type,
        }
        try:
            async with self.session.post(hook.url, data=body, headers=headers,
                                         allow_redirects=False) as response:
                return response.status, None
        except asyncio.TimeoutError:
            return None, f"no answer within {self.config.webhooks_timeout:g} s"
        except aiohttp.ClientConnectorError as e:
            # The reason only (errno's words): the address is the URL's, never logged.
            errno = e.os_error.errno
            return None, f"cannot connect ({os.strerror(errno) if errno else 'no route'})"
        except aiohttp.ClientError as e:
            return None, f"the receiver's answer failed ({type(e).__name__})"
