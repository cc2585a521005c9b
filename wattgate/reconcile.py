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

It also sweeps budget holds older than ``metering.hold_ttl_seconds``, and erases
the funding keys of revoked connections (``revoke``, a deleted app's) and of
typed-key grants expired or used up, once nothing of theirs can be corrected any
more.

This background work (``Reconciler.loop``) runs only in the process leading
``LEAD_TASK`` (``Ledger.lead``): asked every ``LEAD_CHECK_SECONDS`` at most, so
when the leader of a fleet dies another takes over within seconds, while each
pass itself keeps ``metering.reconcile_interval``.
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
# before it answers (rows still not final keep the key for the reconciler's passes).
REVOKE_RECONCILE_SECONDS = 2.0
# The background work's lead (``Ledger.lead``), and how often the loop asks for it.
LEAD_TASK = "reconciler"
LEAD_CHECK_SECONDS = 2.0


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
                if await self.gw.store.correct_usage(usage.generation_id, cost,
                                                     now=self.gw.clock()):
                    report.corrected += 1
                    self.gw.observer.reconciled(usage.app_id, cost)
                self._next_try.pop(usage.generation_id, None)
        if report.checked < max_checks:  # a full pass: forget rows no longer provisional
            for generation_id in list(self._next_try):
                if generation_id not in seen:
                    del self._next_try[generation_id]
        return report

    async def verify(self, limit: int) -> tuple[list[str], int, int]:
        """Compare the latest ``limit`` final rows with what the upstream says it billed.

        Answers (problems naming each row that disagrees, rows compared, rows
        that could not be asked about: no funding key left, or the upstream
        does not know the generation yet).
        """
        problems: list[str] = []
        compared = unknown = 0
        for usage_id, usage in await self.gw.store.recent_final_usage(limit):
            key = await self._funding_key(usage)
            billed = None if key is None else \
                await self._ask(usage, key, first=True)
            if billed is None:
                unknown += 1
                continue
            compared += 1
            if billed != usage.cost_nanos:
                problems.append(f"usage row {usage_id} ({usage.generation_id}): ledger "
                                f"{usage.cost_nanos} nano-USD but the upstream billed {billed}")
        return problems, compared, unknown

    async def _ask(self, usage: Usage, key: str, *, first: bool) -> int | None:
        """The generation's final cost, or None; an unbelievable answer is logged once."""
        cost, problem = await self.upstream.generation_cost(usage.generation_id, key)
        if problem is not None and first:
            log.warning("GET /generation for %s: %s; the call stays provisional",
                        usage.generation_id, problem)
        return cost

    async def _correct(self, usage: Usage, key: str) -> bool:
        cost = await self._ask(usage, key, first=True)
        if cost is None or not await self.gw.store.correct_usage(usage.generation_id, cost,
                                                                 now=self.gw.clock()):
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

    async def erase_revoked_keys(self, connection: Connection | None = None) -> int:
        """Erase the funding keys no call can use or correct any more: of revoked
        connections (one, or all of them) and, in a full pass, of typed-key grants
        expired or used up (``SQLiteStore.erase_revoked_keys`` states the rule).

        For one connection with no call in flight, its provisional calls get one
        bounded chance to be reconciled first (the passes of ``loop`` give the
        others theirs, with backoff).
        """
        now = self.gw.clock()
        since = now - self.gw.config.metering_reconcile_give_up
        if connection is None:
            return await self.gw.store.erase_revoked_keys(since=since, now=now)
        if await self.gw.store.held(connection.connection_id):
            return 0  # calls still running: a later pass erases it once they settled
        corrected = await self.before_erasing(connection)
        if corrected:
            log.info("reconciled %d provisional calls before erasing a revoked key", corrected)
        # Only if still revoked: a reconnection meanwhile keeps its new key.
        return await self.gw.store.erase_revoked_keys(since=since,
                                                      connection_id=connection.connection_id)

    async def sweep(self) -> int:
        """Holds past their TTL; on a shared ledger also the holds of processes that
        died (kill -9, a lost host), so they free within a pass, not at the next
        start of some process. (On SQLite every hold is this living process's.)"""
        now = self.gw.clock()
        swept = await self.gw.store.sweep_holds(
            older_than=now - self.gw.config.metering_hold_ttl_seconds, now=now)
        if self.gw.store.kind != "sqlite":
            swept += await self.gw.store.sweep_holds(now=now)
        return swept

    async def loop(self) -> None:
        """Pass after pass, each ``reconcile_interval`` after the last, while this
        process leads the work; the lead is asked again at every tick."""
        interval = self.gw.config.metering_reconcile_interval
        tick = min(LEAD_CHECK_SECONDS, interval)
        clock = asyncio.get_running_loop().time  # real time, whatever ``gw.clock`` says
        due = clock() + interval
        while True:
            await asyncio.sleep(tick)
            try:
                if not await self.gw.store.lead(LEAD_TASK):
                    continue
            except Exception as e:  # the database is down: ask again next tick
                log.warning("cannot tell whether this process leads background work: %r", e)
                continue
            if clock() < due:
                continue
            try:
                swept = await self.sweep()
                if swept:
                    log.warning("swept %d expired budget holds", swept)
                report = await self.run_once()
                if report.corrected:
                    log.info("reconciled %d provisional calls", report.corrected)
                if await self.erase_revoked_keys():
                    log.info("erased the funding keys of revoked connections and ended grants")
            except Exception:
                log.exception("reconciliation pass failed")
            due = clock() + interval


async def revoke(gw: Gateway, upstream: Upstream, connection: Connection) -> None:
    """Revoke a connection: from the first write on, no new call may spend from it (the
    user's own calls, and those of the grants it funds, which end with it).

    Calls already running when the user revoked finish and are billed exactly (each
    within the worst case the cap allowed at its admission). The funding key, which
    no new call can use, is erased once no call of the connection is in flight and
    none of its calls still awaits a final cost the upstream could give (see
    ``SQLiteStore.erase_revoked_keys``): here at once when nothing is pending, after
    one bounded chance to reconcile its provisional calls; otherwise by the
    reconciler's next passes (``Reconciler.erase_revoked_keys``).
    """
    await gw.store.set_connection_state(connection.connection_id, REVOKED, now=gw.clock())
    if connection.sealed_key is None:
        return
    await Reconciler(gw, upstream).erase_revoked_keys(connection)
