-- ===========================================================================
-- The API's role executes no private helper (revision 0030)
--
-- rules.put_campaign and rules.refill_budget_slice run as their caller (a
-- write of a reference table reaches every node as the current user), so the
-- private helpers they called had to be executable by rewards_api, which could
-- then gather a campaign's slices (points taken from the slices and given to
-- nobody) or set a budget with no history row, by calling them directly. The
-- helpers' work is written out in the two functions; rules._set_budget and
-- rules._gather_budget are gone, and rules._budget_anchor (rules._claim_budget's,
-- inside rules.act) is the owner's again. Functions a later migration creates
-- are not executable by PUBLIC unless it grants them.
--
-- Under Citus every function a worker holds was executable there by PUBLIC
-- (PostgreSQL's default when Citus creates it; only explicit grants follow),
-- so the API's role, which logs in on the workers, could call any private
-- helper of the ledger there: ledger._close_routines_to_public revokes it on
-- every node, which every migration run ends with (app.operations.migrate, in
-- a transaction of its own: the workers' copies of what a migration changed
-- stay locked until it commits) and adding a node too.
--
-- rewards_auditor reads rules.change_history under Citus too: the view's
-- query reads the reference table's shard as the auditor, who needs SELECT on
-- the table (the view shows all of it).
-- ===========================================================================

CREATE OR REPLACE FUNCTION rules.put_campaign(
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

CREATE OR REPLACE FUNCTION rules.refill_budget_slice(p_campaign_id bigint, p_user_id text, p_points bigint)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_hash constant integer := hashtext(p_user_id);
    v_slices constant bigint := (SELECT count(*) FROM rules.budget_anchors);
    v_anchor text;
    v_unallocated bigint;
    v_slice rules.budget_slices;
    v_gathered bigint;
    v_need bigint;
    v_give bigint;
    v_exhausted boolean := false;
BEGIN
    -- rules._budget_anchor's lookup, written out: this runs as its caller,
    -- who may execute no private helper.
    SELECT anchor INTO v_anchor FROM rules.budget_anchors WHERE v_hash BETWEEN hash_min AND hash_max;
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

DROP FUNCTION rules._set_budget(bigint, bigint);
DROP FUNCTION rules._gather_budget(bigint);
REVOKE EXECUTE ON FUNCTION rules._budget_anchor(text) FROM rewards_api;

ALTER DEFAULT PRIVILEGES IN SCHEMA ledger, rules, api, audit REVOKE EXECUTE ON FUNCTIONS FROM PUBLIC;

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

ALTER FUNCTION ledger._close_routines_to_public() OWNER TO rewards_owner;
REVOKE ALL ON FUNCTION ledger._close_routines_to_public() FROM PUBLIC;
COMMENT ON FUNCTION ledger._close_routines_to_public() IS
'Revoke PUBLIC''s EXECUTE on every routine of ledger, rules, api and audit, on every node (Citus gives it on the workers to what it creates there). Run by the superuser.';

GRANT SELECT ON rules.changes TO rewards_auditor;

DO $citus$
BEGIN
    IF EXISTS (SELECT FROM pg_catalog.pg_extension WHERE extname = 'citus') THEN
        PERFORM create_distributed_function('ledger._close_routines_to_public()');
    END IF;
END
$citus$;
