-- A verified action in one transaction where its claim can be written with
-- the credit (revision 0035; docs/ARCHITECTURE.md, "A verified action: once
-- ever, across shards"). On a single node rules.act takes the claim itself
-- (rules._claim, which rules.claim_action now shares), before the account, so
-- the claim commits with the entry: one transaction, one commit, where the
-- API made two. Under Citus the claim stays its own transaction on the
-- action's shard, and rules.act's new last argument, p_claimed, says the
-- caller made it (RLB03 otherwise). It defaults to true, so the code before
-- this revision, which claims first and passes eight arguments, calls the
-- new function unchanged during a deploy. The claim's key is checked without
-- a bounded repetition in its pattern, which cost about ten times as much
-- (twice per claim under Citus: the function's check and the table's); the
-- table's new check is validated over the claims there are, within the
-- migration.

-- Citus creates each function on every node over one connection per node,
-- which a parallel change of a distributed table earlier in the transaction
-- would refuse: the table change below goes one connection per node as well.
DO $sequential$
BEGIN
    IF EXISTS (SELECT FROM pg_catalog.pg_extension WHERE extname = 'citus') THEN
        PERFORM pg_catalog.set_config('citus.multi_shard_modify_mode', 'sequential', true);
    END IF;
END
$sequential$;

-- Inside a DO block: Citus sends a shard the text of the statement that
-- changes its table, and a file's statements arrive as one text.
DO $tables$
BEGIN
    ALTER TABLE rules.action_claims DROP CONSTRAINT action_claims_key_format;
    ALTER TABLE rules.action_claims ADD CONSTRAINT action_claims_key_format CHECK (
        action_key ~ '^[A-Za-z0-9._:-]+ [!-~]+$'
        AND position(' ' IN action_key) <= 65
        AND length(action_key) <= position(' ' IN action_key) + 255);
END
$tables$;

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

-- Bind a verified action to the user it is reported for, the first time, and
-- answer whom it belongs to (the caller goes on to rules.act, with p_claimed,
-- only when that is its user). Under Citus the first step of an action: a
-- one-shard transaction on the action's shard. Idempotent.
CREATE OR REPLACE FUNCTION rules.claim_action(p_action_key text, p_user_id text)
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

DROP FUNCTION rules.act(text, text, text, text, text, bigint, timestamptz, jsonb);

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

ALTER FUNCTION rules._claim(text, text) OWNER TO rewards_owner;
ALTER FUNCTION rules.act(text, text, text, text, text, bigint, timestamptz, jsonb, boolean) OWNER TO rewards_owner;
REVOKE ALL ON FUNCTION rules._claim(text, text),
    rules.act(text, text, text, text, text, bigint, timestamptz, jsonb, boolean) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION rules.act(text, text, text, text, text, bigint, timestamptz, jsonb, boolean) TO rewards_api;

COMMENT ON FUNCTION rules.claim_action(text, text) IS
'Bind the verified action (action_key: source, a space, external id) to p_user_id the first time; answers the user it belongs to. Under Citus call it before rules.act (p_claimed true), and that only for the user it answers.';
COMMENT ON FUNCTION rules.act(text, text, text, text, text, bigint, timestamptz, jsonb, boolean) IS
'Earn the points the rules give a verified action. Args: user_id, idempotency_key, source, external_id, action type, value (minor currency units, for per-unit rules), occurred_at (NULL: now), metadata, claimed (under Citus: rules.claim_action bound it to this user; RLB03 otherwise). Status: ok | idempotency_key_reused | action_already_credited | action_claimed_by_another_user (single node) | not_eligible | cap_reached; rule, campaign, capped and budget_exhausted say why. Invalid arguments raise 22023 naming the argument.';

DO $citus$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_extension WHERE extname = 'citus') THEN
        RETURN;
    END IF;
    PERFORM create_distributed_function('rules._claim(text, text)');
    PERFORM create_distributed_function('rules.act(text, text, text, text, text, bigint, timestamptz, jsonb, boolean)',
                                        'p_user_id', colocate_with => 'ledger.accounts', force_delegation => true);
END
$citus$;
