-- ===========================================================================
-- API keys written under Citus (revision 0005)
--
-- api.keys is a reference table under Citus, and Citus refuses two things the
-- key functions did when they write it: a subquery inside an INSERT's VALUES
-- (api.create_key sorted the scopes that way: "subqueries are not supported
-- within INSERT queries"), and a non-IMMUTABLE function inside a COALESCE
-- (api.revoke_key's now()). Both are computed into a variable first. Same
-- signatures, results, owner, grants and comments; on a single node nothing
-- changes but the text of the bodies.
-- ===========================================================================

CREATE OR REPLACE FUNCTION api.create_key(p_name text, p_secret_hash bytea, p_scopes text[])
RETURNS api.key_info
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_scopes text[];
    v_key api.key_info;
BEGIN
    IF p_name IS NULL OR length(p_name) NOT BETWEEN 1 AND 100 THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value', COLUMN = 'name',
            MESSAGE = 'invalid name: must be 1-100 characters';
    END IF;
    IF p_scopes IS NULL OR cardinality(p_scopes) = 0
       OR NOT p_scopes <@ ARRAY['points:earn', 'points:redeem', 'points:read', 'admin'] THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value', COLUMN = 'scopes',
            MESSAGE = 'invalid scopes: choose from points:earn, points:redeem, points:read, admin';
    END IF;
    -- Computed first: Citus refuses a subquery inside an INSERT's VALUES.
    SELECT array_agg(DISTINCT s ORDER BY s) INTO v_scopes FROM unnest(p_scopes) AS s;
    INSERT INTO api.keys (name, secret_hash, scopes)
    VALUES (p_name, p_secret_hash, v_scopes)
    RETURNING key_id, name, scopes, created_at, revoked_at INTO v_key;
    RETURN v_key;
END;
$$;

-- Revoke a key (once; revoking again changes nothing). A row of NULLs for an unknown key.
CREATE OR REPLACE FUNCTION api.revoke_key(p_key_id bigint)
RETURNS api.key_info
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    -- A value, not now() inside the COALESCE: Citus refuses non-IMMUTABLE
    -- functions in CASE or COALESCE of a statement it modifies a table with.
    v_now constant timestamptz := now();
    v_key api.key_info;
BEGIN
    UPDATE api.keys SET revoked_at = coalesce(revoked_at, v_now)
    WHERE key_id = p_key_id
    RETURNING key_id, name, scopes, created_at, revoked_at INTO v_key;
    RETURN v_key;
END;
$$;
