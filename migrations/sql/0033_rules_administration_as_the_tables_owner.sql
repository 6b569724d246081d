-- The rules administration runs as the superuser who owns the tables it
-- writes (SECURITY DEFINER), no longer as its caller: the API's role keeps no
-- right on any table of the schema, only EXECUTE on the functions it calls
-- (sql/rules.sql, "Public functions: the administration"). The refill now
-- finds its slice's anchor with rules._budget_anchor, which its caller could
-- not execute.

-- A refill: the user's slice of the campaign gets at least p_points more,
-- from the unallocated part of the budget; when that is too little, every
-- slice is gathered back first; when even all of it is too little, the slice
-- gets all there is and the budget is exhausted (claims then
-- take what they find, down to the last point). A slice gets more than it
-- asked, a share of what is unallocated (1/slices), so refills stay
-- rare: one transaction on the coordinator, over the budget's reference row
-- and the slice's shard (every shard when it gathers). Does nothing when
-- another refill came first.
CREATE OR REPLACE FUNCTION rules.refill_budget_slice(p_campaign_id bigint, p_user_id text, p_points bigint)
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
ALTER FUNCTION rules.refill_budget_slice(bigint, text, bigint) OWNER TO CURRENT_USER;

ALTER FUNCTION rules.put_rule(text, text, bigint, bigint, bigint, bigint, bigint, boolean, integer, integer) SECURITY DEFINER;
ALTER FUNCTION rules.put_rule(text, text, bigint, bigint, bigint, bigint, bigint, boolean, integer, integer) OWNER TO CURRENT_USER;
ALTER FUNCTION rules.enable_rule(text, text, boolean) SECURITY DEFINER;
ALTER FUNCTION rules.enable_rule(text, text, boolean) OWNER TO CURRENT_USER;
ALTER FUNCTION rules.list_rules() SECURITY DEFINER;
ALTER FUNCTION rules.list_rules() OWNER TO CURRENT_USER;
ALTER FUNCTION rules.put_campaign(text, bigint, text, timestamptz, timestamptz, integer, bigint, text[], text[], bigint, boolean) SECURITY DEFINER;
ALTER FUNCTION rules.put_campaign(text, bigint, text, timestamptz, timestamptz, integer, bigint, text[], text[], bigint, boolean) OWNER TO CURRENT_USER;
ALTER FUNCTION rules.enable_campaign(text, bigint, boolean) SECURITY DEFINER;
ALTER FUNCTION rules.enable_campaign(text, bigint, boolean) OWNER TO CURRENT_USER;
ALTER FUNCTION rules.list_campaigns() SECURITY DEFINER;
ALTER FUNCTION rules.list_campaigns() OWNER TO CURRENT_USER;
ALTER FUNCTION rules.budget_report(bigint) SECURITY DEFINER;
ALTER FUNCTION rules.budget_report(bigint) OWNER TO CURRENT_USER;
ALTER FUNCTION rules.list_changes(bigint, integer) SECURITY DEFINER;
ALTER FUNCTION rules.list_changes(bigint, integer) OWNER TO CURRENT_USER;

REVOKE ALL ON rules.rules, rules.campaigns, rules.campaign_budgets, rules.budget_slices, rules.budget_anchors,
    rules.changes, rules.change_history FROM rewards_api;
REVOKE ALL ON SEQUENCE rules.campaigns_campaign_id_seq, rules.changes_change_id_seq FROM rewards_api;
REVOKE EXECUTE ON FUNCTION rules.check_change(text, boolean), rules.check_rule(rules.rules),
    rules.check_campaign(rules.campaigns) FROM rewards_api;
