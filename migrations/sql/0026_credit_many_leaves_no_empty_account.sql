-- ===========================================================================
-- ledger.credit_many leaves no empty account behind (revision 0026)
--
-- An item that raised after the accounts were locked left the account made
-- for it (all zeros, no entry) when no other item of its user succeeded,
-- where a single credit that raises writes nothing. The locking now runs in
-- the subtransaction that applies the items, so it is rolled back with them
-- and done again, without the failed item, in the same order.
-- ===========================================================================

CREATE OR REPLACE FUNCTION ledger.credit_many(
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
                                         p_action_external_ids[v_item], p_metadata[v_item], NULL, NULL);
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

    LOOP
        v_item := 0;
        BEGIN
            FOR v_user IN
                SELECT DISTINCT u.user_id COLLATE "C" FROM unnest(p_user_ids, v_failed) AS u(user_id, failed)
                WHERE NOT u.failed ORDER BY 1
            LOOP
                PERFORM ledger._lock_account(v_user);
            END LOOP;
            WHILE v_item < v_count LOOP
                v_item := v_item + 1;
                CONTINUE WHEN v_failed[v_item];
                SELECT * INTO STRICT v_account FROM ledger.accounts WHERE user_id = p_user_ids[v_item];
                v_result := ledger._apply_credit(v_account, p_idempotency_keys[v_item], p_amounts[v_item],
                                                 p_reasons[v_item], p_action_sources[v_item],
                                                 p_action_external_ids[v_item], p_metadata[v_item], NULL, NULL);
                v_answers[v_item] := ROW(v_item, (v_result).*, NULL, NULL, NULL)::ledger.item_result;
            END LOOP;
            EXIT;
        EXCEPTION WHEN OTHERS THEN
            IF v_item = 0 THEN
                RAISE;  -- locking failed (lock_timeout): the call's, not an item's
            END IF;
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
