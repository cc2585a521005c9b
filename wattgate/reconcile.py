"""Reconciliation: provisional ledger rows corrected to the upstream's final cost.

A call that ended without a usage object (client gone past the drain bound,
upstream cut, error event, a hold swept after a crash) is recorded at its
worst-case estimate and marked provisional. The reconciler asks the upstream
for the truth (OpenRouter ``GET /generation?id=`` with the payer's own key)
and corrects the row and its aggregates in one transaction, idempotently.
404 means "not ready yet": the row is retried with exponential backoff until
``metering.reconcile_give_up`` seconds after the call, after which it stays
provisional at its estimate (``wattgate ledger check`` still passes; the
admin console and export show it as provisional).

It also sweeps budget holds older than ``metering.hold_ttl_seconds``.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from .gateway import Gateway
from .sealing import SealError, connection_aad, grant_aad
from .store import REVOKED, Connection, Usage
from .upstream import Upstream

log = logging.getLogger("wattgate.reconcile")

# How long a revocation may spend reconciling the connection's provisional rows
# before it erases the key that could ask about them.
REVOKE_RECONCILE_SECONDS = 2.0


@dataclass
class Report:
    checked: int = 0
    corrected: int = 0
    waiting: int = 0
    unreachable: int = 0  # no funding key left to ask with (connection revoked)


@dataclass
class Reconciler:
    gw: Gateway
    upstream: Upstream
    _next_try: dict[str, tuple[int, float]] = field(default_factory=dict)

    async def _funding_key(self, usage: Usage) -> str | None:
        store, sealer = self.gw.store, self.gw.sealer
        try:
            if usage.grant_id is not None:
                grant = await store.get_grant_by_id(usage.grant_id)
                if grant is not None and grant.sealed_key is not None:
                    return sealer.unseal(grant.sealed_key, grant_aad(grant.grant_id))
            if usage.connection_id is not None:
                conn = await store.get_connection_by_id(usage.connection_id)
                if conn is not None and conn.sealed_key is not None:
                    return sealer.unseal(conn.sealed_key, connection_aad(conn.connection_id))
        except SealError:
            return None
        return None

    async def run_once(self, *, force: bool = False, max_checks: int = 5000) -> Report:
        """One pass over every provisional row still worth asking about.

        Pages through the rows by id, so rows that cannot be corrected (a
        revoked connection has no key left to ask with) never hide newer
        ones; rows older than ``reconcile_give_up`` are not read at all.
        At most ``max_checks`` upstream look-ups per pass.
        """
        now = self.gw.clock()
        report = Report()
        since = now - self.gw.config.metering_reconcile_give_up
        seen: set[str] = set()
        after = 0
        while report.checked < max_checks:
            page = await self.gw.store.provisional_page(500, after=after, since=since)
            if not page:
                break
            after = page[-1][0]
            for _, usage, _period in page:
                seen.add(usage.generation_id)
                attempts, next_at = self._next_try.get(usage.generation_id, (0, 0.0))
                if not force and next_at > now:
                    report.waiting += 1
                    continue
                if report.checked >= max_checks:
                    break
                report.checked += 1
                key = await self._funding_key(usage)
                if key is None:
                    report.unreachable += 1
                    continue
                cost = await self._ask(usage, key, first=attempts == 0)
                if cost is None:
                    self._next_try[usage.generation_id] = (attempts + 1,
                                                           now + min(2.0 ** attempts, 300.0))
                    report.waiting += 1
                    continue
                if await self.gw.store.correct_usage(usage.generation_id, cost):
                    report.corrected += 1
                    self.gw.observer.reconciled(usage.app_id, cost)
                self._next_try.pop(usage.generation_id, None)
        if report.checked < max_checks:  # a full pass: forget rows no longer provisional
            for generation_id in list(self._next_try):
                if generation_id not in seen:
                    del self._next_try[generation_id]
        return report

    async def _ask(self, usage: Usage, key: str, *, first: bool) -> int | None:
        """The generation's final cost, or None; an unbelievable answer is logged once."""
        cost, problem = await self.upstream.generation_cost(usage.generation_id, key)
        if problem is not None and first:
            log.warning("GET /generation for %s: %s; the call stays provisional",
                        usage.generation_id, problem)
        return cost

    async def _correct(self, usage: Usage, key: str) -> bool:
        cost = await self._ask(usage, key, first=True)
        if cost is None or not await self.gw.store.correct_usage(usage.generation_id, cost):
            return False
        self.gw.observer.reconciled(usage.app_id, cost)
        return True

    async def before_erasing(self, connection: Connection, *,
                             seconds: float = REVOKE_RECONCILE_SECONDS) -> int:
        """Last chance for a connection's provisional rows: ask about them while its
        funding key still exists (one try each, at most ``seconds`` in all)."""
        if connection.sealed_key is None:
            return 0
        rows = await self.gw.store.provisional_of_connection(connection.connection_id)
        if not rows:
            return 0
        try:
            key = self.gw.sealer.unseal(connection.sealed_key,
                                        connection_aad(connection.connection_id))
        except SealError:
            return 0
        corrected = 0
        try:
            async with asyncio.timeout(seconds):
                for usage in rows:
                    corrected += await self._correct(usage, key)
        except TimeoutError:
            pass
        return corrected

    async def sweep(self) -> int:
        now = self.gw.clock()
        return await self.gw.store.sweep_holds(
            older_than=now - self.gw.config.metering_hold_ttl_seconds)

    async def loop(self) -> None:
        interval = self.gw.config.metering_reconcile_interval
        while True:
            await asyncio.sleep(interval)
            try:
                swept = await self.sweep()
                if swept:
                    log.warning("swept %d expired budget holds", swept)
                report = await self.run_once()
                if report.corrected:
                    log.info("reconciled %d provisional calls", report.corrected)
            except Exception:
                log.exception("reconciliation pass failed")


async def revoke(gw: Gateway, upstream: Upstream, connection: Connection) -> None:
    """Revoke a connection: no call may spend from the first write on; its funding key
    is erased after one bounded chance to reconcile its provisional rows (without
    the key, they would stay at their worst-case estimate for good)."""
    await gw.store.set_connection_state(connection.connection_id, REVOKED, now=gw.clock())
    if connection.sealed_key is None:
        return
    try:
        corrected = await Reconciler(gw, upstream).before_erasing(connection)
        if corrected:
            log.info("reconciled %d provisional calls before erasing a revoked key", corrected)
    finally:
        # Only this key, only if still revoked: a reconnection meanwhile stays whole.
        await gw.store.erase_revoked_key(connection.connection_id, connection.sealed_key)
