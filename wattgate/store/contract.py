"""The ledger contract: every operation wattgate's code performs on its store.

One ``typing.Protocol``, ``Ledger``, grouped by what the operations touch. A
backend (``sqlite.SQLiteStore``: embedded, one serving process;
``postgres.PostgresStore``: one database shared by a fleet of processes and
hosts) implements all of it and passes ``tests/test_store_contract.py``;
nothing outside ``store/`` imports a backend or a driver (``open_store`` picks
one from the config).

The rules of money are not here: the cap rule and the grant rule live in
``wattgate/budget.py``, and a backend only performs, atomically, the
check-and-hold those rules ask for. What a backend keeps in memory (cached
rows, holds not written yet) is an optimisation behind this contract, never a
second source of truth: every promise below holds across every process that
serves the same ledger.

Promises every backend keeps:

- Ids (apps aside, which are named) come from sequences that are never reused,
  whatever is deleted: a hold id, a connection id, a grant id or a usage row id
  means one thing for the ledger's whole life.
- A hold is a ledger entry: admitted atomically against its cap, then settled
  (a usage row and the period aggregate, one transaction, idempotent on the
  generation id) or released (no spend; a grant's request refunded when asked),
  exactly once, whichever of settle, release, sweep and reconcile comes first.
- Writes whose caller may be cancelled (``settle``, ``release``) happen anyway
  once called: what the caller awaits is shielded.
- A call belongs to the period it was admitted in (``Hold.period``): its row is
  dated there and its hold narrows only that period's cap.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Protocol, runtime_checkable

from .browse import DayCalls, GrantRow, LogFilter, LogLine, Page
from .records import App, AppPolicy, Connection, Grant, Hold, Usage, Webhook, WebhookEvent
from .reports import AppTotals, ConnectionSpend, DaySpend, PayerSpend, UsageLine

__all__ = ["AdminSessionRow", "Ledger", "StoreInUse"]

class StoreInUse(Exception):
    """Another gateway process already admits calls against this database (``claim``)."""


# (csrf token, expires_at) of a signed-in console session.
AdminSessionRow = tuple[str, float]


@runtime_checkable
class Ledger(Protocol):
    """What the gateway, the CLI and the reconciler may ask of a store."""

    #: "sqlite" or "postgresql": for logs, ``serve --workers`` and ``/readyz``.
    kind: str

    # ---- lifecycle ---------------------------------------------------------
    async def close(self) -> None:
        """Finish queued writes, then close every connection."""

    def close_now(self) -> None:
        """Close without awaiting: for a store opened but never used (setup failed)."""

    def claim(self) -> None:
        """Become a serving process of this ledger, or raise ``StoreInUse``.

        SQLite: the one serving process (an exclusive lock on the database
        file's identity). PostgreSQL: any number may serve; nothing to take.
        """

    async def ping(self) -> bool:
        """Whether the database answers now (health checks); never raises."""

    async def holds_apps(self) -> bool:
        """Whether any app was ever registered (the keys file then matters)."""

    async def bind_keys(self, fingerprint: str) -> None:
        """Record the fingerprint of the hash and JWT keys, or refuse other keys.

        The first process to start records it; every later one must present
        the same, or ``KeysMismatch`` (a ``ConfigError``) says so in one line:
        a host with another keys file must never mint or verify with it.
        """

    # ---- change notification and caches ------------------------------------
    def apps_version(self) -> object | None:
        """A value that changes whenever an app, a connection or a key may have
        changed, through any process or the CLI, within one second at most.

        Callers may keep what they derived from the store (a verified secret
        key) while this value is unchanged. None: freshness cannot be vouched
        for now (the listener is down, a write is in flight): read again.
        """

    # ---- apps --------------------------------------------------------------
    async def create_app(self, app_id: str, name: str, secret_hash: str,
                         origins: Iterable[str], *, now: float) -> App:
        """Insert an app with its origins, in one transaction."""

    async def get_app(self, app_id: str, *, deleted: bool = False) -> App | None:
        """The app; a deleted app's tombstone only when ``deleted``."""

    async def list_apps(self) -> list[App]:
        """Apps not deleted, oldest first."""

    async def set_app_secret(self, app_id: str, secret_hash: str, *,
                             keep_previous_until: float | None = None) -> bool:
        """Make ``secret_hash`` a live app's secret, in one transaction; False when no
        such live app.

        ``keep_previous_until`` None: the replaced secret stops at once, and so
        does a previous one still in its overlap. A time (epoch seconds): the
        replaced secret becomes the previous one, authenticating until then;
        a previous one it had (a second rotation during an overlap) is dropped:
        an app holds at most two secrets.
        """

    async def retire_previous_secret(self, app_id: str) -> bool:
        """End a live app's overlap now: its previous secret stops authenticating.
        False when no live app had one."""

    async def delete_app(self, app_id: str, *, now: float) -> bool:
        """In one transaction: tombstone the app (both secrets and origins gone), revoke
        its connections, end its grants. Its rows and ids stay its own forever;
        its in-flight calls settle to its own connections and grants."""

    async def set_origins(self, app_id: str, add: Iterable[str] = (),
                          remove: Iterable[str] = ()) -> bool:
        """Add and remove origins of a live app in one transaction."""

    async def origin_registered(self, origin: str) -> bool:
        """Whether any live app registered this origin (CORS preflights)."""

    async def set_app_policy(self, app_id: str, policy: AppPolicy) -> App | None:
        """Replace a live app's policy (``AppPolicy()`` clears it) in one transaction;
        the app as now stored, or None when no such live app. Moves ``apps_version``
        on every process, like any app change: the next call anywhere is judged by it."""

    # ---- connections -------------------------------------------------------
    async def get_connection(self, app_id: str, app_user_id: str) -> Connection | None:
        """The (app, user) connection as committed (a cached copy only while
        ``apps_version`` vouches for it)."""

    async def get_connection_by_id(self, connection_id: int) -> Connection | None: ...

    async def connections_for_browser(self, browser_hash: str) -> list[Connection]: ...

    async def connections_for_app(self, app_id: str) -> list[Connection]: ...

    async def save_connection(self, app_id: str, app_user_id: str, *, state: str,
                              cap_nanos: int | None, sealed_key: str | None,
                              browser_hash: str | None, now: float,
                              seal: Callable[[int], str] | None = None) -> Connection:
        """Upsert the (app, user) connection in one transaction; ``seal`` is
        called with the connection id inside it and its result stored."""

    async def update_cap(self, connection_id: int, cap_nanos: int | None, *,
                         expected_key: str | None, expected_cap: int | None,
                         now: float) -> Connection | None:
        """Change the cap only if still active with ``expected_key`` and still at
        ``expected_cap`` (the cap the change was judged against: a lowering, a raise
        or a policy bound decided on one cap is never written over another); else None."""

    async def set_connection_state(self, connection_id: int, state: str, *,
                                   now: float) -> None:
        """Move to ``state`` (revoked stays revoked); revoking ends, in the same
        transaction, every grant the connection funds."""

    async def all_sealed_keys(self) -> list[tuple[str, int | str, str]]:
        """(table, row id, sealed value) of everything sealed under a master key: the
        funding keys (``connections``, ``grants``: integer ids) and the apps' webhook
        signing secrets (``apps``: the app id), so ``wattgate keys rotate`` re-seals all."""

    async def replace_sealed_keys(self, changes: list[tuple[str, int | str, str, str]]) -> int:
        """Swap (table, id, old, new) in one transaction, only where still old."""

    # ---- holds and debits --------------------------------------------------
    async def period_spent(self, connection_id: int, period: str) -> int:
        """Committed spend of a connection in a period."""

    async def held(self, connection_id: int, period: str | None = None) -> int:
        """Budget held by calls in flight of this connection, on every process,
        admitted in ``period`` (None: in any)."""

    async def admit(self, connection_id: int, period: str, amount_nanos: int, *,
                    now: float, expires_at: float) -> Hold:
        """Atomically, against every process: apply ``budget.check_connection``
        and ``budget.check_cap`` (spent + held + amount ≤ cap) and hold
        ``amount_nanos``; no two admissions can both pass on the same room."""

    def note_generation(self, hold: Hold, generation_id: str, app_id: str,
                        model: str) -> Awaitable[None] | None:
        """Name the generation a hold pays for, durably, before any body byte.

        After a crash a named hold becomes a provisional row to reconcile.
        None when the hold is no longer held (settled or released already).
        """

    def settle(self, hold: Hold | None, usage: Usage, period: str) -> Awaitable[bool]:
        """Drop the hold and write the usage row and the period aggregates, in one
        transaction. Idempotent on ``usage.generation_id``: a repeat answers
        False and counts nothing, except that a final figure replaces a
        provisional one (the aggregates move by the difference). Shielded."""

    def release(self, hold: Hold, *, refund_request: bool = False,
                record: Usage | None = None) -> Awaitable[None]:
        """Drop a hold without spend (the call never reached the model); a
        grant's request is given back when ``refund_request``. With ``record``
        (a $0 ``UPSTREAM_REFUSED`` row: the upstream refused the call before any
        byte), that row is written in the same transaction. Shielded."""

    async def sweep_holds(self, *, older_than: float | None = None,
                          now: float | None = None) -> int:
        """Holds no living process will settle: those created before
        ``older_than``, and with None every hold whose process is gone. A hold
        whose generation was named becomes a provisional row at its estimate;
        one never named is released (a grant's request given back). What the
        estimate tells (a line of the cap crossed, a grant used up) is written in
        the same transaction, dated ``now`` (None: the call's own time)."""

    async def open_holds(self) -> int:
        """Holds of calls in flight, on every process."""

    # ---- grants ------------------------------------------------------------
    async def create_grant(self, app_id: str, token_hash: str, requests: int,
                           max_nanos: int | None, *, sealed_key: str | None,
                           connection_id: int | None, now: float, expires_at: float,
                           seal: Callable[[int], str] | None = None,
                           approved_by: str | None = None) -> Grant:
        """A grant funded by a typed key (``seal``) or by ``connection_id``, which
        must still be active and approved by ``approved_by`` in the same
        transaction (else ``ConsentRequired``)."""

    async def get_grant(self, token_hash: str) -> Grant | None: ...

    async def get_grant_by_id(self, grant_id: int) -> Grant | None: ...

    async def grants_for_app(self, app_id: str) -> list[Grant]: ...

    async def admit_grant(self, token_hash: str, app_id: str, period: str, amount_nanos: int,
                          *, now: float, expires_at: float) -> tuple[Grant, Hold]:
        """Atomically, against every process: ``budget.check_grant``, then for a
        connection-funded grant ``budget.check_connection`` and
        ``budget.check_cap`` on the connection; use one request and hold."""

    # ---- webhooks (the outbox, store/outbox.py) ----------------------------
    # Events are written by the changes that cause them, in their transaction:
    # save_connection (connection.created, .cap_changed), update_cap
    # (.cap_changed), set_connection_state (.revoked, funding.invalid) and settle
    # (budget.threshold, grant.exhausted: only when a line is crossed); none for an
    # app with no endpoint.
    async def set_webhook(self, app_id: str, url: str | None,
                          sealed_secret: str | None) -> bool:
        """Set (or with None, clear) a live app's endpoint; False when no such app."""

    async def get_webhook(self, app_id: str) -> Webhook | None: ...

    async def claim_webhooks(self, *, now: float, lease_until: float,
                             limit: int = 100) -> list[WebhookEvent]:
        """Atomically, against every process: the due pending events that head their
        stream (no earlier event of it pending), each leased until ``lease_until``
        and its attempt counted, so no other claim takes it meanwhile."""

    async def record_webhook(self, event_id: int, *, status: str, next_at: float,
                             code: int | None, error: str | None, now: float) -> None:
        """An attempt's outcome: delivered, failed (given up) or pending until ``next_at``."""

    async def recent_webhooks(self, app_id: str, limit: int = 50) -> list[WebhookEvent]:
        """The app's latest events, newest first."""

    async def resend_webhook(self, app_id: str, public_id: str, *, now: float) -> bool:
        """Deliver a delivered or failed event again (same id and body), from now;
        False when the app has no such event or it is pending already."""

    async def prune_webhooks(self, *, before: float) -> int:
        """Delete delivered and failed events created before ``before``; how many."""

    # ---- presence (the end user's browser) ---------------------------------
    async def add_presence(self, browser_hash: str, *, now: float) -> None: ...

    async def has_presence(self, browser_hash: str) -> bool: ...

    async def rotate_presence(self, old_hashes: Iterable[str], new_hash: str, *,
                              now: float) -> None:
        """Make ``new_hash`` the browser's proof, old ones proving nothing, at once."""

    # ---- reconciliation ----------------------------------------------------
    async def correct_usage(self, generation_id: str, cost_nanos: int, *,
                            now: float | None = None) -> bool:
        """Make a provisional row final at the upstream's figure (aggregates too), and
        write what that tells in the same transaction, as a settle would (a line of
        the cap crossed, a grant used up), dated ``now`` (None: the call's own time)."""

    async def provisional_usage(self, limit: int = 100, *, after: int = 0,
                                since: float | None = None) -> list[tuple[Usage, str]]: ...

    async def provisional_page(self, limit: int, *, after: int = 0,
                               since: float | None = None) -> list[tuple[int, Usage, str]]:
        """(usage id, row, period) of provisional rows naming a real generation,
        keyset-paged by usage id."""

    async def recent_final_usage(self, limit: int) -> list[tuple[int, Usage]]: ...

    async def provisional_of_connection(self, connection_id: int,
                                        limit: int = 100) -> list[Usage]: ...

    async def provisional_count(self) -> int: ...

    async def erase_revoked_keys(self, *, since: float, now: float | None = None,
                                 connection_id: int | None = None) -> int:
        """Erase funding keys no call can use or need any more (the rule is in
        ``SQLiteStore.erase_revoked_keys``'s docstring), on every process's view."""

    async def check(self, *, now: float, hold_ttl: float) -> list[str]:
        """Every way the ledger disagrees with itself, one sentence per row."""

    # ---- reports -----------------------------------------------------------
    async def recent_usage(self, connection_id: int, limit: int = 20) -> list[Usage]:
        """The connection's latest metered calls (no ``UPSTREAM_REFUSED`` row), newest first."""

    async def daily_spend(self, since: float, until: float, *,
                          app_id: str | None = None) -> list[DaySpend]: ...

    async def top_payers(self, since: float, until: float, *, app_id: str | None = None,
                         limit: int = 10) -> list[PayerSpend]: ...

    async def connection_spend(self, app_id: str, period: str) -> list[ConnectionSpend]: ...

    async def app_totals(self, since: float, until: float) -> dict[str, AppTotals]: ...

    def usage_lines(self, app_id: str, since: float | None = None,
                    until: float | None = None, *,
                    page: int = 5000) -> AsyncIterator[list[UsageLine]]: ...

    # ---- the console's pages (store/browse.py, pg_browse.py) ---------------
    async def connections_page(self, app_id: str, period: str, *, search: str = "",
                               state: str | None = None, offset: int = 0,
                               limit: int = 50) -> Page[ConnectionSpend]:
        """One page of an app's connections, biggest spender in ``period`` first (then by
        user id), filtered by a substring of the user id and a state, with the total."""

    async def grants_page(self, app_id: str, *, now: float, search: str = "",
                          state: str | None = None, offset: int = 0,
                          limit: int = 50) -> Page[GrantRow]:
        """One page of an app's grants, newest first, filtered by a substring of the
        funding user's id and a state (``budget.grant_state`` at ``now``), with the total."""

    async def request_log(self, f: LogFilter, *, limit: int = 50) -> list[LogLine]:
        """Settled calls of an app (or one user of it), newest first, after the keyset
        ``f.before``, filtered by model, status and a time range."""

    async def daily_calls(self, app_id: str | None, since: float, until: float, *,
                          app_user_id: str | None = None) -> list[DayCalls]:
        """Per UTC day in [since, until): calls, errors, tokens and total latency, of one
        app (or one user of it), or of every app not deleted when ``app_id`` is None."""

    # ---- fleet-wide state --------------------------------------------------
    async def rate_take(self, limiter: str, key: str, per_minute: int, *, now: float,
                        take: bool = True) -> int | None:
        """One token bucket per (limiter, key), shared by every process.

        None: allowed (a token taken unless ``take`` is False, a check only).
        Otherwise the whole seconds until a token is back (the request is
        refused; nothing taken). SQLite: in this process's memory.
        """

    async def open_admin_session(self, session_hash: str, csrf: str, *,
                                 expires_at: float, now: float) -> None:
        """Store a signed-in console session (by its cookie's hash), dropping expired ones."""

    async def find_admin_session(self, session_hash: str, *,
                                 now: float) -> AdminSessionRow | None: ...

    async def close_admin_session(self, session_hash: str) -> None: ...

    async def lead(self, task: str) -> bool:
        """Whether this process runs background ``task`` now, taking the lead
        when no living process has it. Exactly one process of a fleet leads a
        task at a time; when it dies another takes over within seconds."""
