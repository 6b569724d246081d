-- ===========================================================================
-- A write that succeeds keeps its idempotency key on its entry (revision 0022)
--
-- A credit, debit or reserve that succeeds wrote its entry and, beside it, an
-- idempotency record repeating the entry's result: a second insert, with two
-- indexes, on every success. Now the entry is the record: a unique key on
-- (user_id, idempotency_key) holds one entry per key, and a retry finds its
-- answer on the entry, comparing the request with what the entry holds. Only
-- what writes no entry under its key keeps a record: refusals, and the ends of
-- reservations (commit and release), whose request the entry does not fully
-- hold. The entries table is not partitioned (only the history is), so the key
-- needs no time column; it includes user_id, as Citus requires. No entry could
-- hold a key twice before: every key was remembered until 0015, which is when
-- the oldest record became eligible for retention, 30 days from now.
-- ===========================================================================

-- The replay now takes the request itself, not its fingerprint: the
-- fingerprint is only needed where a record is read or written.
DROP FUNCTION ledger._replay(ledger.accounts, text, text, bytea);

-- The earlier result for this key: replayed when the request is the same,
-- 'idempotency_key_reused' when it differs, NULL when the key is new (test
-- .status: a row value IS NOT NULL only when every field is). A key's record
-- wins; without one, the entry written under the key answers, its request
-- rebuilt from its columns in the shape each operation gives p_request. Call
-- only with the account locked.
CREATE FUNCTION ledger._replay(
    p_account ledger.accounts,
    p_idempotency_key text,
    p_operation text,
    p_request jsonb
)
RETURNS ledger.result
LANGUAGE plpgsql
AS $$
DECLARE
    v_key ledger.idempotency_keys;
    v_entry ledger.entries;
    v_reservation ledger.reservations;
    v_stored jsonb;
BEGIN
    SELECT * INTO v_key FROM ledger.idempotency_keys
    WHERE user_id = p_account.user_id AND idempotency_key = p_idempotency_key;
    IF FOUND THEN
        IF v_key.operation <> p_operation OR v_key.request_hash <> ledger._fingerprint(p_request) THEN
            RETURN ROW('idempotency_key_reused', p_account.user_id, NULL, NULL, NULL,
                       p_account.available, p_account.reserved, NULL, NULL, false)::ledger.result;
        END IF;
        RETURN ROW(v_key.status, v_key.user_id, v_key.entry_id, v_key.reservation_id, v_key.amount,
                   v_key.available, v_key.reserved, v_key.expires_at, v_key.created_at, true)::ledger.result;
    END IF;
    SELECT * INTO v_entry FROM ledger.entries
    WHERE user_id = p_account.user_id AND idempotency_key = p_idempotency_key;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF v_entry.reservation_id IS NOT NULL THEN
        SELECT * INTO v_reservation FROM ledger.reservations
        WHERE user_id = p_account.user_id AND reservation_id = v_entry.reservation_id;
    END IF;
    v_stored := CASE v_entry.kind
        WHEN 'credit' THEN jsonb_build_array(v_entry.amount, v_entry.reason, v_entry.action_source,
                                             v_entry.action_external_id, v_entry.metadata)
        WHEN 'debit' THEN jsonb_build_array(v_entry.amount, v_entry.reason, v_entry.metadata)
        -- both timestamps of a reservation are its transaction's now()
        WHEN 'reserve' THEN jsonb_build_array(
            v_entry.amount, extract(epoch FROM v_reservation.expires_at - v_reservation.created_at)::integer,
            v_entry.reason, v_entry.metadata)
        -- Commits and releases keep their record; these only answer once it
        -- is past its retention. A commit of the whole hold may have named its
        -- amount or not: the entry cannot tell, so either matches.
        WHEN 'commit' THEN jsonb_build_array(
            v_entry.reservation_id,
            CASE WHEN p_request -> 1 = 'null' AND v_entry.amount = v_reservation.amount THEN NULL
                 ELSE v_entry.amount END,
            v_entry.reason, v_entry.metadata)
        WHEN 'release' THEN jsonb_build_array(v_entry.reservation_id, NULL, v_entry.reason, v_entry.metadata)
    END;
    IF v_entry.kind <> p_operation OR p_request IS DISTINCT FROM v_stored THEN
        RETURN ROW('idempotency_key_reused', p_account.user_id, NULL, NULL, NULL,
                   p_account.available, p_account.reserved, NULL, NULL, false)::ledger.result;
    END IF;
    RETURN ROW('ok', v_entry.user_id, v_entry.entry_id, v_entry.reservation_id, v_entry.amount,
               v_entry.available_after, v_entry.reserved_after,
               CASE v_entry.kind WHEN 'reserve' THEN v_reservation.expires_at END,
               v_entry.created_at, true)::ledger.result;
END;
$$;

-- The one place a balance changes: appends the entry (chained to the account's
-- last hash) and moves the account, in one statement.
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
    v_entry ledger.entries := ROW(
        p_account.user_id, nextval('ledger.entries_entry_id_seq'), p_account.last_seq + 1, p_kind,
        p_amount, p_available_delta, p_reserved_delta, p_account.available + p_available_delta,
        p_account.reserved + p_reserved_delta, p_reservation_id, p_reason, p_action_source,
        p_action_external_id, p_metadata, p_idempotency_key, now(), p_account.last_entry_hash, NULL);
BEGIN
    v_entry.hash := ledger._entry_hash(v_entry.prev_hash, v_entry);
    WITH appended AS (INSERT INTO ledger.entries SELECT v_entry.*)
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

-- A record is written only where no entry holds the key's answer; it takes the
-- request and fingerprints it here.
DROP FUNCTION ledger._remember(text, text, bytea, ledger.result);

-- Store the result under its key, then hand it back for the caller to return.
CREATE FUNCTION ledger._remember(
    p_idempotency_key text,
    p_operation text,
    p_request jsonb,
    p_result ledger.result
)
RETURNS ledger.result
LANGUAGE plpgsql
AS $$
BEGIN
    INSERT INTO ledger.idempotency_keys (
        user_id, idempotency_key, operation, request_hash, status, entry_id,
        reservation_id, amount, available, reserved, expires_at, created_at)
    VALUES (
        p_result.user_id, p_idempotency_key, p_operation, ledger._fingerprint(p_request), p_result.status,
        p_result.entry_id, p_result.reservation_id, p_result.amount, p_result.available,
        p_result.reserved, p_result.expires_at, p_result.created_at);
    RETURN p_result;
END;
$$;

-- Commit and release share everything but the final step.
CREATE OR REPLACE FUNCTION ledger._finish_reservation(
    p_operation text,
    p_user_id text,
    p_idempotency_key text,
    p_reservation_id bigint,
    p_amount bigint,
    p_reason text,
    p_metadata jsonb
)
RETURNS ledger.result
LANGUAGE plpgsql
AS $$
DECLARE
    v_settings ledger.settings := ledger._settings();
    v_account ledger.accounts;
    v_reservation ledger.reservations;
    v_request jsonb;
    v_result ledger.result;
    v_entry ledger.entries;
BEGIN
    PERFORM ledger._check_request(v_settings, p_user_id, p_idempotency_key, p_reason, p_metadata);
    IF p_reservation_id IS NULL OR p_reservation_id < 1 THEN
        PERFORM ledger._invalid('reservation_id', 'must be a positive integer');
    END IF;
    IF p_amount IS NOT NULL THEN
        PERFORM ledger._check_amount(v_settings, 'amount', p_amount);
    END IF;

    v_account := ledger._lock_account(p_user_id);
    v_request := jsonb_build_array(p_reservation_id, p_amount, p_reason, p_metadata);
    v_result := ledger._replay(v_account, p_idempotency_key, p_operation, v_request);
    IF v_result.status IS NOT NULL THEN
        RETURN v_result;
    END IF;

    SELECT * INTO v_reservation FROM ledger.reservations
    WHERE user_id = p_user_id AND reservation_id = p_reservation_id FOR UPDATE;
    IF NOT FOUND THEN
        v_result := ledger._refusal('reservation_not_found', v_account, p_reservation_id);
    ELSIF v_reservation.status <> 'open' THEN
        v_result := ledger._refusal('reservation_' || v_reservation.status, v_account, p_reservation_id);
    ELSIF v_reservation.expires_at <= now() THEN
        -- Past its deadline but not yet swept: it ends now, as expired, exactly
        -- as the scheduled job would have ended it.
        v_entry := ledger._end_reservation(v_account, v_reservation, 'expired', NULL, NULL,
                                           'reservation expired', '{}'::jsonb);
        v_result := ledger._entry_result(v_entry);
        v_result.status := 'reservation_expired';
    ELSIF p_amount > v_reservation.amount THEN
        v_result := ledger._refusal('amount_exceeds_reservation', v_account, p_reservation_id);
    ELSE
        v_entry := ledger._end_reservation(
            v_account, v_reservation,
            CASE p_operation WHEN 'commit' THEN 'committed' ELSE 'released' END,
            CASE p_operation WHEN 'commit' THEN coalesce(p_amount, v_reservation.amount) END,
            p_idempotency_key, p_reason, p_metadata);
        v_result := ledger._entry_result(v_entry);
    END IF;
    RETURN ledger._remember(p_idempotency_key, p_operation, v_request, v_result);
END;
$$;

-- A checked credit, applied to its account: the one credit that ledger.credit
-- and ledger.credit_many both make. Call only with the account locked;
-- p_account is its row as it stands.
CREATE OR REPLACE FUNCTION ledger._apply_credit(
    p_account ledger.accounts,
    p_idempotency_key text,
    p_amount bigint,
    p_reason text,
    p_action_source text,
    p_action_external_id text,
    p_metadata jsonb,
    p_pending_seconds integer,
    p_expiry_seconds integer
)
RETURNS ledger.result
LANGUAGE plpgsql
AS $$
DECLARE
    v_lot boolean := p_pending_seconds IS NOT NULL OR p_expiry_seconds IS NOT NULL;
    -- A credit without a lot keeps the request it always had.
    v_request jsonb := CASE WHEN v_lot
        THEN jsonb_build_array(p_amount, p_reason, p_action_source, p_action_external_id, p_metadata,
                               p_pending_seconds, p_expiry_seconds)
        ELSE jsonb_build_array(p_amount, p_reason, p_action_source, p_action_external_id, p_metadata) END;
    v_result ledger.result;
BEGIN
    v_result := ledger._replay(p_account, p_idempotency_key, 'credit', v_request);
    IF v_result.status IS NOT NULL THEN
        RETURN v_result;
    END IF;

    IF p_action_source IS NOT NULL
       AND ledger._action_credited(p_account.user_id, p_action_source, p_action_external_id) THEN
        RETURN ledger._remember(p_idempotency_key, 'credit', v_request,
                                ledger._refusal('action_already_credited', p_account));
    END IF;
    v_result := ledger._credit_entry(p_account, p_idempotency_key, p_amount, p_reason, p_action_source,
                                     p_action_external_id, p_metadata, p_pending_seconds, p_expiry_seconds);
    IF v_lot THEN
        -- the entry does not hold the lot's terms, so its key keeps a record
        RETURN ledger._remember(p_idempotency_key, 'credit', v_request, v_result);
    END IF;
    -- the entry is the key's record (ledger._replay reads it)
    RETURN v_result;
END;
$$;
CREATE OR REPLACE FUNCTION ledger.debit(
    p_user_id text,
    p_idempotency_key text,
    p_amount bigint,
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
BEGIN
    PERFORM ledger._check_request(v_settings, p_user_id, p_idempotency_key, p_reason, p_metadata);
    PERFORM ledger._check_amount(v_settings, 'amount', p_amount);

    v_account := ledger._lock_account(p_user_id);
    v_request := jsonb_build_array(p_amount, p_reason, p_metadata);
    v_result := ledger._replay(v_account, p_idempotency_key, 'debit', v_request);
    IF v_result.status IS NOT NULL THEN
        RETURN v_result;
    END IF;

    IF v_account.pending > 0 OR v_account.expiring > 0 THEN
        v_account := ledger._settle_due(v_account);
    END IF;
    IF v_account.available < p_amount THEN
        RETURN ledger._remember(p_idempotency_key, 'debit', v_request,
                                ledger._refusal('insufficient_points', v_account));
    END IF;
    PERFORM ledger._draw_lots(v_account, p_amount);
    -- the entry is the key's record (ledger._replay reads it)
    RETURN ledger._entry_result(ledger._append_entry(
        v_account, 'debit', p_amount, -p_amount, 0, NULL, p_reason, p_metadata, p_idempotency_key));
END;
$$;
CREATE OR REPLACE FUNCTION ledger.reserve(
    p_user_id text,
    p_idempotency_key text,
    p_amount bigint,
    p_ttl_seconds integer,
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
    v_reservation ledger.reservations;
    v_draws jsonb;
BEGIN
    PERFORM ledger._check_request(v_settings, p_user_id, p_idempotency_key, p_reason, p_metadata);
    PERFORM ledger._check_amount(v_settings, 'amount', p_amount);
    IF p_ttl_seconds IS NULL OR p_ttl_seconds < 1
       OR make_interval(secs => p_ttl_seconds) > v_settings.max_reservation_ttl THEN
        PERFORM ledger._invalid('ttl_seconds', format(
            'must be from 1 to %s seconds', extract(epoch FROM v_settings.max_reservation_ttl)::bigint));
    END IF;

    v_account := ledger._lock_account(p_user_id);
    v_request := jsonb_build_array(p_amount, p_ttl_seconds, p_reason, p_metadata);
    v_result := ledger._replay(v_account, p_idempotency_key, 'reserve', v_request);
    IF v_result.status IS NOT NULL THEN
        RETURN v_result;
    END IF;

    IF v_account.pending > 0 OR v_account.expiring > 0 THEN
        v_account := ledger._settle_due(v_account);
    END IF;
    IF v_account.available < p_amount THEN
        RETURN ledger._remember(p_idempotency_key, 'reserve', v_request,
                                ledger._refusal('insufficient_points', v_account));
    END IF;
    v_draws := ledger._draw_lots(v_account, p_amount);
    INSERT INTO ledger.reservations (user_id, amount, reason, metadata, expires_at, lot_draws)
    VALUES (p_user_id, p_amount, p_reason, p_metadata, now() + make_interval(secs => p_ttl_seconds), v_draws)
    RETURNING * INTO v_reservation;
    -- the entry is the key's record (ledger._replay reads it)
    RETURN ledger._entry_result(
        ledger._append_entry(v_account, 'reserve', p_amount, -p_amount, p_amount,
                             v_reservation.reservation_id, p_reason, p_metadata, p_idempotency_key),
        v_reservation.expires_at);
END;
$$;

ALTER FUNCTION ledger._replay(ledger.accounts, text, text, jsonb) OWNER TO rewards_owner;
ALTER FUNCTION ledger._remember(text, text, jsonb, ledger.result) OWNER TO rewards_owner;
REVOKE ALL ON FUNCTION ledger._replay(ledger.accounts, text, text, jsonb),
                       ledger._remember(text, text, jsonb, ledger.result) FROM PUBLIC;

DO $citus$
BEGIN
    IF EXISTS (SELECT FROM pg_catalog.pg_extension WHERE extname = 'citus') THEN
        PERFORM create_distributed_function('ledger._replay(ledger.accounts, text, text, jsonb)');
        PERFORM create_distributed_function('ledger._remember(text, text, jsonb, ledger.result)');
    END IF;
END
$citus$;

-- The index last: Citus creates a function on every node over one connection
-- per node, which a parallel change of a distributed table before it in the
-- same transaction would refuse. And inside a DO block: Citus sends a
-- distributed table's DDL to the workers as the text of its statement, which
-- in a file sent as one query would be the whole file.
DO $tables$
BEGIN
    CREATE UNIQUE INDEX entries_idempotency_key_once
        ON ledger.entries (user_id, idempotency_key)
        WHERE idempotency_key IS NOT NULL;
END
$tables$;
