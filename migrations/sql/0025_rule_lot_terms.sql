-- A rule may make the credits of its action type lots (sql/rules.sql,
-- rules.rules): pending_seconds and expiry_seconds, set through put_rule
-- (checked against ledger.settings.max_lot_term by check_rule), recorded in
-- the change history with the rest of the row, and handed by rules.act to the
-- ledger's credit.

DROP FUNCTION rules.put_rule(text, text, bigint, bigint, bigint, bigint, bigint, boolean);

CREATE OR REPLACE FUNCTION rules.check_rule(p_rule rules.rules)
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

-- A verified action: the points come from the rules, never from the caller.
-- The rule of p_action_type gives the base points (fixed, or floor(value *
-- points_per_unit / unit_value)); the best eligible campaign whose window holds
-- p_occurred_at adds to them; the user's daily and lifetime caps for the type
-- cut the total down; a budgeted campaign pays only what its budget has left.
-- The credit is ledger._credit_entry's, on the account locked first, with
-- the rule's lot terms (pending, expiry; none: plain points); the earning (rule, campaign, caps, budget) is kept in the entry's metadata under
-- "earning". Refusals (not_eligible, cap_reached, action_already_credited)
-- write only their idempotency record.
CREATE OR REPLACE FUNCTION rules.act(
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

ALTER FUNCTION rules.put_rule(text, text, bigint, bigint, bigint, bigint, bigint, boolean, integer, integer)
    OWNER TO rewards_owner;
REVOKE ALL ON FUNCTION rules.put_rule(text, text, bigint, bigint, bigint, bigint, bigint, boolean, integer, integer)
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION rules.put_rule(text, text, bigint, bigint, bigint, bigint, bigint, boolean, integer, integer)
    TO rewards_api;
COMMENT ON FUNCTION rules.put_rule(text, text, bigint, bigint, bigint, bigint, bigint, boolean, integer, integer) IS
'Create or change the rule of an action type (fixed_points, or points_per_unit per unit_value, rounded down; daily and lifetime caps; pending_seconds and expiry_seconds for the lot each credit makes); recorded in rules.changes.';

-- The table last, inside a DO block, one subcommand a statement (see revision
-- 0015: Citus refuses ADD CONSTRAINT beside other subcommands on a reference
-- table, and sends its DDL to the workers as the text of its statement). The
-- functions above are PL/pgSQL: they read the new columns only when they run.
DO $tables$
BEGIN
    ALTER TABLE rules.rules ADD COLUMN pending_seconds integer;
    ALTER TABLE rules.rules ADD COLUMN expiry_seconds integer;
    ALTER TABLE rules.rules ADD CONSTRAINT rules_lot_terms CHECK (
        coalesce(pending_seconds, 1) >= 1 AND coalesce(expiry_seconds, 1) > coalesce(pending_seconds, 0));
END
$tables$;
