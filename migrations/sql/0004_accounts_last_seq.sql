-- ===========================================================================
-- ledger.accounts.version becomes last_seq (revision 0004)
--
-- The column holds the seq of the account's newest entry, which is what the
-- reconciler already called it. The view ledger.balances (and so the row
-- ledger.balance returns) follows; the CHECK accounts_counters_valid follows by
-- itself (PostgreSQL stores the column, not its name). The functions that name
-- the column are replaced with identical signatures, owners, grants and (under
-- Citus) distribution, in the same transaction as the rename, so API processes
-- still running the old code keep calling them unchanged. Under Citus the
-- RENAME COLUMN reaches every shard, and CREATE OR REPLACE of a distributed
-- function reaches every worker.
-- ===========================================================================

-- In a DO block because Citus refuses to propagate DDL on a distributed table
-- that arrives in a query string holding other statements ("cannot execute
-- multiple utility events"), and run_sql_file sends the whole file as one; each
-- statement of a DO block is a query string of its own.
DO $rename$
BEGIN
    IF EXISTS (SELECT FROM pg_catalog.pg_extension WHERE extname = 'citus') THEN
        -- The distributed functions below are replaced over one connection per
        -- node, which Citus allows only when the rename used no more.
        PERFORM pg_catalog.set_config('citus.multi_shard_modify_mode', 'sequential', true);
    END IF;
    ALTER TABLE ledger.accounts RENAME COLUMN version TO last_seq;
    ALTER VIEW ledger.balances RENAME COLUMN version TO last_seq;
    -- The view's stored query still calls its column `version`: PostgreSQL reads
    -- the view's own column names, but Citus deparses that query when it pushes
    -- a read down to a shard. Restating the view gives its query the new name.
    CREATE OR REPLACE VIEW ledger.balances AS
        SELECT user_id, available, reserved, lifetime_earned, last_seq, updated_at
        FROM ledger.accounts;
END
$rename$;

-- The one place a balance changes: appends the entry (chained to the account's
-- last hash) and moves the account in the same transaction.
-- Call only with the account locked; p_account is its locked row.
CREATE OR REPLACE FUNCTION ledger._append_entry(
    p_account ledger.accounts,
    p_kind text,
    p_amount bigint,
    p_available_delta bigint,
    p_reserved_delta bigint,
    p_reservation_id bigint,
    p_reason text,
    p_metadata jsonb,
    p_idempotency_key text,
    p_action_source text DEFAULT NULL,
    p_action_external_id text DEFAULT NULL
)
RETURNS ledger.entries
LANGUAGE plpgsql
AS $$
DECLARE
    v_entry ledger.entries;
BEGIN
    v_entry.user_id := p_account.user_id;
    v_entry.entry_id := nextval('ledger.entries_entry_id_seq');
    v_entry.seq := p_account.last_seq + 1;
    v_entry.kind := p_kind;
    v_entry.amount := p_amount;
    v_entry.available_delta := p_available_delta;
    v_entry.reserved_delta := p_reserved_delta;
    v_entry.available_after := p_account.available + p_available_delta;
    v_entry.reserved_after := p_account.reserved + p_reserved_delta;
    v_entry.reservation_id := p_reservation_id;
    v_entry.reason := p_reason;
    v_entry.action_source := p_action_source;
    v_entry.action_external_id := p_action_external_id;
    v_entry.metadata := p_metadata;
    v_entry.idempotency_key := p_idempotency_key;
    v_entry.created_at := now();
    v_entry.prev_hash := p_account.last_entry_hash;
    v_entry.hash := ledger._entry_hash(v_entry.prev_hash, v_entry);

    INSERT INTO ledger.entries SELECT v_entry.*;

    UPDATE ledger.accounts SET
        available = v_entry.available_after,
        reserved = v_entry.reserved_after,
        lifetime_earned = lifetime_earned + CASE WHEN p_kind = 'credit' THEN p_amount ELSE 0 END,
        last_seq = v_entry.seq,
        last_entry_hash = v_entry.hash,
        updated_at = v_entry.created_at
    WHERE user_id = p_account.user_id;

    RETURN v_entry;
END;
$$;

-- Recompute an account's hash chain from its first entry. ok is false when an
-- entry's stored hash or link differs from the recomputed one, or the account's
-- head does not match its last entry; first_broken_* name the first bad entry.
CREATE OR REPLACE FUNCTION ledger.verify_chain(p_user_id text)
RETURNS TABLE (ok boolean, entries_checked bigint, first_broken_entry_id bigint, first_broken_seq bigint)
LANGUAGE plpgsql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_entry ledger.entries;
    v_expected_prev bytea := '\x0000000000000000000000000000000000000000000000000000000000000000';
    v_expected_seq bigint := 1;
    v_head ledger.accounts;
BEGIN
    entries_checked := 0;
    FOR v_entry IN SELECT * FROM ledger.entries WHERE user_id = p_user_id ORDER BY seq LOOP
        IF v_entry.seq <> v_expected_seq
           OR v_entry.prev_hash <> v_expected_prev
           OR v_entry.hash <> ledger._entry_hash(v_entry.prev_hash, v_entry) THEN
            ok := false;
            first_broken_entry_id := v_entry.entry_id;
            first_broken_seq := v_entry.seq;
            RETURN NEXT;
            RETURN;
        END IF;
        entries_checked := entries_checked + 1;
        v_expected_prev := v_entry.hash;
        v_expected_seq := v_expected_seq + 1;
    END LOOP;
    SELECT * INTO v_head FROM ledger.accounts WHERE user_id = p_user_id;
    ok := NOT FOUND OR (v_head.last_entry_hash = v_expected_prev AND v_head.last_seq = v_expected_seq - 1);
    RETURN NEXT;
END;
$$;

-- What is wrong with each of the given accounts: one row per finding, none
-- when all agree. Checks that the balance equals what its entries sum to and
-- its holds equal its open reservations, that its hash chain verifies, and
-- that the history holds exactly its entries.
CREATE OR REPLACE FUNCTION audit.reconcile(p_user_ids text[])
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
