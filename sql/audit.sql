-- The audit schema: the auditors' history of the ledger, the notification
-- outbox and reconciliation, as the database holds them now.
--
-- audit.entries and audit.reservation_events are the auditors' copy of the
-- ledger, filled from the ledger's WAL by logical decoding (`rewards audit
-- run`), partitioned by month with pg_partman. Rows are keyed by the ledger's
-- own ids, so the at-least-once stream lands exactly once. audit.notifications
-- is the outbox the notification sender drains; a trigger fills it as entries
-- reach the history (in the same transaction), so ledger writes never wait
-- for either.
--
-- The last of the current-state files applied in the order that SCHEMA_FILES in
-- app/operations/migrate.py names: it reads ledger types and functions, and its
-- schedule needs the pg_cron extension that sql/ledger.sql creates.

-- ===========================================================================
-- Extensions
-- ===========================================================================

CREATE SCHEMA IF NOT EXISTS partman;
CREATE EXTENSION IF NOT EXISTS pg_partman SCHEMA partman;

-- ===========================================================================
-- Schema
-- ===========================================================================

CREATE SCHEMA audit AUTHORIZATION rewards_owner;
REVOKE ALL ON SCHEMA audit FROM PUBLIC;

-- ===========================================================================
-- Tables (each with its constraints)
-- ===========================================================================

CREATE TABLE audit.entries (
    user_id             text NOT NULL,
    entry_id            bigint NOT NULL,
    seq                 bigint NOT NULL,
    kind                text NOT NULL,
    amount              bigint NOT NULL,
    available_delta     bigint NOT NULL,
    reserved_delta      bigint NOT NULL,
    available_after     bigint NOT NULL,
    reserved_after      bigint NOT NULL,
    reservation_id      bigint,
    reason              text NOT NULL,
    action_source       text,
    action_external_id  text,
    metadata            jsonb NOT NULL,
    idempotency_key     text,
    created_at          timestamptz NOT NULL,
    prev_hash           bytea NOT NULL,
    hash                bytea NOT NULL,
    -- when the ledger transaction committed, and where in the WAL; NULL for a
    -- row copied by the reconciler's repair rather than streamed
    committed_at        timestamptz,
    lsn                 pg_lsn,
    CONSTRAINT entries_pkey PRIMARY KEY (user_id, entry_id, created_at)
) PARTITION BY RANGE (created_at);

CREATE TABLE audit.reservation_events (
    user_id           text NOT NULL,
    reservation_id    bigint NOT NULL,
    status            text NOT NULL,
    amount            bigint NOT NULL,
    committed_amount  bigint,
    reason            text NOT NULL,
    expires_at        timestamptz NOT NULL,
    -- created_at for 'open', ended_at for the end
    event_at          timestamptz NOT NULL,
    committed_at      timestamptz,
    lsn               pg_lsn,
    CONSTRAINT reservation_events_pkey PRIMARY KEY (user_id, reservation_id, status, event_at)
) PARTITION BY RANGE (event_at);

CREATE TABLE audit.notifications (
    notification_id  bigserial PRIMARY KEY,
    user_id          text NOT NULL,
    entry_id         bigint NOT NULL,
    kind             text NOT NULL,
    payload          jsonb NOT NULL,
    status           text NOT NULL DEFAULT 'pending',
    attempts         integer NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    last_error       text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    delivered_at     timestamptz,
    CONSTRAINT notifications_entry_key UNIQUE (user_id, entry_id),
    CONSTRAINT notifications_status CHECK (status IN ('pending', 'delivered', 'dead'))
);

-- How long the history is kept (NULL: every month), and since when it is
-- whole: audit.apply_history_retention raises the horizon to the end of each
-- month it drops, so what is older is known to be gone, not missing. One row.
CREATE TABLE audit.settings (
    singleton          boolean PRIMARY KEY DEFAULT true,
    history_retention  interval,
    history_horizon    timestamptz NOT NULL DEFAULT '-infinity',
    -- how long a delivered notification is kept (audit.expire_notifications)
    notification_retention  interval NOT NULL DEFAULT interval '30 days',
    CONSTRAINT settings_singleton CHECK (singleton),
    CONSTRAINT settings_history_retention_positive CHECK (history_retention > interval '0'),
    CONSTRAINT settings_notification_retention_positive CHECK (notification_retention > interval '0')
);

-- Where each account's chain continues in the history once retention dropped
-- its beginning: its last entry in the months dropped (audit.verify_chain
-- starts after it). Written by audit.apply_history_retention before each drop.
CREATE TABLE audit.chain_checkpoints (
    user_id     text PRIMARY KEY,
    seq         bigint NOT NULL,
    entry_id    bigint NOT NULL,
    hash        bytea NOT NULL,
    created_at  timestamptz NOT NULL
);

-- Where the consumer has got to, per slot: written in the same transaction as
-- the rows, so the lag it reports is the lag of what is really in the history.
CREATE TABLE audit.stream_progress (
    slot_name     text PRIMARY KEY,
    lsn           pg_lsn NOT NULL,
    committed_at  timestamptz NOT NULL,
    applied_at    timestamptz NOT NULL DEFAULT now()
);

-- ===========================================================================
-- Indexes
-- ===========================================================================

CREATE INDEX entries_account_time ON audit.entries (user_id, created_at);
CREATE INDEX entries_entry_id ON audit.entries (entry_id);

CREATE INDEX notifications_due ON audit.notifications (next_attempt_at) WHERE status = 'pending';
-- Delivered ones, oldest first, for their expiry.
CREATE INDEX notifications_delivered ON audit.notifications (delivered_at) WHERE status = 'delivered';
-- Parked notifications are few and counted at every metrics scrape
-- (rewards_notifications_dead) and listed by `rewards notify dead`.
CREATE INDEX notifications_dead ON audit.notifications (notification_id) WHERE status = 'dead';

-- ===========================================================================
-- Partitions (pg_partman): monthly, made ahead, and their configuration
-- ===========================================================================

SELECT partman.create_parent(p_parent_table := 'audit.entries', p_control := 'created_at',
                             p_type := 'native', p_interval := 'monthly', p_premake := 4, p_jobmon := false);
SELECT partman.create_parent(p_parent_table := 'audit.reservation_events', p_control := 'event_at',
                             p_type := 'native', p_interval := 'monthly', p_premake := 4, p_jobmon := false);
-- pg_partman only makes months ahead: its retention stays off, because the
-- months are dropped by audit.apply_history_retention, which first keeps each
-- account's chain checkpoint and moves the horizon (audit.settings).
UPDATE partman.part_config SET retention = NULL, retention_keep_table = false
WHERE parent_table IN ('audit.entries', 'audit.reservation_events');

-- ===========================================================================
-- Public functions
-- ===========================================================================

-- Recompute one account's chain from the history: the auditors' check, which
-- needs no access to the ledger itself.
CREATE FUNCTION audit.verify_chain(p_user_id text)
RETURNS TABLE (ok boolean, entries_checked bigint, first_broken_entry_id bigint, first_broken_seq bigint)
LANGUAGE plpgsql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_row audit.entries;
    v_entry ledger.entries;
    v_checkpoint audit.chain_checkpoints;
    v_expected_prev bytea := '\x0000000000000000000000000000000000000000000000000000000000000000';
    v_expected_seq bigint := 1;
BEGIN
    entries_checked := 0;
    -- Where retention dropped the chain's beginning, it goes on from the last
    -- entry dropped.
    SELECT * INTO v_checkpoint FROM audit.chain_checkpoints c WHERE c.user_id = p_user_id;
    IF FOUND THEN
        v_expected_prev := v_checkpoint.hash;
        v_expected_seq := v_checkpoint.seq + 1;
    END IF;
    FOR v_row IN SELECT * FROM audit.entries e
                 WHERE e.user_id = p_user_id AND e.seq >= v_expected_seq ORDER BY e.seq LOOP
        v_entry := ROW(v_row.user_id, v_row.entry_id, v_row.seq, v_row.kind, v_row.amount,
                       v_row.available_delta, v_row.reserved_delta, v_row.available_after,
                       v_row.reserved_after, v_row.reservation_id, v_row.reason, v_row.action_source,
                       v_row.action_external_id, v_row.metadata, v_row.idempotency_key, v_row.created_at,
                       v_row.prev_hash, v_row.hash)::ledger.entries;
        IF v_row.seq <> v_expected_seq OR v_row.prev_hash <> v_expected_prev
           OR v_row.hash <> ledger._entry_hash(v_row.prev_hash, v_entry) THEN
            ok := false;
            first_broken_entry_id := v_row.entry_id;
            first_broken_seq := v_row.seq;
            RETURN NEXT;
            RETURN;
        END IF;
        entries_checked := entries_checked + 1;
        v_expected_prev := v_row.hash;
        v_expected_seq := v_expected_seq + 1;
    END LOOP;
    ok := true;
    RETURN NEXT;
END;
$$;

-- What is wrong with each of the given accounts: one row per finding, none
-- when all agree, in the order of the accounts given and, for each, in the
-- order below. Checks that the balance (pending and owed points included)
-- equals what its entries sum to and its holds equal its open reservations,
-- that its hash chain verifies (the rule of
-- ledger.verify_chain, entry by entry), and that the history holds exactly its
-- entries: every history row is one of them, and every entry is in the
-- history but those the history cannot hold yet or any more; and that its
-- pending and expiring points are what its lots hold. Not yet: with
-- p_confirmed_seqs (one per account, NULL for none), an account's entries
-- after that seq, which the stream has not been shown to have delivered
-- (app.audit.reconcile reads the seqs before it marks the WAL with
-- audit.stream_barrier, and passes them once every slot is past the mark).
-- Not any more: entries created before the history's horizon, whose months
-- retention dropped.
--
-- One statement for the whole batch, so that it plans on Citus too: the ledger
-- side is gathered by queries restricted to the batch's users and so pushed
-- down to their shards (the MATERIALIZED CTEs, which Citus runs first as
-- subplans), and only those results meet the history, which is a plain table
-- on the coordinator (Citus refuses a direct join of a distributed table with
-- a local one). Each account's balance, entries and holds come from one query
-- of its colocated rows (one snapshot, on its shard), so a write landing
-- meanwhile cannot make them disagree; the history is read before any of it
-- (the statement's own snapshot), so each history row's entry is there to be
-- found.
--
-- This function and the two after it run with their caller's rights (SECURITY
-- INVOKER): on a Citus cluster their queries of ledger.* open connections to
-- the workers as the current user, which for SECURITY DEFINER would be
-- rewards_owner, a role that cannot log in. Their callers are the superuser
-- (`rewards reconcile`) and the consumer's rewards_audit_writer (the backfill),
-- granted below exactly what that needs.
CREATE FUNCTION audit.reconcile(p_user_ids text[], p_confirmed_seqs bigint[] DEFAULT NULL)
RETURNS TABLE (user_id text, finding text, detail jsonb)
LANGUAGE plpgsql
STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_horizon timestamptz := (SELECT s.history_horizon FROM audit.settings s);
BEGIN
    RETURN QUERY
    WITH batch AS (
        SELECT b.user_id, b.position, p_confirmed_seqs[b.position] AS confirmed_seq
        FROM unnest(p_user_ids) WITH ORDINALITY AS b(user_id, position)
    ),
    -- The ledger side of each account, in one pushed-down query of its rows.
    accounts AS MATERIALIZED (
        SELECT a.user_id, a.available, a.reserved, a.lifetime_earned, a.last_seq, a.last_entry_hash,
               a.pending, a.expiring, a.owed,
               s.available AS entries_available, s.reserved AS entries_reserved, s.earned AS entries_earned,
               s.pending AS entries_pending, s.owed AS entries_owed,
               s.last_seq AS entries_last_seq, s.entries, s.last_hash, s.first_broken_entry_id,
               s.first_broken_seq, h.held, l.pending AS lots_pending, l.expiring AS lots_expiring
        FROM ledger.accounts a
        LEFT JOIN (
            SELECT c.user_id, sum(c.available_delta) AS available, sum(c.reserved_delta) AS reserved,
                   sum(c.earned) AS earned, sum(c.pending) AS pending, sum(c.owed) AS owed, max(c.seq) AS last_seq,
                   count(*) AS entries,
                   (array_agg(c.hash ORDER BY c.seq DESC))[1] AS last_hash,
                   (array_agg(c.entry_id ORDER BY c.seq) FILTER (WHERE c.broken))[1] AS first_broken_entry_id,
                   (array_agg(c.seq ORDER BY c.seq) FILTER (WHERE c.broken))[1] AS first_broken_seq
            FROM (
                SELECT e.user_id, e.entry_id, e.seq, e.available_delta, e.reserved_delta, e.hash,
                       CASE WHEN e.kind = 'credit' THEN e.amount ELSE 0 END AS earned,
                       -- a pending credit's points wait until their 'mature' entry, or
                       -- their refund cancels them
                       CASE e.kind WHEN 'credit' THEN e.amount - e.available_delta
                                   WHEN 'mature' THEN -e.amount WHEN 'cancel' THEN -e.amount ELSE 0 END AS pending,
                       -- what refunds found spent, until later credits pay it off
                       CASE e.kind WHEN 'owed' THEN e.amount WHEN 'repay' THEN -e.amount ELSE 0 END AS owed,
                       -- ledger.verify_chain's rule, entry by entry: its position, its link, its hash
                       (e.seq <> row_number() OVER w
                        OR e.prev_hash <> coalesce(lag(e.hash) OVER w,
                                                   '\x0000000000000000000000000000000000000000000000000000000000000000'::bytea)
                        OR e.hash <> ledger._entry_hash(e.prev_hash, ROW(
                               e.user_id, e.entry_id, e.seq, e.kind, e.amount, e.available_delta, e.reserved_delta,
                               e.available_after, e.reserved_after, e.reservation_id, e.reason, e.action_source,
                               e.action_external_id, e.metadata, e.idempotency_key, e.created_at, e.prev_hash,
                               e.hash)::ledger.entries)) AS broken
                FROM ledger.entries e WHERE e.user_id = ANY (p_user_ids)
                WINDOW w AS (PARTITION BY e.user_id ORDER BY e.seq)
            ) c
            GROUP BY c.user_id
        ) s ON s.user_id = a.user_id
        LEFT JOIN (
            SELECT r.user_id, sum(r.amount) AS held
            FROM ledger.reservations r WHERE r.user_id = ANY (p_user_ids) AND r.status = 'open'
            GROUP BY r.user_id
        ) h ON h.user_id = a.user_id
        LEFT JOIN (
            SELECT t.user_id, sum(t.remaining) FILTER (WHERE NOT t.matured) AS pending,
                   sum(t.remaining) FILTER (WHERE t.matured) AS expiring
            FROM ledger.lots t WHERE t.user_id = ANY (p_user_ids)
            GROUP BY t.user_id
        ) l ON l.user_id = a.user_id
        WHERE a.user_id = ANY (p_user_ids)
    ),
    -- The entries to hold against the history (append-only: a later read only adds).
    entries AS MATERIALIZED (
        SELECT e.user_id, e.entry_id, e.seq, e.hash, e.created_at
        FROM ledger.entries e WHERE e.user_id = ANY (p_user_ids)
    ),
    -- Everything below runs where the history is, on these results.
    -- An id without an account row compares as NULLs, so it is reported too.
    findings AS (
        SELECT b.position, 1 AS kind, b.user_id, 'balance_differs_from_entries' AS finding,
               jsonb_build_object(
                   'account', jsonb_build_object('available', a.available, 'reserved', a.reserved,
                                                 'lifetime_earned', a.lifetime_earned, 'last_seq', a.last_seq,
                                                 'pending', a.pending, 'owed', a.owed),
                   'entries', jsonb_build_object('available', coalesce(a.entries_available, 0),
                                                 'reserved', coalesce(a.entries_reserved, 0),
                                                 'lifetime_earned', coalesce(a.entries_earned, 0),
                                                 'last_seq', coalesce(a.entries_last_seq, 0),
                                                 'pending', coalesce(a.entries_pending, 0),
                                                 'owed', coalesce(a.entries_owed, 0))) AS detail
        FROM batch b LEFT JOIN accounts a ON a.user_id = b.user_id
        WHERE (a.available, a.reserved, a.lifetime_earned, a.last_seq, a.pending, a.owed) IS DISTINCT FROM
              (coalesce(a.entries_available, 0), coalesce(a.entries_reserved, 0), coalesce(a.entries_earned, 0),
               coalesce(a.entries_last_seq, 0), coalesce(a.entries_pending, 0), coalesce(a.entries_owed, 0))
        UNION ALL
        SELECT b.position, 2, b.user_id, 'reserved_differs_from_open_reservations',
               jsonb_build_object('reserved', a.reserved, 'open_reservations', coalesce(a.held, 0))
        FROM batch b LEFT JOIN accounts a ON a.user_id = b.user_id
        WHERE a.reserved IS DISTINCT FROM coalesce(a.held, 0)
        UNION ALL
        -- the first entry that breaks, or (ids NULL) an account head that is not its last entry
        SELECT b.position, 3, b.user_id, 'chain_broken',
               jsonb_build_object('first_broken_entry_id', a.first_broken_entry_id,
                                  'first_broken_seq', a.first_broken_seq)
        FROM batch b JOIN accounts a ON a.user_id = b.user_id
        WHERE a.first_broken_seq IS NOT NULL
           OR (a.last_entry_hash, a.last_seq) IS DISTINCT FROM (
                  coalesce(a.last_hash, '\x0000000000000000000000000000000000000000000000000000000000000000'::bytea),
                  coalesce(a.entries, 0))
        UNION ALL
        SELECT b.position, 4, b.user_id, 'entries_missing_from_history',
               jsonb_build_object('entry_ids', to_jsonb(m.entry_ids))
        FROM batch b CROSS JOIN LATERAL (
            SELECT array_agg(e.entry_id ORDER BY e.entry_id) AS entry_ids
            FROM entries e
            WHERE e.user_id = b.user_id
              AND e.seq <= coalesce(b.confirmed_seq, e.seq)
              AND e.created_at >= v_horizon
              AND NOT EXISTS (
                SELECT FROM audit.entries h
                WHERE h.user_id = e.user_id AND h.entry_id = e.entry_id AND h.hash = e.hash)) m
        WHERE m.entry_ids IS NOT NULL
        UNION ALL
        SELECT b.position, 5, b.user_id, 'history_rows_not_in_ledger',
               jsonb_build_object('entry_ids', to_jsonb(x.entry_ids))
        FROM batch b CROSS JOIN LATERAL (
            SELECT array_agg(h.entry_id ORDER BY h.entry_id) AS entry_ids
            FROM audit.entries h
            WHERE h.user_id = b.user_id AND NOT EXISTS (
                SELECT FROM entries e
                WHERE e.user_id = h.user_id AND e.entry_id = h.entry_id AND e.hash = h.hash)) x
        WHERE x.entry_ids IS NOT NULL
        UNION ALL
        -- the account's pending and expiring points are what its lots hold
        SELECT b.position, 6, b.user_id, 'lots_differ_from_balance',
               jsonb_build_object('pending', a.pending, 'expiring', a.expiring,
                                  'lots_pending', coalesce(a.lots_pending, 0),
                                  'lots_expiring', coalesce(a.lots_expiring, 0))
        FROM batch b JOIN accounts a ON a.user_id = b.user_id
        WHERE (a.pending, a.expiring) IS DISTINCT FROM (coalesce(a.lots_pending, 0), coalesce(a.lots_expiring, 0))
    )
    SELECT f.user_id, f.finding, f.detail FROM findings f ORDER BY f.position, f.kind;
END;
$$;

-- The reconciler's only repair: copy entries the history lacks from the
-- ledger, for one account or (NULL) all of them, but none from before the
-- horizon (retention dropped those on purpose). It never touches a ledger entry.
CREATE FUNCTION audit.repair_history(p_user_id text)
RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_horizon timestamptz := (SELECT s.history_horizon FROM audit.settings s);
    v_copied bigint;
BEGIN
    INSERT INTO audit.entries (user_id, entry_id, seq, kind, amount, available_delta, reserved_delta,
                               available_after, reserved_after, reservation_id, reason, action_source,
                               action_external_id, metadata, idempotency_key, created_at, prev_hash, hash)
    SELECT e.user_id, e.entry_id, e.seq, e.kind, e.amount, e.available_delta, e.reserved_delta,
           e.available_after, e.reserved_after, e.reservation_id, e.reason, e.action_source,
           e.action_external_id, e.metadata, e.idempotency_key, e.created_at, e.prev_hash, e.hash
    FROM ledger.entries e
    WHERE (p_user_id IS NULL OR e.user_id = p_user_id)
      AND e.created_at >= v_horizon
    ON CONFLICT DO NOTHING;
    GET DIAGNOSTICS v_copied = ROW_COUNT;
    RETURN v_copied;
END;
$$;

-- A mark in the WAL of every node, for the reconciler: a logical message in
-- a transaction of its own, so it reaches each slot like a commit, after
-- every transaction that committed before it. Once each of the consumer's
-- slots has confirmed past its node's mark (audit.stream_behind), every
-- ledger change committed before it is in the history, since the consumer
-- confirms only what it has committed there. Returns {"<node id>": "<lsn>"}
-- (node 0 without Citus). Under Citus it runs on every node over Citus' own
-- connections, each committed there at once.
CREATE FUNCTION audit.stream_barrier()
RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_marks jsonb;
    v_failures text;
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_extension WHERE extname = 'citus') THEN
        RETURN jsonb_build_object('0', pg_catalog.pg_logical_emit_message(true, 'rewards.reconcile', '')::text);
    END IF;
    SELECT jsonb_object_agg(r.nodeid::text, r.result) FILTER (WHERE r.success),
           string_agg(format('node %s: %s', r.nodeid, r.result), '; ') FILTER (WHERE NOT r.success)
    INTO v_marks, v_failures
    FROM pg_catalog.run_command_on_all_nodes(
        $c$SELECT pg_catalog.pg_logical_emit_message(true, 'rewards.reconcile', '')$c$) AS r;
    IF v_failures IS NOT NULL THEN
        RAISE EXCEPTION 'the WAL could not be marked on every node: %', v_failures;
    END IF;
    RETURN v_marks;
END;
$$;

-- Of the audit consumer's slots (p_slots: each node's, as `rewards audit run`
-- names them), those on any node that have not yet confirmed past that
-- node's mark from audit.stream_barrier: none once the history holds
-- everything committed before the marks. Other logical slots of the database
-- (a DBA's, a test's, another tool's) feed nothing into the history, so
-- whether they keep up says nothing about it: they are not looked at. A slot
-- of the list that does not exist on a node is not waited for either (that
-- node's consumer makes it, and backfills, at its next poll).
CREATE FUNCTION audit.stream_behind(p_marks jsonb, p_slots text[])
RETURNS TABLE (nodeid integer, slot_name text, confirmed_lsn pg_lsn, mark_lsn pg_lsn)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_slots CONSTANT text := format($c$SELECT coalesce(json_agg(json_build_object(
        'slot', slot_name, 'confirmed', confirmed_flush_lsn)), '[]') FROM pg_catalog.pg_replication_slots
        WHERE database = current_database() AND slot_type = 'logical' AND slot_name = ANY (%L::text[])$c$,
        p_slots);
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_extension WHERE extname = 'citus') THEN
        RETURN QUERY
        SELECT 0, s.slot_name::text, s.confirmed_flush_lsn, (p_marks ->> '0')::pg_lsn
        FROM pg_catalog.pg_replication_slots s
        WHERE s.database = current_database() AND s.slot_type = 'logical' AND s.slot_name = ANY (p_slots)
          AND (s.confirmed_flush_lsn IS NULL OR s.confirmed_flush_lsn < (p_marks ->> '0')::pg_lsn);
        RETURN;
    END IF;
    RETURN QUERY
    WITH nodes AS MATERIALIZED (
        SELECT r.nodeid, r.success, r.result, (p_marks ->> r.nodeid::text)::pg_lsn AS mark
        FROM pg_catalog.run_command_on_all_nodes(v_slots) AS r
        WHERE p_marks ? r.nodeid::text
    )
    SELECT n.nodeid, slot ->> 'slot', (slot ->> 'confirmed')::pg_lsn, n.mark
    FROM nodes n CROSS JOIN LATERAL jsonb_array_elements(CASE WHEN n.success THEN n.result::jsonb ELSE '[]' END) AS slot
    WHERE n.success AND ((slot ->> 'confirmed') IS NULL OR (slot ->> 'confirmed')::pg_lsn < n.mark)
    UNION ALL
    -- a node that does not answer cannot be shown to be caught up
    SELECT n.nodeid, NULL, NULL, n.mark FROM nodes n WHERE NOT n.success;
END;
$$;

-- Drops the history's months older than its retention (audit.settings),
-- oldest first, one month per transaction. Before an entries month goes, each
-- account's last entry in it becomes the account's chain checkpoint (unless it
-- has a later one) and the horizon moves to the month's end, in the same
-- transaction, so nothing older is ever taken for missing. pg_cron runs it
-- every hour; pg_partman only makes months ahead. Neither SECURITY DEFINER
-- nor SET search_path (PostgreSQL refuses COMMIT in either): every name in it
-- is qualified.
CREATE PROCEDURE audit.apply_history_retention(INOUT dropped integer DEFAULT 0)
LANGUAGE plpgsql
AS $$
DECLARE
    v_keep interval := (SELECT s.history_retention FROM audit.settings s);
    v_parent text;
    v_child record;
    v_ends timestamptz;
BEGIN
    dropped := 0;
    IF v_keep IS NULL THEN
        RETURN;
    END IF;
    FOREACH v_parent IN ARRAY ARRAY['audit.entries', 'audit.reservation_events'] LOOP
        FOR v_child IN
            SELECT p.partition_schemaname AS schema_name, p.partition_tablename AS table_name
            FROM partman.show_partitions(v_parent, 'ASC') AS p
        LOOP
            SELECT i.child_end_time INTO v_ends
            FROM partman.show_partition_info(format('%I.%I', v_child.schema_name, v_child.table_name),
                                             p_parent_table := v_parent) AS i;
            EXIT WHEN v_ends > now() - v_keep;
            IF v_parent = 'audit.entries' THEN
                EXECUTE format(
                    'INSERT INTO audit.chain_checkpoints AS c (user_id, seq, entry_id, hash, created_at)'
                    ' SELECT DISTINCT ON (e.user_id) e.user_id, e.seq, e.entry_id, e.hash, e.created_at'
                    ' FROM %I.%I e ORDER BY e.user_id, e.seq DESC'
                    ' ON CONFLICT (user_id) DO UPDATE SET seq = EXCLUDED.seq, entry_id = EXCLUDED.entry_id,'
                    ' hash = EXCLUDED.hash, created_at = EXCLUDED.created_at WHERE EXCLUDED.seq > c.seq',
                    v_child.schema_name, v_child.table_name);
                UPDATE audit.settings SET history_horizon = greatest(history_horizon, v_ends);
            END IF;
            EXECUTE format('DROP TABLE %I.%I', v_child.schema_name, v_child.table_name);
            dropped := dropped + 1;
            COMMIT;
        END LOOP;
    END LOOP;
END;
$$;

-- Forgets the delivered notifications older than
-- audit.settings.notification_retention (30 days by default), batch_size at a
-- time, committing after each batch; a pending or parked one is never
-- touched, however old. The outbox is a plain table where the history is (the
-- coordinator, under Citus), so this runs there. pg_cron runs it every hour.
-- Not SECURITY DEFINER and no SET clause (it commits): every name is qualified.
CREATE PROCEDURE audit.expire_notifications(INOUT deleted bigint DEFAULT 0, batch_size integer DEFAULT 1000)
LANGUAGE plpgsql
AS $$
DECLARE
    v_cutoff timestamptz := pg_catalog.clock_timestamp()
                            - (SELECT s.notification_retention FROM audit.settings s);
    v_in_batch bigint;
BEGIN
    deleted := 0;
    IF batch_size IS NULL OR batch_size < 1 THEN
        RAISE EXCEPTION 'batch_size must be a positive integer' USING ERRCODE = 'invalid_parameter_value',
            COLUMN = 'batch_size';
    END IF;
    LOOP
        DELETE FROM audit.notifications n
        WHERE n.notification_id = ANY (ARRAY(
            SELECT d.notification_id FROM audit.notifications d
            WHERE d.status = 'delivered' AND d.delivered_at < v_cutoff
            ORDER BY d.delivered_at LIMIT batch_size));
        GET DIAGNOSTICS v_in_batch = ROW_COUNT;
        deleted := deleted + v_in_batch;
        COMMIT;
        EXIT WHEN v_in_batch < batch_size;
    END LOOP;
END;
$$;

-- Copy into the history whatever the ledger held before the stream began:
-- run once, right after the consumer creates its slot. What the slot also
-- delivers lands once, keyed by the ledger's ids.
CREATE FUNCTION audit.backfill()
RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    INSERT INTO audit.reservation_events (user_id, reservation_id, status, amount, committed_amount, reason,
                                          expires_at, event_at)
    SELECT r.user_id, r.reservation_id, 'open', r.amount, NULL, r.reason, r.expires_at, r.created_at
    FROM ledger.reservations r
    UNION ALL
    SELECT r.user_id, r.reservation_id, r.status, r.amount, r.committed_amount, r.reason, r.expires_at, r.ended_at
    FROM ledger.reservations r WHERE r.status <> 'open'
    ON CONFLICT DO NOTHING;
    RETURN audit.repair_history(NULL);
END;
$$;

-- ===========================================================================
-- Triggers
-- ===========================================================================

-- An entry's notification, queued in the outbox as the entry reaches the
-- history, by whichever path: the stream (`rewards audit run`), the backfill
-- after the consumer made its slot again (an invalidated slot, a failover, a
-- new node) or the reconciler's repair. This is the one place a notification
-- is made, so every path makes the same one, and it is made once per entry:
-- a row already in the history is skipped by its insert's ON CONFLICT DO
-- NOTHING and fires nothing (an entry streamed again after its delivered
-- notification was forgotten is not notified twice), and the outbox is keyed
-- by the entry too.
CREATE FUNCTION audit._queue_notification()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    INSERT INTO audit.notifications (user_id, entry_id, kind, payload)
    VALUES (NEW.user_id, NEW.entry_id, NEW.kind, jsonb_build_object(
        'id', NEW.user_id || ':' || NEW.entry_id,  -- the receiver drops repeats on it
        'type', 'points.' || NEW.kind,
        'user_id', NEW.user_id,
        'entry_id', NEW.entry_id,
        'amount', NEW.amount,
        'balance', jsonb_build_object('available', NEW.available_after, 'reserved', NEW.reserved_after),
        'reservation_id', NEW.reservation_id,
        'created_at', NEW.created_at))
    ON CONFLICT DO NOTHING;
    RETURN NULL;
END;
$$;

-- The kinds the app's notification service hears about.
CREATE TRIGGER entries_queue_notification
    AFTER INSERT ON audit.entries
    FOR EACH ROW WHEN (NEW.kind IN ('credit', 'debit', 'commit', 'expire', 'mature', 'lapse',
                                    'cancel', 'reversal', 'owed', 'write_off', 'repay'))
    EXECUTE FUNCTION audit._queue_notification();

-- ===========================================================================
-- Ownership: every object belongs to rewards_owner, as in the ledger schema
-- ===========================================================================

ALTER TABLE audit.entries OWNER TO rewards_owner;
ALTER TABLE audit.reservation_events OWNER TO rewards_owner;
ALTER TABLE audit.notifications OWNER TO rewards_owner;
ALTER TABLE audit.stream_progress OWNER TO rewards_owner;
ALTER TABLE audit.settings OWNER TO rewards_owner;
ALTER TABLE audit.chain_checkpoints OWNER TO rewards_owner;
ALTER FUNCTION audit.verify_chain(text) OWNER TO rewards_owner;
ALTER FUNCTION audit.reconcile(text[], bigint[]) OWNER TO rewards_owner;
ALTER FUNCTION audit.stream_barrier() OWNER TO rewards_owner;
ALTER FUNCTION audit.stream_behind(jsonb, text[]) OWNER TO rewards_owner;
ALTER PROCEDURE audit.apply_history_retention(integer) OWNER TO rewards_owner;
ALTER PROCEDURE audit.expire_notifications(bigint, integer) OWNER TO rewards_owner;
ALTER FUNCTION audit.repair_history(text) OWNER TO rewards_owner;
ALTER FUNCTION audit.backfill() OWNER TO rewards_owner;
ALTER FUNCTION audit._queue_notification() OWNER TO rewards_owner;

-- ===========================================================================
-- Seed rows
-- ===========================================================================

INSERT INTO audit.settings DEFAULT VALUES;

-- ===========================================================================
-- Grants
-- ===========================================================================

REVOKE ALL ON ALL TABLES IN SCHEMA audit FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA audit FROM PUBLIC;
REVOKE ALL ON ALL PROCEDURES IN SCHEMA audit FROM PUBLIC;
GRANT USAGE ON SCHEMA audit TO rewards_auditor, rewards_audit_writer, rewards_notifier;
GRANT SELECT ON audit.entries, audit.reservation_events, audit.notifications, audit.stream_progress,
                audit.settings, audit.chain_checkpoints
    TO rewards_auditor;
GRANT EXECUTE ON FUNCTION audit.verify_chain(text) TO rewards_auditor;
-- The consumer only inserts (ON CONFLICT DO NOTHING needs no more), and keeps
-- its own progress row.
GRANT INSERT ON audit.entries, audit.reservation_events, audit.notifications TO rewards_audit_writer;
GRANT USAGE ON SEQUENCE audit.notifications_notification_id_seq TO rewards_audit_writer;
GRANT SELECT, INSERT, UPDATE ON audit.stream_progress TO rewards_audit_writer;
-- The backfill's repair reads the horizon.
GRANT SELECT ON audit.settings TO rewards_audit_writer;
-- The backfill runs with the consumer's rights: it reads the ledger's entries
-- and reservations (which the consumer's slot carries anyway) and copies them
-- through audit.repair_history.
GRANT EXECUTE ON FUNCTION audit.backfill(), audit.repair_history(text) TO rewards_audit_writer;
GRANT USAGE ON SCHEMA ledger TO rewards_audit_writer;
GRANT SELECT ON ledger.entries, ledger.reservations TO rewards_audit_writer;
-- The consumer counts the parked notifications for its metrics, and reads no
-- more of them.
GRANT SELECT (status) ON audit.notifications TO rewards_audit_writer;
GRANT SELECT, UPDATE ON audit.notifications TO rewards_notifier;
-- (On the ledger's schema, but here, after the grants above, where migration
-- 0011 puts it in the schema's privileges.) A Citus shard move copies the
-- shard, then applies what was written meanwhile through a subscription on the
-- new node, as a role Citus makes for the move: a member of the tables' owner
-- (the migrating superuser) but no superuser, so it reaches the tables only by
-- the owner's grants, this one too.
GRANT USAGE ON SCHEMA ledger TO CURRENT_USER;

-- ===========================================================================
-- Comments
-- ===========================================================================

COMMENT ON FUNCTION audit.verify_chain(text) IS
'Recompute an account''s hash chain from the audit history alone; ok=false names the first broken entry.';
COMMENT ON FUNCTION audit.reconcile(text[], bigint[]) IS
'One row per finding for the given accounts: balance_differs_from_entries, reserved_differs_from_open_reservations, chain_broken, entries_missing_from_history, history_rows_not_in_ledger. With confirmed seqs, entries after them are not required in the history yet; entries before the history horizon never are.';
COMMENT ON FUNCTION audit.stream_barrier() IS
'Mark every node''s WAL; returns {"<node id>": "<lsn>"} for audit.stream_behind.';
COMMENT ON FUNCTION audit.stream_behind(jsonb, text[]) IS
'The audit consumer''s slots (p_slots) not yet past their node''s mark: none once the history holds all committed before it.';
COMMENT ON PROCEDURE audit.apply_history_retention(integer) IS
'Drop history months older than audit.settings.history_retention, keeping each account''s chain checkpoint and moving the horizon first. Hourly by pg_cron.';
COMMENT ON PROCEDURE audit.expire_notifications(bigint, integer) IS
'Forget delivered notifications older than audit.settings.notification_retention, committing every batch_size; never a pending or parked one. Hourly by pg_cron.';
COMMENT ON FUNCTION audit.repair_history(text) IS
'Copy the account''s ledger entries that the history lacks, none before the horizon; returns how many. Never touches the ledger.';

-- ===========================================================================
-- Schedule (only in the database pg_cron serves)
-- ===========================================================================

DO $cron$
BEGIN
    IF current_database() IS DISTINCT FROM current_setting('cron.database_name', true) THEN
        RETURN;
    END IF;
    -- New monthly partitions ahead of time, and retention, every hour.
    PERFORM cron.schedule('rewards-audit-partitions', '17 * * * *',
                          'CALL partman.run_maintenance_proc(p_jobmon := false)');
    -- And the months past their retention dropped, each after its checkpoints.
    PERFORM cron.schedule('rewards-audit-retention', '27 * * * *', 'CALL audit.apply_history_retention()');
    -- And the delivered notifications past theirs.
    PERFORM cron.schedule('rewards-expire-notifications', '47 * * * *', 'CALL audit.expire_notifications()');
END
$cron$;
