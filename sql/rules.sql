-- The rules schema: what an action earns (rules per action type, campaigns),
-- the change history of both, and the per-user counters and action claims the
-- earning function keeps, as the database holds them now.
--
-- One of the current-state files applied in the order that SCHEMA_FILES in
-- app/operations/migrate.py names (after sql/api.sql). Rules and campaigns are
-- data: rules.act reads them on every call, so a change takes effect on the
-- next request. Under Citus they are reference tables (a copy on every node,
-- read locally by the call delegated to the user's worker).

-- ===========================================================================
-- Schema
-- ===========================================================================

CREATE SCHEMA rules AUTHORIZATION rewards_owner;
REVOKE ALL ON SCHEMA rules FROM PUBLIC;

-- ===========================================================================
-- Types
-- ===========================================================================

-- What rules.act returns: the ledger's answer and why it earned what it did.
-- status: ok | idempotency_key_reused | action_already_credited | not_eligible | cap_reached,
-- and on a single node action_claimed_by_another_user (nothing written)
CREATE TYPE rules.action_result AS (
    status            text,
    user_id           text,
    entry_id          bigint,
    -- points credited (NULL on a refusal)
    points            bigint,
    -- the rule (its action type) and what it gave before any cap
    rule              text,
    base_points       bigint,
    -- the campaign that added points, and how many
    campaign_id       bigint,
    campaign_points   bigint,
    -- a daily or lifetime cap cut the points down
    capped            boolean,
    -- the campaign's budget could not pay all of its points
    budget_exhausted  boolean,
    available         bigint,
    reserved          bigint,
    created_at        timestamptz,
    replayed          boolean
);

-- ===========================================================================
-- Tables (each with its constraints)
-- ===========================================================================

-- What one action of a type earns: fixed points, or points per unit of the
-- action's value (a purchase's amount in minor currency units), rounded down:
-- floor(value * points_per_unit / unit_value). Caps bound the points one user
-- earns from the type per UTC day and in all. pending_seconds and
-- expiry_seconds (NULL: none) make each credit of the type a lot: pending
-- for that long (a purchase's return window), expiring that long after it
-- (ledger.credit's terms; within ledger.settings.max_lot_term, checked when
-- the rule is set).
CREATE TABLE rules.rules (
    action_type      text NOT NULL,
    fixed_points     bigint,
    points_per_unit  bigint,
    unit_value       bigint,
    daily_cap        bigint,
    lifetime_cap     bigint,
    enabled          boolean NOT NULL DEFAULT true,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    pending_seconds  integer,
    expiry_seconds   integer,
    CONSTRAINT rules_pkey PRIMARY KEY (action_type),
    CONSTRAINT rules_action_type_format CHECK (
        length(action_type) BETWEEN 1 AND 64 AND action_type !~ '[^A-Za-z0-9._:-]'),
    -- fixed, or per unit (both of its numbers), never both
    CONSTRAINT rules_one_kind CHECK (
        (fixed_points IS NULL) <> (points_per_unit IS NULL)
        AND (points_per_unit IS NULL) = (unit_value IS NULL)),
    CONSTRAINT rules_points_range CHECK (
        coalesce(fixed_points, 1) BETWEEN 1 AND 100000000
        AND coalesce(points_per_unit, 1) BETWEEN 1 AND 1000000
        AND coalesce(unit_value, 1) BETWEEN 1 AND 1000000000),
    CONSTRAINT rules_caps_positive CHECK (coalesce(daily_cap, 1) >= 1 AND coalesce(lifetime_cap, 1) >= 1),
    -- ledger.lots' terms: it matures before it expires
    CONSTRAINT rules_lot_terms CHECK (
        coalesce(pending_seconds, 1) >= 1
        AND (expiry_seconds IS NULL OR expiry_seconds > coalesce(pending_seconds, 0)))
);

-- A promotion: inside [starts_at, ends_at) (by the action's occurred_at), an
-- eligible action earns more: its base points times multiplier_percent / 100
-- (rounded down), or a fixed bonus. Eligible: its type among action_types and
-- its source among sources (NULL: any). budget: the most points the campaign
-- adds in all (NULL: no limit).
CREATE TABLE rules.campaigns (
    campaign_id         bigserial NOT NULL,
    name                text NOT NULL,
    starts_at           timestamptz NOT NULL,
    ends_at             timestamptz NOT NULL,
    multiplier_percent  integer,
    bonus_points        bigint,
    action_types        text[],
    sources             text[],
    budget              bigint,
    enabled             boolean NOT NULL DEFAULT true,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT campaigns_pkey PRIMARY KEY (campaign_id),
    CONSTRAINT campaigns_name_key UNIQUE (name),
    CONSTRAINT campaigns_name_length CHECK (length(name) BETWEEN 1 AND 100 AND name !~ '[[:cntrl:]]'),
    CONSTRAINT campaigns_window CHECK (ends_at > starts_at),
    CONSTRAINT campaigns_one_kind CHECK ((multiplier_percent IS NULL) <> (bonus_points IS NULL)),
    CONSTRAINT campaigns_amounts CHECK (
        coalesce(multiplier_percent, 101) BETWEEN 101 AND 10000
        AND coalesce(bonus_points, 1) BETWEEN 1 AND 100000000
        AND coalesce(budget, 1) >= 1),
    -- each filter, when given, a non-empty list of names: joined by spaces,
    -- the text is name ( name)* and splits back into as many as there are
    -- (so no element is blank or holds a space)
    CONSTRAINT campaigns_filters CHECK (
        (action_types IS NULL OR (cardinality(action_types) BETWEEN 1 AND 100
            AND array_to_string(action_types, ' ', '') ~ '^[A-Za-z0-9._:-]{1,64}( [A-Za-z0-9._:-]{1,64})*$'
            AND cardinality(string_to_array(array_to_string(action_types, ' ', ''), ' ')) = cardinality(action_types)))
        AND (sources IS NULL OR (cardinality(sources) BETWEEN 1 AND 100
            AND array_to_string(sources, ' ', '') ~ '^[A-Za-z0-9._:-]{1,64}( [A-Za-z0-9._:-]{1,64})*$'
            AND cardinality(string_to_array(array_to_string(sources, ' ', ''), ' ')) = cardinality(sources))))
);

-- A budgeted campaign's budget, and the part of it no slice holds yet
-- (unallocated). Claims never touch this row: they draw from their slice
-- (rules.budget_slices); a refill moves points from here to a slice. So at
-- every commit: budget = awarded + unallocated + what the slices hold.
CREATE TABLE rules.campaign_budgets (
    campaign_id  bigint NOT NULL,
    budget       bigint NOT NULL,
    unallocated  bigint NOT NULL,
    -- nothing is left beyond what the slices hold: a claim takes what its
    -- slice has, down to the last point, instead of asking for a refill
    exhausted    boolean NOT NULL DEFAULT false,
    CONSTRAINT campaign_budgets_pkey PRIMARY KEY (campaign_id),
    CONSTRAINT campaign_budgets_never_overspent CHECK (budget >= 1 AND unallocated BETWEEN 0 AND budget)
);

-- Where a user's claims on a budget draw from: the slice whose anchor is the
-- row of this table covering the hashtext of the user id. Under Citus one row
-- per shard of ledger.accounts, its range the shard's and its anchor a text
-- that hashes into it (Citus places a text value by hashtext), so a slice keyed
-- by the anchor lives on the shard of every user it serves
-- (rules._place_budget_anchors); on a single node, equal ranges.
CREATE TABLE rules.budget_anchors (
    slice_no  integer NOT NULL,
    hash_min  integer NOT NULL,
    hash_max  integer NOT NULL,
    anchor    text NOT NULL,
    CONSTRAINT budget_anchors_pkey PRIMARY KEY (slice_no),
    CONSTRAINT budget_anchors_anchor_inside CHECK (hash_min <= hash_max AND hashtext(anchor) BETWEEN hash_min AND hash_max)
);

-- A slice of a campaign's budget (a sharded counter): what the claims of its
-- anchor's users may still take without a refill. reclaimed: what the last
-- gathering took back (the gatherings of rules.refill_budget_slice and
-- rules.put_campaign read it).
CREATE TABLE rules.budget_slices (
    anchor       text NOT NULL,
    campaign_id  bigint NOT NULL,
    remaining    bigint NOT NULL DEFAULT 0,
    reclaimed    bigint NOT NULL DEFAULT 0,
    CONSTRAINT budget_slices_pkey PRIMARY KEY (anchor, campaign_id),
    CONSTRAINT budget_slices_never_negative CHECK (remaining >= 0 AND reclaimed >= 0)
);

-- Every change of a rule or a campaign: who (the API key's name, or the OS
-- user at the CLI), when, and the row before and after (NULL before a create).
CREATE TABLE rules.changes (
    change_id   bigserial NOT NULL,
    changed_at  timestamptz NOT NULL DEFAULT now(),
    actor       text NOT NULL,
    subject     text NOT NULL,
    subject_id  text NOT NULL,
    operation   text NOT NULL,
    before      jsonb,
    after       jsonb NOT NULL,
    CONSTRAINT changes_pkey PRIMARY KEY (change_id),
    CONSTRAINT changes_actor_length CHECK (length(actor) BETWEEN 1 AND 200),
    CONSTRAINT changes_subject CHECK (subject IN ('rule', 'campaign')),
    CONSTRAINT changes_operation CHECK (
        operation IN ('create', 'change', 'disable', 'enable')
        AND (before IS NULL) = (operation = 'create'))
);

-- What one user earned from one action type: today (UTC) and in all, the
-- counters the caps are held against. Under Citus distributed by user_id with
-- the accounts, so the cap check is part of the user's one-shard transaction.
CREATE TABLE rules.earnings (
    user_id          text NOT NULL,
    action_type      text NOT NULL,
    day              date NOT NULL,
    day_points       bigint NOT NULL,
    lifetime_points  bigint NOT NULL,
    CONSTRAINT earnings_pkey PRIMARY KEY (user_id, action_type),
    CONSTRAINT earnings_counters CHECK (day_points >= 0 AND lifetime_points >= day_points)
);

-- Which user a verified action (source, external id) belongs to: the first
-- one it was reported for, forever. Keyed by action_key = source || ' ' ||
-- external_id (neither may hold a space). On a single node rules.act takes
-- the claim in the credit's own transaction; under Citus the table is
-- distributed by that key (colocated with the accounts' hashing), so the claim
-- is a one-shard transaction of its own on the action's shard, made first
-- (rules.claim_action; docs/ARCHITECTURE.md).
CREATE TABLE rules.action_claims (
    action_key  text NOT NULL,
    user_id     text NOT NULL,
    claimed_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT action_claims_pkey PRIMARY KEY (action_key),
    -- The lengths apart from the pattern: with a bounded repetition ({1,255})
    -- PostgreSQL's regex engine works through hundreds of states, about ten
    -- times this form's cost and most of what a claim's insert cost.
    CONSTRAINT action_claims_key_format CHECK (
        action_key ~ '^[A-Za-z0-9._:-]+ [!-~]+$'
        AND position(' ' IN action_key) <= 65
        AND length(action_key) <= position(' ' IN action_key) + 255),
    CONSTRAINT action_claims_user_id_format CHECK (
        length(user_id) BETWEEN 1 AND 64 AND user_id !~ '[^A-Za-z0-9._:-]')
);

-- ===========================================================================
-- Views
-- ===========================================================================

-- The change history as auditors read it (rewards_auditor may select it).
CREATE VIEW rules.change_history AS
    SELECT change_id, changed_at, actor, subject, subject_id, operation, before, after
    FROM rules.changes;

-- ===========================================================================
-- Private helpers
-- ===========================================================================

-- A list of names for a campaign's filter: NULL (any) or 1-100 names.
CREATE FUNCTION rules._check_names(p_field text, p_names text[])
RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    IF p_names IS NOT NULL AND (cardinality(p_names) NOT BETWEEN 1 AND 100 OR EXISTS (
            SELECT FROM unnest(p_names) AS n WHERE NOT ledger._is_name(n))) THEN
        PERFORM ledger._invalid(p_field, 'must be absent (any) or 1-100 names of 1-64 characters of A-Z a-z 0-9 . _ : -');
    END IF;
END;
$$;

-- The anchor of the slice a user's claims draw from (rules.budget_anchors).
-- PL/pgSQL: Citus plans no parameter of an SQL function's query.
CREATE FUNCTION rules._budget_anchor(p_user_id text)
RETURNS text
LANGUAGE plpgsql
STABLE
AS $$
DECLARE
    v_hash constant integer := hashtext(p_user_id);
    v_anchor text;
BEGIN
    SELECT anchor INTO v_anchor FROM rules.budget_anchors WHERE v_hash BETWEEN hash_min AND hash_max;
    RETURN v_anchor;
END;
$$;

-- The anchors: under Citus one per shard of ledger.accounts, found by trying
-- 'budget-slice-<n>' until one hashes into each shard's range (a few hundred
-- tries for 32 shards); on a single node 8 equal ranges, which is as many rows
-- as concurrent claims of one campaign need to spread over. Run again after
-- the shards of ledger.accounts are split (moves keep the ranges).
CREATE FUNCTION rules._place_budget_anchors()
RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    v_range record;
    v_slice integer := 0;
    v_n integer;
BEGIN
    DELETE FROM rules.budget_anchors;
    FOR v_range IN EXECUTE CASE
        WHEN EXISTS (SELECT FROM pg_catalog.pg_extension WHERE extname = 'citus') THEN
            -- text, so read through EXECUTE: pg_dist_shard exists only with Citus
            'SELECT shardminvalue::integer AS lo, shardmaxvalue::integer AS hi FROM pg_catalog.pg_dist_shard
             WHERE logicalrelid = ''ledger.accounts''::regclass ORDER BY 1'
        ELSE
            'SELECT (-2147483648 + g * 536870912::bigint)::integer AS lo,
                    (-2147483648 + (g + 1) * 536870912::bigint - 1)::integer AS hi
             FROM generate_series(0, 7) AS g ORDER BY 1'
        END
    LOOP
        v_n := 0;
        LOOP
            v_n := v_n + 1;
            EXIT WHEN hashtext('budget-slice-' || v_n) BETWEEN v_range.lo AND v_range.hi;
        END LOOP;
        INSERT INTO rules.budget_anchors (slice_no, hash_min, hash_max, anchor)
        VALUES (v_slice, v_range.lo, v_range.hi, 'budget-slice-' || v_n);
        v_slice := v_slice + 1;
    END LOOP;
END;
$$;

-- The table that holds the user's slices by its own name: under Citus the
-- shard of rules.budget_slices on the user's node (a call delegated there with
-- force_delegation may only name the distributed table with the user's own
-- key, and a slice is keyed by its anchor), without Citus the table itself.
CREATE FUNCTION rules._slice_table(p_user_id text)
RETURNS text
LANGUAGE plpgsql
STABLE
AS $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_extension WHERE extname = 'citus') THEN
        RETURN 'rules.budget_slices';
    END IF;
    RETURN pg_catalog.shard_name('rules.budget_slices',
                                 pg_catalog.get_shard_id_for_distribution_column('rules.budget_slices', p_user_id));
END;
$$;

-- The budget claim, a sharded counter: up to p_points from the user's slice
-- of the campaign's budget, locked on the user's shard with the account (lock
-- order: account, then slice), so concurrent claims queue per slice, not on
-- one row. A slice too short for the claim is refilled outside this
-- transaction: the call raises RLB01 (budget slice low, nothing written), the
-- caller runs rules.refill_budget_slice and calls again (app.ledger.actions).
-- Once the budget has nothing beyond the slices (exhausted, read from the
-- budget's row, a reference table's copy on this node), the claim takes what
-- the slice has, 0 when it is spent. Answers the points granted.
CREATE FUNCTION rules._claim_budget(p_campaign_id bigint, p_user_id text, p_points bigint)
RETURNS bigint
LANGUAGE plpgsql
AS $$
DECLARE
    v_anchor constant text := rules._budget_anchor(p_user_id);
    v_table constant text := rules._slice_table(p_user_id);
    v_slice rules.budget_slices;
    v_granted bigint;
BEGIN
    EXECUTE format('SELECT * FROM %s WHERE anchor = $1 AND campaign_id = $2 FOR UPDATE', v_table)
        INTO v_slice USING v_anchor, p_campaign_id;
    IF coalesce(v_slice.remaining, 0) < p_points
       AND NOT coalesce((SELECT b.exhausted FROM rules.campaign_budgets b WHERE b.campaign_id = p_campaign_id), true) THEN
        RAISE EXCEPTION USING ERRCODE = 'RLB01',
            MESSAGE = format('budget slice low: campaign %s needs %s', p_campaign_id, p_points),
            HINT = 'call rules.refill_budget_slice(campaign_id, user_id, points), then the action again';
    END IF;
    v_granted := least(coalesce(v_slice.remaining, 0), p_points);
    IF v_granted > 0 THEN
        EXECUTE format('UPDATE %s SET remaining = remaining - $3 WHERE anchor = $1 AND campaign_id = $2', v_table)
            USING v_anchor, p_campaign_id, v_granted;
    END IF;
    RETURN v_granted;
END;
$$;

-- Bind the action to p_user_id unless it is bound already, and answer whom
-- it belongs to: the one claim of rules.claim_action and rules.act. A report
-- for another user waits here for the transaction that claimed the action to
-- end, then reads its user (or claims it, when that one rolled back).
CREATE FUNCTION rules._claim(p_action_key text, p_user_id text)
RETURNS text
LANGUAGE plpgsql
AS $$
DECLARE
    v_owner text;
BEGIN
    INSERT INTO rules.action_claims (action_key, user_id) VALUES (p_action_key, p_user_id)
    ON CONFLICT (action_key) DO NOTHING
    RETURNING user_id INTO v_owner;
    IF v_owner IS NULL THEN
        SELECT user_id INTO STRICT v_owner FROM rules.action_claims WHERE action_key = p_action_key;
    END IF;
    RETURN v_owner;
END;
$$;

-- The answer of rules.act from a ledger.result and the earning it recorded.
CREATE FUNCTION rules._action_result(p_result ledger.result, p_earning jsonb)
RETURNS rules.action_result
LANGUAGE plpgsql
IMMUTABLE
AS $$
BEGIN
    RETURN ROW(p_result.status, p_result.user_id, p_result.entry_id, p_result.amount,
               p_earning->>'rule', (p_earning->>'base_points')::bigint,
               (p_earning->>'campaign_id')::bigint, (p_earning->>'campaign_points')::bigint,
               (p_earning->>'capped')::boolean, (p_earning->>'budget_exhausted')::boolean,
               p_result.available, p_result.reserved, p_result.created_at, p_result.replayed)::rules.action_result;
END;
$$;

-- ===========================================================================
-- Public functions: the earning (rewards_api), delegated to the user's node
-- ===========================================================================

-- Bind a verified action to the user it is reported for, the first time, and
-- answer whom it belongs to (the caller goes on to rules.act, with p_claimed,
-- only when that is its user). Under Citus the first step of an action: a
-- one-shard transaction on the action's shard. Idempotent.
CREATE FUNCTION rules.claim_action(p_action_key text, p_user_id text)
RETURNS text
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    -- action_claims_key_format, checked first to name the argument
    IF p_action_key IS NULL OR NOT (p_action_key ~ '^[A-Za-z0-9._:-]+ [!-~]+$'
                                    AND position(' ' IN p_action_key) <= 65
                                    AND length(p_action_key) <= position(' ' IN p_action_key) + 255) THEN
        PERFORM ledger._invalid('action_key', 'must be the source, a space and the external id');
    END IF;
    IF NOT ledger._is_name(p_user_id) THEN
        PERFORM ledger._invalid('user_id', 'must be 1-64 characters of A-Z a-z 0-9 . _ : -');
    END IF;
    RETURN rules._claim(p_action_key, p_user_id);
END;
$$;

-- A verified action: the points come from the rules, never from the caller.
-- The rule of p_action_type gives the base points (fixed, or floor(value *
-- points_per_unit / unit_value)); the best eligible campaign whose window holds
-- p_occurred_at adds to them; the user's daily and lifetime caps for the type
-- cut the total down; a budgeted campaign pays only what its budget has left.
-- The credit is ledger._credit_entry's, on the account locked first, with
-- the rule's lot terms (pending, expiry; none: plain points); the earning (rule, campaign, caps, budget) is kept in the entry's metadata under
-- "earning". Refusals (not_eligible, cap_reached, action_already_credited)
-- write only their idempotency record.
-- Once ever across users: on a single node the action is claimed here first,
-- before the account (rules._claim; lock order: claim, account, slice), so the
-- claim commits with the credit, and an action another user holds is refused
-- (action_claimed_by_another_user) writing nothing. Under Citus the claim's
-- row is on the action's shard, which this call, delegated to the user's,
-- cannot reach: p_claimed says the caller claimed it for this user with
-- rules.claim_action, committed; without it the call raises RLB03 (nothing
-- written). p_claimed defaults to true for code before revision 0035, which
-- claimed first and passed eight arguments.
CREATE FUNCTION rules.act(
    p_user_id text,
    p_idempotency_key text,
    p_source text,
    p_external_id text,
    p_action_type text,
    p_value bigint,
    p_occurred_at timestamptz,
    p_metadata jsonb,
    p_claimed boolean DEFAULT true
)
RETURNS rules.action_result
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_settings ledger.settings := ledger._settings();
    v_now constant timestamptz := now();
    v_today constant date := (now() AT TIME ZONE 'UTC')::date;
    v_account ledger.accounts;
    v_request jsonb;
    v_result ledger.result;
    v_rule rules.rules;
    v_campaign rules.campaigns;
    v_earned rules.earnings;
    v_base bigint;
    v_extra bigint := 0;
    v_room bigint;
    v_base_award bigint;
    v_extra_award bigint := 0;
    v_budget_short boolean := false;
    v_points bigint;
    v_earning jsonb;
BEGIN
    PERFORM ledger._check_request(v_settings, p_user_id, p_idempotency_key, 'action', p_metadata);
    IF NOT ledger._is_name(p_source) THEN
        PERFORM ledger._invalid('source', 'must be 1-64 characters of A-Z a-z 0-9 . _ : -');
    END IF;
    IF NOT ledger._is_token(p_external_id) THEN
        PERFORM ledger._invalid('external_id', 'must be 1-255 visible ASCII characters');
    END IF;
    IF NOT ledger._is_name(p_action_type) THEN
        PERFORM ledger._invalid('type', 'must be 1-64 characters of A-Z a-z 0-9 . _ : -');
    END IF;
    IF p_value < 0 OR p_value > 1000000000000 THEN
        PERFORM ledger._invalid('value', 'must be an integer from 0 to 1000000000000 (minor currency units)');
    END IF;
    -- An action reported from the future, or too long after it happened to
    -- fall in any campaign window it names, is refused.
    IF p_occurred_at IS NOT NULL
       AND (p_occurred_at > v_now + interval '5 minutes' OR p_occurred_at < v_now - interval '30 days') THEN
        PERFORM ledger._invalid('occurred_at', 'must be within the last 30 days (and not in the future)');
    END IF;

    IF EXISTS (SELECT FROM pg_catalog.pg_extension WHERE extname = 'citus') THEN
        IF p_claimed IS NOT TRUE THEN
            RAISE EXCEPTION USING ERRCODE = 'RLB03',
                MESSAGE = format('action not claimed: %s %s', p_source, p_external_id),
                HINT = 'call rules.claim_action(action_key, user_id), then rules.act with p_claimed true';
        END IF;
    ELSIF rules._claim(p_source || ' ' || p_external_id, p_user_id) <> p_user_id THEN
        RETURN ROW('action_claimed_by_another_user', p_user_id, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
                   NULL, NULL, NULL, NULL, false)::rules.action_result;
    END IF;

    v_account := ledger._lock_account(p_user_id);
    v_request := jsonb_build_array(p_source, p_external_id, p_action_type, p_value, p_occurred_at, p_metadata);
    v_result := ledger._replay(v_account, p_idempotency_key, 'action', v_request);
    IF v_result.status IS NOT NULL THEN
        RETURN rules._action_result(v_result, (
            SELECT e.metadata->'earning' FROM ledger.entries e
            WHERE e.user_id = p_user_id AND e.entry_id = v_result.entry_id));
    END IF;

    IF ledger._action_credited(p_user_id, p_source, p_external_id) THEN
        RETURN rules._action_result(ledger._remember(p_idempotency_key, 'action', v_request,
            ledger._refusal('action_already_credited', v_account)), NULL);
    END IF;

    SELECT * INTO v_rule FROM rules.rules WHERE action_type = p_action_type AND enabled;
    IF FOUND THEN
        IF v_rule.fixed_points IS NOT NULL THEN
            v_base := v_rule.fixed_points;
        ELSIF p_value IS NULL THEN
            PERFORM ledger._invalid('value', format('the %s rule earns per unit: send the value', p_action_type));
        ELSE
            -- numeric: exact, and no overflow before the division
            v_base := div(p_value::numeric * v_rule.points_per_unit, v_rule.unit_value)::bigint;
        END IF;
    END IF;
    IF coalesce(v_base, 0) = 0 THEN
        RETURN rules._action_result(ledger._remember(p_idempotency_key, 'action', v_request,
            ledger._refusal('not_eligible', v_account)), jsonb_build_object('rule', v_rule.action_type));
    END IF;

    -- The eligible campaign that adds the most (the oldest among equals).
    SELECT * INTO v_campaign FROM rules.campaigns c
    WHERE c.enabled
      AND coalesce(p_occurred_at, v_now) >= c.starts_at AND coalesce(p_occurred_at, v_now) < c.ends_at
      AND (c.action_types IS NULL OR p_action_type = ANY (c.action_types))
      AND (c.sources IS NULL OR p_source = ANY (c.sources))
    ORDER BY coalesce(div(v_base::numeric * (c.multiplier_percent - 100), 100), c.bonus_points) DESC,
             c.campaign_id
    LIMIT 1;
    IF FOUND THEN
        v_extra := coalesce(div(v_base::numeric * (v_campaign.multiplier_percent - 100), 100)::bigint,
                            v_campaign.bonus_points);
    END IF;

    SELECT * INTO v_earned FROM rules.earnings WHERE user_id = p_user_id AND action_type = p_action_type;
    IF v_earned.day IS DISTINCT FROM v_today THEN
        v_earned.day_points := 0;
    END IF;
    v_room := least(v_rule.daily_cap - v_earned.day_points, v_rule.lifetime_cap - v_earned.lifetime_points,
                    v_base + v_extra);
    IF v_room <= 0 THEN
        RETURN rules._action_result(ledger._remember(p_idempotency_key, 'action', v_request,
            ledger._refusal('cap_reached', v_account)),
            jsonb_build_object('rule', v_rule.action_type, 'base_points', v_base, 'capped', true));
    END IF;
    v_base_award := least(v_base, v_room);
    IF v_extra > 0 AND v_room > v_base_award THEN
        v_extra_award := v_room - v_base_award;
        IF v_campaign.budget IS NOT NULL THEN
            v_extra_award := rules._claim_budget(v_campaign.campaign_id, p_user_id, v_room - v_base_award);
            v_budget_short := v_extra_award < v_room - v_base_award;
        END IF;
    END IF;
    v_points := v_base_award + v_extra_award;
    IF v_points > v_settings.max_amount THEN
        PERFORM ledger._invalid('value', format('earns more than %s points', v_settings.max_amount));
    END IF;

    INSERT INTO rules.earnings AS e (user_id, action_type, day, day_points, lifetime_points)
    VALUES (p_user_id, p_action_type, v_today, v_points, v_points)
    ON CONFLICT (user_id, action_type) DO UPDATE SET
        day_points = CASE WHEN e.day = EXCLUDED.day THEN e.day_points + EXCLUDED.day_points
                          ELSE EXCLUDED.day_points END,
        day = EXCLUDED.day,
        lifetime_points = e.lifetime_points + EXCLUDED.lifetime_points;

    v_earning := jsonb_build_object(
        'rule', v_rule.action_type, 'base_points', v_base,
        'campaign_id', CASE WHEN v_extra_award > 0 THEN v_campaign.campaign_id END,
        'campaign_points', CASE WHEN v_extra_award > 0 THEN v_extra_award END,
        'capped', v_room < v_base + v_extra, 'budget_exhausted', v_budget_short);
    v_result := ledger._credit_entry(
        v_account, p_idempotency_key, v_points, format('%s from %s', p_action_type, p_source),
        p_source, p_external_id, p_metadata || jsonb_build_object('earning', v_earning),
        v_rule.pending_seconds, v_rule.expiry_seconds);
    RETURN rules._action_result(ledger._remember(p_idempotency_key, 'action', v_request, v_result), v_earning);
END;
$$;

-- ===========================================================================
-- Public functions: the administration (scope admin in the API, `rewards
-- rules|campaigns` at the CLI), run on the coordinator. SECURITY DEFINER and,
-- like the tables, the superuser's (sql/README.md, "Citus"): under Citus a
-- write of a reference table or of the slices' shards reaches every node over
-- connections made as the current user, which inside these is their owner, so
-- it must log in on every node, as the superuser does and rewards_owner
-- cannot. The caller, rewards_api, holds no right on any table: it executes
-- these. Each names everything by its schema, builds no SQL from its
-- arguments, and its search_path ends with pg_temp, so a caller can slip
-- nothing of its own in. Who made a change is the p_actor the caller passes
-- (the API key's name, the OS user at the CLI), never the session's role.
-- Changes serialize on one advisory lock, so `before` is what was there.
-- ===========================================================================

-- The checks the administration makes before it writes, field by field
-- (22023 naming the field), before the tables' CHECKs would refuse the row as
-- a whole. SECURITY DEFINER to rewards_owner: they only read their arguments
-- and the ledger's settings, so they run with less than the superuser's
-- rights of the administration that calls them.
CREATE FUNCTION rules.check_change(p_actor text, p_enabled boolean)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF p_actor IS NULL OR length(p_actor) NOT BETWEEN 1 AND 200 THEN
        PERFORM ledger._invalid('actor', 'must be 1-200 characters');
    END IF;
    IF p_enabled IS NULL THEN
        PERFORM ledger._invalid('enabled', 'must be true or false');
    END IF;
END;
$$;

CREATE FUNCTION rules.check_rule(p_rule rules.rules)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF NOT ledger._is_name(p_rule.action_type) THEN
        PERFORM ledger._invalid('action_type', 'must be 1-64 characters of A-Z a-z 0-9 . _ : -');
    END IF;
    IF (p_rule.fixed_points IS NULL) = (p_rule.points_per_unit IS NULL) THEN
        PERFORM ledger._invalid('fixed_points', 'give fixed_points, or points_per_unit with unit_value, not both');
    END IF;
    IF (p_rule.points_per_unit IS NULL) <> (p_rule.unit_value IS NULL) THEN
        PERFORM ledger._invalid('unit_value', 'comes with points_per_unit');
    END IF;
    IF p_rule.fixed_points NOT BETWEEN 1 AND 100000000 THEN
        PERFORM ledger._invalid('fixed_points', 'must be an integer from 1 to 100000000');
    END IF;
    IF p_rule.points_per_unit NOT BETWEEN 1 AND 1000000 THEN
        PERFORM ledger._invalid('points_per_unit', 'must be an integer from 1 to 1000000');
    END IF;
    IF p_rule.unit_value NOT BETWEEN 1 AND 1000000000 THEN
        PERFORM ledger._invalid('unit_value', 'must be an integer from 1 to 1000000000');
    END IF;
    IF p_rule.daily_cap < 1 THEN
        PERFORM ledger._invalid('daily_cap', 'must be a positive integer, or absent for no cap');
    END IF;
    IF p_rule.lifetime_cap < 1 THEN
        PERFORM ledger._invalid('lifetime_cap', 'must be a positive integer, or absent for no cap');
    END IF;
    -- the terms ledger.credit would take, so that no action of the type is refused for them later
    PERFORM ledger._check_lot_terms(ledger._settings(), p_rule.pending_seconds, p_rule.expiry_seconds);
END;
$$;

CREATE FUNCTION rules.check_campaign(p_campaign rules.campaigns)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF p_campaign.name IS NULL OR length(p_campaign.name) NOT BETWEEN 1 AND 100 OR p_campaign.name ~ '[[:cntrl:]]' THEN
        PERFORM ledger._invalid('name', 'must be 1-100 characters without control characters');
    END IF;
    IF p_campaign.starts_at IS NULL OR p_campaign.ends_at IS NULL OR p_campaign.ends_at <= p_campaign.starts_at THEN
        PERFORM ledger._invalid('ends_at', 'the window needs starts_at and a later ends_at');
    END IF;
    IF (p_campaign.multiplier_percent IS NULL) = (p_campaign.bonus_points IS NULL) THEN
        PERFORM ledger._invalid('multiplier_percent', 'give multiplier_percent or bonus_points, not both');
    END IF;
    IF p_campaign.multiplier_percent NOT BETWEEN 101 AND 10000 THEN
        PERFORM ledger._invalid('multiplier_percent', 'must be an integer from 101 (x1.01) to 10000 (x100)');
    END IF;
    IF p_campaign.bonus_points NOT BETWEEN 1 AND 100000000 THEN
        PERFORM ledger._invalid('bonus_points', 'must be an integer from 1 to 100000000');
    END IF;
    IF p_campaign.budget < 1 THEN
        PERFORM ledger._invalid('budget', 'must be a positive integer, or absent for no budget');
    END IF;
    PERFORM rules._check_names('action_types', p_campaign.action_types);
    PERFORM rules._check_names('sources', p_campaign.sources);
END;
$$;

CREATE FUNCTION rules.put_rule(
    p_actor text,
    p_action_type text,
    p_fixed_points bigint,
    p_points_per_unit bigint,
    p_unit_value bigint,
    p_daily_cap bigint,
    p_lifetime_cap bigint,
    p_enabled boolean,
    p_pending_seconds integer DEFAULT NULL,
    p_expiry_seconds integer DEFAULT NULL
)
RETURNS rules.rules
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_now constant timestamptz := now();
    v_before rules.rules;
    v_rule rules.rules;
    v_operation text;
    v_old jsonb;
    v_new jsonb;
BEGIN
    PERFORM rules.check_change(p_actor, p_enabled);
    v_rule := ROW(p_action_type, p_fixed_points, p_points_per_unit, p_unit_value, p_daily_cap,
                  p_lifetime_cap, p_enabled, v_now, v_now, p_pending_seconds, p_expiry_seconds)::rules.rules;
    PERFORM rules.check_rule(v_rule);
    PERFORM pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtext('rules.changes'));
    SELECT * INTO v_before FROM rules.rules WHERE action_type = p_action_type;
    IF FOUND THEN
        v_rule.created_at := v_before.created_at;
        UPDATE rules.rules SET fixed_points = v_rule.fixed_points, points_per_unit = v_rule.points_per_unit,
            unit_value = v_rule.unit_value, daily_cap = v_rule.daily_cap, lifetime_cap = v_rule.lifetime_cap,
            enabled = v_rule.enabled, updated_at = v_now, pending_seconds = v_rule.pending_seconds,
            expiry_seconds = v_rule.expiry_seconds
        WHERE action_type = p_action_type;
    ELSE
        INSERT INTO rules.rules SELECT v_rule.*;
    END IF;
    v_operation := CASE WHEN v_before.action_type IS NULL THEN 'create' ELSE 'change' END;
    v_old := CASE WHEN v_before.action_type IS NOT NULL THEN to_jsonb(v_before) END;
    v_new := to_jsonb(v_rule);
    INSERT INTO rules.changes (actor, subject, subject_id, operation, before, after)
    VALUES (p_actor, 'rule', p_action_type, v_operation, v_old, v_new);
    RETURN v_rule;
END;
$$;

-- Disable (or enable again) a rule; a row of NULLs for an unknown one. Doing
-- what is already so changes nothing and records nothing.
CREATE FUNCTION rules.enable_rule(p_actor text, p_action_type text, p_enabled boolean)
RETURNS rules.rules
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_now constant timestamptz := now();
    v_before rules.rules;
    v_rule rules.rules;
    v_operation text;
    v_old jsonb;
    v_new jsonb;
BEGIN
    PERFORM rules.check_change(p_actor, p_enabled);
    PERFORM pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtext('rules.changes'));
    SELECT * INTO v_before FROM rules.rules WHERE action_type = p_action_type;
    IF NOT FOUND OR v_before.enabled = p_enabled THEN
        RETURN v_before;
    END IF;
    UPDATE rules.rules SET enabled = p_enabled, updated_at = v_now WHERE action_type = p_action_type;
    v_rule := v_before;
    v_rule.enabled := p_enabled;
    v_rule.updated_at := v_now;
    v_operation := CASE WHEN p_enabled THEN 'enable' ELSE 'disable' END;
    v_old := to_jsonb(v_before);
    v_new := to_jsonb(v_rule);
    INSERT INTO rules.changes (actor, subject, subject_id, operation, before, after)
    VALUES (p_actor, 'rule', p_action_type, v_operation, v_old, v_new);
    RETURN v_rule;
END;
$$;

CREATE FUNCTION rules.list_rules()
RETURNS SETOF rules.rules
LANGUAGE sql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT * FROM rules.rules ORDER BY action_type;
$$;

-- Create a campaign (p_campaign_id NULL) or change one (a row of NULLs for an
-- unknown id). A budget cannot go below what the campaign has paid out.
CREATE FUNCTION rules.put_campaign(
    p_actor text,
    p_campaign_id bigint,
    p_name text,
    p_starts_at timestamptz,
    p_ends_at timestamptz,
    p_multiplier_percent integer,
    p_bonus_points bigint,
    p_action_types text[],
    p_sources text[],
    p_budget bigint,
    p_enabled boolean
)
RETURNS rules.campaigns
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_now constant timestamptz := now();
    v_before rules.campaigns;
    v_campaign rules.campaigns;
    v_operation text;
    v_old jsonb;
    v_new jsonb;
    v_id text;
    v_budget rules.campaign_budgets;
    v_gathered bigint;
    v_awarded bigint;
BEGIN
    PERFORM rules.check_change(p_actor, p_enabled);
    v_campaign := ROW(p_campaign_id, p_name, p_starts_at, p_ends_at, p_multiplier_percent, p_bonus_points,
                      p_action_types, p_sources, p_budget, p_enabled, v_now, v_now)::rules.campaigns;
    PERFORM rules.check_campaign(v_campaign);
    PERFORM pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtext('rules.changes'));
    IF p_campaign_id IS NULL THEN
        IF EXISTS (SELECT FROM rules.campaigns WHERE name = p_name) THEN
            RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value', COLUMN = 'name',
                MESSAGE = format('invalid name: a campaign named %s exists', p_name);
        END IF;
        v_campaign.campaign_id := nextval('rules.campaigns_campaign_id_seq');
        INSERT INTO rules.campaigns SELECT v_campaign.*;
    ELSE
        SELECT * INTO v_before FROM rules.campaigns WHERE campaign_id = p_campaign_id;
        IF NOT FOUND THEN
            RETURN v_before;
        END IF;
        IF EXISTS (SELECT FROM rules.campaigns WHERE name = p_name AND campaign_id <> p_campaign_id) THEN
            RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value', COLUMN = 'name',
                MESSAGE = format('invalid name: a campaign named %s exists', p_name);
        END IF;
        v_campaign.created_at := v_before.created_at;
        UPDATE rules.campaigns SET name = v_campaign.name, starts_at = v_campaign.starts_at,
            ends_at = v_campaign.ends_at, multiplier_percent = v_campaign.multiplier_percent,
            bonus_points = v_campaign.bonus_points, action_types = v_campaign.action_types,
            sources = v_campaign.sources, budget = v_campaign.budget, enabled = v_campaign.enabled,
            updated_at = v_now
        WHERE campaign_id = p_campaign_id;
    END IF;
    -- The budget: its slices are gathered back, what was awarded stays
    -- awarded (a budget below it, or none once it paid, is refused), the rest
    -- is unallocated again and the budget no longer exhausted. One connection
    -- per node: the budget's reference row and many shards in one transaction.
    PERFORM pg_catalog.set_config('citus.multi_shard_modify_mode', 'sequential', true);
    UPDATE rules.campaign_budgets SET unallocated = unallocated WHERE campaign_id = v_campaign.campaign_id
    RETURNING * INTO v_budget;
    IF NOT FOUND THEN
        IF p_budget IS NOT NULL THEN
            INSERT INTO rules.campaign_budgets (campaign_id, budget, unallocated)
            VALUES (v_campaign.campaign_id, p_budget, p_budget);
        END IF;
    ELSE
        -- reclaimed = remaining keeps the value before the update, which
        -- RETURNING alone cannot give.
        WITH gathered AS (
            UPDATE rules.budget_slices SET reclaimed = remaining, remaining = 0
            WHERE campaign_id = v_campaign.campaign_id AND remaining > 0
            RETURNING reclaimed
        )
        SELECT coalesce(sum(reclaimed), 0) INTO v_gathered FROM gathered;
        v_awarded := v_budget.budget - v_budget.unallocated - v_gathered;
        IF v_awarded > 0 AND (p_budget IS NULL OR p_budget < v_awarded) THEN
            RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value', COLUMN = 'budget',
                MESSAGE = format('invalid budget: the campaign has paid %s points already', v_awarded);
        ELSIF p_budget IS NULL THEN
            DELETE FROM rules.budget_slices WHERE campaign_id = v_campaign.campaign_id;
            DELETE FROM rules.campaign_budgets WHERE campaign_id = v_campaign.campaign_id;
        ELSE
            UPDATE rules.campaign_budgets SET budget = p_budget, unallocated = p_budget - v_awarded, exhausted = false
            WHERE campaign_id = v_campaign.campaign_id;
        END IF;
    END IF;
    v_operation := CASE WHEN p_campaign_id IS NULL THEN 'create' ELSE 'change' END;
    v_old := CASE WHEN p_campaign_id IS NOT NULL THEN to_jsonb(v_before) END;
    v_new := to_jsonb(v_campaign);
    v_id := v_campaign.campaign_id::text;
    INSERT INTO rules.changes (actor, subject, subject_id, operation, before, after)
    VALUES (p_actor, 'campaign', v_id, v_operation, v_old, v_new);
    RETURN v_campaign;
END;
$$;

-- Disable (or enable again) a campaign; a row of NULLs for an unknown one.
CREATE FUNCTION rules.enable_campaign(p_actor text, p_campaign_id bigint, p_enabled boolean)
RETURNS rules.campaigns
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_now constant timestamptz := now();
    v_before rules.campaigns;
    v_campaign rules.campaigns;
    v_operation text;
    v_old jsonb;
    v_new jsonb;
    v_id text;
BEGIN
    PERFORM rules.check_change(p_actor, p_enabled);
    PERFORM pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtext('rules.changes'));
    SELECT * INTO v_before FROM rules.campaigns WHERE campaign_id = p_campaign_id;
    IF NOT FOUND OR v_before.enabled = p_enabled THEN
        RETURN v_before;
    END IF;
    UPDATE rules.campaigns SET enabled = p_enabled, updated_at = v_now WHERE campaign_id = p_campaign_id;
    v_campaign := v_before;
    v_campaign.enabled := p_enabled;
    v_campaign.updated_at := v_now;
    v_operation := CASE WHEN p_enabled THEN 'enable' ELSE 'disable' END;
    v_old := to_jsonb(v_before);
    v_new := to_jsonb(v_campaign);
    v_id := p_campaign_id::text;
    INSERT INTO rules.changes (actor, subject, subject_id, operation, before, after)
    VALUES (p_actor, 'campaign', v_id, v_operation, v_old, v_new);
    RETURN v_campaign;
END;
$$;

-- Every campaign with what its budget has paid (spent NULL: no budget).
CREATE FUNCTION rules.list_campaigns()
RETURNS TABLE (campaign_id bigint, name text, starts_at timestamptz, ends_at timestamptz,
               multiplier_percent integer, bonus_points bigint, action_types text[], sources text[],
               budget bigint, spent bigint, enabled boolean, created_at timestamptz, updated_at timestamptz)
LANGUAGE sql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT c.campaign_id, c.name, c.starts_at, c.ends_at, c.multiplier_percent, c.bonus_points,
           c.action_types, c.sources, c.budget, b.budget - b.unallocated - coalesce(h.held, 0), c.enabled,
           c.created_at, c.updated_at
    FROM rules.campaigns c
    LEFT JOIN rules.campaign_budgets b ON b.campaign_id = c.campaign_id
    -- what the slices hold, summed apart (under Citus over every shard, then joined)
    LEFT JOIN (SELECT s.campaign_id, sum(s.remaining) AS held FROM rules.budget_slices s GROUP BY s.campaign_id) h
        ON h.campaign_id = c.campaign_id
    ORDER BY c.campaign_id;
$$;

-- A refill: the user's slice of the campaign gets at least p_points more,
-- from the unallocated part of the budget; when that is too little, every
-- slice is gathered back first; when even all of it is too little, the slice
-- gets all there is and the budget is exhausted (claims then
-- take what they find, down to the last point). A slice gets more than it
-- asked, a share of what is unallocated (1/slices), so refills stay
-- rare: one transaction on the coordinator, over the budget's reference row
-- and the slice's shard (every shard when it gathers). Does nothing when
-- another refill came first.
CREATE FUNCTION rules.refill_budget_slice(p_campaign_id bigint, p_user_id text, p_points bigint)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_slices constant bigint := (SELECT count(*) FROM rules.budget_anchors);
    v_anchor constant text := rules._budget_anchor(p_user_id);
    v_unallocated bigint;
    v_slice rules.budget_slices;
    v_gathered bigint;
    v_need bigint;
    v_give bigint;
    v_exhausted boolean := false;
BEGIN
    IF p_points IS NULL OR p_points < 1 OR v_anchor IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value', COLUMN = 'points',
            MESSAGE = 'invalid points: a refill needs a user id and a positive number of points';
    END IF;
    -- Refilled meanwhile by the refill of a concurrent claim: nothing to lock.
    SELECT * INTO v_slice FROM rules.budget_slices WHERE anchor = v_anchor AND campaign_id = p_campaign_id;
    IF v_slice.remaining >= p_points THEN
        RETURN;
    END IF;
    PERFORM pg_catalog.set_config('citus.multi_shard_modify_mode', 'sequential', true);
    -- The budget row first: refills and changes of one campaign go one at a time.
    UPDATE rules.campaign_budgets SET unallocated = unallocated WHERE campaign_id = p_campaign_id AND NOT exhausted
    RETURNING unallocated INTO v_unallocated;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    SELECT * INTO v_slice FROM rules.budget_slices
    WHERE anchor = v_anchor AND campaign_id = p_campaign_id FOR UPDATE;
    IF v_slice.remaining >= p_points THEN
        RETURN;
    END IF;
    v_need := p_points - coalesce(v_slice.remaining, 0);
    IF v_unallocated < v_need THEN
        -- Every slice back (as a budget's change does, rules.put_campaign).
        WITH gathered AS (
            UPDATE rules.budget_slices SET reclaimed = remaining, remaining = 0
            WHERE campaign_id = p_campaign_id AND remaining > 0
            RETURNING reclaimed
        )
        SELECT coalesce(sum(reclaimed), 0) INTO v_gathered FROM gathered;
        v_unallocated := v_unallocated + v_gathered;
        v_need := p_points;  -- this slice was gathered too
    END IF;
    IF v_unallocated <= v_need THEN
        v_give := v_unallocated;
        v_exhausted := true;
    ELSE
        v_give := least(v_unallocated, greatest(v_need, ceil(v_unallocated::numeric / v_slices)::bigint));
    END IF;
    INSERT INTO rules.budget_slices AS s (anchor, campaign_id, remaining) VALUES (v_anchor, p_campaign_id, v_give)
    ON CONFLICT (anchor, campaign_id) DO UPDATE SET remaining = s.remaining + EXCLUDED.remaining;
    UPDATE rules.campaign_budgets SET unallocated = v_unallocated - v_give, exhausted = v_exhausted
    WHERE campaign_id = p_campaign_id;
END;
$$;

-- What a budgeted campaign has awarded and what is left (unallocated plus
-- what its slices hold), and whether it has ended (its window closed, or
-- disabled): the report of a finished campaign. No row for a campaign without
-- a budget.
CREATE FUNCTION rules.budget_report(p_campaign_id bigint)
RETURNS TABLE (campaign_id bigint, name text, ends_at timestamptz, ended boolean, budget bigint,
               awarded bigint, left_points bigint, in_slices bigint, unallocated bigint)
LANGUAGE plpgsql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_held bigint;
BEGIN
    -- Apart from the join: under Citus a sum over the slices' shards.
    SELECT coalesce(sum(s.remaining), 0) INTO v_held FROM rules.budget_slices s WHERE s.campaign_id = p_campaign_id;
    RETURN QUERY
        SELECT c.campaign_id, c.name, c.ends_at, c.ends_at <= now() OR NOT c.enabled, b.budget,
               b.budget - b.unallocated - v_held, b.unallocated + v_held, v_held, b.unallocated
        FROM rules.campaigns c JOIN rules.campaign_budgets b ON b.campaign_id = c.campaign_id
        WHERE c.campaign_id = p_campaign_id;
END;
$$;


-- The change history, newest first, older than p_before_id when given.
CREATE FUNCTION rules.list_changes(p_before_id bigint, p_limit integer)
RETURNS SETOF rules.change_history
LANGUAGE plpgsql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF p_limit IS NULL OR p_limit NOT BETWEEN 1 AND 500 THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value', COLUMN = 'limit',
            MESSAGE = 'invalid limit: must be an integer from 1 to 500';
    END IF;
    RETURN QUERY SELECT * FROM rules.change_history h
        WHERE p_before_id IS NULL OR h.change_id < p_before_id
        ORDER BY h.change_id DESC LIMIT p_limit;
END;
$$;

-- ===========================================================================
-- Ownership: as in the ledger schema (the tables stay with the superuser),
-- but for the administration, which stays the superuser's too (above).
-- ===========================================================================

DO $owner$
DECLARE
    v_object record;
BEGIN
    FOR v_object IN
        SELECT format('ALTER VIEW %s OWNER TO rewards_owner', c.oid::regclass) AS command
        FROM pg_catalog.pg_class c
        WHERE c.relnamespace = 'rules'::regnamespace AND c.relkind = 'v'
        UNION ALL
        SELECT format('ALTER ROUTINE %s OWNER TO rewards_owner', p.oid::regprocedure)
        FROM pg_catalog.pg_proc p
        WHERE p.pronamespace = 'rules'::regnamespace
          AND p.proname NOT IN ('put_rule', 'enable_rule', 'list_rules', 'put_campaign', 'enable_campaign',
                                'list_campaigns', 'refill_budget_slice', 'budget_report', 'list_changes')
        UNION ALL
        SELECT format('ALTER TYPE %s OWNER TO rewards_owner', t.oid::regtype)
        FROM pg_catalog.pg_type t
        JOIN pg_catalog.pg_class c ON c.oid = t.typrelid
        WHERE t.typnamespace = 'rules'::regnamespace AND c.relkind = 'c'
    LOOP
        EXECUTE v_object.command;
    END LOOP;
END
$owner$;

-- ===========================================================================
-- Seed rows
-- ===========================================================================

-- The budget slices' anchors (under Citus, ledger.accounts is distributed
-- by now: its shards' ranges).
SELECT rules._place_budget_anchors();

-- ===========================================================================
-- Grants
-- ===========================================================================

REVOKE ALL ON ALL TABLES IN SCHEMA rules FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA rules FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA rules FROM PUBLIC;
-- Nobody rewrites the history, the owner included (privileges do not bind
-- the superuser; the functions never do it).
REVOKE UPDATE, DELETE, TRUNCATE ON rules.changes FROM CURRENT_USER;
-- What rules.act and claim_action (SECURITY DEFINER) do.
GRANT SELECT ON rules.rules, rules.campaigns, rules.changes TO rewards_owner;  -- and the history's view
GRANT SELECT, UPDATE ON rules.budget_slices TO rewards_owner;  -- the claim, on the user's shard
GRANT SELECT ON rules.budget_anchors, rules.campaign_budgets TO rewards_owner;
GRANT SELECT, INSERT, UPDATE ON rules.earnings TO rewards_owner;
GRANT SELECT, INSERT ON rules.action_claims TO rewards_owner;
GRANT USAGE ON SCHEMA rules TO rewards_owner;
-- The API: the earning and the administration, as functions alone; no table
-- of the schema is in its reach.
GRANT USAGE ON SCHEMA rules TO rewards_api;
GRANT EXECUTE ON FUNCTION
    rules.claim_action(text, text),
    rules.act(text, text, text, text, text, bigint, timestamptz, jsonb, boolean),
    rules.put_rule(text, text, bigint, bigint, bigint, bigint, bigint, boolean, integer, integer),
    rules.enable_rule(text, text, boolean),
    rules.list_rules(),
    rules.put_campaign(text, bigint, text, timestamptz, timestamptz, integer, bigint, text[], text[], bigint, boolean),
    rules.enable_campaign(text, bigint, boolean),
    rules.list_campaigns(),
    rules.list_changes(bigint, integer),
    rules.refill_budget_slice(bigint, text, bigint),
    rules.budget_report(bigint)
TO rewards_api;
-- Auditors read the history: the view, and under Citus its table too, whose
-- shard the view's query reads as the auditor (a view's owner's rights do not
-- reach a shard on another node, or on this one under Citus). The view shows
-- every column of the table.
GRANT USAGE ON SCHEMA rules TO rewards_auditor;
GRANT SELECT ON rules.change_history, rules.changes TO rewards_auditor;

-- ===========================================================================
-- Comments
-- ===========================================================================

COMMENT ON FUNCTION rules.claim_action(text, text) IS
'Bind the verified action (action_key: source, a space, external id) to p_user_id the first time; answers the user it belongs to. Under Citus call it before rules.act (p_claimed true), and that only for the user it answers.';
COMMENT ON FUNCTION rules.act(text, text, text, text, text, bigint, timestamptz, jsonb, boolean) IS
'Earn the points the rules give a verified action. Args: user_id, idempotency_key, source, external_id, action type, value (minor currency units, for per-unit rules), occurred_at (NULL: now), metadata, claimed (under Citus: rules.claim_action bound it to this user; RLB03 otherwise). Status: ok | idempotency_key_reused | action_already_credited | action_claimed_by_another_user (single node) | not_eligible | cap_reached; rule, campaign, capped and budget_exhausted say why. Invalid arguments raise 22023 naming the argument.';
COMMENT ON FUNCTION rules.put_rule(text, text, bigint, bigint, bigint, bigint, bigint, boolean, integer, integer) IS
'Create or change the rule of an action type (fixed_points, or points_per_unit per unit_value, rounded down; daily and lifetime caps; pending_seconds and expiry_seconds for the lot each credit makes); recorded in rules.changes.';
COMMENT ON FUNCTION rules.put_campaign(text, bigint, text, timestamptz, timestamptz, integer, bigint, text[], text[], bigint, boolean) IS
'Create (campaign_id NULL) or change a campaign: window, multiplier_percent or bonus_points, action types and sources (NULL: any), budget; recorded in rules.changes.';
COMMENT ON FUNCTION rules.refill_budget_slice(bigint, text, bigint) IS
'Give the user''s slice of a campaign''s budget at least p_points more (from the unallocated part, gathering the slices back when it is short); the API calls it when rules.act answers RLB01, then calls rules.act again.';
COMMENT ON FUNCTION rules.budget_report(bigint) IS
'A budgeted campaign''s budget, what it awarded, what is left (unallocated and in slices) and whether it has ended.';
COMMENT ON VIEW rules.change_history IS
'Every change of a rule or campaign: who, when, the row before and after. Readable by rewards_auditor.';

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
    -- Read by every call, changed by people: a copy on every node.
    PERFORM create_reference_table('rules.rules');
    PERFORM create_reference_table('rules.campaigns');
    PERFORM create_reference_table('rules.changes');
    -- The per-user counters beside the user's account; the claims on the
    -- action's own shard, hashed like the accounts.
    PERFORM create_distributed_table('rules.earnings', 'user_id', colocate_with => 'ledger.accounts');
    PERFORM create_distributed_table('rules.action_claims', 'action_key', colocate_with => 'ledger.accounts');
    -- A budget's row and the anchors on every node; its slices each on the
    -- shard of the users it serves (rules.budget_anchors).
    PERFORM create_reference_table('rules.campaign_budgets');
    PERFORM create_reference_table('rules.budget_anchors');
    PERFORM create_distributed_table('rules.budget_slices', 'anchor', colocate_with => 'ledger.accounts');
    FOR v_function IN
        SELECT p.oid::regprocedure FROM pg_catalog.pg_proc p
        WHERE p.pronamespace = 'rules'::regnamespace AND p.prokind = 'f'
          AND p.proname LIKE '\_%'
    LOOP
        PERFORM create_distributed_function(v_function);
    END LOOP;
    PERFORM create_distributed_function('rules.act(text, text, text, text, text, bigint, timestamptz, jsonb, boolean)',
                                        'p_user_id', colocate_with => 'ledger.accounts', force_delegation => true);
    PERFORM create_distributed_function('rules.claim_action(text, text)', 'p_action_key',
                                        colocate_with => 'ledger.accounts', force_delegation => true);
END
$citus$;
