-- ===========================================================================
-- Many credits in one call (revision 0018)
--
-- ledger.credit_many applies many credits in one transaction, for the API's
-- group commit and bulk grants: one answer per item, each what ledger.credit
-- would have answered for that item alone. The credit itself moves into two
-- private helpers that both call (ledger._check_credit, ledger._apply_credit),
-- so there is one credit; ledger.credit keeps its signature and answers.
-- ledger.settings.max_batch_items bounds a call (1000).
-- ===========================================================================

-- One item's answer from a call over many items (ledger.credit_many): its
-- position in the call, then either what the single call answers (the columns
-- of ledger.result, error_sqlstate NULL) or the error that item alone raised
-- (status NULL; error_column is the argument a 22023 names).
CREATE TYPE ledger.item_result AS (
    item            integer,
    status          text,
    user_id         text,
    entry_id        bigint,
    reservation_id  bigint,
    amount          bigint,
    available       bigint,
    reserved        bigint,
    expires_at      timestamptz,
    created_at      timestamptz,
    replayed        boolean,
    error_sqlstate  text,
    error_column    text,
    error_message   text
);

ALTER TYPE ledger.item_result OWNER TO rewards_owner;

-- The checks of a credit's arguments (ledger.credit, ledger.credit_many).
CREATE FUNCTION ledger._check_credit(
    p_settings ledger.settings,
    p_user_id text,
    p_idempotency_key text,
    p_amount bigint,
    p_reason text,
    p_action_source text,
    p_action_external_id text,
    p_metadata jsonb
)
RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    PERFORM ledger._check_request(p_settings, p_user_id, p_idempotency_key, p_reason, p_metadata);
    PERFORM ledger._check_amount(p_settings, 'amount', p_amount);
    IF (p_action_source IS NULL) <> (p_action_external_id IS NULL) THEN
        PERFORM ledger._invalid('action', 'source and external_id come together or not at all');
    END IF;
    IF p_action_source IS NOT NULL AND NOT ledger._is_name(p_action_source) THEN
        PERFORM ledger._invalid('action_source', 'must be 1-64 characters of A-Z a-z 0-9 . _ : -');
    END IF;
    IF p_action_external_id IS NOT NULL AND NOT ledger._is_token(p_action_external_id) THEN
        PERFORM ledger._invalid('action_external_id', 'must be 1-255 visible ASCII characters');
    END IF;
END;
$$;

-- A checked credit, applied to its account: the one credit that ledger.credit
-- and ledger.credit_many both make. Call only with the account locked;
-- p_account is its row as it stands.
CREATE FUNCTION ledger._apply_credit(
    p_account ledger.accounts,
    p_idempotency_key text,
    p_amount bigint,
    p_reason text,
    p_action_source text,
    p_action_external_id text,
    p_metadata jsonb
)
RETURNS ledger.result
LANGUAGE plpgsql
AS $$
DECLARE
    v_request bytea;
    v_result ledger.result;
BEGIN
    v_request := ledger._fingerprint(jsonb_build_array(
        p_amount, p_reason, p_action_source, p_action_external_id, p_metadata));
    v_result := ledger._replay(p_account, p_idempotency_key, 'credit', v_request);
    IF v_result.status IS NOT NULL THEN
        RETURN v_result;
    END IF;

    IF p_action_source IS NOT NULL AND EXISTS (
        SELECT FROM ledger.entries
        WHERE user_id = p_account.user_id
          AND action_source = p_action_source
          AND action_external_id = p_action_external_id
    ) THEN
        v_result := ledger._refusal('action_already_credited', p_account);
    ELSE
        v_result := ledger._entry_result(ledger._append_entry(
            p_account, 'credit', p_amount, p_amount, 0, NULL, p_reason, p_metadata,
            p_idempotency_key, p_action_source, p_action_external_id));
    END IF;
    RETURN ledger._remember(p_idempotency_key, 'credit', v_request, v_result);
END;
$$;

-- An item of a call over many answered with the error it raised alone.
CREATE FUNCTION ledger._item_error(p_item integer, p_user_id text, p_sqlstate text, p_column text,
                                   p_message text)
RETURNS ledger.item_result
LANGUAGE plpgsql
IMMUTABLE
AS $$
BEGIN
    RETURN ROW(p_item, NULL, p_user_id, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
               p_sqlstate, nullif(p_column, ''), p_message)::ledger.item_result;
END;
$$;

CREATE OR REPLACE FUNCTION ledger.credit(
    p_user_id text,
    p_idempotency_key text,
    p_amount bigint,
    p_reason text,
    p_action_source text DEFAULT NULL,
    p_action_external_id text DEFAULT NULL,
    p_metadata jsonb DEFAULT '{}'
)
RETURNS ledger.result
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM ledger._check_credit(ledger._settings(), p_user_id, p_idempotency_key, p_amount, p_reason,
                                 p_action_source, p_action_external_id, p_metadata);
    RETURN ledger._apply_credit(ledger._lock_account(p_user_id), p_idempotency_key, p_amount, p_reason,
                                p_action_source, p_action_external_id, p_metadata);
END;
$$;

-- Many credits in one transaction: one commit for all of them. Item i is
-- (p_user_ids[i], p_idempotency_keys[i], p_amounts[i], p_reasons[i],
-- p_action_sources[i], p_action_external_ids[i], p_metadata[i]), and its
-- answer is the i-th row, exactly what ledger.credit would have answered for
-- it alone after the items before it: the same checks, statuses and replays
-- (two items with one key have one effect; the second replays the first).
-- Three phases:
-- 1. Each item is checked as ledger.credit checks it; an invalid one is
--    answered with its error (SQLSTATE, COLUMN, message) and takes no part.
--    The check raises, so each runs in a subtransaction of its own, which
--    writes nothing and so takes no transaction id.
-- 2. The accounts of the valid items are locked in one order (user_id in "C"
--    collation) before any item is applied, so calls over overlapping users
--    cannot deadlock each other.
-- 3. The items are applied in input order, all in one subtransaction. An item
--    that raises a genuine error (a constraint, an overflow) rolls back what
--    the items had done so far; it is answered with its error and the others
--    are applied again, their accounts still locked. The common case pays for
--    one subtransaction, not one per item (each writing subtransaction takes a
--    transaction id of its own, and past 64 of them every snapshot taken
--    meanwhile overflows into pg_subtrans).
-- Under Citus the call is distributed by p_user_id, the user whose shard all
-- the items' users must share (an item whose user is elsewhere is answered
-- with 0A000 and may be sent again on its own); it is delegated only as a
-- statement of its own, outside a transaction block: force_delegation would
-- pin every query inside to p_user_id's value alone.
CREATE FUNCTION ledger.credit_many(
    p_user_id text,
    p_user_ids text[],
    p_idempotency_keys text[],
    p_amounts bigint[],
    p_reasons text[],
    p_action_sources text[],
    p_action_external_ids text[],
    p_metadata jsonb[]
)
RETURNS SETOF ledger.item_result
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_settings ledger.settings := ledger._settings();
    v_count integer := coalesce(cardinality(p_user_ids), 0);
    v_shard bigint;
    v_answers ledger.item_result[];
    v_failed boolean[] := array_fill(false, ARRAY[v_count]);
    v_item integer;
    v_user text;
    v_account ledger.accounts;
    v_result ledger.result;
    v_sqlstate text;
    v_column text;
    v_message text;
BEGIN
    IF NOT ledger._is_name(p_user_id) THEN
        PERFORM ledger._invalid('user_id', 'must be 1-64 characters of A-Z a-z 0-9 . _ : -');
    END IF;
    IF v_count NOT BETWEEN 1 AND v_settings.max_batch_items
       OR v_count IS DISTINCT FROM cardinality(p_idempotency_keys)
       OR v_count IS DISTINCT FROM cardinality(p_amounts)
       OR v_count IS DISTINCT FROM cardinality(p_reasons)
       OR v_count IS DISTINCT FROM cardinality(p_action_sources)
       OR v_count IS DISTINCT FROM cardinality(p_action_external_ids)
       OR v_count IS DISTINCT FROM cardinality(p_metadata) THEN
        PERFORM ledger._invalid('items', format(
            'must be 1-%s items, each argument array of the same length', v_settings.max_batch_items));
    END IF;
    IF EXISTS (SELECT FROM pg_catalog.pg_extension WHERE extname = 'citus') THEN
        v_shard := pg_catalog.get_shard_id_for_distribution_column('ledger.accounts', p_user_id);
    END IF;

    FOR v_item IN 1..v_count LOOP
        BEGIN
            PERFORM ledger._check_credit(v_settings, p_user_ids[v_item], p_idempotency_keys[v_item],
                                         p_amounts[v_item], p_reasons[v_item], p_action_sources[v_item],
                                         p_action_external_ids[v_item], p_metadata[v_item]);
            -- (Nested: the Citus function must not be named where Citus is absent.)
            IF v_shard IS NOT NULL THEN
                IF v_shard <> pg_catalog.get_shard_id_for_distribution_column('ledger.accounts',
                                                                              p_user_ids[v_item]) THEN
                    RAISE EXCEPTION USING
                        ERRCODE = 'feature_not_supported',
                        COLUMN = 'user_id',
                        MESSAGE = format('user %s is not in the shard of user %s, which this call holds',
                                         p_user_ids[v_item], p_user_id);
                END IF;
            END IF;
        EXCEPTION WHEN OTHERS THEN
            GET STACKED DIAGNOSTICS v_sqlstate = RETURNED_SQLSTATE, v_column = COLUMN_NAME,
                                    v_message = MESSAGE_TEXT;
            v_failed[v_item] := true;
            v_answers[v_item] := ledger._item_error(v_item, p_user_ids[v_item], v_sqlstate, v_column, v_message);
        END;
    END LOOP;

    FOR v_user IN
        SELECT DISTINCT u.user_id COLLATE "C" FROM unnest(p_user_ids, v_failed) AS u(user_id, failed)
        WHERE NOT u.failed ORDER BY 1
    LOOP
        PERFORM ledger._lock_account(v_user);
    END LOOP;

    LOOP
        v_item := 0;
        BEGIN
            WHILE v_item < v_count LOOP
                v_item := v_item + 1;
                CONTINUE WHEN v_failed[v_item];
                SELECT * INTO STRICT v_account FROM ledger.accounts WHERE user_id = p_user_ids[v_item];
                v_result := ledger._apply_credit(v_account, p_idempotency_keys[v_item], p_amounts[v_item],
                                                 p_reasons[v_item], p_action_sources[v_item],
                                                 p_action_external_ids[v_item], p_metadata[v_item]);
                v_answers[v_item] := ROW(v_item, (v_result).*, NULL, NULL, NULL)::ledger.item_result;
            END LOOP;
            EXIT;
        EXCEPTION WHEN OTHERS THEN
            GET STACKED DIAGNOSTICS v_sqlstate = RETURNED_SQLSTATE, v_column = COLUMN_NAME,
                                    v_message = MESSAGE_TEXT;
            v_failed[v_item] := true;
            v_answers[v_item] := ledger._item_error(v_item, p_user_ids[v_item], v_sqlstate, v_column, v_message);
        END;
    END LOOP;

    FOR v_item IN 1..v_count LOOP
        RETURN NEXT v_answers[v_item];
    END LOOP;
END;
$$;


ALTER FUNCTION ledger._check_credit(ledger.settings, text, text, bigint, text, text, text, jsonb) OWNER TO rewards_owner;
ALTER FUNCTION ledger._apply_credit(ledger.accounts, text, bigint, text, text, text, jsonb) OWNER TO rewards_owner;
ALTER FUNCTION ledger._item_error(integer, text, text, text, text) OWNER TO rewards_owner;
ALTER FUNCTION ledger.credit_many(text, text[], text[], bigint[], text[], text[], text[], jsonb[]) OWNER TO rewards_owner;
REVOKE ALL ON FUNCTION
    ledger._check_credit(ledger.settings, text, text, bigint, text, text, text, jsonb),
    ledger._apply_credit(ledger.accounts, text, bigint, text, text, text, jsonb),
    ledger._item_error(integer, text, text, text, text),
    ledger.credit_many(text, text[], text[], bigint[], text[], text[], text[], jsonb[])
FROM PUBLIC;
GRANT EXECUTE ON FUNCTION ledger.credit_many(text, text[], text[], bigint[], text[], text[], text[], jsonb[]) TO rewards_api;

COMMENT ON FUNCTION ledger.credit_many(text, text[], text[], bigint[], text[], text[], text[], jsonb[]) IS
'Many credits in one transaction. Args: user_id (under Citus the user whose shard every item''s user must share), then one array per ledger.credit argument, item i taking element i of each (1..settings.max_batch_items items). One row per item, in input order: what ledger.credit would have answered for it alone after the items before it, or its error (error_sqlstate, error_column, error_message) when that item alone raised; 0A000 for an item of another shard. Accounts are locked in user_id order before any item is applied. Invalid call arguments raise 22023 (COLUMN user_id or items).';

DO $citus$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_extension WHERE extname = 'citus') THEN
        RETURN;
    END IF;
    PERFORM create_distributed_function('ledger._check_credit(ledger.settings, text, text, bigint, text, text, text, jsonb)');
    PERFORM create_distributed_function('ledger._apply_credit(ledger.accounts, text, bigint, text, text, text, jsonb)');
    PERFORM create_distributed_function('ledger._item_error(integer, text, text, text, text)');
    -- Delegated by the user whose shard holds every item, as a statement of its
    -- own: force_delegation would allow the queries inside to touch p_user_id's
    -- rows alone.
    PERFORM create_distributed_function('ledger.credit_many(text, text[], text[], bigint[], text[], text[], text[], jsonb[])', 'p_user_id',
                                        colocate_with => 'ledger.accounts');
END
$citus$;

-- The table last, inside a DO block (see revision 0015).
DO $tables$
BEGIN
    ALTER TABLE ledger.settings ADD COLUMN max_batch_items integer NOT NULL DEFAULT 1000;
    ALTER TABLE ledger.settings ADD CONSTRAINT settings_batch_items_positive CHECK (max_batch_items > 0);
END
$tables$;
