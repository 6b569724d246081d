-- The api schema: the HTTP API's bearer keys, as the database holds them now.
--
-- Clients of the HTTP API authenticate with a bearer key. Only its SHA-256 is
-- stored: the keys are 256 random bits, so a fast hash is enough and a leaked
-- table yields no usable key. The API's role may only look a hash up.
--
-- One of the current-state files applied in the order that SCHEMA_FILES in
-- app/operations/migrate.py names (after sql/ledger.sql).

-- ===========================================================================
-- Schema
-- ===========================================================================

CREATE SCHEMA api AUTHORIZATION rewards_owner;
REVOKE ALL ON SCHEMA api FROM PUBLIC;

-- ===========================================================================
-- Tables (each with its constraints)
-- ===========================================================================

CREATE TABLE api.keys (
    key_id       bigserial NOT NULL,
    name         text NOT NULL,
    secret_hash  bytea NOT NULL,
    scopes       text[] NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    revoked_at   timestamptz,
    CONSTRAINT keys_pkey PRIMARY KEY (key_id),
    CONSTRAINT keys_secret_hash_key UNIQUE (secret_hash),
    CONSTRAINT keys_name_length CHECK (length(name) BETWEEN 1 AND 100),
    CONSTRAINT keys_secret_hash_length CHECK (octet_length(secret_hash) = 32),
    CONSTRAINT keys_scopes_known CHECK (
        cardinality(scopes) > 0
        AND scopes <@ ARRAY['points:earn', 'points:redeem', 'points:read', 'admin']
    )
);

-- ===========================================================================
-- Views: what the functions return
-- ===========================================================================

CREATE VIEW api.key_info AS
    SELECT key_id, name, scopes, created_at, revoked_at FROM api.keys;

-- ===========================================================================
-- Public functions
-- ===========================================================================

-- The active key with this hash; a row of NULLs when there is none or it is revoked.
CREATE FUNCTION api.authenticate(p_secret_hash bytea)
RETURNS api.key_info
LANGUAGE plpgsql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_key api.key_info;
BEGIN
    SELECT key_id, name, scopes, created_at, revoked_at INTO v_key
    FROM api.keys
    WHERE secret_hash = p_secret_hash AND revoked_at IS NULL;
    RETURN v_key;
END;
$$;

-- The key administration below is the superuser's (`rewards keys`), run with
-- its own rights (SECURITY INVOKER, and EXECUTE for nobody else): under Citus a
-- write of the reference table api.keys reaches every node over connections
-- opened as the current user, which for a SECURITY DEFINER function would be
-- rewards_owner, a role that cannot log in (see sql/README.md, "Citus").
CREATE FUNCTION api.create_key(p_name text, p_secret_hash bytea, p_scopes text[])
RETURNS api.key_info
LANGUAGE plpgsql
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
CREATE FUNCTION api.revoke_key(p_key_id bigint)
RETURNS api.key_info
LANGUAGE plpgsql
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

CREATE FUNCTION api.list_keys()
RETURNS SETOF api.key_info
LANGUAGE sql
STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT key_id, name, scopes, created_at, revoked_at FROM api.keys ORDER BY key_id;
$$;

-- ===========================================================================
-- Ownership: as in the ledger schema, everything belongs to rewards_owner but
-- the table, which stays with the superuser who created it (Citus copies a
-- reference table to a new node as its owner) and is read through a grant.
-- ===========================================================================

ALTER VIEW api.key_info OWNER TO rewards_owner;
ALTER FUNCTION api.authenticate(bytea) OWNER TO rewards_owner;
ALTER FUNCTION api.create_key(text, bytea, text[]) OWNER TO rewards_owner;
ALTER FUNCTION api.revoke_key(bigint) OWNER TO rewards_owner;
ALTER FUNCTION api.list_keys() OWNER TO rewards_owner;

-- ===========================================================================
-- Grants
-- ===========================================================================

REVOKE ALL ON ALL TABLES IN SCHEMA api FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA api FROM PUBLIC;
GRANT SELECT ON api.keys TO rewards_owner;  -- api.authenticate and the view
GRANT USAGE ON SCHEMA api TO rewards_api;
GRANT EXECUTE ON FUNCTION api.authenticate(bytea) TO rewards_api;

-- ===========================================================================
-- Comments
-- ===========================================================================

COMMENT ON FUNCTION api.authenticate(bytea) IS
'The active API key whose SHA-256 is p_secret_hash (key_id, name, scopes); a row of NULLs when none.';
COMMENT ON FUNCTION api.create_key(text, bytea, text[]) IS
'Register a key by its SHA-256 with scopes from points:earn, points:redeem, points:read, admin. `rewards keys create` makes the secret and calls this.';
COMMENT ON FUNCTION api.revoke_key(bigint) IS
'Revoke a key; its next request is refused once the API''s key cache expires (REWARDS_AUTH_CACHE_SECONDS).';

-- ===========================================================================
-- Distribution (only where the citus extension is installed)
-- ===========================================================================

DO $citus$
BEGIN
    IF EXISTS (SELECT FROM pg_catalog.pg_extension WHERE extname = 'citus') THEN
        -- Small and read on every request: a copy on every node.
        PERFORM create_reference_table('api.keys');
    END IF;
END
$citus$;
