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
    -- the action sources the key may report (NULL: any), and its rate tier
    -- (NULL: the default bucket of REWARDS_RATE_API_KEY)
    sources      text[],
    rate_tier    text,
    CONSTRAINT keys_pkey PRIMARY KEY (key_id),
    CONSTRAINT keys_secret_hash_key UNIQUE (secret_hash),
    CONSTRAINT keys_name_length CHECK (length(name) BETWEEN 1 AND 100),
    CONSTRAINT keys_secret_hash_length CHECK (octet_length(secret_hash) = 32),
    CONSTRAINT keys_scopes_known CHECK (
        cardinality(scopes) > 0
        AND scopes <@ ARRAY['points:earn', 'points:redeem', 'points:read', 'admin']
    ),
    -- each source a name: joined by spaces, the text is name ( name)* and
    -- splits back into as many as there are (none blank or holding a space)
    CONSTRAINT keys_sources CHECK (sources IS NULL OR (cardinality(sources) BETWEEN 1 AND 100
        AND array_to_string(sources, ' ', '') ~ '^[A-Za-z0-9._:-]{1,64}( [A-Za-z0-9._:-]{1,64})*$'
            AND cardinality(string_to_array(array_to_string(sources, ' ', ''), ' ')) = cardinality(sources))),
    CONSTRAINT keys_rate_tier_format CHECK (rate_tier ~ '^[a-z0-9_-]{1,32}$')
);

-- Partners that call back (ad networks, stores), each signing its callbacks
-- with a shared secret (README "Signed callbacks"). HMAC verification needs the
-- secret itself, so no hash of it could be checked against; the secret is
-- therefore not stored at all: it is derived in the API from a master key kept
-- outside the database (REWARDS_CALLBACK_MASTER_KEY) and this row's random
-- salt. Whoever reads these tables, the superuser included, learns salts and
-- fingerprints, neither of which signs anything.
CREATE TABLE api.callback_sources (
    source       text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    changed_at   timestamptz NOT NULL DEFAULT now(),
    disabled_at  timestamptz,
    CONSTRAINT callback_sources_pkey PRIMARY KEY (source),
    CONSTRAINT callback_sources_source_format CHECK (source ~ '^[A-Za-z0-9._:-]{1,64}$')
);

-- A source's secrets: one in use, two while a rotation is under way (the
-- functions below hold that), retired ones kept for the record. Each belongs
-- to a source of api.callback_sources, which only api.create_callback_source
-- inserts, with the first secret, and from which no row is ever deleted; no
-- foreign key says so, because under Citus one between these reference tables
-- would have create_reference_table convert the tables and drop the view on
-- them.
CREATE TABLE api.callback_secrets (
    secret_id    bigserial NOT NULL,
    source       text NOT NULL,
    salt         bytea NOT NULL,
    fingerprint  bytea NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    retired_at   timestamptz,
    CONSTRAINT callback_secrets_pkey PRIMARY KEY (secret_id),
    CONSTRAINT callback_secrets_salt_key UNIQUE (salt),
    CONSTRAINT callback_secrets_salt_length CHECK (octet_length(salt) = 32),
    CONSTRAINT callback_secrets_fingerprint_length CHECK (octet_length(fingerprint) = 32)
);

-- ===========================================================================
-- Views: what the functions return
-- ===========================================================================

CREATE VIEW api.key_info AS
    SELECT key_id, name, scopes, created_at, revoked_at FROM api.keys;

-- A source's secrets as the administration shows them: never the salt.
CREATE VIEW api.callback_secret_info AS
    SELECT s.source, s.disabled_at, k.secret_id, k.fingerprint, k.created_at, k.retired_at
    FROM api.callback_sources AS s
    JOIN api.callback_secrets AS k ON k.source = s.source;

-- A key with what limits it: the sources it may report and its rate tier.
CREATE VIEW api.key_access AS
    SELECT key_id, name, scopes, created_at, revoked_at, sources, rate_tier FROM api.keys;

-- ===========================================================================
-- Public functions
-- ===========================================================================

-- The active key with this hash and its limits; a row of NULLs when there is
-- none or it is revoked.
CREATE FUNCTION api.authenticate_v2(p_secret_hash bytea)
RETURNS api.key_access
LANGUAGE plpgsql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_key api.key_access;
BEGIN
    SELECT key_id, name, scopes, created_at, revoked_at, sources, rate_tier INTO v_key
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

-- Limit a key to the action sources it may report (NULL: any) and give it a
-- rate tier (NULL: the default); a row of NULLs for an unknown key.
CREATE FUNCTION api.limit_key(p_key_id bigint, p_sources text[], p_rate_tier text)
RETURNS api.key_access
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_sources text[];
    v_key api.key_access;
BEGIN
    IF p_sources IS NOT NULL AND (cardinality(p_sources) NOT BETWEEN 1 AND 100 OR EXISTS (
            SELECT FROM unnest(p_sources) AS s WHERE s IS NULL OR s !~ '^[A-Za-z0-9._:-]{1,64}$')) THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value', COLUMN = 'sources',
            MESSAGE = 'invalid sources: 1-100 names of 1-64 characters of A-Z a-z 0-9 . _ : -, or none for any';
    END IF;
    IF p_rate_tier !~ '^[a-z0-9_-]{1,32}$' THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value', COLUMN = 'rate_tier',
            MESSAGE = 'invalid rate_tier: 1-32 characters of a-z 0-9 _ -';
    END IF;
    -- Computed first: Citus refuses a subquery inside a modification of a reference table.
    SELECT array_agg(DISTINCT s ORDER BY s) INTO v_sources FROM unnest(p_sources) AS s;
    UPDATE api.keys SET sources = v_sources, rate_tier = p_rate_tier
    WHERE key_id = p_key_id
    RETURNING key_id, name, scopes, created_at, revoked_at, sources, rate_tier INTO v_key;
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

-- The salts of an enabled source's secrets in use, newest first (two during a
-- rotation); NULL for an unknown or disabled source. What the API derives the
-- secrets from, with a key the database never sees.
CREATE FUNCTION api.callback_salts(p_source text)
RETURNS bytea[]
LANGUAGE sql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT array_agg(k.salt ORDER BY k.secret_id DESC)
    FROM api.callback_sources AS s
    JOIN api.callback_secrets AS k ON k.source = s.source
    WHERE s.source = p_source AND s.disabled_at IS NULL AND k.retired_at IS NULL;
$$;

-- The callback administration is the superuser's (`rewards sources`), run with
-- its own rights for the reason the key administration is (above). Each change
-- of a source first updates its row, which serializes changes of one source.
CREATE FUNCTION api._lock_callback_source(p_source text)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_now constant timestamptz := now();
BEGIN
    UPDATE api.callback_sources SET changed_at = v_now WHERE source = p_source AND disabled_at IS NULL;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'undefined_object',
            MESSAGE = format('no enabled callback source %L', p_source);
    END IF;
END;
$$;

CREATE FUNCTION api.create_callback_source(p_source text, p_salt bytea, p_fingerprint bytea)
RETURNS SETOF api.callback_secret_info
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF p_source IS NULL OR p_source !~ '^[A-Za-z0-9._:-]{1,64}$' THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value', COLUMN = 'source',
            MESSAGE = 'invalid source: must be 1-64 characters of A-Z a-z 0-9 . _ : -';
    END IF;
    IF EXISTS (SELECT FROM api.callback_sources WHERE source = p_source) THEN
        RAISE EXCEPTION USING ERRCODE = 'duplicate_object',
            MESSAGE = format('callback source %L exists already (a disabled one keeps its name)', p_source);
    END IF;
    INSERT INTO api.callback_sources (source) VALUES (p_source);
    INSERT INTO api.callback_secrets (source, salt, fingerprint) VALUES (p_source, p_salt, p_fingerprint);
    RETURN QUERY SELECT * FROM api.callback_secret_info WHERE source = p_source;
END;
$$;

-- A second secret beside the one in use: both verify until the rotation is finished.
CREATE FUNCTION api.rotate_callback_secret(p_source text, p_salt bytea, p_fingerprint bytea)
RETURNS SETOF api.callback_secret_info
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM api._lock_callback_source(p_source);
    IF (SELECT count(*) FROM api.callback_secrets WHERE source = p_source AND retired_at IS NULL) > 1 THEN
        RAISE EXCEPTION USING ERRCODE = 'RLB02',
            MESSAGE = format('a rotation of %L is under way: finish it before starting another', p_source);
    END IF;
    INSERT INTO api.callback_secrets (source, salt, fingerprint) VALUES (p_source, p_salt, p_fingerprint);
    RETURN QUERY SELECT * FROM api.callback_secret_info WHERE source = p_source AND retired_at IS NULL
        ORDER BY secret_id;
END;
$$;

-- Retire the older secret: from now on only the newest verifies.
CREATE FUNCTION api.finish_callback_rotation(p_source text)
RETURNS SETOF api.callback_secret_info
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_now constant timestamptz := now();
    v_newest bigint;
BEGIN
    PERFORM api._lock_callback_source(p_source);
    SELECT max(secret_id) INTO v_newest FROM api.callback_secrets WHERE source = p_source AND retired_at IS NULL;
    UPDATE api.callback_secrets SET retired_at = v_now
    WHERE source = p_source AND retired_at IS NULL AND secret_id <> v_newest;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'RLB02',
            MESSAGE = format('no rotation of %L is under way: `rewards sources rotate` starts one', p_source);
    END IF;
    RETURN QUERY SELECT * FROM api.callback_secret_info WHERE secret_id = v_newest;
END;
$$;

-- Refuse the source's callbacks from now on (its name stays taken).
CREATE FUNCTION api.disable_callback_source(p_source text)
RETURNS SETOF api.callback_secret_info
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_now constant timestamptz := now();
BEGIN
    PERFORM api._lock_callback_source(p_source);
    UPDATE api.callback_sources SET disabled_at = v_now WHERE source = p_source;
    RETURN QUERY SELECT * FROM api.callback_secret_info WHERE source = p_source AND retired_at IS NULL;
END;
$$;

CREATE FUNCTION api.list_callback_sources()
RETURNS SETOF api.callback_secret_info
LANGUAGE sql
STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT * FROM api.callback_secret_info ORDER BY source, secret_id;
$$;

-- ===========================================================================
-- Ownership: as in the ledger schema, everything belongs to rewards_owner but
-- the table, which stays with the superuser who created it (Citus copies a
-- reference table to a new node as its owner) and is read through a grant.
-- ===========================================================================

ALTER VIEW api.key_info OWNER TO rewards_owner;
ALTER VIEW api.key_access OWNER TO rewards_owner;
ALTER FUNCTION api.authenticate_v2(bytea) OWNER TO rewards_owner;
ALTER FUNCTION api.limit_key(bigint, text[], text) OWNER TO rewards_owner;
ALTER FUNCTION api.create_key(text, bytea, text[]) OWNER TO rewards_owner;
ALTER FUNCTION api.revoke_key(bigint) OWNER TO rewards_owner;
ALTER FUNCTION api.list_keys() OWNER TO rewards_owner;
ALTER VIEW api.callback_secret_info OWNER TO rewards_owner;
ALTER FUNCTION api.callback_salts(text) OWNER TO rewards_owner;
ALTER FUNCTION api._lock_callback_source(text) OWNER TO rewards_owner;
ALTER FUNCTION api.create_callback_source(text, bytea, bytea) OWNER TO rewards_owner;
ALTER FUNCTION api.rotate_callback_secret(text, bytea, bytea) OWNER TO rewards_owner;
ALTER FUNCTION api.finish_callback_rotation(text) OWNER TO rewards_owner;
ALTER FUNCTION api.disable_callback_source(text) OWNER TO rewards_owner;
ALTER FUNCTION api.list_callback_sources() OWNER TO rewards_owner;

-- ===========================================================================
-- Grants
-- ===========================================================================

REVOKE ALL ON ALL TABLES IN SCHEMA api FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA api FROM PUBLIC;
GRANT SELECT ON api.keys TO rewards_owner;  -- api.authenticate_v2 and the views
GRANT SELECT ON api.callback_sources, api.callback_secrets TO rewards_owner;  -- api.callback_salts and the view
GRANT USAGE ON SCHEMA api TO rewards_api;
GRANT EXECUTE ON FUNCTION api.authenticate_v2(bytea) TO rewards_api;
GRANT EXECUTE ON FUNCTION api.callback_salts(text) TO rewards_api;

-- ===========================================================================
-- Comments
-- ===========================================================================

COMMENT ON FUNCTION api.authenticate_v2(bytea) IS
'The active API key whose SHA-256 is p_secret_hash with its limits (sources it may report, rate tier); a row of NULLs when none.';
COMMENT ON FUNCTION api.limit_key(bigint, text[], text) IS
'Limit a key to the action sources it may report (NULL: any) and set its rate tier (NULL: default). `rewards keys limit` calls this.';
COMMENT ON FUNCTION api.create_key(text, bytea, text[]) IS
'Register a key by its SHA-256 with scopes from points:earn, points:redeem, points:read, admin. `rewards keys create` makes the secret and calls this.';
COMMENT ON FUNCTION api.revoke_key(bigint) IS
'Revoke a key; its next request is refused once the API''s key cache expires (REWARDS_AUTH_CACHE_SECONDS).';
COMMENT ON FUNCTION api.callback_salts(text) IS
'The salts of an enabled callback source''s secrets in use, newest first; NULL when none. The API derives each secret from one and REWARDS_CALLBACK_MASTER_KEY.';
COMMENT ON FUNCTION api.create_callback_source(text, bytea, bytea) IS
'Register a callback source with its first secret''s salt and SHA-256 fingerprint. `rewards sources create` makes the salt and prints the secret.';
COMMENT ON FUNCTION api.rotate_callback_secret(text, bytea, bytea) IS
'Add a second secret to a source; both verify until api.finish_callback_rotation. Refused while a rotation is under way.';
COMMENT ON FUNCTION api.finish_callback_rotation(text) IS
'Retire every secret of a source but the newest.';
COMMENT ON FUNCTION api.disable_callback_source(text) IS
'Refuse a source''s callbacks from now on (once the API''s cache expires, REWARDS_AUTH_CACHE_SECONDS).';

-- ===========================================================================
-- Distribution (only where the citus extension is installed)
-- ===========================================================================

DO $citus$
BEGIN
    IF EXISTS (SELECT FROM pg_catalog.pg_extension WHERE extname = 'citus') THEN
        -- Small and read on every request: a copy on every node.
        PERFORM create_reference_table('api.keys');
        PERFORM create_reference_table('api.callback_sources');
        PERFORM create_reference_table('api.callback_secrets');
    END IF;
END
$citus$;
