-- ===========================================================================
-- A refused rotation of a callback secret has its own SQLSTATE (revision 0024)
--
-- They raised 55000 (object_not_in_prerequisite_state), which the API and the
-- CLI translated to "refused"; but the server raises 55000 too when a
-- replication slot was invalidated, and the audit consumer must see that as
-- the database being unavailable (it makes the slot again and backfills), not
-- as a refusal it does not retry. RLB02 is the ledger's own "precondition
-- does not hold" (sql/README.md).
-- ===========================================================================

CREATE OR REPLACE FUNCTION api.rotate_callback_secret(p_source text, p_salt bytea, p_fingerprint bytea)
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

CREATE OR REPLACE FUNCTION api.finish_callback_rotation(p_source text)
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
