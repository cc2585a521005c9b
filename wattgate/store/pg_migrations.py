"""Ordered schema migrations of the PostgreSQL ledger; ``wattgate_schema`` records how many ran.

The same scheme as ``migrations.py`` (SQLite): each migration is a named
function of one connection, run in its own transaction; append new ones,
never edit one that has shipped; a database made by a newer wattgate is
refused with ``SchemaError``. A fleet's processes start together, so every
migration transaction first takes a transaction-level advisory lock and reads
the version again under it: one process migrates, the others wait, then find
nothing left to do.

Migration 1 is the SQLite schema as migration 5 left it (apps with
tombstones, their origins, connections, usage, period aggregates, holds,
grants, presence) with money in BIGINT nano-dollars and ids from identity
sequences (never reused, whatever is deleted), plus what a fleet shares:
holds name their owning process, token buckets of the rate limits, console
sessions, and a meta row for the keys fingerprint. Timestamps are epoch
seconds (DOUBLE PRECISION), as in SQLite, so the code above the store is
the same for both.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable

from .migrations import SchemaError

__all__ = ["MIGRATIONS", "MIGRATION_LOCK", "SchemaError", "migrate", "schema_version"]

# Two-key advisory lock space of wattgate ("Watg"); key 0 serialises migrations.
LOCK_SPACE = 0x57617467
MIGRATION_LOCK = 0


async def m001_initial(con: Any) -> None:
    await con.execute("""
    CREATE TABLE apps (
        app_id      TEXT PRIMARY KEY,
        name        TEXT NOT NULL,
        secret_hash TEXT NOT NULL,
        created_at  DOUBLE PRECISION NOT NULL,
        deleted_at  DOUBLE PRECISION
    );
    CREATE TABLE app_origins (
        app_id TEXT NOT NULL REFERENCES apps(app_id) ON DELETE CASCADE,
        origin TEXT NOT NULL,
        PRIMARY KEY (app_id, origin)
    );
    CREATE INDEX app_origins_by_origin ON app_origins (origin);
    CREATE TABLE connections (
        connection_id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        app_id        TEXT NOT NULL REFERENCES apps(app_id) ON DELETE CASCADE,
        app_user_id   TEXT NOT NULL,
        state         TEXT NOT NULL,
        cap_nanos     BIGINT,
        sealed_key    TEXT,
        browser_hash  TEXT,
        created_at    DOUBLE PRECISION NOT NULL,
        updated_at    DOUBLE PRECISION NOT NULL,
        UNIQUE (app_id, app_user_id)
    );
    CREATE INDEX connections_by_browser ON connections (browser_hash);
    CREATE TABLE usage (
        usage_id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        generation_id     TEXT NOT NULL UNIQUE,
        app_id            TEXT NOT NULL,
        connection_id     BIGINT,
        grant_id          BIGINT,
        period            TEXT NOT NULL,
        model             TEXT NOT NULL,
        prompt_tokens     BIGINT NOT NULL,
        completion_tokens BIGINT NOT NULL,
        cost_nanos        BIGINT NOT NULL,
        provisional       BOOLEAN NOT NULL DEFAULT FALSE,
        status            TEXT NOT NULL DEFAULT 'ok',
        latency_ms        BIGINT NOT NULL DEFAULT 0,
        created_at        DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX usage_by_connection ON usage (connection_id, created_at);
    CREATE INDEX usage_by_app ON usage (app_id, created_at);
    CREATE INDEX usage_by_grant ON usage (grant_id) WHERE grant_id IS NOT NULL;
    CREATE INDEX usage_provisional ON usage (usage_id) WHERE provisional;
    CREATE TABLE periods (
        connection_id BIGINT NOT NULL,
        period        TEXT NOT NULL,
        spent_nanos   BIGINT NOT NULL,
        PRIMARY KEY (connection_id, period)
    );
    CREATE TABLE grants (
        grant_id      BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        app_id        TEXT NOT NULL REFERENCES apps(app_id) ON DELETE CASCADE,
        token_hash    TEXT NOT NULL UNIQUE,
        requests      BIGINT NOT NULL,
        used          BIGINT NOT NULL DEFAULT 0,
        max_nanos     BIGINT,
        spent_nanos   BIGINT NOT NULL DEFAULT 0,
        held_nanos    BIGINT NOT NULL DEFAULT 0,
        sealed_key    TEXT,
        connection_id BIGINT,
        created_at    DOUBLE PRECISION NOT NULL,
        expires_at    DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX grants_by_app ON grants (app_id, created_at);
    CREATE INDEX grants_by_connection ON grants (connection_id);
    CREATE TABLE holds (
        hold_id       BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        owner         BIGINT NOT NULL,
        connection_id BIGINT,
        grant_id      BIGINT,
        app_id        TEXT,
        period        TEXT NOT NULL,
        amount_nanos  BIGINT NOT NULL,
        generation_id TEXT,
        model         TEXT,
        created_at    DOUBLE PRECISION NOT NULL,
        expires_at    DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX holds_by_connection ON holds (connection_id, period);
    CREATE INDEX holds_by_grant ON holds (grant_id);
    CREATE INDEX holds_by_owner ON holds (owner);
    CREATE TABLE presence (
        browser_hash TEXT PRIMARY KEY,
        created_at   DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE rate_buckets (
        limiter    TEXT NOT NULL,
        key        TEXT NOT NULL,
        tokens     DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL,
        allowed    BOOLEAN NOT NULL,
        PRIMARY KEY (limiter, key)
    );
    CREATE TABLE admin_sessions (
        session_hash TEXT PRIMARY KEY,
        csrf         TEXT NOT NULL,
        expires_at   DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE meta (
        name  TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    """)


async def m002_owners(con: Any) -> None:
    # Each living process's heartbeat (server clock, epoch seconds): a sweep takes a
    # process's holds only once its owner lock is free AND it has not been seen for
    # a grace period, so a lifeline reconnecting is not taken for a death.
    await con.execute("""
    CREATE TABLE owners (
        owner     BIGINT PRIMARY KEY,
        last_seen DOUBLE PRECISION NOT NULL
    );
    """)


# Migration 3's wattgate_settle, kept as written: migration 4 derives the outbox's
# version from it (``_settle_with_outbox``), so the two cannot drift apart.
_SETTLE_V3 = """
    CREATE FUNCTION wattgate_settle(
        p_hold BIGINT[], p_generation TEXT[], p_app TEXT[], p_connection BIGINT[],
        p_grant BIGINT[], p_period TEXT[], p_model TEXT[], p_prompt BIGINT[],
        p_completion BIGINT[], p_cost BIGINT[], p_provisional BOOLEAN[], p_status TEXT[],
        p_latency BIGINT[], p_created DOUBLE PRECISION[])
    RETURNS BOOLEAN[]
    LANGUAGE plpgsql VOLATILE AS $fn$
    DECLARE
        n INTEGER := COALESCE(array_length(p_generation, 1), 0);
        counted BOOLEAN[] := array_fill(FALSE, ARRAY[n]);
        d_grant BIGINT[] := '{}';
        d_connection BIGINT[] := '{}';
        d_period TEXT[] := '{}';
        d_nanos BIGINT[] := '{}';
        r RECORD;
        v_id BIGINT;
        i INTEGER;
    BEGIN
        -- 1. holds, in id order; what they held of a grant given back.
        FOR r IN
            WITH gone AS (
                DELETE FROM holds h WHERE h.hold_id IN (
                    SELECT h2.hold_id FROM holds h2 WHERE h2.hold_id = ANY(p_hold)
                     ORDER BY h2.hold_id FOR UPDATE)
                RETURNING h.grant_id, h.amount_nanos)
            SELECT g.grant_id, SUM(g.amount_nanos)::BIGINT AS nanos FROM gone g
             WHERE g.grant_id IS NOT NULL GROUP BY g.grant_id ORDER BY g.grant_id
        LOOP
            UPDATE grants SET held_nanos = held_nanos - r.nanos WHERE grant_id = r.grant_id;
        END LOOP;
        -- 2. the usage rows, each call's own answer.
        FOR i IN 1..n LOOP
            INSERT INTO usage (generation_id, app_id, connection_id, grant_id, period, model,
                               prompt_tokens, completion_tokens, cost_nanos, provisional,
                               status, latency_ms, created_at)
            VALUES (p_generation[i], p_app[i], p_connection[i], p_grant[i], p_period[i],
                    p_model[i], p_prompt[i], p_completion[i], p_cost[i], p_provisional[i],
                    p_status[i], p_latency[i], p_created[i])
            ON CONFLICT (generation_id) DO NOTHING RETURNING usage_id INTO v_id;
            IF v_id IS NOT NULL THEN
                counted[i] := TRUE;
                d_grant := d_grant || p_grant[i];
                d_connection := d_connection || p_connection[i];
                d_period := d_period || p_period[i];
                d_nanos := d_nanos || p_cost[i];
            ELSIF NOT p_provisional[i] THEN
                -- Recorded already: a final figure replaces a provisional one.
                SELECT u.connection_id, u.grant_id, u.period, u.cost_nanos INTO r
                  FROM usage u WHERE u.generation_id = p_generation[i] AND u.provisional
                   FOR UPDATE;
                IF FOUND THEN
                    UPDATE usage SET cost_nanos = p_cost[i], provisional = FALSE,
                           prompt_tokens = p_prompt[i], completion_tokens = p_completion[i]
                     WHERE generation_id = p_generation[i];
                    counted[i] := TRUE;
                    d_grant := d_grant || r.grant_id;
                    d_connection := d_connection || r.connection_id;
                    d_period := d_period || r.period;
                    d_nanos := d_nanos || (p_cost[i] - r.cost_nanos);
                END IF;
            END IF;
        END LOOP;
        -- 3. the aggregates: grants before periods, each in one order.
        FOR r IN SELECT d.g, SUM(d.nanos)::BIGINT AS nanos
                   FROM unnest(d_grant, d_nanos) AS d(g, nanos)
                  WHERE d.g IS NOT NULL GROUP BY d.g ORDER BY d.g
        LOOP
            UPDATE grants SET spent_nanos = spent_nanos + r.nanos WHERE grant_id = r.g;
        END LOOP;
        FOR r IN SELECT d.c, d.p, SUM(d.nanos)::BIGINT AS nanos
                   FROM unnest(d_connection, d_period, d_nanos) AS d(c, p, nanos)
                  WHERE d.c IS NOT NULL GROUP BY d.c, d.p ORDER BY d.c, d.p
        LOOP
            INSERT INTO periods (connection_id, period, spent_nanos) VALUES (r.c, r.p, r.nanos)
            ON CONFLICT (connection_id, period) DO UPDATE
               SET spent_nanos = periods.spent_nanos + EXCLUDED.spent_nanos;
        END LOOP;
        RETURN counted;
    END
    $fn$;
"""


async def m003_hot_path_functions(con: Any) -> None:
    """The metered path's writes as one round trip each, many calls' at once
    (group commit, ``pg_batch``; see ``postgres.py``).

    ``wattgate_admit`` locks the connection row, then reads the period's spent
    and held in one statement of their own: inside a VOLATILE plpgsql function
    each statement takes a new snapshot, so it sees every hold committed
    before the lock was granted (one statement that waited for the lock would
    not), and both figures come from that one snapshot (a settle committing
    between two reads would be in neither: the cap passed by its amount). It evaluates the cap rule of ``budget.cap_refusal`` (spent + held +
    amount <= cap) and inserts the hold only when it passes, returning the
    numbers either way: Python words any refusal from them with ``budget``.

    ``wattgate_admit_many`` runs ``wattgate_admit`` for a batch in one
    transaction, connection rows locked in id order; ``wattgate_rate_take`` is
    the token bucket's UPSERT for a batch of takes, buckets locked in key order.

    ``wattgate_settle`` settles any number of calls in one transaction
    (group commit): every hold dropped first (ordered by id), then each usage
    row inserted, idempotent on the generation id (a final figure replacing a
    provisional one; a final row never counted twice), then the aggregates
    moved in one order, grants by id before periods by (connection, period),
    so two batches never wait on each other in a cycle. Returns one boolean
    per call: whether it was counted.
    """
    await con.execute("""
    CREATE FUNCTION wattgate_admit(p_connection BIGINT, p_period TEXT, p_amount BIGINT,
                                   p_owner BIGINT, p_now DOUBLE PRECISION,
                                   p_expires DOUBLE PRECISION,
                                   OUT known BOOLEAN, OUT state TEXT, OUT sealed_key TEXT,
                                   OUT cap_nanos BIGINT, OUT spent NUMERIC, OUT held NUMERIC,
                                   OUT hold_id BIGINT, OUT app_id TEXT)
    LANGUAGE plpgsql VOLATILE AS $fn$
    BEGIN
        SELECT c.app_id, c.state, c.sealed_key, c.cap_nanos
          INTO app_id, state, sealed_key, cap_nanos
          FROM connections c WHERE c.connection_id = p_connection FOR UPDATE;
        known := FOUND;
        spent := 0;
        held := 0;
        IF NOT known OR state IS DISTINCT FROM 'active' OR sealed_key IS NULL THEN
            RETURN;
        END IF;
        IF cap_nanos IS NOT NULL THEN
            -- A new statement, a new snapshot: every hold committed before the lock.
            -- Spent and held in ONE statement, one snapshot: a settle (its hold
            -- dropped, its spend moved, one transaction) committing between two
            -- reads would be missing from both, and the cap passed by its amount.
            SELECT (SELECT COALESCE(SUM(p.spent_nanos), 0) FROM periods p
                     WHERE p.connection_id = p_connection AND p.period = p_period),
                   (SELECT COALESCE(SUM(h.amount_nanos), 0) FROM holds h
                     WHERE h.connection_id = p_connection AND h.period = p_period)
              INTO spent, held;
            -- budget.cap_refusal's inequality, the same numbers.
            IF NOT (spent + held + p_amount <= cap_nanos) THEN
                RETURN;
            END IF;
        END IF;
        INSERT INTO holds (owner, connection_id, grant_id, app_id, period, amount_nanos,
                           created_at, expires_at)
        VALUES (p_owner, p_connection, NULL, app_id, p_period, p_amount, p_now, p_expires)
        RETURNING holds.hold_id INTO hold_id;
    END
    $fn$;

    CREATE FUNCTION wattgate_admit_many(p_connection BIGINT[], p_period TEXT[],
                                        p_amount BIGINT[], p_owner BIGINT,
                                        p_now DOUBLE PRECISION[], p_expires DOUBLE PRECISION[])
    RETURNS TABLE (i BIGINT, known BOOLEAN, state TEXT, sealed_key TEXT, cap_nanos BIGINT,
                   spent NUMERIC, held NUMERIC, hold_id BIGINT, app_id TEXT)
    LANGUAGE plpgsql VOLATILE AS $fn$
    DECLARE
        r RECORD;
    BEGIN
        -- Connection rows locked in id order: two batches never wait in a cycle.
        -- Each admission sees the holds of those before it (the same transaction).
        FOR r IN SELECT u.c, u.p, u.a, u.n, u.e, u.k
                   FROM unnest(p_connection, p_period, p_amount, p_now, p_expires)
                        WITH ORDINALITY AS u(c, p, a, n, e, k)
                  ORDER BY u.c, u.k
        LOOP
            i := r.k;
            SELECT * INTO known, state, sealed_key, cap_nanos, spent, held, hold_id, app_id
              FROM wattgate_admit(r.c, r.p, r.a, p_owner, r.n, r.e);
            RETURN NEXT;
        END LOOP;
    END
    $fn$;

    CREATE FUNCTION wattgate_rate_take(p_limiter TEXT[], p_key TEXT[],
                                       p_capacity DOUBLE PRECISION[],
                                       p_now DOUBLE PRECISION[], p_take DOUBLE PRECISION[])
    RETURNS TABLE (i BIGINT, tokens DOUBLE PRECISION, allowed BOOLEAN)
    LANGUAGE plpgsql VOLATILE AS $fn$
    DECLARE
        r RECORD;
    BEGIN
        -- The token bucket of ratelimit.RateLimiter, one take after another, buckets
        -- locked in key order (a key's takes in the order they were asked).
        FOR r IN SELECT u.l, u.key, u.cap, u.n, u.t, u.k
                   FROM unnest(p_limiter, p_key, p_capacity, p_now, p_take)
                        WITH ORDINALITY AS u(l, key, cap, n, t, k)
                  ORDER BY u.l, u.key, u.k
        LOOP
            i := r.k;
            INSERT INTO rate_buckets AS b (limiter, key, tokens, updated_at, allowed)
            VALUES (r.l, r.key, CASE WHEN r.cap >= 1 THEN r.cap - r.t ELSE r.cap END, r.n,
                    r.cap >= 1)
            ON CONFLICT (limiter, key) DO UPDATE SET
                tokens = LEAST(r.cap, b.tokens + GREATEST(0, r.n - b.updated_at) * r.cap / 60.0)
                         - CASE WHEN LEAST(r.cap, b.tokens + GREATEST(0, r.n - b.updated_at)
                                           * r.cap / 60.0) >= 1
                                THEN r.t ELSE 0 END,
                updated_at = GREATEST(b.updated_at, r.n),
                allowed = LEAST(r.cap, b.tokens + GREATEST(0, r.n - b.updated_at)
                                * r.cap / 60.0) >= 1
            RETURNING b.tokens, b.allowed INTO tokens, allowed;
            RETURN NEXT;
        END LOOP;
    END
    $fn$;

    """ + _SETTLE_V3)


async def m004_webhooks(con: Any) -> None:
    """The SQLite ledger's m007: an app's webhook endpoint, the outbox of its events;
    and ``wattgate_settle`` again, now writing the settle's events in its own
    transaction (no round trip more): after a period's aggregate moved up past
    80 % or 100 % of the cap, ``budget.threshold`` (once per connection, period
    and percentage: the dedupe key); after a grant's, ``grant.exhausted`` when its
    requests are used with nothing held or its amount spent (once per grant).
    A batch's calls of one connection and period are one move of the aggregate, so
    a batch crossing 80 % tells it once. The bodies are ``webhooks.body_of``'s,
    byte for byte: keys in its order, no spaces, amounts as exact decimal strings
    of dollars (``wattgate_usd``: a nano-dollar is 0.000000001, multiplied, never
    divided, so no digit is rounded away), ``created`` the call's whole seconds.
    The lines (80, 100) are ``webhooks.THRESHOLDS``; the arithmetic is in NUMERIC,
    so a cap near the ledger's largest amount cannot overflow ``* 100``."""
    await con.execute("""
    ALTER TABLE apps ADD COLUMN webhook_url TEXT;
    ALTER TABLE apps ADD COLUMN webhook_secret TEXT;
    CREATE TABLE webhook_events (
        event_id     BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        public_id    TEXT NOT NULL UNIQUE,
        app_id       TEXT NOT NULL,
        stream       TEXT NOT NULL,
        type         TEXT NOT NULL,
        dedupe       TEXT UNIQUE,
        body         TEXT NOT NULL,
        created_at   DOUBLE PRECISION NOT NULL,
        status       TEXT NOT NULL DEFAULT 'pending',
        attempts     INTEGER NOT NULL DEFAULT 0,
        next_at      DOUBLE PRECISION NOT NULL,
        since        DOUBLE PRECISION NOT NULL,
        last_code    INTEGER,
        last_error   TEXT,
        delivered_at DOUBLE PRECISION
    );
    CREATE INDEX webhook_events_due ON webhook_events (status, next_at);
    CREATE INDEX webhook_events_stream ON webhook_events (stream, event_id);
    CREATE INDEX webhook_events_app ON webhook_events (app_id, event_id);
    """ + _OUTBOX_FUNCTIONS + _settle_with_outbox())


_OUTBOX_FUNCTIONS = """
    CREATE FUNCTION wattgate_json(p TEXT) RETURNS TEXT LANGUAGE sql IMMUTABLE AS
    $fn$ SELECT COALESCE(to_json(p)::text, 'null') $fn$;

    CREATE FUNCTION wattgate_usd(p_nanos BIGINT) RETURNS TEXT LANGUAGE sql IMMUTABLE AS
    $fn$ SELECT wattgate_json(trim_scale(p_nanos::numeric * 0.000000001)::text) $fn$;

    -- outbox.emit's INSERT: nothing when the app has no endpoint; a dedupe key seen
    -- before (or an id drawn twice) writes nothing.
    CREATE FUNCTION wattgate_webhook_emit(p_app TEXT, p_stream TEXT, p_type TEXT,
                                          p_dedupe TEXT, p_created DOUBLE PRECISION,
                                          p_data TEXT)
    RETURNS VOID LANGUAGE plpgsql VOLATILE AS $fn$
    DECLARE
        h TEXT := replace(gen_random_uuid()::text, '-', '');
        -- webhooks.new_event_id: 24 random hex digits (the UUID's version digit left out)
        v_public TEXT := 'evt_' || substr(h, 1, 12) || substr(h, 14, 3) || substr(h, 18, 9);
    BEGIN
        INSERT INTO webhook_events (public_id, app_id, stream, type, dedupe, body,
                                    created_at, next_at, since)
        SELECT v_public, a.app_id, p_stream, p_type, p_dedupe,
               '{"id":' || wattgate_json(v_public) || ',"type":' || wattgate_json(p_type)
               || ',"created":' || trunc(p_created)::bigint || ',"data":{"appId":'
               || wattgate_json(a.app_id) || ',' || p_data || '}}',
               p_created, p_created, p_created
          FROM apps a
         WHERE a.app_id = p_app AND a.webhook_url IS NOT NULL AND a.deleted_at IS NULL
        ON CONFLICT DO NOTHING;
    END
    $fn$;

    CREATE FUNCTION wattgate_thresholds(p_connection BIGINT, p_period TEXT, p_cap BIGINT,
                                        p_before BIGINT, p_after BIGINT,
                                        p_created DOUBLE PRECISION)
    RETURNS VOID LANGUAGE plpgsql VOLATILE AS $fn$
    DECLARE
        v_app TEXT;
        v_user TEXT;
        pct INTEGER;
    BEGIN
        SELECT c.app_id, c.app_user_id INTO v_app, v_user FROM connections c
         WHERE c.connection_id = p_connection;
        FOREACH pct IN ARRAY ARRAY[80, 100] LOOP
            IF p_before::numeric * 100 < p_cap::numeric * pct
               AND p_cap::numeric * pct <= p_after::numeric * 100 THEN
                PERFORM wattgate_webhook_emit(
                    v_app, 'c' || p_connection, 'budget.threshold',
                    'threshold:' || p_connection || ':' || p_period || ':' || pct, p_created,
                    '"appUserId":' || wattgate_json(v_user) || ',"period":'
                    || wattgate_json(p_period) || ',"percent":' || pct || ',"capUsd":'
                    || wattgate_usd(p_cap) || ',"spentUsd":' || wattgate_usd(p_after));
            END IF;
        END LOOP;
    END
    $fn$;

    CREATE FUNCTION wattgate_grant_exhausted(p_grant BIGINT, p_created DOUBLE PRECISION)
    RETURNS VOID LANGUAGE plpgsql VOLATILE AS $fn$
    DECLARE
        g RECORD;
        v_user TEXT;
    BEGIN
        SELECT gr.used, gr.requests, gr.max_nanos, gr.spent_nanos, gr.connection_id,
               gr.app_id INTO g FROM grants gr WHERE gr.grant_id = p_grant;
        SELECT c.app_user_id INTO v_user FROM connections c
         WHERE c.connection_id = g.connection_id;
        PERFORM wattgate_webhook_emit(
            g.app_id, COALESCE('c' || g.connection_id, 'g' || p_grant), 'grant.exhausted',
            'grant:' || p_grant, p_created,
            '"appUserId":' || wattgate_json(v_user) || ',"grantId":' || p_grant
            || ',"requests":' || g.requests || ',"used":' || g.used || ',"maxUsd":'
            || wattgate_usd(g.max_nanos) || ',"spentUsd":' || wattgate_usd(g.spent_nanos));
    END
    $fn$;
"""


def _settle_with_outbox() -> str:
    """Migration 3's ``wattgate_settle`` with the outbox's steps: each call's time
    carried beside its amount, each aggregate's new figure returned by its own
    statement and judged there (a function called only when a line was crossed)."""
    edits = [
        ("CREATE FUNCTION wattgate_settle(", "CREATE OR REPLACE FUNCTION wattgate_settle("),
        ("        d_nanos BIGINT[] := '{}';\n",
         "        d_nanos BIGINT[] := '{}';\n        d_created DOUBLE PRECISION[] := '{}';\n"
         "        v_spent BIGINT;\n        v_cap BIGINT;\n        v_done BOOLEAN;\n"),
        ("                d_nanos := d_nanos || p_cost[i];\n",
         "                d_nanos := d_nanos || p_cost[i];\n"
         "                d_created := d_created || p_created[i];\n"),
        ("                    d_nanos := d_nanos || (p_cost[i] - r.cost_nanos);\n",
         "                    d_nanos := d_nanos || (p_cost[i] - r.cost_nanos);\n"
         "                    d_created := d_created || p_created[i];\n"),
        ("SELECT d.g, SUM(d.nanos)::BIGINT AS nanos\n"
         "                   FROM unnest(d_grant, d_nanos) AS d(g, nanos)",
         "SELECT d.g, SUM(d.nanos)::BIGINT AS nanos, MAX(d.t) AS t\n"
         "                   FROM unnest(d_grant, d_nanos, d_created) AS d(g, nanos, t)"),
        ("            UPDATE grants SET spent_nanos = spent_nanos + r.nanos WHERE grant_id = r.g;\n",
         "            UPDATE grants SET spent_nanos = spent_nanos + r.nanos WHERE grant_id = r.g\n"
         "            RETURNING (used >= requests AND held_nanos = 0)\n"
         "                      OR (max_nanos IS NOT NULL AND spent_nanos >= max_nanos)\n"
         "                 INTO v_done;\n"
         "            IF v_done THEN\n"
         "                PERFORM wattgate_grant_exhausted(r.g, r.t);\n"
         "            END IF;\n"),
        ("SELECT d.c, d.p, SUM(d.nanos)::BIGINT AS nanos\n"
         "                   FROM unnest(d_connection, d_period, d_nanos) AS d(c, p, nanos)",
         "SELECT d.c, d.p, SUM(d.nanos)::BIGINT AS nanos, MAX(d.t) AS t\n"
         "                   FROM unnest(d_connection, d_period, d_nanos, d_created)\n"
         "                        AS d(c, p, nanos, t)"),
        ("               SET spent_nanos = periods.spent_nanos + EXCLUDED.spent_nanos;\n",
         "               SET spent_nanos = periods.spent_nanos + EXCLUDED.spent_nanos\n"
         "            RETURNING spent_nanos INTO v_spent;\n"
         "            IF r.nanos > 0 THEN\n"
         "                SELECT c.cap_nanos INTO v_cap FROM connections c\n"
         "                 WHERE c.connection_id = r.c;\n"
         "                -- the lowest line (80 %) reached, the highest (100 %) not yet before\n"
         "                IF v_cap > 0 AND v_spent::numeric * 100 >= v_cap::numeric * 80\n"
         "                   AND (v_spent - r.nanos)::numeric < v_cap::numeric THEN\n"
         "                    PERFORM wattgate_thresholds(r.c, r.p, v_cap, v_spent - r.nanos,\n"
         "                                                v_spent, r.t);\n"
         "                END IF;\n"
         "            END IF;\n"),
    ]
    sql = _SETTLE_V3
    for old, new in edits:
        assert sql.count(old) == 1, old
        sql = sql.replace(old, new)
    return sql


async def m005_app_policy(con: Any) -> None:
    # An app's policy as JSON (``records.AppPolicy.to_text``); NULL: no policy.
    await con.execute("ALTER TABLE apps ADD COLUMN policy TEXT")


async def m006_previous_secret(con: Any) -> None:
    # Secret rotation with an overlap (as SQLite's m009): the secret a rotation
    # replaced, and until when (epoch seconds) it still authenticates.
    await con.execute("""
    ALTER TABLE apps ADD COLUMN IF NOT EXISTS previous_secret_hash TEXT;
    ALTER TABLE apps ADD COLUMN IF NOT EXISTS previous_until DOUBLE PRECISION;
    """)


async def m007_upstream_code(con: Any) -> None:
    # SQLite's m010: the HTTP code of a call the upstream refused ("upstream_refused").
    await con.execute("ALTER TABLE usage ADD COLUMN IF NOT EXISTS upstream_code INTEGER")


MIGRATIONS: tuple[Callable[[Any], Awaitable[None]], ...] = (
    m001_initial,
    m002_owners,
    m003_hot_path_functions,
    m004_webhooks,
    m005_app_policy,
    m006_previous_secret,
    m007_upstream_code,
)


async def schema_version(con: Any) -> int:
    await con.execute("CREATE TABLE IF NOT EXISTS wattgate_schema (version INTEGER NOT NULL)")
    version = await con.fetchval("SELECT version FROM wattgate_schema")
    return int(version or 0)


async def migrate(con: Any, upto: int | None = None) -> int:
    """Run the migrations this database has not seen (one at a time, fleet-wide);
    returns the new version."""
    target = len(MIGRATIONS) if upto is None else upto
    while True:
        async with con.transaction():
            await con.execute("SELECT pg_advisory_xact_lock($1, $2)", LOCK_SPACE,
                              MIGRATION_LOCK)
            version = await schema_version(con)
            if version > len(MIGRATIONS):
                raise SchemaError(f"its schema version {version} is newer than this wattgate "
                                  f"knows ({len(MIGRATIONS)}); upgrade wattgate")
            if version >= target:
                return version
            await MIGRATIONS[version](con)
            if version == 0:
                await con.execute("DELETE FROM wattgate_schema")
                await con.execute("INSERT INTO wattgate_schema (version) VALUES ($1)", 1)
            else:
                await con.execute("UPDATE wattgate_schema SET version = $1", version + 1)
