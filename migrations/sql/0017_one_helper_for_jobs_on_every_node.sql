-- ===========================================================================
-- One way to run a per-node job on every node (revision 0017)
--
-- ledger.expire_reservations and ledger.expire_idempotency_keys each carried
-- the same run_command_on_all_nodes / sum / raise block; both now call
-- ledger._call_on_every_node. Behaviour is unchanged but for the error's words.
-- ===========================================================================

-- Runs `CALL p_procedure(NULL, p_batch_size)` on every node of the cluster at
-- once (run_command_on_all_nodes, over Citus' own connections as the calling
-- superuser) and adds up the counts the calls return: the way a scheduled job
-- that walks ledger._local_tables in its own per-node transactions runs under
-- Citus. p_procedure takes (INOUT bigint, integer). A node that fails is named
-- in the error; what the others did stays committed, and the error says how much.
CREATE FUNCTION ledger._call_on_every_node(p_procedure regproc, p_batch_size integer, p_what text)
RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_done bigint;
    v_failures text;
BEGIN
    IF p_batch_size IS NULL OR p_batch_size < 1 THEN
        PERFORM ledger._invalid('batch_size', 'must be a positive integer');
    END IF;
    SELECT coalesce(sum(r.result::bigint) FILTER (WHERE r.success), 0),
           string_agg(format('node %s: %s', r.nodeid, r.result), '; ') FILTER (WHERE NOT r.success)
    INTO v_done, v_failures
    FROM pg_catalog.run_command_on_all_nodes(format('CALL %s(NULL, %s)', p_procedure, p_batch_size)) AS r;
    IF v_failures IS NOT NULL THEN
        RAISE EXCEPTION '% failed on some nodes (% done on the others, committed): %', p_what, v_done, v_failures;
    END IF;
    RETURN v_done;
END;
$$;

ALTER FUNCTION ledger._call_on_every_node(regproc, integer, text) OWNER TO rewards_owner;
REVOKE ALL ON FUNCTION ledger._call_on_every_node(regproc, integer, text) FROM PUBLIC;

CREATE OR REPLACE PROCEDURE ledger.expire_reservations(INOUT expired bigint DEFAULT 0, batch_size integer DEFAULT 100)
LANGUAGE plpgsql
AS $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_extension WHERE extname = 'citus') THEN
        CALL ledger._expire_local_shards(expired, batch_size);
        RETURN;
    END IF;
    expired := ledger._call_on_every_node('ledger._expire_local_shards', batch_size, 'expiring reservations');
END;
$$;

CREATE OR REPLACE PROCEDURE ledger.expire_idempotency_keys(INOUT deleted bigint DEFAULT 0, batch_size integer DEFAULT 1000)
LANGUAGE plpgsql
AS $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_extension WHERE extname = 'citus') THEN
        CALL ledger._expire_local_idempotency_keys(deleted, batch_size);
        RETURN;
    END IF;
    deleted := ledger._call_on_every_node('ledger._expire_local_idempotency_keys', batch_size, 'expiring idempotency keys');
END;
$$;
