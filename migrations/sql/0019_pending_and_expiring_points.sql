-- ===========================================================================
-- Pending and expiring points (revision 0019)
--
-- A credit may now be pending for a period and/or expire (ledger.credit's
-- p_pending_seconds and p_expiry_seconds): it makes a lot (ledger.lots),
-- whose sums the account keeps (pending; expiring, the part of available that
-- expires). Redemptions spend the soonest-expiring points first; a reservation
-- keeps the lots it drew from and gives back what it does not spend. A job
-- each minute (ledger.settle_lots, per node under Citus) matures pending lots
-- and lapses what remains of expired ones, as 'mature' and 'lapse' entries.
-- The balance shows pending points and the next expiry; the reconciler checks
-- the pending points against the entries and both sums against the lots.
-- ===========================================================================

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
-- whole file.
DO $tables$
BEGIN
    ALTER TABLE ledger.settings ADD COLUMN max_lot_term interval NOT NULL DEFAULT interval '10 years';
    ALTER TABLE ledger.settings ADD CONSTRAINT settings_lot_term_positive CHECK (max_lot_term >= interval '1 day');
    ALTER TABLE ledger.accounts ADD COLUMN pending bigint NOT NULL DEFAULT 0;
    ALTER TABLE ledger.accounts ADD COLUMN expiring bigint NOT NULL DEFAULT 0;
    ALTER TABLE ledger.accounts DROP CONSTRAINT accounts_counters_valid;
    ALTER TABLE ledger.accounts ADD CONSTRAINT accounts_counters_valid CHECK (
        lifetime_earned >= 0 AND last_seq >= 0 AND octet_length(last_entry_hash) = 32
        AND pending >= 0 AND expiring BETWEEN 0 AND available
    );
    ALTER TABLE ledger.reservations ADD COLUMN lot_draws jsonb;
    -- A credit that is pending or expires, for as long as it has points to move:
    -- pending ones until they mature, expiring ones until spent or lapsed. A plain
    -- credit has no lot: its points are simply `available` and never expire.
    CREATE TABLE ledger.lots (
        user_id       text NOT NULL,
        lot_id        bigserial NOT NULL,
        -- the credit entry that made it
        entry_id      bigint NOT NULL,
        amount        bigint NOT NULL,
        -- pending: all of it; matured: what is left to spend or to lapse
        remaining     bigint NOT NULL,
        created_at    timestamptz NOT NULL,
        -- pending until then (the credit's time when it was never pending)
        available_at  timestamptz NOT NULL,
        matured       boolean NOT NULL,
        expires_at    timestamptz,
        CONSTRAINT lots_pkey PRIMARY KEY (user_id, lot_id),
        CONSTRAINT lots_amount_positive CHECK (amount > 0),
        CONSTRAINT lots_remaining CHECK (remaining BETWEEN 0 AND amount),
        CONSTRAINT lots_pending_whole CHECK (matured OR remaining = amount),
        CONSTRAINT lots_terms CHECK (
            available_at >= created_at AND (expires_at IS NULL OR expires_at > available_at)
            AND (expires_at IS NOT NULL OR available_at > created_at)),
        -- points that matured without an expiry are plain available points
        CONSTRAINT lots_matured_without_expiry_empty CHECK (NOT matured OR expires_at IS NOT NULL OR remaining = 0)
    );

    -- An account's lots in the order redemptions spend them (soonest expiry
    -- first), which is also its next expiry.
    CREATE INDEX lots_spend_order
        ON ledger.lots (user_id, expires_at, lot_id)
        WHERE remaining > 0 AND expires_at IS NOT NULL;

    -- What the settlement job scans: lots to mature, and lots to lapse.
    CREATE INDEX lots_pending_until
        ON ledger.lots (available_at)
        WHERE NOT matured;
    CREATE INDEX lots_expiring_at
        ON ledger.lots (expires_at)
        WHERE matured AND remaining > 0;

    IF EXISTS (SELECT FROM pg_catalog.pg_extension WHERE extname = 'citus') THEN
        PERFORM create_distributed_table('ledger.lots', 'user_id', colocate_with => 'ledger.accounts');
    END IF;
    -- next_expiry_*: the soonest expiry of points the account still holds
    -- (reserved ones are out of their lots until the hold returns them).
    EXECUTE $view$
    CREATE OR REPLACE VIEW ledger.balances AS
        SELECT a.user_id, a.available, a.reserved, a.lifetime_earned, a.last_seq, a.updated_at,
               a.pending, n.expires_at AS next_expiry_at, n.points AS next_expiry_amount
        FROM ledger.accounts a
        LEFT JOIN LATERAL (
            SELECT l.expires_at, sum(l.remaining)::bigint AS points
            FROM ledger.lots l
            WHERE l.user_id = a.user_id AND l.remaining > 0 AND l.expires_at IS NOT NULL
            GROUP BY l.expires_at
            ORDER BY l.expires_at
            LIMIT 1
        ) n ON true
    $view$;
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
        -- expiry, pending points maturing, a lot's points lapsing
        AND (p_idempotency_key IS NULL) = (p_kind IN ('expire', 'mature', 'lapse'))
        -- only credits carry a verified action, as a (source, external id) pair
        AND (p_action_source IS NULL) = (p_action_external_id IS NULL)
        AND (p_action_source IS NULL OR p_kind = 'credit')
        -- the reservations' kinds, and only they, belong to a reservation
        AND (p_reservation_id IS NULL) = (p_kind IN ('credit', 'debit', 'mature', 'lapse'))
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
            ELSE false
        END;
END;
$$;

-- A lot's terms, in seconds from the credit: pending for up to
-- settings.max_lot_term; an expiry after the pending period, within the same.
CREATE FUNCTION ledger._check_lot_terms(p_settings ledger.settings, p_pending_seconds integer,
                                        p_expiry_seconds integer)
RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    v_max bigint := extract(epoch FROM p_settings.max_lot_term)::bigint;
BEGIN
    IF p_pending_seconds < 1 OR p_pending_seconds > v_max THEN
        PERFORM ledger._invalid('pending_seconds', format('must be from 1 to %s seconds', v_max));
    END IF;
    IF p_expiry_seconds <= coalesce(p_pending_seconds, 0) OR p_expiry_seconds > v_max THEN
        PERFORM ledger._invalid('expiry_seconds', format(
            'must be more than pending_seconds and at most %s seconds', v_max));
    END IF;
END;
$$;

-- Make the lot of a credit just appended (p_entry) that is pending for
-- p_pending_seconds or expires after p_expiry_seconds (from the credit's time).
CREATE FUNCTION ledger._open_lot(p_entry ledger.entries, p_pending_seconds integer, p_expiry_seconds integer)
RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    v_pending boolean := p_pending_seconds IS NOT NULL;
BEGIN
    INSERT INTO ledger.lots (user_id, entry_id, amount, remaining, created_at, available_at, matured, expires_at)
    VALUES (p_entry.user_id, p_entry.entry_id, p_entry.amount, p_entry.amount, p_entry.created_at,
            p_entry.created_at + make_interval(secs => coalesce(p_pending_seconds, 0)), NOT v_pending,
            p_entry.created_at + make_interval(secs => p_expiry_seconds));
    UPDATE ledger.accounts SET
        pending = pending + CASE WHEN v_pending THEN p_entry.amount ELSE 0 END,
        expiring = expiring + CASE WHEN v_pending THEN 0 ELSE p_entry.amount END
    WHERE user_id = p_entry.user_id;
END;
$$;

-- Mature a lot whose pending period is over (a 'mature' entry: its points
-- become available), then lapse what it holds if its expiry has passed (a
-- 'lapse' entry). Does what is due and nothing else; returns the account after.
CREATE FUNCTION ledger._settle_lot(p_account ledger.accounts, p_lot ledger.lots)
RETURNS ledger.accounts
LANGUAGE plpgsql
AS $$
DECLARE
    v_account ledger.accounts := p_account;
    v_lot ledger.lots := p_lot;
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
    END IF;
    IF v_lot.matured AND v_lot.remaining > 0 AND v_lot.expires_at <= now() THEN
        UPDATE ledger.lots SET remaining = 0 WHERE user_id = v_lot.user_id AND lot_id = v_lot.lot_id;
        UPDATE ledger.accounts SET expiring = expiring - v_lot.remaining
        WHERE user_id = v_account.user_id
        RETURNING * INTO v_account;
        PERFORM ledger._append_entry(v_account, 'lapse', v_lot.remaining, -v_lot.remaining, 0, NULL,
                                     'points expired', jsonb_build_object('lot_id', v_lot.lot_id), NULL);
        SELECT * INTO v_account FROM ledger.accounts WHERE user_id = v_account.user_id;
    END IF;
    RETURN v_account;
END;
$$;

-- Settle every lot of the account that is due, as the scheduled job would,
-- before a redemption reads `available`: points that matured can be spent at
-- once, and points past their expiry never are. Returns the account after.
CREATE FUNCTION ledger._settle_due(p_account ledger.accounts)
RETURNS ledger.accounts
LANGUAGE plpgsql
AS $$
DECLARE
    v_account ledger.accounts := p_account;
    v_lot ledger.lots;
BEGIN
    FOR v_lot IN
        SELECT * FROM ledger.lots l
        WHERE l.user_id = p_account.user_id
          AND ((NOT l.matured AND l.available_at <= now())
               OR (l.matured AND l.remaining > 0 AND l.expires_at <= now()))
        ORDER BY l.lot_id
    LOOP
        v_account := ledger._settle_lot(v_account, v_lot);
    END LOOP;
    RETURN v_account;
END;
$$;

-- Take up to p_amount points out of the account's matured lots, soonest expiry
-- first (the older lot first among equal expiries): points that expire are
-- spent before points that do not, so that as few as possible are lost. What
-- the lots do not cover comes from points without an expiry. Returns the draws,
-- [[lot_id, points], ...] in the order taken, NULL when the account has no
-- expiring points. Call before the entry that takes the points from available.
CREATE FUNCTION ledger._draw_lots(p_account ledger.accounts, p_amount bigint)
RETURNS jsonb
LANGUAGE plpgsql
AS $$
DECLARE
    v_lot record;
    v_left bigint := p_amount;
    v_take bigint;
    v_draws jsonb := '[]';
BEGIN
    IF p_account.expiring = 0 THEN
        RETURN NULL;
    END IF;
    FOR v_lot IN
        SELECT l.lot_id, l.remaining FROM ledger.lots l
        WHERE l.user_id = p_account.user_id AND l.remaining > 0 AND l.expires_at IS NOT NULL AND l.matured
        ORDER BY l.expires_at, l.lot_id
    LOOP
        v_take := least(v_left, v_lot.remaining);
        UPDATE ledger.lots SET remaining = remaining - v_take
        WHERE user_id = p_account.user_id AND lot_id = v_lot.lot_id;
        v_draws := v_draws || jsonb_build_array(jsonb_build_array(v_lot.lot_id, v_take));
        v_left := v_left - v_take;
        EXIT WHEN v_left = 0;
    END LOOP;
    UPDATE ledger.accounts SET expiring = expiring - (p_amount - v_left) WHERE user_id = p_account.user_id;
    RETURN v_draws;
END;
$$;

-- Give a reservation's unspent points back to the lots it drew from: the
-- spent part is counted from the first draw (the soonest expiry), so the last
-- draws return first. A lot whose expiry passed meanwhile lapses at the next
-- settlement. Call after the entry that returns the points to available.
CREATE FUNCTION ledger._return_to_lots(p_user_id text, p_draws jsonb, p_spent bigint)
RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    v_draw jsonb;
    v_left bigint;
    v_back bigint;
BEGIN
    SELECT greatest(sum((d ->> 1)::bigint) - p_spent, 0) INTO v_left FROM jsonb_array_elements(p_draws) AS d;
    FOR v_draw IN SELECT d FROM jsonb_array_elements(p_draws) WITH ORDINALITY AS t(d, n) ORDER BY n DESC LOOP
        EXIT WHEN v_left = 0;
        v_back := least(v_left, (v_draw ->> 1)::bigint);
        UPDATE ledger.lots SET remaining = remaining + v_back
        WHERE user_id = p_user_id AND lot_id = (v_draw ->> 0)::bigint;
        UPDATE ledger.accounts SET expiring = expiring + v_back WHERE user_id = p_user_id;
        v_left := v_left - v_back;
    END LOOP;
END;
$$;

-- Settle one lot if it is due (ledger._settle_lot); the settlement job's step.
-- Locks the account first; true when something was due.
CREATE FUNCTION ledger._settle_one(p_user_id text, p_lot_id bigint)
RETURNS boolean
LANGUAGE plpgsql
AS $$
DECLARE
    v_account ledger.accounts;
    v_lot ledger.lots;
BEGIN
    SELECT * INTO v_account FROM ledger.accounts WHERE user_id = p_user_id FOR UPDATE;
    SELECT * INTO v_lot FROM ledger.lots WHERE user_id = p_user_id AND lot_id = p_lot_id;
    IF NOT FOUND OR NOT ((NOT v_lot.matured AND v_lot.available_at <= now())
                         OR (v_lot.matured AND v_lot.remaining > 0 AND v_lot.expires_at <= now())) THEN
        RETURN false;
    END IF;
    PERFORM ledger._settle_lot(v_account, v_lot);
    RETURN true;
END;
$$;

-- End an open reservation: the held points leave `reserved`; whatever is not
-- spent goes back to `available`. Call only with account and reservation locked.
CREATE OR REPLACE FUNCTION ledger._end_reservation(
    p_account ledger.accounts,
    p_reservation ledger.reservations,
    p_status text,
    p_spent bigint,
    p_idempotency_key text,
    p_reason text,
    p_metadata jsonb
)
RETURNS ledger.entries
LANGUAGE plpgsql
AS $$
DECLARE
    v_entry ledger.entries;
BEGIN
    v_entry := ledger._append_entry(
        p_account,
        CASE p_status WHEN 'committed' THEN 'commit' WHEN 'released' THEN 'release' ELSE 'expire' END,
        coalesce(p_spent, p_reservation.amount),
        p_reservation.amount - coalesce(p_spent, 0),
        -p_reservation.amount,
        p_reservation.reservation_id,
        p_reason,
        p_metadata,
        p_idempotency_key);
    IF p_reservation.lot_draws IS NOT NULL THEN
        PERFORM ledger._return_to_lots(p_account.user_id, p_reservation.lot_draws, coalesce(p_spent, 0));
    END IF;
    UPDATE ledger.reservations SET
        status = p_status,
        committed_amount = p_spent,
        ended_at = v_entry.created_at
    WHERE user_id = p_reservation.user_id AND reservation_id = p_reservation.reservation_id;
    RETURN v_entry;
END;
$$;

-- The settlement of the lots held on this node, table by table
-- (ledger._local_tables), batch by batch, each batch its own transaction of
-- this node alone, as ledger._expire_local_shards does for reservations;
-- ledger.settle_lots runs it here, or under Citus on every node at once. Lots
-- due by the start are settled; later ones wait for the next run.
CREATE PROCEDURE ledger._settle_local_lots(INOUT settled bigint DEFAULT 0, batch_size integer DEFAULT 100)
LANGUAGE plpgsql
AS $$
DECLARE
    v_cutoff timestamptz := now();
    v_table text;
    v_due record;
    v_in_batch integer;
BEGIN
    settled := 0;
    IF batch_size IS NULL OR batch_size < 1 THEN
        PERFORM ledger._invalid('batch_size', 'must be a positive integer');
    END IF;
    FOR v_table IN SELECT ledger._local_tables('ledger.lots') LOOP
        LOOP
            v_in_batch := 0;
            FOR v_due IN EXECUTE format(
                'SELECT user_id, lot_id FROM %1$s WHERE NOT matured AND available_at <= $1'
                ' UNION ALL SELECT user_id, lot_id FROM %1$s WHERE matured AND remaining > 0 AND expires_at <= $1'
                ' LIMIT $2', v_table) USING v_cutoff, batch_size
            LOOP
                v_in_batch := v_in_batch + 1;
                IF ledger._settle_one(v_due.user_id, v_due.lot_id) THEN
                    settled := settled + 1;
                END IF;
            END LOOP;
            COMMIT;
            EXIT WHEN v_in_batch < batch_size;
        END LOOP;
    END LOOP;
END;
$$;

-- One credit, with the lot's terms as two more optional arguments: a caller
-- that passes the seven of before still reaches it. Its two helpers take the
-- terms too (ledger.credit_many passes none).
DROP FUNCTION ledger.credit(text, text, bigint, text, text, text, jsonb);
DROP FUNCTION ledger._check_credit(ledger.settings, text, text, bigint, text, text, text, jsonb);
DROP FUNCTION ledger._apply_credit(ledger.accounts, text, bigint, text, text, text, jsonb);

-- The checks of a credit's arguments (ledger.credit, ledger.credit_many).
CREATE FUNCTION ledger._check_credit(
    p_settings ledger.settings,
    p_user_id text,
    p_idempotency_key text,
    p_amount bigint,
    p_reason text,
    p_action_source text,
    p_action_external_id text,
    p_metadata jsonb,
    p_pending_seconds integer,
    p_expiry_seconds integer
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
    IF p_pending_seconds IS NOT NULL OR p_expiry_seconds IS NOT NULL THEN
        PERFORM ledger._check_lot_terms(p_settings, p_pending_seconds, p_expiry_seconds);
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
    p_metadata jsonb,
    p_pending_seconds integer,
    p_expiry_seconds integer
)
RETURNS ledger.result
LANGUAGE plpgsql
AS $$
DECLARE
    v_request bytea;
    v_result ledger.result;
    v_entry ledger.entries;
    v_lot boolean := p_pending_seconds IS NOT NULL OR p_expiry_seconds IS NOT NULL;
BEGIN
    -- A credit without a lot keeps the fingerprint it always had.
    v_request := ledger._fingerprint(CASE WHEN v_lot
        THEN jsonb_build_array(p_amount, p_reason, p_action_source, p_action_external_id, p_metadata,
                               p_pending_seconds, p_expiry_seconds)
        ELSE jsonb_build_array(p_amount, p_reason, p_action_source, p_action_external_id, p_metadata) END);
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
        v_entry := ledger._append_entry(
            p_account, 'credit', p_amount, CASE WHEN p_pending_seconds IS NULL THEN p_amount ELSE 0 END, 0,
            NULL, p_reason, p_metadata, p_idempotency_key, p_action_source, p_action_external_id);
        IF v_lot THEN
            PERFORM ledger._open_lot(v_entry, p_pending_seconds, p_expiry_seconds);
        END IF;
        v_result := ledger._entry_result(v_entry);
    END IF;
    RETURN ledger._remember(p_idempotency_key, 'credit', v_request, v_result);
END;
$$;

CREATE FUNCTION ledger.credit(
    p_user_id text,
    p_idempotency_key text,
    p_amount bigint,
    p_reason text,
    p_action_source text DEFAULT NULL,
    p_action_external_id text DEFAULT NULL,
    p_metadata jsonb DEFAULT '{}',
    p_pending_seconds integer DEFAULT NULL,
    p_expiry_seconds integer DEFAULT NULL
)
RETURNS ledger.result
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM ledger._check_credit(ledger._settings(), p_user_id, p_idempotency_key, p_amount, p_reason,
                                 p_action_source, p_action_external_id, p_metadata,
                                 p_pending_seconds, p_expiry_seconds);
    RETURN ledger._apply_credit(ledger._lock_account(p_user_id), p_idempotency_key, p_amount, p_reason,
                                p_action_source, p_action_external_id, p_metadata,
                                p_pending_seconds, p_expiry_seconds);
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
                                                 p_action_external_ids[v_item], p_metadata[v_item], NULL, NULL);
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
    v_request bytea;
    v_result ledger.result;
BEGIN
    PERFORM ledger._check_request(v_settings, p_user_id, p_idempotency_key, p_reason, p_metadata);
    PERFORM ledger._check_amount(v_settings, 'amount', p_amount);

    v_account := ledger._lock_account(p_user_id);
    v_request := ledger._fingerprint(jsonb_build_array(p_amount, p_reason, p_metadata));
    v_result := ledger._replay(v_account, p_idempotency_key, 'debit', v_request);
    IF v_result.status IS NOT NULL THEN
        RETURN v_result;
    END IF;

    IF v_account.pending > 0 OR v_account.expiring > 0 THEN
        v_account := ledger._settle_due(v_account);
    END IF;
    IF v_account.available < p_amount THEN
        v_result := ledger._refusal('insufficient_points', v_account);
    ELSE
        PERFORM ledger._draw_lots(v_account, p_amount);
        v_result := ledger._entry_result(ledger._append_entry(
            v_account, 'debit', p_amount, -p_amount, 0, NULL, p_reason, p_metadata, p_idempotency_key));
    END IF;
    RETURN ledger._remember(p_idempotency_key, 'debit', v_request, v_result);
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
    v_request bytea;
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
    v_request := ledger._fingerprint(jsonb_build_array(p_amount, p_ttl_seconds, p_reason, p_metadata));
    v_result := ledger._replay(v_account, p_idempotency_key, 'reserve', v_request);
    IF v_result.status IS NOT NULL THEN
        RETURN v_result;
    END IF;

    IF v_account.pending > 0 OR v_account.expiring > 0 THEN
        v_account := ledger._settle_due(v_account);
    END IF;
    IF v_account.available < p_amount THEN
        v_result := ledger._refusal('insufficient_points', v_account);
    ELSE
        v_draws := ledger._draw_lots(v_account, p_amount);
        INSERT INTO ledger.reservations (user_id, amount, reason, metadata, expires_at, lot_draws)
        VALUES (p_user_id, p_amount, p_reason, p_metadata, now() + make_interval(secs => p_ttl_seconds), v_draws)
        RETURNING * INTO v_reservation;
        v_result := ledger._entry_result(
            ledger._append_entry(v_account, 'reserve', p_amount, -p_amount, p_amount,
                                 v_reservation.reservation_id, p_reason, p_metadata, p_idempotency_key),
            v_reservation.expires_at);
    END IF;
    RETURN ledger._remember(p_idempotency_key, 'reserve', v_request, v_result);
END;
$$;

-- Matures the pending lots whose period is over and lapses what remains of
-- lots past their expiry, each as a ledger entry, in batches of batch_size,
-- each its own transaction (ledger._settle_local_lots). pg_cron runs it every
-- minute; a redemption settles its own account's due lots first anyway
-- (ledger._settle_due). Under Citus it runs on every node at once, as
-- expire_reservations does, and adds up what they settled.
CREATE PROCEDURE ledger.settle_lots(INOUT settled bigint DEFAULT 0, batch_size integer DEFAULT 100)
LANGUAGE plpgsql
AS $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_extension WHERE extname = 'citus') THEN
        CALL ledger._settle_local_lots(settled, batch_size);
        RETURN;
    END IF;
    settled := ledger._call_on_every_node('ledger._settle_local_lots', batch_size, 'settling lots');
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
           a.pending, n.expires_at, n.points
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
        v_balance := ROW(p_user_id, 0, 0, 0, 0, NULL, 0, NULL, NULL)::ledger.balances;
    END IF;
    RETURN v_balance;
END;
$$;

-- What is wrong with each of the given accounts: one row per finding, none
-- when all agree, in the order of the accounts given and, for each, in the
-- order below. Checks that the balance equals what its entries sum to and its
-- holds equal its open reservations, that its hash chain verifies (the rule of
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
               a.pending, a.expiring,
               s.available AS entries_available, s.reserved AS entries_reserved, s.earned AS entries_earned,
               s.pending AS entries_pending,
               s.last_seq AS entries_last_seq, s.entries, s.last_hash, s.first_broken_entry_id,
               s.first_broken_seq, h.held, l.pending AS lots_pending, l.expiring AS lots_expiring
        FROM ledger.accounts a
        LEFT JOIN (
            SELECT c.user_id, sum(c.available_delta) AS available, sum(c.reserved_delta) AS reserved,
                   sum(c.earned) AS earned, sum(c.pending) AS pending, max(c.seq) AS last_seq, count(*) AS entries,
                   (array_agg(c.hash ORDER BY c.seq DESC))[1] AS last_hash,
                   (array_agg(c.entry_id ORDER BY c.seq) FILTER (WHERE c.broken))[1] AS first_broken_entry_id,
                   (array_agg(c.seq ORDER BY c.seq) FILTER (WHERE c.broken))[1] AS first_broken_seq
            FROM (
                SELECT e.user_id, e.entry_id, e.seq, e.available_delta, e.reserved_delta, e.hash,
                       CASE WHEN e.kind = 'credit' THEN e.amount ELSE 0 END AS earned,
                       -- a pending credit's points wait until their 'mature' entry
                       CASE e.kind WHEN 'credit' THEN e.amount - e.available_delta
                                   WHEN 'mature' THEN -e.amount ELSE 0 END AS pending,
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
                                                 'pending', a.pending),
                   'entries', jsonb_build_object('available', coalesce(a.entries_available, 0),
                                                 'reserved', coalesce(a.entries_reserved, 0),
                                                 'lifetime_earned', coalesce(a.entries_earned, 0),
                                                 'last_seq', coalesce(a.entries_last_seq, 0),
                                                 'pending', coalesce(a.entries_pending, 0))) AS detail
        FROM batch b LEFT JOIN accounts a ON a.user_id = b.user_id
        WHERE (a.available, a.reserved, a.lifetime_earned, a.last_seq, a.pending) IS DISTINCT FROM
              (coalesce(a.entries_available, 0), coalesce(a.entries_reserved, 0), coalesce(a.entries_earned, 0),
               coalesce(a.entries_last_seq, 0), coalesce(a.entries_pending, 0))
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

ALTER FUNCTION ledger._check_lot_terms(ledger.settings, integer, integer) OWNER TO rewards_owner;
ALTER FUNCTION ledger._check_credit(ledger.settings, text, text, bigint, text, text, text, jsonb, integer, integer) OWNER TO rewards_owner;
ALTER FUNCTION ledger._apply_credit(ledger.accounts, text, bigint, text, text, text, jsonb, integer, integer) OWNER TO rewards_owner;
ALTER FUNCTION ledger._open_lot(ledger.entries, integer, integer) OWNER TO rewards_owner;
ALTER FUNCTION ledger._settle_lot(ledger.accounts, ledger.lots) OWNER TO rewards_owner;
ALTER FUNCTION ledger._settle_due(ledger.accounts) OWNER TO rewards_owner;
ALTER FUNCTION ledger._draw_lots(ledger.accounts, bigint) OWNER TO rewards_owner;
ALTER FUNCTION ledger._return_to_lots(text, jsonb, bigint) OWNER TO rewards_owner;
ALTER FUNCTION ledger._settle_one(text, bigint) OWNER TO rewards_owner;
ALTER PROCEDURE ledger._settle_local_lots(bigint, integer) OWNER TO rewards_owner;
ALTER FUNCTION ledger.credit(text, text, bigint, text, text, text, jsonb, integer, integer) OWNER TO rewards_owner;
ALTER PROCEDURE ledger.settle_lots(bigint, integer) OWNER TO rewards_owner;

REVOKE ALL ON FUNCTION
    ledger._check_lot_terms(ledger.settings, integer, integer),
    ledger._check_credit(ledger.settings, text, text, bigint, text, text, text, jsonb, integer, integer),
    ledger._apply_credit(ledger.accounts, text, bigint, text, text, text, jsonb, integer, integer),
    ledger._open_lot(ledger.entries, integer, integer),
    ledger._settle_lot(ledger.accounts, ledger.lots),
    ledger._settle_due(ledger.accounts),
    ledger._draw_lots(ledger.accounts, bigint),
    ledger._return_to_lots(text, jsonb, bigint),
    ledger._settle_one(text, bigint),
    ledger.credit(text, text, bigint, text, text, text, jsonb, integer, integer)
FROM PUBLIC;
REVOKE ALL ON PROCEDURE ledger._settle_local_lots(bigint, integer), ledger.settle_lots(bigint, integer) FROM PUBLIC;
REVOKE ALL ON ledger.lots FROM PUBLIC;
REVOKE ALL ON SEQUENCE ledger.lots_lot_id_seq FROM PUBLIC;
GRANT SELECT, INSERT, UPDATE ON ledger.lots TO rewards_owner;
GRANT USAGE ON SEQUENCE ledger.lots_lot_id_seq TO rewards_owner;
GRANT EXECUTE ON FUNCTION ledger.credit(text, text, bigint, text, text, text, jsonb, integer, integer) TO rewards_api;

COMMENT ON FUNCTION ledger.credit(text, text, bigint, text, text, text, jsonb, integer, integer) IS
'Add points. Args: user_id, idempotency_key, amount (1..settings.max_amount), reason, action_source and action_external_id (both or neither: a verified action earns once per user, ever), metadata (JSON object), pending_seconds (NULL: available at once; else pending that long), expiry_seconds (NULL: never expire; else the points expire that long after the credit, after any pending period). Status: ok | idempotency_key_reused | action_already_credited. Invalid arguments raise 22023 naming the argument in COLUMN.';
COMMENT ON FUNCTION ledger.balance(text) IS
'The account''s available, reserved, lifetime earned and pending points and its next expiry (date and points); zeros for a user who never had any.';
COMMENT ON PROCEDURE ledger.settle_lots(bigint, integer) IS
'Make available the pending points whose period is over and expire what remains of lots past their expiry, as ledger entries, committing every batch_size; returns how many lots it settled. Under Citus each node its own shards'' (ledger._settle_local_lots), all at once. Each minute by pg_cron; CALL it by hand at any time.';
COMMENT ON PROCEDURE ledger._settle_local_lots(bigint, integer) IS
'Settle the due lots held on this node (its shards under Citus), in transactions of this node alone; ledger.settle_lots runs it, under Citus on every node.';

DO $citus$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_extension WHERE extname = 'citus') THEN
        RETURN;
    END IF;
    PERFORM create_distributed_function('ledger._check_lot_terms(ledger.settings, integer, integer)');
    PERFORM create_distributed_function('ledger._check_credit(ledger.settings, text, text, bigint, text, text, text, jsonb, integer, integer)');
    PERFORM create_distributed_function('ledger._apply_credit(ledger.accounts, text, bigint, text, text, text, jsonb, integer, integer)');
    PERFORM create_distributed_function('ledger._open_lot(ledger.entries, integer, integer)');
    PERFORM create_distributed_function('ledger._settle_lot(ledger.accounts, ledger.lots)');
    PERFORM create_distributed_function('ledger._settle_due(ledger.accounts)');
    PERFORM create_distributed_function('ledger._draw_lots(ledger.accounts, bigint)');
    PERFORM create_distributed_function('ledger._return_to_lots(text, jsonb, bigint)');
    PERFORM create_distributed_function('ledger._settle_one(text, bigint)', 'p_user_id',
                                        colocate_with => 'ledger.accounts', force_delegation => true);
    PERFORM create_distributed_function('ledger.credit(text, text, bigint, text, text, text, jsonb, integer, integer)',
                                        'p_user_id', colocate_with => 'ledger.accounts', force_delegation => true);
    PERFORM create_distributed_function('ledger._settle_local_lots(bigint, integer)');
END
$citus$;

DO $cron$
BEGIN
    IF current_database() IS DISTINCT FROM current_setting('cron.database_name', true) THEN
        RETURN;
    END IF;
    PERFORM cron.schedule('rewards-settle-lots', '* * * * *', 'CALL ledger.settle_lots()');
END
$cron$;
