-- The audit schema: the auditors' history of the ledger, the notification
-- outbox and reconciliation, as the database holds them now.
--
-- audit.entries and audit.reservation_events are the auditors' copy of the
-- ledger, filled from the ledger's WAL by logical decoding (`rewards audit
-- run`), partitioned by month with pg_partman. Rows are keyed by the ledger's
-- own ids, so the at-least-once stream lands exactly once. audit.notifications
-- is the outbox the notification sender drains; the consumer fills it in the
-- same transaction as the history, so ledger writes never wait for either.
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

-- ===========================================================================
-- Partitions (pg_partman): monthly, made ahead, and their configuration
-- ===========================================================================

SELECT partman.create_parent(p_parent_table := 'audit.entries', p_control := 'created_at',
                             p_type := 'native', p_interval := 'monthly', p_premake := 4, p_jobmon := false);
SELECT partman.create_parent(p_parent_table := 'audit.reservation_events', p_control := 'event_at',
                             p_type := 'native', p_interval := 'monthly', p_premake := 4, p_jobmon := false);
-- Retention is a setting: NULL keeps every partition. `rewards audit retention`
-- sets partman.part_config.retention, and maintenance then drops older months.
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
    v_expected_prev bytea := '\x0000000000000000000000000000000000000000000000000000000000000000';
    v_expected_seq bigint := 1;
BEGIN
    entries_checked := 0;
    FOR v_row IN SELECT * FROM audit.entries WHERE user_id = p_user_id ORDER BY seq LOOP
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
-- when all agree. Checks that the balance equals what its entries sum to and
-- its holds equal its open reservations, that its hash chain verifies, and
-- that the history holds exactly its entries.
CREATE FUNCTION audit.reconcile(p_user_ids text[])
RETURNS TABLE (user_id text, finding text, detail jsonb)
LANGUAGE plpgsql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_user text;
    v_account ledger.accounts;
    v_sums record;
    v_held bigint;
    v_chain record;
    v_missing bigint[];
    v_extra bigint[];
BEGIN
    FOREACH v_user IN ARRAY p_user_ids LOOP
        user_id := v_user;
        SELECT * INTO v_account FROM ledger.accounts a WHERE a.user_id = v_user;
        SELECT coalesce(sum(e.available_delta), 0) AS available, coalesce(sum(e.reserved_delta), 0) AS reserved,
               coalesce(sum(e.amount) FILTER (WHERE e.kind = 'credit'), 0) AS earned,
               coalesce(max(e.seq), 0) AS last_seq
        INTO v_sums FROM ledger.entries e WHERE e.user_id = v_user;
        IF (v_account.available, v_account.reserved, v_account.lifetime_earned, v_account.last_seq)
           IS DISTINCT FROM (v_sums.available, v_sums.reserved, v_sums.earned, v_sums.last_seq) THEN
            finding := 'balance_differs_from_entries';
            detail := jsonb_build_object(
                'account', jsonb_build_object('available', v_account.available, 'reserved', v_account.reserved,
                                              'lifetime_earned', v_account.lifetime_earned, 'last_seq', v_account.last_seq),
                'entries', jsonb_build_object('available', v_sums.available, 'reserved', v_sums.reserved,
                                              'lifetime_earned', v_sums.earned, 'last_seq', v_sums.last_seq));
            RETURN NEXT;
        END IF;
        SELECT coalesce(sum(r.amount), 0) INTO v_held
        FROM ledger.reservations r WHERE r.user_id = v_user AND r.status = 'open';
        IF v_account.reserved IS DISTINCT FROM v_held THEN
            finding := 'reserved_differs_from_open_reservations';
            detail := jsonb_build_object('reserved', v_account.reserved, 'open_reservations', v_held);
            RETURN NEXT;
        END IF;
        SELECT * INTO v_chain FROM ledger.verify_chain(v_user);
        IF NOT v_chain.ok THEN
            finding := 'chain_broken';
            detail := jsonb_build_object('first_broken_entry_id', v_chain.first_broken_entry_id,
                                         'first_broken_seq', v_chain.first_broken_seq);
            RETURN NEXT;
        END IF;
        SELECT array_agg(e.entry_id ORDER BY e.entry_id) INTO v_missing
        FROM ledger.entries e
        WHERE e.user_id = v_user AND NOT EXISTS (
            SELECT FROM audit.entries h
            WHERE h.user_id = e.user_id AND h.entry_id = e.entry_id AND h.hash = e.hash);
        IF v_missing IS NOT NULL THEN
            finding := 'entries_missing_from_history';
            detail := jsonb_build_object('entry_ids', to_jsonb(v_missing));
            RETURN NEXT;
        END IF;
        SELECT array_agg(h.entry_id ORDER BY h.entry_id) INTO v_extra
        FROM audit.entries h
        WHERE h.user_id = v_user AND NOT EXISTS (
            SELECT FROM ledger.entries e
            WHERE e.user_id = h.user_id AND e.entry_id = h.entry_id AND e.hash = h.hash);
        IF v_extra IS NOT NULL THEN
            finding := 'history_rows_not_in_ledger';
            detail := jsonb_build_object('entry_ids', to_jsonb(v_extra));
            RETURN NEXT;
        END IF;
    END LOOP;
END;
$$;

-- The reconciler's only repair: copy entries the history lacks from the
-- ledger, for one account or (NULL) all of them. It never touches a ledger entry.
CREATE FUNCTION audit.repair_history(p_user_id text)
RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_copied bigint;
BEGIN
    INSERT INTO audit.entries (user_id, entry_id, seq, kind, amount, available_delta, reserved_delta,
                               available_after, reserved_after, reservation_id, reason, action_source,
                               action_external_id, metadata, idempotency_key, created_at, prev_hash, hash)
    SELECT e.user_id, e.entry_id, e.seq, e.kind, e.amount, e.available_delta, e.reserved_delta,
           e.available_after, e.reserved_after, e.reservation_id, e.reason, e.action_source,
           e.action_external_id, e.metadata, e.idempotency_key, e.created_at, e.prev_hash, e.hash
    FROM ledger.entries e
    WHERE p_user_id IS NULL OR e.user_id = p_user_id
    ON CONFLICT DO NOTHING;
    GET DIAGNOSTICS v_copied = ROW_COUNT;
    RETURN v_copied;
END;
$$;

-- Copy into the history whatever the ledger held before the stream began:
-- run once, right after the consumer creates its slot. What the slot also
-- delivers lands once, keyed by the ledger's ids.
CREATE FUNCTION audit.backfill()
RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
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
-- Ownership: every object belongs to rewards_owner, as in the ledger schema
-- ===========================================================================

ALTER TABLE audit.entries OWNER TO rewards_owner;
ALTER TABLE audit.reservation_events OWNER TO rewards_owner;
ALTER TABLE audit.notifications OWNER TO rewards_owner;
ALTER TABLE audit.stream_progress OWNER TO rewards_owner;
ALTER FUNCTION audit.verify_chain(text) OWNER TO rewards_owner;
ALTER FUNCTION audit.reconcile(text[]) OWNER TO rewards_owner;
ALTER FUNCTION audit.repair_history(text) OWNER TO rewards_owner;
ALTER FUNCTION audit.backfill() OWNER TO rewards_owner;

-- ===========================================================================
-- Grants
-- ===========================================================================

REVOKE ALL ON ALL TABLES IN SCHEMA audit FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA audit FROM PUBLIC;
GRANT USAGE ON SCHEMA audit TO rewards_auditor, rewards_audit_writer, rewards_notifier;
GRANT SELECT ON audit.entries, audit.reservation_events, audit.notifications, audit.stream_progress
    TO rewards_auditor;
GRANT EXECUTE ON FUNCTION audit.verify_chain(text) TO rewards_auditor;
-- The consumer only inserts (ON CONFLICT DO NOTHING needs no more), and keeps
-- its own progress row.
GRANT INSERT ON audit.entries, audit.reservation_events, audit.notifications TO rewards_audit_writer;
GRANT USAGE ON SEQUENCE audit.notifications_notification_id_seq TO rewards_audit_writer;
GRANT SELECT, INSERT, UPDATE ON audit.stream_progress TO rewards_audit_writer;
GRANT EXECUTE ON FUNCTION audit.backfill() TO rewards_audit_writer;
GRANT SELECT, UPDATE ON audit.notifications TO rewards_notifier;

-- ===========================================================================
-- Comments
-- ===========================================================================

COMMENT ON FUNCTION audit.verify_chain(text) IS
'Recompute an account''s hash chain from the audit history alone; ok=false names the first broken entry.';
COMMENT ON FUNCTION audit.reconcile(text[]) IS
'One row per finding for the given accounts: balance_differs_from_entries, reserved_differs_from_open_reservations, chain_broken, entries_missing_from_history, history_rows_not_in_ledger.';
COMMENT ON FUNCTION audit.repair_history(text) IS
'Copy the account''s ledger entries that the history lacks; returns how many. Never touches the ledger.';

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
END
$cron$;
