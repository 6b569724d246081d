-- ===========================================================================
-- The reconciler under live traffic and after retention (revision 0012)
--
-- audit.reconcile counted as missing from the history every entry the stream
-- had not delivered yet, and every entry of a month retention had dropped
-- (which --repair then copied back); audit.verify_chain failed for every
-- account whose chain began in a dropped month. Now: the reconciler marks
-- each node's WAL (audit.stream_barrier), waits for every slot to confirm
-- past it (audit.stream_behind) and requires in the history only the entries
-- up to the seqs it read before the mark (audit.reconcile's new argument,
-- NULL by default, so a call with the users alone means what it meant); the
-- months are dropped by audit.apply_history_retention (pg_cron, hourly), which
-- first keeps each account's chain checkpoint and moves the history's horizon
-- (audit.settings, audit.chain_checkpoints); entries before the horizon are
-- neither required nor repaired, and verify_chain starts at the checkpoint.
-- Each account's balance, entries and holds are read in one query of its
-- rows, so under Citus a write landing meanwhile cannot make them disagree.
-- A retention set the old way (in pg_partman) moves to audit.settings.
-- ===========================================================================

-- How long the history is kept (NULL: every month), and since when it is
-- whole: audit.apply_history_retention raises the horizon to the end of each
-- month it drops, so what is older is known to be gone, not missing. One row.
CREATE TABLE audit.settings (
    singleton          boolean PRIMARY KEY DEFAULT true,
    history_retention  interval,
    history_horizon    timestamptz NOT NULL DEFAULT '-infinity',
    CONSTRAINT settings_singleton CHECK (singleton),
    CONSTRAINT settings_history_retention_positive CHECK (history_retention > interval '0')
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

INSERT INTO audit.settings (history_retention)
SELECT (SELECT p.retention::interval FROM partman.part_config p WHERE p.parent_table = 'audit.entries');
UPDATE partman.part_config SET retention = NULL, retention_keep_table = false
WHERE parent_table IN ('audit.entries', 'audit.reservation_events');

-- Recompute one account's chain from the history: the auditors' check, which
-- needs no access to the ledger itself.
CREATE OR REPLACE FUNCTION audit.verify_chain(p_user_id text)
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

DROP FUNCTION audit.reconcile(text[]);

-- What is wrong with each of the given accounts: one row per finding, none
-- when all agree, in the order of the accounts given and, for each, in the
-- order below. Checks that the balance equals what its entries sum to and its
-- holds equal its open reservations, that its hash chain verifies (the rule of
-- ledger.verify_chain, entry by entry), and that the history holds exactly its
-- entries: every history row is one of them, and every entry is in the
-- history but those the history cannot hold yet or any more. Not yet: with
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
               s.available AS entries_available, s.reserved AS entries_reserved, s.earned AS entries_earned,
               s.last_seq AS entries_last_seq, s.entries, s.last_hash, s.first_broken_entry_id,
               s.first_broken_seq, h.held
        FROM ledger.accounts a
        LEFT JOIN (
            SELECT c.user_id, sum(c.available_delta) AS available, sum(c.reserved_delta) AS reserved,
                   sum(c.earned) AS earned, max(c.seq) AS last_seq, count(*) AS entries,
                   (array_agg(c.hash ORDER BY c.seq DESC))[1] AS last_hash,
                   (array_agg(c.entry_id ORDER BY c.seq) FILTER (WHERE c.broken))[1] AS first_broken_entry_id,
                   (array_agg(c.seq ORDER BY c.seq) FILTER (WHERE c.broken))[1] AS first_broken_seq
            FROM (
                SELECT e.user_id, e.entry_id, e.seq, e.available_delta, e.reserved_delta, e.hash,
                       CASE WHEN e.kind = 'credit' THEN e.amount ELSE 0 END AS earned,
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
                                                 'lifetime_earned', a.lifetime_earned, 'last_seq', a.last_seq),
                   'entries', jsonb_build_object('available', coalesce(a.entries_available, 0),
                                                 'reserved', coalesce(a.entries_reserved, 0),
                                                 'lifetime_earned', coalesce(a.entries_earned, 0),
                                                 'last_seq', coalesce(a.entries_last_seq, 0))) AS detail
        FROM batch b LEFT JOIN accounts a ON a.user_id = b.user_id
        WHERE (a.available, a.reserved, a.lifetime_earned, a.last_seq) IS DISTINCT FROM
              (coalesce(a.entries_available, 0), coalesce(a.entries_reserved, 0), coalesce(a.entries_earned, 0),
               coalesce(a.entries_last_seq, 0))
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
    )
    SELECT f.user_id, f.finding, f.detail FROM findings f ORDER BY f.position, f.kind;
END;
$$;

-- The reconciler's only repair: copy entries the history lacks from the
-- ledger, for one account or (NULL) all of them, but none from before the
-- horizon (retention dropped those on purpose). It never touches a ledger entry.
CREATE OR REPLACE FUNCTION audit.repair_history(p_user_id text)
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
-- every transaction that committed before it. Once each logical slot of this
-- database has confirmed past its node's mark (audit.stream_behind), every
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

-- The logical slots of this database, on any node, that have not yet
-- confirmed past that node's mark from audit.stream_barrier: none once the
-- history holds everything committed before the marks.
CREATE FUNCTION audit.stream_behind(p_marks jsonb)
RETURNS TABLE (nodeid integer, slot_name text, confirmed_lsn pg_lsn, mark_lsn pg_lsn)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_slots CONSTANT text := $c$SELECT coalesce(json_agg(json_build_object(
        'slot', slot_name, 'confirmed', confirmed_flush_lsn)), '[]') FROM pg_catalog.pg_replication_slots
        WHERE database = current_database() AND slot_type = 'logical'$c$;
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_extension WHERE extname = 'citus') THEN
        RETURN QUERY
        SELECT 0, s.slot_name::text, s.confirmed_flush_lsn, (p_marks ->> '0')::pg_lsn
        FROM pg_catalog.pg_replication_slots s
        WHERE s.database = current_database() AND s.slot_type = 'logical'
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

ALTER TABLE audit.settings OWNER TO rewards_owner;
ALTER TABLE audit.chain_checkpoints OWNER TO rewards_owner;
ALTER FUNCTION audit.reconcile(text[], bigint[]) OWNER TO rewards_owner;
ALTER FUNCTION audit.stream_barrier() OWNER TO rewards_owner;
ALTER FUNCTION audit.stream_behind(jsonb) OWNER TO rewards_owner;
ALTER PROCEDURE audit.apply_history_retention(integer) OWNER TO rewards_owner;

REVOKE ALL ON audit.settings, audit.chain_checkpoints FROM PUBLIC;
REVOKE ALL ON FUNCTION audit.reconcile(text[], bigint[]), audit.stream_barrier(), audit.stream_behind(jsonb)
    FROM PUBLIC;
REVOKE ALL ON PROCEDURE audit.apply_history_retention(integer) FROM PUBLIC;
GRANT SELECT ON audit.settings, audit.chain_checkpoints TO rewards_auditor;
GRANT SELECT ON audit.settings TO rewards_audit_writer;

COMMENT ON FUNCTION audit.reconcile(text[], bigint[]) IS
'One row per finding for the given accounts: balance_differs_from_entries, reserved_differs_from_open_reservations, chain_broken, entries_missing_from_history, history_rows_not_in_ledger. With confirmed seqs, entries after them are not required in the history yet; entries before the history horizon never are.';
COMMENT ON FUNCTION audit.stream_barrier() IS
'Mark every node''s WAL; returns {"<node id>": "<lsn>"} for audit.stream_behind.';
COMMENT ON FUNCTION audit.stream_behind(jsonb) IS
'The logical slots of this database not yet past their node''s mark: none once the history holds all committed before it.';
COMMENT ON PROCEDURE audit.apply_history_retention(integer) IS
'Drop history months older than audit.settings.history_retention, keeping each account''s chain checkpoint and moving the horizon first. Hourly by pg_cron.';
COMMENT ON FUNCTION audit.repair_history(text) IS
'Copy the account''s ledger entries that the history lacks, none before the horizon; returns how many. Never touches the ledger.';

DO $cron$
BEGIN
    IF current_database() IS DISTINCT FROM current_setting('cron.database_name', true) THEN
        RETURN;
    END IF;
    PERFORM cron.schedule('rewards-audit-retention', '27 * * * *', 'CALL audit.apply_history_retention()');
END
$cron$;
