-- Refunds and reversals (sql/ledger.sql, ledger.refund): a refund of a
-- verified action reverses what its credit earned, as entries that name the
-- action ('cancel' of pending points, 'reversal' of available ones, 'owed' or
-- 'write_off' for what the user already spent, by ledger.settings.
-- refund_shortfall); accounts.owed is paid off first by the points later
-- credits make available ('repay'). The credit's action index takes the kind,
-- so a refund's parts may name the action once each; the reconciler sums
-- cancelled pending points and owed ones too.

-- Citus creates each function on every node over one connection per node,
-- which a parallel change of a distributed table earlier in the transaction
-- would refuse: the table changes below go one connection per node as well.
DO $sequential$
BEGIN
    IF EXISTS (SELECT FROM pg_catalog.pg_extension WHERE extname = 'citus') THEN
        PERFORM pg_catalog.set_config('citus.multi_shard_modify_mode', 'sequential', true);
    END IF;
END
$sequential$;

-- Inside a DO block: Citus sends a distributed table's DDL to the workers as
-- the text of its statement, which in a file sent as one query would be the
-- whole file; and one subcommand each, as Citus runs no ADD CONSTRAINT beside
-- others.
DO $tables$
BEGIN
    ALTER TABLE ledger.settings ADD COLUMN refund_shortfall text NOT NULL DEFAULT 'owe';
    ALTER TABLE ledger.settings
        ADD CONSTRAINT settings_refund_shortfall CHECK (refund_shortfall IN ('owe', 'write_off'));

    ALTER TABLE ledger.accounts ADD COLUMN owed bigint NOT NULL DEFAULT 0;
    ALTER TABLE ledger.accounts DROP CONSTRAINT accounts_counters_valid;
    ALTER TABLE ledger.accounts
        ADD CONSTRAINT accounts_counters_valid CHECK (
            lifetime_earned >= 0 AND last_seq >= 0 AND octet_length(last_entry_hash) = 32
            AND pending >= 0 AND expiring BETWEEN 0 AND available AND owed >= 0
        );

    ALTER TABLE ledger.idempotency_keys DROP CONSTRAINT idempotency_keys_operation;
    ALTER TABLE ledger.idempotency_keys
        ADD CONSTRAINT idempotency_keys_operation CHECK (
            operation IN ('credit', 'debit', 'reserve', 'commit', 'release', 'action', 'refund')
        );

    DROP INDEX ledger.entries_action_once;
    CREATE UNIQUE INDEX entries_action_once
        ON ledger.entries (user_id, action_source, action_external_id, kind)
        WHERE action_source IS NOT NULL;
END
$tables$;

-- The shape every ledger entry must have, by kind (see entries_well_formed).
CREATE OR REPLACE FUNCTION ledger._entry_well_formed(
    p_kind text,
    p_seq bigint,
    p_amount bigint,
    p_available_delta bigint,
    p_reserved_delta bigint,
    p_reservation_id bigint,
    p_action_source text,
    p_action_external_id text,
    p_idempotency_key text,
    p_prev_hash bytea,
    p_hash bytea
)
RETURNS boolean
LANGUAGE plpgsql
IMMUTABLE
PARALLEL SAFE
AS $$
BEGIN
    RETURN p_seq > 0
        AND octet_length(p_hash) = 32 AND octet_length(p_prev_hash) = 32
        -- only what the database does on its own comes without a key: a hold's
        -- expiry, pending points maturing, a lot's points lapsing, owed points
        -- paid off; and the parts of a refund, whose key keeps its record
        AND (p_idempotency_key IS NULL) = (p_kind IN ('expire', 'mature', 'lapse', 'repay',
                                                       'cancel', 'reversal', 'owed', 'write_off'))
        -- only credits carry a verified action, as a (source, external id)
        -- pair, and the parts of its refund name it, always
        AND (p_action_source IS NULL) = (p_action_external_id IS NULL)
        AND CASE WHEN p_kind IN ('cancel', 'reversal', 'owed', 'write_off') THEN p_action_source IS NOT NULL
                 ELSE p_action_source IS NULL OR p_kind = 'credit' END
        -- the reservations' kinds, and only they, belong to a reservation
        AND (p_reservation_id IS NULL) = (p_kind NOT IN ('reserve', 'commit', 'release', 'expire'))
        AND CASE p_kind
            -- a pending credit moves nothing into `available` until it matures
            WHEN 'credit'  THEN p_available_delta IN (p_amount, 0) AND p_reserved_delta = 0
            WHEN 'mature'  THEN p_available_delta = p_amount AND p_reserved_delta = 0
            WHEN 'lapse'   THEN p_available_delta = -p_amount AND p_reserved_delta = 0
            WHEN 'debit'   THEN p_available_delta = -p_amount AND p_reserved_delta = 0
            WHEN 'reserve' THEN p_available_delta = -p_amount AND p_reserved_delta = p_amount
            -- commit: the hold leaves `reserved`; what is not spent returns to `available`
            WHEN 'commit'  THEN p_reserved_delta < 0 AND p_available_delta >= 0
                                AND p_available_delta + p_amount = -p_reserved_delta
            WHEN 'release' THEN p_available_delta = p_amount AND p_reserved_delta = -p_amount
            WHEN 'expire'  THEN p_available_delta = p_amount AND p_reserved_delta = -p_amount
            -- a refund: its pending points cancelled, its available ones taken
            -- back, and what the user already spent owed, or written off;
            -- owed points paid off by the points a later credit makes available
            WHEN 'cancel'    THEN p_available_delta = 0 AND p_reserved_delta = 0
            WHEN 'reversal'  THEN p_available_delta = -p_amount AND p_reserved_delta = 0
            WHEN 'owed'      THEN p_available_delta = 0 AND p_reserved_delta = 0
            WHEN 'write_off' THEN p_available_delta = 0 AND p_reserved_delta = 0
            WHEN 'repay'     THEN p_available_delta = -p_amount AND p_reserved_delta = 0
            ELSE false
        END;
END;
$$;

CREATE OR REPLACE VIEW ledger.balances AS
    SELECT a.user_id, a.available, a.reserved, a.lifetime_earned, a.last_seq, a.updated_at,
           a.pending, n.expires_at AS next_expiry_at, n.points AS next_expiry_amount, a.owed
    FROM ledger.accounts a
    LEFT JOIN LATERAL (
        SELECT l.expires_at, sum(l.remaining)::bigint AS points
        FROM ledger.lots l
        WHERE l.user_id = a.user_id AND l.remaining > 0 AND l.expires_at IS NOT NULL
        GROUP BY l.expires_at
        ORDER BY l.expires_at
        LIMIT 1
    ) n ON true;

-- Whether this (source, external id) already earned this user points: the
-- question every credit of a verified action asks (ledger._apply_credit,
-- rules.act) under the account lock, before it credits (entries_action_once
-- backs it up). PL/pgSQL: Citus cannot plan a parameterized SQL function's
-- query on a distributed table.
CREATE OR REPLACE FUNCTION ledger._action_credited(p_user_id text, p_action_source text, p_action_external_id text)
RETURNS boolean
LANGUAGE plpgsql
STABLE
AS $$
BEGIN
    RETURN EXISTS (
        SELECT FROM ledger.entries
        WHERE user_id = p_user_id
          AND action_source = p_action_source
          AND action_external_id = p_action_external_id
          AND kind = 'credit');
END;
$$;

-- The credit's entry, and its lot when it is pending for p_pending_seconds
-- or expires after p_expiry_seconds: what ledger._apply_credit (for
-- ledger.credit and ledger.credit_many) and rules.act (points computed from
-- the rules) both write. Points available at once pay off what the account
-- owes first (ledger._repay; the answer's balance is after it). Call only with
-- the account locked, its arguments checked and the action found new.
CREATE OR REPLACE FUNCTION ledger._credit_entry(
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
    v_entry ledger.entries;
    v_result ledger.result;
BEGIN
    v_entry := ledger._append_entry(
        p_account, 'credit', p_amount, CASE WHEN p_pending_seconds IS NULL THEN p_amount ELSE 0 END, 0,
        NULL, p_reason, p_metadata, p_idempotency_key, p_action_source, p_action_external_id);
    IF p_pending_seconds IS NOT NULL OR p_expiry_seconds IS NOT NULL THEN
        PERFORM ledger._open_lot(v_entry, p_pending_seconds, p_expiry_seconds);
    END IF;
    v_result := ledger._entry_result(v_entry);
    IF p_account.owed > 0 AND p_pending_seconds IS NULL THEN
        v_result.available := (ledger._repay(p_account.user_id, v_entry.entry_id, p_amount)).available;
    END IF;
    RETURN v_result;
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
    IF v_lot OR p_account.owed > 0 THEN
        -- the entry does not hold the lot's terms, or the balance after the
        -- owed points it paid off, so its key keeps a record
        RETURN ledger._remember(p_idempotency_key, 'credit', v_request, v_result);
    END IF;
    -- the entry is the key's record (ledger._replay reads it)
    RETURN v_result;
END;
$$;

-- Mature a lot whose pending period is over (a 'mature' entry: its points
-- become available), then lapse what it holds if its expiry has passed (a
-- 'lapse' entry); points that matured and did not lapse pay off what the
-- account owes first (ledger._repay). Does what is due and nothing else;
-- returns the account after.
CREATE OR REPLACE FUNCTION ledger._settle_lot(p_account ledger.accounts, p_lot ledger.lots)
RETURNS ledger.accounts
LANGUAGE plpgsql
AS $$
DECLARE
    v_account ledger.accounts := p_account;
    v_lot ledger.lots := p_lot;
    v_matured boolean := false;
BEGIN
    IF NOT v_lot.matured AND v_lot.available_at <= now() THEN
        PERFORM ledger._append_entry(v_account, 'mature', v_lot.amount, v_lot.amount, 0, NULL,
                                     'pending points available', jsonb_build_object('lot_id', v_lot.lot_id), NULL);
        UPDATE ledger.lots SET
            matured = true,
            remaining = CASE WHEN v_lot.expires_at IS NULL THEN 0 ELSE remaining END
        WHERE user_id = v_lot.user_id AND lot_id = v_lot.lot_id
        RETURNING * INTO v_lot;
        UPDATE ledger.accounts SET
            pending = pending - v_lot.amount,
            expiring = expiring + v_lot.remaining
        WHERE user_id = v_account.user_id
        RETURNING * INTO v_account;
        v_matured := true;
    END IF;
    IF v_lot.matured AND v_lot.remaining > 0 AND v_lot.expires_at <= now() THEN
        UPDATE ledger.lots SET remaining = 0 WHERE user_id = v_lot.user_id AND lot_id = v_lot.lot_id;
        UPDATE ledger.accounts SET expiring = expiring - v_lot.remaining
        WHERE user_id = v_account.user_id
        RETURNING * INTO v_account;
        PERFORM ledger._append_entry(v_account, 'lapse', v_lot.remaining, -v_lot.remaining, 0, NULL,
                                     'points expired', jsonb_build_object('lot_id', v_lot.lot_id), NULL);
        SELECT * INTO v_account FROM ledger.accounts WHERE user_id = v_account.user_id;
    ELSIF v_matured AND v_account.owed > 0 THEN
        v_account := ledger._repay(v_account.user_id, v_lot.entry_id, v_lot.amount);
    END IF;
    RETURN v_account;
END;
$$;

-- Pay off what the account owes (accounts.owed, left by refunds) from
-- p_points that the credit p_entry_id has just made available: taken from its
-- lot when that expires, else from the points without expiry, as a 'repay'
-- entry. Call only with the account locked, after the entries that made the
-- points available; returns the account after.
CREATE FUNCTION ledger._repay(p_user_id text, p_entry_id bigint, p_points bigint)
RETURNS ledger.accounts
LANGUAGE plpgsql
AS $$
DECLARE
    v_account ledger.accounts;
    v_pay bigint;
    v_from_lot integer;
BEGIN
    SELECT * INTO v_account FROM ledger.accounts WHERE user_id = p_user_id;
    v_pay := least(v_account.owed, p_points);
    IF v_pay <= 0 THEN
        RETURN v_account;
    END IF;
    UPDATE ledger.lots SET remaining = remaining - v_pay
    WHERE user_id = p_user_id AND entry_id = p_entry_id AND matured AND expires_at IS NOT NULL
      AND remaining >= v_pay;
    GET DIAGNOSTICS v_from_lot = ROW_COUNT;
    UPDATE ledger.accounts SET
        owed = owed - v_pay,
        expiring = expiring - CASE WHEN v_from_lot > 0 THEN v_pay ELSE 0 END
    WHERE user_id = p_user_id
    RETURNING * INTO v_account;
    PERFORM ledger._append_entry(v_account, 'repay', v_pay, -v_pay, 0, NULL, 'owed points paid off',
                                 jsonb_build_object('paid_by_entry_id', p_entry_id), NULL);
    SELECT * INTO v_account FROM ledger.accounts WHERE user_id = p_user_id;
    RETURN v_account;
END;
$$;

-- A refund of a verified action (a purchase returned, an ad view charged
-- back): what its credit earned is reversed, by entries that name the action
-- and the credit (metadata.refund_of_entry_id). A pending credit's points are
-- cancelled ('cancel'). Of an available one, what it earned less what of it
-- lapsed is taken back ('reversal'): first what its own lot still holds (or,
-- for a plain credit, points without expiry), then others in the order a
-- redemption spends them; what the user already spent is owed ('owed', paid
-- off first by the points later credits make available) or, with
-- settings.refund_shortfall 'write_off', recorded as lost ('write_off'). The
-- answer's amount is what was reversed in all, entry_id the last entry. The
-- key keeps a record (the answer spans entries); refusals write only that.
CREATE FUNCTION ledger.refund(
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

CREATE OR REPLACE FUNCTION ledger.balance(p_user_id text)
RETURNS ledger.balances
LANGUAGE plpgsql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_balance ledger.balances;
BEGIN
    IF NOT ledger._is_name(p_user_id) THEN
        PERFORM ledger._invalid('user_id', 'must be 1-64 characters of A-Z a-z 0-9 . _ : -');
    END IF;
    -- ledger.balances' query with the user named on each table: Citus prunes a
    -- table by its own filter, and through the view the lots would be read
    -- from every shard.
    SELECT a.user_id, a.available, a.reserved, a.lifetime_earned, a.last_seq, a.updated_at,
           a.pending, n.expires_at, n.points, a.owed
    INTO v_balance
    FROM ledger.accounts a
    LEFT JOIN LATERAL (
        SELECT l.expires_at, sum(l.remaining)::bigint AS points
        FROM ledger.lots l
        WHERE l.user_id = p_user_id AND l.remaining > 0 AND l.expires_at IS NOT NULL
        GROUP BY l.expires_at
        ORDER BY l.expires_at
        LIMIT 1
    ) n ON true
    WHERE a.user_id = p_user_id;
    IF NOT FOUND THEN
        -- A user who never had points reads as zeros; reads create nothing.
        v_balance := ROW(p_user_id, 0, 0, 0, 0, NULL, 0, NULL, NULL, 0)::ledger.balances;
    END IF;
    RETURN v_balance;
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
CREATE OR REPLACE FUNCTION audit.reconcile(p_user_ids text[], p_confirmed_seqs bigint[] DEFAULT NULL)
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

-- The kinds the app's notification service hears about: the refunds' too.
DROP TRIGGER entries_queue_notification ON audit.entries;
CREATE TRIGGER entries_queue_notification
    AFTER INSERT ON audit.entries
    FOR EACH ROW WHEN (NEW.kind IN ('credit', 'debit', 'commit', 'expire', 'mature', 'lapse',
                                    'cancel', 'reversal', 'owed', 'write_off', 'repay'))
    EXECUTE FUNCTION audit._queue_notification();

ALTER FUNCTION ledger._repay(text, bigint, bigint) OWNER TO rewards_owner;
ALTER FUNCTION ledger.refund(text, text, text, text, text, jsonb) OWNER TO rewards_owner;
REVOKE ALL ON FUNCTION ledger._repay(text, bigint, bigint), ledger.refund(text, text, text, text, text, jsonb)
FROM PUBLIC;
GRANT EXECUTE ON FUNCTION ledger.refund(text, text, text, text, text, jsonb) TO rewards_api;

COMMENT ON FUNCTION ledger.refund(text, text, text, text, text, jsonb) IS
'Reverse what a verified action earned. Args: user_id, idempotency_key, action_source, action_external_id, reason, metadata. Pending points are cancelled; available ones taken back (its lot first); what the user already spent is owed (paid off by later credits first) or, with settings.refund_shortfall write_off, written off. Status: ok (amount: points reversed) | idempotency_key_reused | action_not_found | action_already_refunded | action_points_expired. Invalid arguments raise 22023.';
--
COMMENT ON FUNCTION ledger.balance(text) IS
'The account''s available, reserved, lifetime earned and pending points, its next expiry (date and points) and the points it owes after refunds; zeros for a user who never had any.';

DO $citus$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_extension WHERE extname = 'citus') THEN
        RETURN;
    END IF;
    PERFORM create_distributed_function('ledger._repay(text, bigint, bigint)');
    PERFORM create_distributed_function('ledger.refund(text, text, text, text, text, jsonb)',
                                        'p_user_id', colocate_with => 'ledger.accounts', force_delegation => true);
END
$citus$;
