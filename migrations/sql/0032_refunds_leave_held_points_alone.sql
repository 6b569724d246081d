-- ===========================================================================
-- Refunds leave held points alone; rules may make pending points that never
-- expire (revision 0032)
--
-- A refund that needed points an open reservation held counted them as owed
-- (or wrote them off), and the release or a smaller commit of the hold then
-- gave them back to the user: with write_off the user kept refunded points,
-- with an expiring lot the points lapsed and were owed as well. It is now
-- refused (RLB02, nothing written) until the hold has ended.
-- rules_lot_terms refused a rule with pending_seconds and no expiry_seconds,
-- which the rule's checks and the ledger's credits allow.
-- ===========================================================================

CREATE OR REPLACE FUNCTION ledger.refund(
    p_user_id text,
    p_idempotency_key text,
    p_action_source text,
    p_action_external_id text,
    p_reason text,
    p_metadata jsonb DEFAULT '{}'
)
RETURNS ledger.result
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_settings ledger.settings := ledger._settings();
    v_account ledger.accounts;
    v_request jsonb;
    v_result ledger.result;
    v_credit ledger.entries;
    v_lot ledger.lots;
    v_entry ledger.entries;
    v_metadata jsonb;
    v_due bigint;
    v_take bigint;
    v_own bigint;
BEGIN
    PERFORM ledger._check_request(v_settings, p_user_id, p_idempotency_key, p_reason, p_metadata);
    IF NOT ledger._is_name(p_action_source) THEN
        PERFORM ledger._invalid('action_source', 'must be 1-64 characters of A-Z a-z 0-9 . _ : -');
    END IF;
    IF NOT ledger._is_token(p_action_external_id) THEN
        PERFORM ledger._invalid('action_external_id', 'must be 1-255 visible ASCII characters');
    END IF;

    v_account := ledger._lock_account(p_user_id);
    v_request := jsonb_build_array(p_action_source, p_action_external_id, p_reason, p_metadata);
    v_result := ledger._replay(v_account, p_idempotency_key, 'refund', v_request);
    IF v_result.status IS NOT NULL THEN
        RETURN v_result;
    END IF;

    SELECT * INTO v_credit FROM ledger.entries
    WHERE user_id = p_user_id AND action_source = p_action_source AND action_external_id = p_action_external_id
      AND kind = 'credit';
    IF NOT FOUND THEN
        RETURN ledger._remember(p_idempotency_key, 'refund', v_request,
                                ledger._refusal('action_not_found', v_account));
    END IF;
    IF EXISTS (SELECT FROM ledger.entries
               WHERE user_id = p_user_id AND action_source = p_action_source
                 AND action_external_id = p_action_external_id
                 AND kind IN ('cancel', 'reversal', 'owed', 'write_off')) THEN
        RETURN ledger._remember(p_idempotency_key, 'refund', v_request,
                                ledger._refusal('action_already_refunded', v_account));
    END IF;
    -- as a redemption does: the credit's lot may be due to mature or lapse
    IF v_account.pending > 0 OR v_account.expiring > 0 THEN
        v_account := ledger._settle_due(v_account);
    END IF;

    v_metadata := p_metadata || jsonb_build_object('refund_of_entry_id', v_credit.entry_id);
    SELECT * INTO v_lot FROM ledger.lots WHERE user_id = p_user_id AND entry_id = v_credit.entry_id;
    IF FOUND AND NOT v_lot.matured THEN
        -- closed: it will never mature, and holds nothing
        UPDATE ledger.lots SET matured = true, remaining = 0 WHERE user_id = p_user_id AND lot_id = v_lot.lot_id;
        UPDATE ledger.accounts SET pending = pending - v_lot.amount WHERE user_id = p_user_id
        RETURNING * INTO v_account;
        v_due := v_lot.amount;
        v_entry := ledger._append_entry(v_account, 'cancel', v_due, 0, 0, NULL, p_reason, v_metadata, NULL,
                                        p_action_source, p_action_external_id);
    ELSE
        v_due := v_credit.amount;
        IF v_lot.lot_id IS NOT NULL THEN
            v_due := v_due - coalesce((SELECT sum(e.amount) FROM ledger.entries e
                                       WHERE e.user_id = p_user_id AND e.kind = 'lapse'
                                         AND e.metadata ->> 'lot_id' = v_lot.lot_id::text), 0);
        END IF;
        IF v_due = 0 THEN
            RETURN ledger._remember(p_idempotency_key, 'refund', v_request,
                                    ledger._refusal('action_points_expired', v_account));
        END IF;
        IF v_due > v_account.available AND v_account.reserved > 0 THEN
            -- What a reservation holds is not spent yet: counted as owed (or
            -- written off) now, it would come back to the user when the hold
            -- is released or committed for less. Refused, writing nothing, so
            -- that the same request succeeds once the hold has ended.
            RAISE EXCEPTION USING ERRCODE = 'RLB02',
                MESSAGE = format('%s of the points to refund are held by open reservations:'
                                 ' retry once they are committed, released or expired',
                                 least(v_due - v_account.available, v_account.reserved));
        END IF;
        v_take := least(v_due, v_account.available);
        IF v_take > 0 THEN
            IF v_lot.expires_at IS NOT NULL THEN
                v_own := least(v_lot.remaining, v_take);
                UPDATE ledger.lots SET remaining = remaining - v_own
                WHERE user_id = p_user_id AND lot_id = v_lot.lot_id;
                UPDATE ledger.accounts SET expiring = expiring - v_own WHERE user_id = p_user_id
                RETURNING * INTO v_account;
            ELSE
                v_own := least(v_take, v_account.available - v_account.expiring);
            END IF;
            IF v_take > v_own THEN
                PERFORM ledger._draw_lots(v_account, v_take - v_own);
                SELECT * INTO v_account FROM ledger.accounts WHERE user_id = p_user_id;
            END IF;
            v_entry := ledger._append_entry(v_account, 'reversal', v_take, -v_take, 0, NULL, p_reason, v_metadata,
                                            NULL, p_action_source, p_action_external_id);
            SELECT * INTO v_account FROM ledger.accounts WHERE user_id = p_user_id;
        END IF;
        IF v_due > v_take AND v_settings.refund_shortfall = 'write_off' THEN
            v_entry := ledger._append_entry(v_account, 'write_off', v_due - v_take, 0, 0, NULL, p_reason,
                                            v_metadata, NULL, p_action_source, p_action_external_id);
        ELSIF v_due > v_take THEN
            UPDATE ledger.accounts SET owed = owed + (v_due - v_take) WHERE user_id = p_user_id
            RETURNING * INTO v_account;
            v_entry := ledger._append_entry(v_account, 'owed', v_due - v_take, 0, 0, NULL, p_reason, v_metadata,
                                            NULL, p_action_source, p_action_external_id);
        END IF;
    END IF;
    v_result := ledger._entry_result(v_entry);
    v_result.amount := v_due;
    RETURN ledger._remember(p_idempotency_key, 'refund', v_request, v_result);
END;
$$;

-- One subcommand a statement inside a DO block (revision 0025: Citus refuses
-- ADD CONSTRAINT beside other subcommands on a reference table).
DO $tables$
BEGIN
    ALTER TABLE rules.rules DROP CONSTRAINT rules_lot_terms;
    ALTER TABLE rules.rules ADD CONSTRAINT rules_lot_terms CHECK (
        coalesce(pending_seconds, 1) >= 1
        AND (expiry_seconds IS NULL OR expiry_seconds > coalesce(pending_seconds, 0)));
END
$tables$;
