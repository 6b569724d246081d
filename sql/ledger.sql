-- The ledger schema: accounts, entries, reservations, idempotency keys, their
-- functions and the expiry job, as the database holds them now.
--
-- One of the current-state files applied in the order that SCHEMA_FILES in
-- app/operations/migrate.py names (after sql/roles.sql); tests/test_migrations.py
-- proves that a database migrated to head equals one built from them. A change
-- is made here and in a new migration (sql/README.md, "Making a change").
--
-- Every name is schema-qualified because Citus does not propagate search_path to
-- the workers that run pushed-down calls. Balance-changing writes go through
-- ledger._append_entry only, so a balance can never move without a ledger entry.
-- Locks are always taken in one order: the account row first, then the
-- reservation row.

-- ===========================================================================
-- Schema
-- ===========================================================================

CREATE SCHEMA ledger AUTHORIZATION rewards_owner;
REVOKE ALL ON SCHEMA ledger FROM PUBLIC;

-- ===========================================================================
-- Types and domains
-- ===========================================================================

-- An idempotency key's rule, held by the database whatever the code does. A
-- domain rather than a table CHECK: it is checked where a value enters the
-- column, with its check cached per session, where a table CHECK is rebuilt for
-- every statement. (user_id cannot be a domain: Citus will not coerce the text
-- argument of a delegated call to a domain-typed distribution column.)
CREATE DOMAIN ledger.idempotency_key AS text
    CONSTRAINT idempotency_key_format CHECK (octet_length(VALUE) BETWEEN 1 AND 255 AND VALUE !~ '[^!-~]');

-- What every write function returns. `status` is 'ok' or a business refusal the
-- caller branches on (see sql/README.md); genuine errors raise instead.
CREATE TYPE ledger.result AS (
    status          text,
    user_id         text,
    entry_id        bigint,
    reservation_id  bigint,
    amount          bigint,
    available       bigint,
    reserved        bigint,
    expires_at      timestamptz,
    created_at      timestamptz,
    replayed        boolean
);

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

-- ===========================================================================
-- Rules the table constraints call (functions, so they come before the tables)
-- ===========================================================================

-- The shape every ledger entry must have, by kind (see entries_well_formed).
CREATE FUNCTION ledger._entry_well_formed(
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

-- ===========================================================================
-- Tables (each with its constraints)
-- ===========================================================================

-- Operating limits. One row; a reference table under Citus.
CREATE TABLE ledger.settings (
    singleton            boolean PRIMARY KEY DEFAULT true,
    max_amount           bigint NOT NULL,
    max_reservation_ttl  interval NOT NULL,
    max_metadata_bytes   integer NOT NULL,
    max_reason_length    integer NOT NULL,
    -- how long an idempotency key is remembered (ledger.expire_idempotency_keys)
    idempotency_retention  interval NOT NULL DEFAULT interval '30 days',
    -- the most items one call over many may hold (ledger.credit_many)
    max_batch_items      integer NOT NULL DEFAULT 1000,
    -- the longest a credit may stay pending, or last before its points expire
    max_lot_term         interval NOT NULL DEFAULT interval '10 years',
    -- what a refund does with the points the user already spent (ledger.refund):
    -- 'owe' them (later credits pay them off first) or 'write_off' the loss
    refund_shortfall     text NOT NULL DEFAULT 'owe',
    CONSTRAINT settings_singleton CHECK (singleton),
    CONSTRAINT settings_max_amount_positive CHECK (max_amount > 0),
    CONSTRAINT settings_ttl_positive CHECK (max_reservation_ttl >= interval '1 second'),
    CONSTRAINT settings_metadata_positive CHECK (max_metadata_bytes > 1),
    CONSTRAINT settings_reason_positive CHECK (max_reason_length > 0),
    CONSTRAINT settings_batch_items_positive CHECK (max_batch_items > 0),
    CONSTRAINT settings_lot_term_positive CHECK (max_lot_term >= interval '1 day'),
    CONSTRAINT settings_refund_shortfall CHECK (refund_shortfall IN ('owe', 'write_off')),
    -- A key must outlive every retry of its call, and a hold's retries last as
    -- long as the hold: at least a day, and longer than the longest hold.
    CONSTRAINT settings_idempotency_retention_outlives_retries CHECK (
        idempotency_retention >= interval '1 day' AND idempotency_retention > max_reservation_ttl)
);

-- One row per user: the balance the ledger sums to, and the head of its hash chain.
CREATE TABLE ledger.accounts (
    user_id          text NOT NULL,
    available        bigint NOT NULL DEFAULT 0,
    reserved         bigint NOT NULL DEFAULT 0,
    lifetime_earned  bigint NOT NULL DEFAULT 0,
    -- seq of the newest entry; 0 before the first one
    last_seq         bigint NOT NULL DEFAULT 0,
    last_entry_hash  bytea NOT NULL DEFAULT '\x0000000000000000000000000000000000000000000000000000000000000000',
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    -- credited but not yet available (ledger.lots not matured); not spendable
    pending          bigint NOT NULL DEFAULT 0,
    -- the part of `available` that expires: what the matured lots still hold
    expiring         bigint NOT NULL DEFAULT 0,
    -- points refunds took back that the user had already spent: the points
    -- later credits make available pay this off first (ledger._repay)
    owed             bigint NOT NULL DEFAULT 0,
    CONSTRAINT accounts_pkey PRIMARY KEY (user_id),
    CONSTRAINT accounts_user_id_format CHECK (length(user_id) BETWEEN 1 AND 64 AND user_id !~ '[^A-Za-z0-9._:-]'),
    CONSTRAINT accounts_available_nonnegative CHECK (available >= 0),
    CONSTRAINT accounts_reserved_nonnegative CHECK (reserved >= 0),
    -- One constraint for the rest: each CHECK is rebuilt for every UPDATE statement.
    CONSTRAINT accounts_counters_valid CHECK (
        lifetime_earned >= 0 AND last_seq >= 0 AND octet_length(last_entry_hash) = 32
        AND pending >= 0 AND expiring BETWEEN 0 AND available AND owed >= 0
    )
) WITH (fillfactor = 80);  -- room for HOT updates: only the row changes, never its key

-- The ledger: append-only, one row per balance change, chained per account by hash.
CREATE TABLE ledger.entries (
    user_id             text NOT NULL,
    entry_id            bigserial NOT NULL,
    -- position in the account's chain: 1, 2, 3, ... with no gaps
    seq                 bigint NOT NULL,
    kind                text NOT NULL,
    -- commit: the points spent; every other kind: the points moved (cancel, owed,
    -- write_off: the points of a refund that move nothing in `available`)
    amount              bigint NOT NULL,
    available_delta     bigint NOT NULL,
    reserved_delta      bigint NOT NULL,
    available_after     bigint NOT NULL,
    reserved_after      bigint NOT NULL,
    reservation_id      bigint,
    reason              text NOT NULL,
    action_source       text,
    action_external_id  text,
    metadata            jsonb NOT NULL DEFAULT '{}',
    -- NULL for what the database does on its own and for a refund's parts
    -- (its key keeps a record)
    idempotency_key     text,
    created_at          timestamptz NOT NULL,
    prev_hash           bytea NOT NULL,
    hash                bytea NOT NULL,
    CONSTRAINT entries_pkey PRIMARY KEY (user_id, entry_id),
    CONSTRAINT entries_seq_key UNIQUE (user_id, seq),
    CONSTRAINT entries_amount_positive CHECK (amount > 0),
    CONSTRAINT entries_after_nonnegative CHECK (available_after >= 0 AND reserved_after >= 0),
    -- The per-kind rules live in one function: PostgreSQL rebuilds every CHECK
    -- expression for each INSERT statement, and one call is far cheaper to
    -- rebuild than the same rules spelled out as a large expression.
    CONSTRAINT entries_well_formed CHECK (ledger._entry_well_formed(
        kind, seq, amount, available_delta, reserved_delta, reservation_id,
        action_source, action_external_id, idempotency_key, prev_hash, hash))
);

-- Points held for a redemption until it is committed, released or expired.
CREATE TABLE ledger.reservations (
    user_id           text NOT NULL,
    reservation_id    bigserial NOT NULL,
    amount            bigint NOT NULL,
    status            text NOT NULL DEFAULT 'open',
    committed_amount  bigint,
    reason            text NOT NULL,
    metadata          jsonb NOT NULL DEFAULT '{}',
    created_at        timestamptz NOT NULL DEFAULT now(),
    expires_at        timestamptz NOT NULL,
    ended_at          timestamptz,
    -- the points it took from expiring lots, [[lot_id, points], ...] in the
    -- order taken; NULL when the account had none (ledger._draw_lots)
    lot_draws         jsonb,
    CONSTRAINT reservations_pkey PRIMARY KEY (user_id, reservation_id),
    CONSTRAINT reservations_amount_positive CHECK (amount > 0),
    CONSTRAINT reservations_status CHECK (status IN ('open', 'committed', 'released', 'expired')),
    CONSTRAINT reservations_committed_amount CHECK (
        (status = 'committed') = (committed_amount IS NOT NULL)
        AND (committed_amount IS NULL OR committed_amount BETWEEN 1 AND amount)
    ),
    CONSTRAINT reservations_ended CHECK ((status = 'open') = (ended_at IS NULL)),
    CONSTRAINT reservations_deadline CHECK (expires_at > created_at)
);

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

-- One row per idempotency key whose answer no entry holds (refusals, commits
-- and releases): the request's fingerprint and the result it got, so a retry
-- gets the same answer and changes nothing. A success of credit, debit or
-- reserve is answered by its entry instead (ledger._replay).
CREATE TABLE ledger.idempotency_keys (
    user_id          text NOT NULL,
    idempotency_key  ledger.idempotency_key NOT NULL,
    operation        text NOT NULL,
    request_hash     bytea NOT NULL,
    status           text NOT NULL,
    entry_id         bigint,
    reservation_id   bigint,
    amount           bigint,
    available        bigint NOT NULL,
    reserved         bigint NOT NULL,
    expires_at       timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT idempotency_keys_pkey PRIMARY KEY (user_id, idempotency_key),
    CONSTRAINT idempotency_keys_operation CHECK (
        operation IN ('credit', 'debit', 'reserve', 'commit', 'release', 'action', 'refund')
    )
);

-- ===========================================================================
-- Indexes
-- ===========================================================================

-- One entry per idempotency key: a write that succeeds keeps its key's answer
-- on its entry (ledger._replay reads it there), so it writes no record.
CREATE UNIQUE INDEX entries_idempotency_key_once
    ON ledger.entries (user_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;

-- A verified action earns points once per user, ever (its credit), and is
-- refunded at most once (each part of the refund once).
CREATE UNIQUE INDEX entries_action_once
    ON ledger.entries (user_id, action_source, action_external_id, kind)
    WHERE action_source IS NOT NULL;

-- What the expiry job scans: only open reservations, by deadline.
-- The idempotency records past their retention, oldest first, for the expiry.
CREATE INDEX idempotency_keys_created_at ON ledger.idempotency_keys (created_at);

CREATE INDEX reservations_open_deadline
    ON ledger.reservations (expires_at)
    WHERE status = 'open';

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

-- ===========================================================================
-- Views: what the read functions return
-- ===========================================================================

-- next_expiry_*: the soonest expiry of points the account still holds
-- (reserved ones are out of their lots until the hold returns them).
CREATE VIEW ledger.balances AS
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

CREATE VIEW ledger.account_entries AS
    SELECT user_id, entry_id, seq, kind, amount, available_delta, reserved_delta,
           available_after, reserved_after, reservation_id, reason,
           action_source, action_external_id, metadata, created_at
    FROM ledger.entries;

CREATE VIEW ledger.reservation_states AS
    SELECT user_id, reservation_id, amount, status, committed_amount, reason,
           metadata, created_at, expires_at, ended_at
    FROM ledger.reservations;

-- ===========================================================================
-- Private helpers
-- ===========================================================================

-- The two identifier shapes. Plain SQL expressions, so the planner inlines them;
-- the table CHECK constraints spell the same rules out again.
-- A user id or action source: 1-64 characters of A-Z a-z 0-9 . _ : -
CREATE FUNCTION ledger._is_name(p_value text)
RETURNS boolean
LANGUAGE sql
IMMUTABLE
PARALLEL SAFE
AS $$
    SELECT coalesce(length(p_value) BETWEEN 1 AND 64 AND p_value !~ '[^A-Za-z0-9._:-]', false);
$$;

-- An idempotency key or external id: 1-255 visible ASCII characters.
CREATE FUNCTION ledger._is_token(p_value text)
RETURNS boolean
LANGUAGE sql
IMMUTABLE
PARALLEL SAFE
AS $$
    SELECT coalesce(octet_length(p_value) BETWEEN 1 AND 255 AND p_value !~ '[^!-~]', false);
$$;

-- Raise the one error every invalid argument gets: SQLSTATE 22023 with the
-- argument's name in the COLUMN field, which callers map without reading text.
CREATE FUNCTION ledger._invalid(p_argument text, p_message text)
RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    RAISE EXCEPTION USING
        ERRCODE = 'invalid_parameter_value',
        COLUMN = p_argument,
        MESSAGE = format('invalid %s: %s', p_argument, p_message);
END;
$$;

CREATE FUNCTION ledger._settings()
RETURNS ledger.settings
LANGUAGE plpgsql
STABLE
AS $$
BEGIN
    RETURN (SELECT s FROM ledger.settings AS s WHERE s.singleton);
END;
$$;

-- The checks every write shares: user id, idempotency key, reason, metadata.
CREATE FUNCTION ledger._check_request(
    p_settings ledger.settings,
    p_user_id text,
    p_idempotency_key text,
    p_reason text,
    p_metadata jsonb
)
RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    IF NOT ledger._is_name(p_user_id) THEN
        PERFORM ledger._invalid('user_id', 'must be 1-64 characters of A-Z a-z 0-9 . _ : -');
    END IF;
    IF NOT ledger._is_token(p_idempotency_key) THEN
        PERFORM ledger._invalid('idempotency_key', 'must be 1-255 visible ASCII characters');
    END IF;
    IF p_reason IS NULL OR length(p_reason) NOT BETWEEN 1 AND p_settings.max_reason_length
       OR p_reason ~ '[[:cntrl:]]' THEN
        PERFORM ledger._invalid('reason', format(
            'must be 1-%s characters without control characters', p_settings.max_reason_length));
    END IF;
    IF p_metadata IS NULL OR jsonb_typeof(p_metadata) <> 'object'
       OR octet_length(p_metadata::text) > p_settings.max_metadata_bytes THEN
        PERFORM ledger._invalid('metadata', format(
            'must be a JSON object of at most %s bytes', p_settings.max_metadata_bytes));
    END IF;
END;
$$;

CREATE FUNCTION ledger._check_amount(p_settings ledger.settings, p_argument text, p_amount bigint)
RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    IF p_amount IS NULL OR p_amount < 1 OR p_amount > p_settings.max_amount THEN
        PERFORM ledger._invalid(p_argument, format('must be an integer from 1 to %s', p_settings.max_amount));
    END IF;
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

-- Lock the account row, creating it on first use. Every write starts here, so
-- all writes of one user (and every retry of one key) serialize on this row.
CREATE FUNCTION ledger._lock_account(p_user_id text)
RETURNS ledger.accounts
LANGUAGE plpgsql
AS $$
DECLARE
    v_account ledger.accounts;
BEGIN
    SELECT * INTO v_account FROM ledger.accounts WHERE user_id = p_user_id FOR UPDATE;
    IF NOT FOUND THEN
        INSERT INTO ledger.accounts (user_id) VALUES (p_user_id) ON CONFLICT (user_id) DO NOTHING;
        SELECT * INTO STRICT v_account FROM ledger.accounts WHERE user_id = p_user_id FOR UPDATE;
    END IF;
    RETURN v_account;
END;
$$;

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

-- A refusal that changes no balance, reported with the account as it stands.
CREATE FUNCTION ledger._refusal(p_status text, p_account ledger.accounts, p_reservation_id bigint DEFAULT NULL)
RETURNS ledger.result
LANGUAGE plpgsql
STABLE
AS $$
BEGIN
    RETURN ROW(p_status, p_account.user_id, NULL, p_reservation_id, NULL,
                   p_account.available, p_account.reserved, NULL, now(), false)::ledger.result;
END;
$$;

-- Fingerprint of a request, to tell a retry from a different request under the same key.
CREATE FUNCTION ledger._fingerprint(p_request jsonb)
RETURNS bytea
LANGUAGE plpgsql
IMMUTABLE
PARALLEL SAFE
AS $$
BEGIN
    RETURN sha256(convert_to(p_request::text, 'UTF8'));
END;
$$;

-- sha256(previous hash || canonical bytes of the entry). The canonical form is
-- a JSON array: unambiguous whatever the text fields hold, and independent of
-- the session's time zone because the time is in epoch microseconds.
CREATE FUNCTION ledger._entry_hash(p_prev_hash bytea, p_entry ledger.entries)
RETURNS bytea
LANGUAGE plpgsql
IMMUTABLE
PARALLEL SAFE
AS $$
BEGIN
    RETURN sha256(p_prev_hash || convert_to(jsonb_build_array(
            p_entry.user_id, p_entry.entry_id, p_entry.seq, p_entry.kind, p_entry.amount,
            p_entry.available_delta, p_entry.reserved_delta, p_entry.available_after,
            p_entry.reserved_after, p_entry.reservation_id, p_entry.reason,
            p_entry.action_source, p_entry.action_external_id, p_entry.metadata,
            p_entry.idempotency_key,
            (extract(epoch FROM p_entry.created_at) * 1000000)::bigint
        )::text, 'UTF8'));
END;
$$;

-- The one place a balance changes: appends the entry (chained to the account's
-- last hash) and moves the account, in one statement.
-- Call only with the account locked; p_account is its locked row.
CREATE FUNCTION ledger._append_entry(
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

CREATE FUNCTION ledger._entry_result(p_entry ledger.entries, p_expires_at timestamptz DEFAULT NULL)
RETURNS ledger.result
LANGUAGE plpgsql
IMMUTABLE
AS $$
BEGIN
    RETURN ROW('ok', p_entry.user_id, p_entry.entry_id, p_entry.reservation_id, p_entry.amount,
                   p_entry.available_after, p_entry.reserved_after, p_expires_at,
                   p_entry.created_at, false)::ledger.result;
END;
$$;

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

-- Whether this (source, external id) already earned this user points: the
-- question every credit of a verified action asks (ledger._apply_credit,
-- rules.act) under the account lock, before it credits (entries_action_once
-- backs it up). PL/pgSQL: Citus cannot plan a parameterized SQL function's
-- query on a distributed table.
CREATE FUNCTION ledger._action_credited(p_user_id text, p_action_source text, p_action_external_id text)
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
CREATE FUNCTION ledger._credit_entry(
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

-- Lots: the points of credits that are pending or expire (ledger.lots). The
-- account keeps their sums (pending; expiring, the part of available that
-- expires), so an account without lots never reads the table. Each helper is
-- called with the account locked, and orders its statements so that the
-- account's `expiring <= available` holds after each of them.

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
-- 'lapse' entry); points that matured and did not lapse pay off what the
-- account owes first (ledger._repay). Does what is due and nothing else;
-- returns the account after.
CREATE FUNCTION ledger._settle_lot(p_account ledger.accounts, p_lot ledger.lots)
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
CREATE FUNCTION ledger._end_reservation(
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

-- Expire one reservation if it is still open and past its deadline. Locks the
-- account, then the reservation; true when it expired it.
CREATE FUNCTION ledger._expire_one(p_user_id text, p_reservation_id bigint)
RETURNS boolean
LANGUAGE plpgsql
AS $$
DECLARE
    v_account ledger.accounts;
    v_reservation ledger.reservations;
BEGIN
    SELECT * INTO v_account FROM ledger.accounts WHERE user_id = p_user_id FOR UPDATE;
    SELECT * INTO v_reservation FROM ledger.reservations
    WHERE user_id = p_user_id AND reservation_id = p_reservation_id FOR UPDATE;
    IF NOT FOUND OR v_reservation.status <> 'open' OR v_reservation.expires_at > now() THEN
        RETURN false;
    END IF;
    PERFORM ledger._end_reservation(v_account, v_reservation, 'expired', NULL, NULL,
                                    'reservation expired', '{}'::jsonb);
    RETURN true;
END;
$$;

-- The tables on this node that hold p_table's rows, by their own names: under
-- Citus the shards placed here (p_table itself would reach every node's),
-- without Citus p_table itself. Work that must stay within one node's
-- transactions (expiry, retention) walks these.
CREATE FUNCTION ledger._local_tables(p_table regclass)
RETURNS SETOF text
LANGUAGE plpgsql
STABLE
AS $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_extension WHERE extname = 'citus') THEN
        RETURN NEXT p_table::text;
        RETURN;
    END IF;
    RETURN QUERY
        SELECT pg_catalog.shard_name(p_table, s.shardid)
        FROM pg_catalog.pg_dist_shard s
        JOIN pg_catalog.pg_dist_placement p ON p.shardid = s.shardid
        WHERE s.logicalrelid = p_table
          AND p.groupid = (SELECT g.groupid FROM pg_catalog.pg_dist_local_group g)
        ORDER BY s.shardid;
END;
$$;

-- PUBLIC executes no routine of the project's schemas, on any node. Under
-- Citus a function is created on a worker (when it is distributed, or a node
-- is added) with PostgreSQL's default EXECUTE for PUBLIC, and only its
-- explicit grants follow it there. Run after every migration, in a
-- transaction of its own (app.operations.migrate: what a migration changed on
-- the workers stays locked until it commits), and after adding a node
-- (app.operations.nodes). On a worker with the DDL propagation off: Citus
-- refuses DDL from a worker.
CREATE FUNCTION ledger._close_routines_to_public()
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_revoke constant text := $revoke$
        DO $do$
        BEGIN
            PERFORM pg_catalog.set_config('citus.enable_ddl_propagation', 'off', true);
            REVOKE ALL ON ALL ROUTINES IN SCHEMA ledger, rules, api, audit FROM PUBLIC;
        END
        $do$
    $revoke$;
    v_failures text;
BEGIN
    EXECUTE v_revoke;
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_extension WHERE extname = 'citus') THEN
        RETURN;
    END IF;
    SELECT string_agg(format('%s:%s: %s', r.nodename, r.nodeport, r.result), '; ') INTO v_failures
    FROM pg_catalog.run_command_on_workers(v_revoke) AS r
    WHERE NOT r.success;
    IF v_failures IS NOT NULL THEN
        RAISE EXCEPTION 'could not revoke PUBLIC''s EXECUTE on the workers: %', v_failures;
    END IF;
END;
$$;

-- Runs `CALL p_procedure(NULL, p_batch_size)` on every node of the cluster at
-- once (run_command_on_all_nodes, over Citus' own connections as the calling
-- superuser) and adds up the counts the calls return: the way a scheduled job
-- that walks ledger._local_tables in its own per-node transactions runs under
-- Citus. p_procedure takes (INOUT bigint, integer). A node that fails is named
-- in the error; what the others did stays committed, and the error says how much.
CREATE FUNCTION ledger._call_on_every_node(p_procedure regproc, p_batch_size integer, p_what text)
RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_done bigint;
    v_failures text;
BEGIN
    IF p_batch_size IS NULL OR p_batch_size < 1 THEN
        PERFORM ledger._invalid('batch_size', 'must be a positive integer');
    END IF;
    SELECT coalesce(sum(r.result::bigint) FILTER (WHERE r.success), 0),
           string_agg(format('node %s: %s', r.nodeid, r.result), '; ') FILTER (WHERE NOT r.success)
    INTO v_done, v_failures
    FROM pg_catalog.run_command_on_all_nodes(format('CALL %s(NULL, %s)', p_procedure, p_batch_size)) AS r;
    IF v_failures IS NOT NULL THEN
        RAISE EXCEPTION '% failed on some nodes (% done on the others, committed): %', p_what, v_done, v_failures;
    END IF;
    RETURN v_done;
END;
$$;

-- The expiry of the reservations held on this node, table by table
-- (ledger._local_tables), committing after each batch: every account it locks
-- is on this node, so no transaction ever spans nodes. ledger.expire_reservations
-- runs it here, or under Citus on every node at once; _expire_one's statements
-- then run locally, against this node's shards. Bounded by the deadline at the
-- start, so a stream of new expiries cannot keep it running. Not SECURITY
-- DEFINER, like expire_reservations (it commits).
CREATE PROCEDURE ledger._expire_local_shards(INOUT expired bigint DEFAULT 0, batch_size integer DEFAULT 100)
LANGUAGE plpgsql
AS $$
DECLARE
    v_cutoff timestamptz := clock_timestamp();
    v_table text;
    v_due record;
    v_in_batch integer;
BEGIN
    expired := 0;
    IF batch_size IS NULL OR batch_size < 1 THEN
        PERFORM ledger._invalid('batch_size', 'must be a positive integer');
    END IF;
    FOR v_table IN SELECT ledger._local_tables('ledger.reservations') LOOP
        LOOP
            v_in_batch := 0;
            FOR v_due IN EXECUTE format(
                'SELECT user_id, reservation_id FROM %s WHERE status = ''open'' AND expires_at <= $1'
                ' ORDER BY expires_at LIMIT $2', v_table) USING v_cutoff, batch_size
            LOOP
                v_in_batch := v_in_batch + 1;
                IF ledger._expire_one(v_due.user_id, v_due.reservation_id) THEN
                    expired := expired + 1;
                END IF;
            END LOOP;
            COMMIT;
            EXIT WHEN v_in_batch < batch_size;
        END LOOP;
    END LOOP;
END;
$$;

-- The expiry of the idempotency records held on this node, table by table
-- (ledger._local_tables), batch by batch, each batch its own transaction of
-- this node alone; ledger.expire_idempotency_keys runs it here, or under Citus
-- on every node at once. The cutoff is taken once, at the start: nothing
-- younger than the retention is ever deleted. Not SECURITY DEFINER (it commits).
CREATE PROCEDURE ledger._expire_local_idempotency_keys(INOUT deleted bigint DEFAULT 0,
                                                       batch_size integer DEFAULT 1000)
LANGUAGE plpgsql
AS $$
DECLARE
    v_cutoff timestamptz := clock_timestamp() - (SELECT s.idempotency_retention FROM ledger.settings s);
    v_table text;
    v_in_batch bigint;
BEGIN
    deleted := 0;
    IF batch_size IS NULL OR batch_size < 1 THEN
        PERFORM ledger._invalid('batch_size', 'must be a positive integer');
    END IF;
    FOR v_table IN SELECT ledger._local_tables('ledger.idempotency_keys') LOOP
        LOOP
            EXECUTE format('DELETE FROM %1$s WHERE ctid = ANY (ARRAY('
                           'SELECT ctid FROM %1$s WHERE created_at < $1 ORDER BY created_at LIMIT $2))', v_table)
                USING v_cutoff, batch_size;
            GET DIAGNOSTICS v_in_batch = ROW_COUNT;
            deleted := deleted + v_in_batch;
            COMMIT;
            EXIT WHEN v_in_batch < batch_size;
        END LOOP;
    END LOOP;
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

-- Commit and release share everything but the final step.
CREATE FUNCTION ledger._finish_reservation(
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

-- ===========================================================================
-- Public functions
-- ===========================================================================

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
-- 3. The items are applied in input order.
-- Phases 2 and 3 run in one subtransaction. An item that raises a genuine
-- error (a constraint, an overflow) rolls back what the items had done so
-- far, the accounts locked (or made) for them included; it is answered with
-- its error and phases 2 and 3 run again without it, so an account made only
-- for items that all failed is not left behind, as none is by a single credit
-- that raises. The common case pays for one subtransaction, not one per item
-- (each writing subtransaction takes a transaction id of its own, and past 64
-- of them every snapshot taken meanwhile overflows into pg_subtrans).
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

CREATE FUNCTION ledger.debit(
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

CREATE FUNCTION ledger.reserve(
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

CREATE FUNCTION ledger.commit_reservation(
    p_user_id text,
    p_idempotency_key text,
    p_reservation_id bigint,
    p_amount bigint DEFAULT NULL,
    p_reason text DEFAULT 'redemption',
    p_metadata jsonb DEFAULT '{}'
)
RETURNS ledger.result
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN ledger._finish_reservation('commit', p_user_id, p_idempotency_key, p_reservation_id,
                                          p_amount, p_reason, p_metadata);
END;
$$;

CREATE FUNCTION ledger.release_reservation(
    p_user_id text,
    p_idempotency_key text,
    p_reservation_id bigint,
    p_reason text DEFAULT 'released',
    p_metadata jsonb DEFAULT '{}'
)
RETURNS ledger.result
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN ledger._finish_reservation('release', p_user_id, p_idempotency_key, p_reservation_id,
                                          NULL, p_reason, p_metadata);
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
-- settings.refund_shortfall 'write_off', recorded as lost ('write_off'). A
-- refund that needs points an open reservation holds raises RLB02 (retry once
-- the hold has ended): held points are not spent yet. The
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

-- Ends every open reservation whose deadline has passed, in batches of
-- batch_size, each its own transaction (ledger._expire_local_shards).
-- Not SECURITY DEFINER: PostgreSQL refuses COMMIT in such procedures. pg_cron
-- runs it as the superuser who scheduled it; by hand, a DBA does.
-- Under Citus it runs ledger._expire_local_shards on every node at once
-- (ledger._call_on_every_node) and adds up what they expired: each node's
-- transactions hold only its own accounts' locks.
CREATE PROCEDURE ledger.expire_reservations(INOUT expired bigint DEFAULT 0, batch_size integer DEFAULT 100)
LANGUAGE plpgsql
AS $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_extension WHERE extname = 'citus') THEN
        CALL ledger._expire_local_shards(expired, batch_size);
        RETURN;
    END IF;
    expired := ledger._call_on_every_node('ledger._expire_local_shards', batch_size, 'expiring reservations');
END;
$$;

-- Forgets the idempotency records older than settings.idempotency_retention
-- (30 days by default), in batches of batch_size, each its own transaction
-- (ledger._expire_local_idempotency_keys); a retry of such a key is then a new
-- request. A success's key is on its entry and stays. Verified actions are not
-- keys: they stay in the entries and earn once, ever. pg_cron runs it every
-- hour. Under Citus it runs on every node at once, as expire_reservations
-- does, and adds up what they deleted.
CREATE PROCEDURE ledger.expire_idempotency_keys(INOUT deleted bigint DEFAULT 0, batch_size integer DEFAULT 1000)
LANGUAGE plpgsql
AS $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_extension WHERE extname = 'citus') THEN
        CALL ledger._expire_local_idempotency_keys(deleted, batch_size);
        RETURN;
    END IF;
    deleted := ledger._call_on_every_node('ledger._expire_local_idempotency_keys', batch_size, 'expiring idempotency keys');
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

CREATE FUNCTION ledger.balance(p_user_id text)
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

-- One page of an account's entries, newest first. Pass the last seq of the
-- previous page as p_before_seq to get the next one.
CREATE FUNCTION ledger.entries_page(p_user_id text, p_before_seq bigint DEFAULT NULL, p_limit integer DEFAULT 50)
RETURNS SETOF ledger.account_entries
LANGUAGE plpgsql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF NOT ledger._is_name(p_user_id) THEN
        PERFORM ledger._invalid('user_id', 'must be 1-64 characters of A-Z a-z 0-9 . _ : -');
    END IF;
    IF p_limit IS NULL OR p_limit NOT BETWEEN 1 AND 500 THEN
        PERFORM ledger._invalid('limit', 'must be from 1 to 500');
    END IF;
    IF p_before_seq < 1 THEN
        PERFORM ledger._invalid('before_seq', 'must be a positive integer');
    END IF;
    RETURN QUERY
        SELECT * FROM ledger.account_entries
        WHERE user_id = p_user_id AND seq < coalesce(p_before_seq, 9223372036854775807)
        ORDER BY seq DESC
        LIMIT p_limit;
END;
$$;

CREATE FUNCTION ledger.reservation(p_user_id text, p_reservation_id bigint)
RETURNS ledger.reservation_states
LANGUAGE plpgsql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_state ledger.reservation_states;
BEGIN
    IF NOT ledger._is_name(p_user_id) THEN
        PERFORM ledger._invalid('user_id', 'must be 1-64 characters of A-Z a-z 0-9 . _ : -');
    END IF;
    SELECT * INTO v_state FROM ledger.reservation_states
    WHERE user_id = p_user_id AND reservation_id = p_reservation_id;
    RETURN v_state;  -- all NULL when there is no such reservation
END;
$$;

-- Recompute an account's hash chain from its first entry. ok is false when an
-- entry's stored hash or link differs from the recomputed one, or the account's
-- head does not match its last entry; first_broken_* name the first bad entry.
CREATE FUNCTION ledger.verify_chain(p_user_id text)
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

-- ===========================================================================
-- Triggers and the functions they run
-- ===========================================================================

CREATE FUNCTION ledger._refuse_entry_change()
RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    RAISE EXCEPTION USING
        ERRCODE = 'insufficient_privilege',
        TABLE = TG_TABLE_NAME,
        MESSAGE = format('ledger entries are append-only: %s refused', TG_OP);
END;
$$;

CREATE TRIGGER entries_append_only
    BEFORE UPDATE OR DELETE ON ledger.entries
    FOR EACH ROW EXECUTE FUNCTION ledger._refuse_entry_change();

CREATE TRIGGER entries_no_truncate
    BEFORE TRUNCATE ON ledger.entries
    FOR EACH STATEMENT EXECUTE FUNCTION ledger._refuse_entry_change();

-- A reservation leaves 'open' once and never changes again.
CREATE FUNCTION ledger._guard_reservation()
RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    IF TG_OP = 'DELETE' OR OLD.status <> 'open'
       OR (NEW.user_id, NEW.reservation_id, NEW.amount, NEW.expires_at, NEW.created_at)
          IS DISTINCT FROM (OLD.user_id, OLD.reservation_id, OLD.amount, OLD.expires_at, OLD.created_at) THEN
        RAISE EXCEPTION USING
            ERRCODE = 'object_not_in_prerequisite_state',
            TABLE = TG_TABLE_NAME,
            MESSAGE = format('reservation %s is %s and cannot change', OLD.reservation_id, OLD.status);
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER reservations_end_once
    BEFORE UPDATE OR DELETE ON ledger.reservations
    FOR EACH ROW EXECUTE FUNCTION ledger._guard_reservation();

-- ===========================================================================
-- Ownership: the functions, views and types belong to rewards_owner, so the
-- SECURITY DEFINER functions run with its rights, never a superuser's; it works
-- the tables through the grants below, and nothing more. The tables stay with
-- the superuser who created them: Citus creates and copies a table's shards on
-- a node (a node added, a shard moved) over connections made as the table's
-- owner, which must therefore log in on every node, as the superuser does for
-- Citus anyway; and the role SECURITY DEFINER code runs as cannot alter a
-- table, disable its triggers or grant itself back a right on the entries.
-- (Created as the migrating superuser and handed over, rather than created
-- under SET ROLE, because Citus would open its connections to the workers as
-- that NOLOGIN role.)
-- ===========================================================================

DO $owner$
DECLARE
    v_object record;
BEGIN
    FOR v_object IN
        SELECT format('ALTER VIEW %s OWNER TO rewards_owner', c.oid::regclass) AS command
        FROM pg_catalog.pg_class c
        WHERE c.relnamespace = 'ledger'::regnamespace AND c.relkind = 'v'
        UNION ALL
        SELECT format('ALTER ROUTINE %s OWNER TO rewards_owner', p.oid::regprocedure)
        FROM pg_catalog.pg_proc p
        WHERE p.pronamespace = 'ledger'::regnamespace
        UNION ALL
        SELECT format('ALTER TYPE %s OWNER TO rewards_owner', t.oid::regtype)
        FROM pg_catalog.pg_type t
        JOIN pg_catalog.pg_class c ON c.oid = t.typrelid
        WHERE t.typnamespace = 'ledger'::regnamespace AND c.relkind = 'c'
        UNION ALL
        SELECT format('ALTER DOMAIN %s OWNER TO rewards_owner', t.oid::regtype)
        FROM pg_catalog.pg_type t
        WHERE t.typnamespace = 'ledger'::regnamespace AND t.typtype = 'd'
    LOOP
        EXECUTE v_object.command;
    END LOOP;
END
$owner$;

-- ===========================================================================
-- Seed rows
-- ===========================================================================

INSERT INTO ledger.settings (singleton, max_amount, max_reservation_ttl, max_metadata_bytes, max_reason_length)
VALUES (true, 100000000, interval '7 days', 4096, 200);

-- ===========================================================================
-- Grants
-- ===========================================================================

REVOKE ALL ON ALL TABLES IN SCHEMA ledger FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA ledger FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA ledger FROM PUBLIC;
REVOKE ALL ON ALL PROCEDURES IN SCHEMA ledger FROM PUBLIC;
-- The tables' owner (the superuser) needs no grant, but a Citus shard move
-- applies the rows written during its copy as a role that is only a member of
-- that owner (citus_shard_move_subscription_role_*, no superuser): without
-- EXECUTE on what the entries_well_formed CHECK calls, the first entry written
-- meanwhile fails there and the move never catches up.
GRANT EXECUTE ON FUNCTION ledger._entry_well_formed(text, bigint, bigint, bigint, bigint, bigint, text, text, text,
                                                    bytea, bytea) TO CURRENT_USER;
-- Not even the owner may rewrite history (it is the superuser, whom privileges
-- do not bind: the append-only triggers refuse it all the same).
REVOKE UPDATE, DELETE, TRUNCATE ON ledger.entries FROM CURRENT_USER;
-- What the SECURITY DEFINER functions do to the tables, and no more.
GRANT SELECT, INSERT, UPDATE ON ledger.accounts, ledger.reservations, ledger.lots TO rewards_owner;
GRANT SELECT, INSERT ON ledger.entries, ledger.idempotency_keys TO rewards_owner;
GRANT SELECT ON ledger.settings TO rewards_owner;
GRANT USAGE ON SEQUENCE ledger.entries_entry_id_seq, ledger.reservations_reservation_id_seq,
                         ledger.lots_lot_id_seq TO rewards_owner;

GRANT USAGE ON SCHEMA ledger TO rewards_api;
GRANT EXECUTE ON FUNCTION
    ledger.credit(text, text, bigint, text, text, text, jsonb, integer, integer),
    ledger.credit_many(text, text[], text[], bigint[], text[], text[], text[], jsonb[]),
    ledger.debit(text, text, bigint, text, jsonb),
    ledger.reserve(text, text, bigint, integer, text, jsonb),
    ledger.commit_reservation(text, text, bigint, bigint, text, jsonb),
    ledger.release_reservation(text, text, bigint, text, jsonb),
    ledger.refund(text, text, text, text, text, jsonb),
    ledger.balance(text),
    ledger.entries_page(text, bigint, integer),
    ledger.reservation(text, bigint),
    ledger.verify_chain(text)
TO rewards_api;

-- ===========================================================================
-- Comments (the SQL API; sql/README.md says the same at more length)
-- ===========================================================================

COMMENT ON FUNCTION ledger.credit(text, text, bigint, text, text, text, jsonb, integer, integer) IS
'Add points. Args: user_id, idempotency_key, amount (1..settings.max_amount), reason, action_source and action_external_id (both or neither: a verified action earns once per user, ever), metadata (JSON object), pending_seconds (NULL: available at once; else pending that long), expiry_seconds (NULL: never expire; else the points expire that long after the credit, after any pending period). Status: ok | idempotency_key_reused | action_already_credited. Invalid arguments raise 22023 naming the argument in COLUMN.';
COMMENT ON FUNCTION ledger.credit_many(text, text[], text[], bigint[], text[], text[], text[], jsonb[]) IS
'Many credits in one transaction. Args: user_id (under Citus the user whose shard every item''s user must share), then one array per ledger.credit argument, item i taking element i of each (1..settings.max_batch_items items). One row per item, in input order: what ledger.credit would have answered for it alone after the items before it, or its error (error_sqlstate, error_column, error_message) when that item alone raised; 0A000 for an item of another shard. Accounts are locked in user_id order before any item is applied. Invalid call arguments raise 22023 (COLUMN user_id or items).';
COMMENT ON FUNCTION ledger.debit(text, text, bigint, text, jsonb) IS
'Spend points at once. Args: user_id, idempotency_key, amount, reason, metadata. Status: ok | insufficient_points | idempotency_key_reused. Invalid arguments raise 22023.';
COMMENT ON FUNCTION ledger.reserve(text, text, bigint, integer, text, jsonb) IS
'Hold points for a redemption (available down, reserved up) until committed, released or expired after ttl_seconds. Status: ok (reservation_id, expires_at set) | insufficient_points | idempotency_key_reused. Invalid arguments raise 22023.';
COMMENT ON FUNCTION ledger.commit_reservation(text, text, bigint, bigint, text, jsonb) IS
'Spend a held reservation, all of it or amount (<= held; the rest returns to available). Status: ok | reservation_not_found | reservation_committed | reservation_released | reservation_expired | amount_exceeds_reservation | idempotency_key_reused. Invalid arguments raise 22023.';
COMMENT ON FUNCTION ledger.release_reservation(text, text, bigint, text, jsonb) IS
'Return a held reservation to available. Status: ok | reservation_not_found | reservation_committed | reservation_released | reservation_expired | idempotency_key_reused. Invalid arguments raise 22023.';
COMMENT ON FUNCTION ledger.refund(text, text, text, text, text, jsonb) IS
'Reverse what a verified action earned. Args: user_id, idempotency_key, action_source, action_external_id, reason, metadata. Pending points are cancelled; available ones taken back (its lot first); what the user already spent is owed (paid off by later credits first) or, with settings.refund_shortfall write_off, written off. Status: ok (amount: points reversed) | idempotency_key_reused | action_not_found | action_already_refunded | action_points_expired. Invalid arguments raise 22023.';
COMMENT ON PROCEDURE ledger.expire_reservations(bigint, integer) IS
'Expire every open reservation past its deadline, committing every batch_size; returns how many it expired. Under Citus each node expires its own shards'' reservations (ledger._expire_local_shards), all at once. Run each minute by pg_cron; CALL it by hand at any time.';
COMMENT ON PROCEDURE ledger._expire_local_shards(bigint, integer) IS
'Expire the overdue reservations held on this node (its shards under Citus), in transactions of this node alone; ledger.expire_reservations runs it, under Citus on every node.';
COMMENT ON FUNCTION ledger._close_routines_to_public() IS
'Revoke PUBLIC''s EXECUTE on every routine of ledger, rules, api and audit, on every node (Citus gives it on the workers to what it creates there). Run by the superuser.';
COMMENT ON FUNCTION ledger._local_tables(regclass) IS
'The tables on this node holding the given table''s rows: its shards placed here under Citus, else the table itself.';
COMMENT ON PROCEDURE ledger.expire_idempotency_keys(bigint, integer) IS
'Forget idempotency records older than settings.idempotency_retention, committing every batch_size; returns how many. Under Citus each node its own shards'' (ledger._expire_local_idempotency_keys), all at once. Hourly by pg_cron.';
COMMENT ON PROCEDURE ledger._expire_local_idempotency_keys(bigint, integer) IS
'Forget the expired idempotency records held on this node (its shards under Citus), in transactions of this node alone; ledger.expire_idempotency_keys runs it, under Citus on every node.';
COMMENT ON FUNCTION ledger.balance(text) IS
'The account''s available, reserved, lifetime earned and pending points, its next expiry (date and points) and the points it owes after refunds; zeros for a user who never had any.';
COMMENT ON PROCEDURE ledger.settle_lots(bigint, integer) IS
'Make available the pending points whose period is over and expire what remains of lots past their expiry, as ledger entries, committing every batch_size; returns how many lots it settled. Under Citus each node its own shards'' (ledger._settle_local_lots), all at once. Each minute by pg_cron; CALL it by hand at any time.';
COMMENT ON PROCEDURE ledger._settle_local_lots(bigint, integer) IS
'Settle the due lots held on this node (its shards under Citus), in transactions of this node alone; ledger.settle_lots runs it, under Citus on every node.';
COMMENT ON FUNCTION ledger.entries_page(text, bigint, integer) IS
'Up to p_limit (1..500) entries of an account, newest first, with seq < p_before_seq when given (keyset pagination).';
COMMENT ON FUNCTION ledger.reservation(text, bigint) IS
'One reservation''s state; a row of NULLs when the user has no such reservation.';
COMMENT ON FUNCTION ledger.verify_chain(text) IS
'Recompute the account''s hash chain; ok=false names the first broken entry (or none when only the account head disagrees).';

-- ===========================================================================
-- Distribution (only where the citus extension is installed)
-- ===========================================================================

DO $citus$
DECLARE
    v_function regprocedure;
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_extension WHERE extname = 'citus') THEN
        RETURN;
    END IF;
    -- The append-only and end-once triggers only ever look at their own row,
    -- which is what makes them safe to run on each shard.
    PERFORM pg_catalog.set_config('citus.enable_unsafe_triggers', 'on', true);
    PERFORM create_reference_table('ledger.settings');
    PERFORM create_distributed_table('ledger.accounts', 'user_id');
    PERFORM create_distributed_table('ledger.entries', 'user_id', colocate_with => 'ledger.accounts');
    PERFORM create_distributed_table('ledger.reservations', 'user_id', colocate_with => 'ledger.accounts');
    PERFORM create_distributed_table('ledger.idempotency_keys', 'user_id', colocate_with => 'ledger.accounts');
    PERFORM create_distributed_table('ledger.lots', 'user_id', colocate_with => 'ledger.accounts');

    -- Each public call runs wholly on the worker that holds its user, even
    -- inside a transaction block (force_delegation). The helpers it calls are
    -- distributed too, without an argument, which puts them on every worker.
    FOR v_function IN
        SELECT p.oid::regprocedure FROM pg_catalog.pg_proc p
        WHERE p.pronamespace = 'ledger'::regnamespace AND p.prokind = 'f'
        ORDER BY p.proname LIKE '\_%' DESC  -- helpers first
    LOOP
        IF v_function = ANY (ARRAY[
            'ledger.credit(text, text, bigint, text, text, text, jsonb, integer, integer)',
            'ledger.debit(text, text, bigint, text, jsonb)',
            'ledger.reserve(text, text, bigint, integer, text, jsonb)',
            'ledger.commit_reservation(text, text, bigint, bigint, text, jsonb)',
            'ledger.release_reservation(text, text, bigint, text, jsonb)',
            'ledger.refund(text, text, text, text, text, jsonb)',
            'ledger._expire_one(text, bigint)',
            'ledger._settle_one(text, bigint)',
            'ledger.balance(text)',
            'ledger.entries_page(text, bigint, integer)',
            'ledger.reservation(text, bigint)',
            'ledger.verify_chain(text)'
        ]::regprocedure[]) THEN
            PERFORM create_distributed_function(v_function, 'p_user_id',
                                                colocate_with => 'ledger.accounts',
                                                force_delegation => true);
        ELSIF v_function = 'ledger.credit_many(text, text[], text[], bigint[], text[], text[], text[], jsonb[])'::regprocedure THEN
            -- Delegated by the user whose shard holds every item, as a
            -- statement of its own: force_delegation would allow the queries
            -- inside to touch p_user_id's rows alone.
            PERFORM create_distributed_function(v_function, 'p_user_id',
                                                colocate_with => 'ledger.accounts');
        ELSE
            PERFORM create_distributed_function(v_function);
        END IF;
    END LOOP;
    -- The expiry each node runs for its own shards (ledger.expire_reservations).
    PERFORM create_distributed_function('ledger._expire_local_shards(bigint, integer)');
    -- The same for the idempotency records (ledger.expire_idempotency_keys).
    PERFORM create_distributed_function('ledger._expire_local_idempotency_keys(bigint, integer)');
    -- And for the lots (ledger.settle_lots).
    PERFORM create_distributed_function('ledger._settle_local_lots(bigint, integer)');
END
$citus$;

-- ===========================================================================
-- Schedule (only in the database pg_cron serves)
-- ===========================================================================

DO $cron$
BEGIN
    IF current_database() IS DISTINCT FROM current_setting('cron.database_name', true) THEN
        RETURN;
    END IF;
    CREATE EXTENSION IF NOT EXISTS pg_cron;
    PERFORM cron.schedule('rewards-expire-reservations', '* * * * *',
                          'CALL ledger.expire_reservations()');
    PERFORM cron.schedule('rewards-expire-idempotency-keys', '41 * * * *',
                          'CALL ledger.expire_idempotency_keys()');
    PERFORM cron.schedule('rewards-settle-lots', '* * * * *', 'CALL ledger.settle_lots()');
END
$cron$;
