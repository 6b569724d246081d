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
-- status: ok | idempotency_key_reused | action_already_credited | not_eligible | cap_reached
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
-- earns from the type per UTC day and in all.
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
    CONSTRAINT rules_caps_positive CHECK (coalesce(daily_cap, 1) >= 1 AND coalesce(lifetime_cap, 1) >= 1)
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

-- What a budgeted campaign has paid out. A row of its own, written by each
-- claim, apart from the campaign that is read on every call. The simple exact
-- claim (rules._claim_budget) draws from this one row.
CREATE TABLE rules.campaign_budgets (
    campaign_id  bigint NOT NULL,
    budget       bigint NOT NULL,
    spent        bigint NOT NULL DEFAULT 0,
    CONSTRAINT campaign_budgets_pkey PRIMARY KEY (campaign_id),
    CONSTRAINT campaign_budgets_never_overspent CHECK (budget >= 1 AND spent BETWEEN 0 AND budget)
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
-- external_id (neither may hold a space), and under Citus distributed by that
-- key (colocated with the accounts' hashing), so the claim is a one-shard
-- transaction of its own, on the action's shard (docs/ARCHITECTURE.md).
CREATE TABLE rules.action_claims (
    action_key  text NOT NULL,
    user_id     text NOT NULL,
    claimed_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT action_claims_pkey PRIMARY KEY (action_key),
    CONSTRAINT action_claims_key_format CHECK (
        action_key ~ '^[A-Za-z0-9._:-]{1,64} [!-~]{1,255}$'),
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

-- The exact budget claim: up to p_points from the campaign's one budget row,
-- never more than is left; answers the points granted (0 when spent). The row
-- lock queues concurrent claims, which is what keeps it exact; issue 11 part 4
-- replaces this function with sliced counters. Call with the account locked
-- (lock order: account, then budget).
CREATE FUNCTION rules._claim_budget(p_campaign_id bigint, p_points bigint)
RETURNS bigint
LANGUAGE plpgsql
AS $$
DECLARE
    v_left bigint;
    v_granted bigint;
BEGIN
    SELECT budget - spent INTO v_left FROM rules.campaign_budgets
    WHERE campaign_id = p_campaign_id FOR UPDATE;
    v_granted := least(coalesce(v_left, 0), p_points);
    IF v_granted > 0 THEN
        UPDATE rules.campaign_budgets SET spent = spent + v_granted WHERE campaign_id = p_campaign_id;
    END IF;
    RETURN greatest(v_granted, 0);
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
-- answer whom it belongs to (the caller goes on to rules.act only when that is
-- its user). Idempotent; a one-shard transaction on the action's shard.
CREATE FUNCTION rules.claim_action(p_action_key text, p_user_id text)
RETURNS text
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_owner text;
BEGIN
    IF p_action_key IS NULL OR p_action_key !~ '^[A-Za-z0-9._:-]{1,64} [!-~]{1,255}$' THEN
        PERFORM ledger._invalid('action_key', 'must be the source, a space and the external id');
    END IF;
    IF NOT ledger._is_name(p_user_id) THEN
        PERFORM ledger._invalid('user_id', 'must be 1-64 characters of A-Z a-z 0-9 . _ : -');
    END IF;
    INSERT INTO rules.action_claims (action_key, user_id) VALUES (p_action_key, p_user_id)
    ON CONFLICT (action_key) DO NOTHING;
    SELECT user_id INTO STRICT v_owner FROM rules.action_claims WHERE action_key = p_action_key;
    RETURN v_owner;
END;
$$;

-- A verified action: the points come from the rules, never from the caller.
-- The rule of p_action_type gives the base points (fixed, or floor(value *
-- points_per_unit / unit_value)); the best eligible campaign whose window holds
-- p_occurred_at adds to them; the user's daily and lifetime caps for the type
-- cut the total down; a budgeted campaign pays only what its budget has left.
-- The credit is ledger._credit_entry's, on the account locked first; the
-- earning (rule, campaign, caps, budget) is kept in the entry's metadata under
-- "earning". Refusals (not_eligible, cap_reached, action_already_credited)
-- write only their idempotency record.
CREATE FUNCTION rules.act(
    p_user_id text,
    p_idempotency_key text,
    p_source text,
    p_external_id text,
    p_action_type text,
    p_value bigint,
    p_occurred_at timestamptz,
    p_metadata jsonb
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
    v_request bytea;
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

    v_account := ledger._lock_account(p_user_id);
    v_request := ledger._fingerprint(jsonb_build_array(
        p_source, p_external_id, p_action_type, p_value, p_occurred_at, p_metadata));
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
            v_extra_award := rules._claim_budget(v_campaign.campaign_id, v_room - v_base_award);
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
        p_source, p_external_id, p_metadata || jsonb_build_object('earning', v_earning), NULL, NULL);
    RETURN rules._action_result(ledger._remember(p_idempotency_key, 'action', v_request, v_result), v_earning);
END;
$$;

-- ===========================================================================
-- Public functions: the administration (scope admin in the API, `rewards
-- rules|campaigns` at the CLI). SECURITY INVOKER and run on the coordinator:
-- under Citus a write of a reference table reaches every node over
-- connections made as the current user, which must be able to log in there
-- (rewards_owner cannot; rewards_api and the superuser can). So rewards_api
-- holds the table rights these need, on the rules tables alone (sql/README.md).
-- Changes serialize on one advisory lock, so `before` is what was there.
-- ===========================================================================

-- The checks the administration makes before it writes, field by field
-- (22023 naming the field), before the tables' CHECKs would refuse the row as
-- a whole. SECURITY DEFINER: they only read their arguments, and the
-- administration that calls them runs as its caller (below), who may not call
-- the ledger's private helpers.
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
    -- The one exact budget row is not on the user's shard: under Citus a
    -- budget needs the sliced counters of issue 11 part 4.
    IF p_campaign.budget IS NOT NULL
       AND EXISTS (SELECT FROM pg_catalog.pg_extension WHERE extname = 'citus') THEN
        PERFORM ledger._invalid('budget', 'campaign budgets are not available under Citus yet');
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
    p_enabled boolean
)
RETURNS rules.rules
LANGUAGE plpgsql
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
                  p_lifetime_cap, p_enabled, v_now, v_now)::rules.rules;
    PERFORM rules.check_rule(v_rule);
    PERFORM pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtext('rules.changes'));
    SELECT * INTO v_before FROM rules.rules WHERE action_type = p_action_type;
    IF FOUND THEN
        v_rule.created_at := v_before.created_at;
        UPDATE rules.rules SET fixed_points = v_rule.fixed_points, points_per_unit = v_rule.points_per_unit,
            unit_value = v_rule.unit_value, daily_cap = v_rule.daily_cap, lifetime_cap = v_rule.lifetime_cap,
            enabled = v_rule.enabled, updated_at = v_now
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
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_now constant timestamptz := now();
    v_before rules.campaigns;
    v_campaign rules.campaigns;
    v_spent bigint;
    v_operation text;
    v_old jsonb;
    v_new jsonb;
    v_id text;
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
        SELECT spent INTO v_spent FROM rules.campaign_budgets WHERE campaign_id = p_campaign_id;
        IF v_spent > 0 AND (p_budget IS NULL OR p_budget < v_spent) THEN
            RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value', COLUMN = 'budget',
                MESSAGE = format('invalid budget: the campaign has paid %s points already', v_spent);
        END IF;
        v_campaign.created_at := v_before.created_at;
        UPDATE rules.campaigns SET name = v_campaign.name, starts_at = v_campaign.starts_at,
            ends_at = v_campaign.ends_at, multiplier_percent = v_campaign.multiplier_percent,
            bonus_points = v_campaign.bonus_points, action_types = v_campaign.action_types,
            sources = v_campaign.sources, budget = v_campaign.budget, enabled = v_campaign.enabled,
            updated_at = v_now
        WHERE campaign_id = p_campaign_id;
    END IF;
    IF p_budget IS NULL THEN
        DELETE FROM rules.campaign_budgets WHERE campaign_id = v_campaign.campaign_id;
    ELSE
        INSERT INTO rules.campaign_budgets AS b (campaign_id, budget) VALUES (v_campaign.campaign_id, p_budget)
        ON CONFLICT (campaign_id) DO UPDATE SET budget = EXCLUDED.budget;
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
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT c.campaign_id, c.name, c.starts_at, c.ends_at, c.multiplier_percent, c.bonus_points,
           c.action_types, c.sources, c.budget, b.spent, c.enabled, c.created_at, c.updated_at
    FROM rules.campaigns c LEFT JOIN rules.campaign_budgets b ON b.campaign_id = c.campaign_id
    ORDER BY c.campaign_id;
$$;

-- The change history, newest first, older than p_before_id when given.
CREATE FUNCTION rules.list_changes(p_before_id bigint, p_limit integer)
RETURNS SETOF rules.change_history
LANGUAGE plpgsql
STABLE
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
-- Ownership: as in the ledger schema (the tables stay with the superuser).
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
GRANT SELECT, UPDATE ON rules.campaign_budgets TO rewards_owner;
GRANT SELECT, INSERT, UPDATE ON rules.earnings TO rewards_owner;
GRANT SELECT, INSERT ON rules.action_claims TO rewards_owner;
GRANT USAGE ON SCHEMA rules TO rewards_owner;
-- The API: the earning, and the administration, which runs as the API's role
-- itself (above): it writes the rules tables and the history, and nothing
-- else; the ledger's tables stay out of its reach.
GRANT USAGE ON SCHEMA rules TO rewards_api;
GRANT EXECUTE ON FUNCTION
    rules.claim_action(text, text),
    rules.act(text, text, text, text, text, bigint, timestamptz, jsonb),
    rules.put_rule(text, text, bigint, bigint, bigint, bigint, bigint, boolean),
    rules.enable_rule(text, text, boolean),
    rules.list_rules(),
    rules.put_campaign(text, bigint, text, timestamptz, timestamptz, integer, bigint, text[], text[], bigint, boolean),
    rules.enable_campaign(text, bigint, boolean),
    rules.list_campaigns(),
    rules.list_changes(bigint, integer),
    rules.check_change(text, boolean),
    rules.check_rule(rules.rules),
    rules.check_campaign(rules.campaigns)
TO rewards_api;
GRANT SELECT, INSERT, UPDATE ON rules.rules, rules.campaigns TO rewards_api;
GRANT SELECT, INSERT, UPDATE, DELETE ON rules.campaign_budgets TO rewards_api;
GRANT SELECT, INSERT ON rules.changes TO rewards_api;
GRANT SELECT ON rules.change_history TO rewards_api;
GRANT USAGE ON SEQUENCE rules.campaigns_campaign_id_seq, rules.changes_change_id_seq TO rewards_api;
-- Auditors read the history.
GRANT USAGE ON SCHEMA rules TO rewards_auditor;
GRANT SELECT ON rules.change_history TO rewards_auditor;

-- ===========================================================================
-- Comments
-- ===========================================================================

COMMENT ON FUNCTION rules.claim_action(text, text) IS
'Bind the verified action (action_key: source, a space, external id) to p_user_id the first time; answers the user it belongs to. Call before rules.act, which runs only for that user.';
COMMENT ON FUNCTION rules.act(text, text, text, text, text, bigint, timestamptz, jsonb) IS
'Earn the points the rules give a verified action. Args: user_id, idempotency_key, source, external_id, action type, value (minor currency units, for per-unit rules), occurred_at (NULL: now), metadata. Status: ok | idempotency_key_reused | action_already_credited | not_eligible | cap_reached; rule, campaign, capped and budget_exhausted say why. Invalid arguments raise 22023 naming the argument.';
COMMENT ON FUNCTION rules.put_rule(text, text, bigint, bigint, bigint, bigint, bigint, boolean) IS
'Create or change the rule of an action type (fixed_points, or points_per_unit per unit_value, rounded down; daily and lifetime caps); recorded in rules.changes.';
COMMENT ON FUNCTION rules.put_campaign(text, bigint, text, timestamptz, timestamptz, integer, bigint, text[], text[], bigint, boolean) IS
'Create (campaign_id NULL) or change a campaign: window, multiplier_percent or bonus_points, action types and sources (NULL: any), budget; recorded in rules.changes.';
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
    -- rules.campaign_budgets stays a table of the coordinator: no budget is
    -- accepted under Citus until the sliced counters (rules.check_campaign).
    FOR v_function IN
        SELECT p.oid::regprocedure FROM pg_catalog.pg_proc p
        WHERE p.pronamespace = 'rules'::regnamespace AND p.prokind = 'f'
          AND p.proname LIKE '\_%'
    LOOP
        PERFORM create_distributed_function(v_function);
    END LOOP;
    PERFORM create_distributed_function('rules.act(text, text, text, text, text, bigint, timestamptz, jsonb)',
                                        'p_user_id', colocate_with => 'ledger.accounts', force_delegation => true);
    PERFORM create_distributed_function('rules.claim_action(text, text)', 'p_action_key',
                                        colocate_with => 'ledger.accounts', force_delegation => true);
END
$citus$;
