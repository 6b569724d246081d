-- ===========================================================================
-- One expiry loop for both topologies (revision 0013)
--
-- Without Citus, expire_reservations walked ledger.reservations in a batching
-- loop of its own, beside the per-shard loop each Citus node runs
-- (ledger._expire_local_shards): two copies of one loop. Now the node's own
-- tables come from ledger._local_tables (the shards placed here under Citus,
-- the table itself without), and expire_reservations calls the one loop here
-- or, under Citus, on every node. Same signatures, grants and results.
-- ===========================================================================

-- The tables on this node that hold p_table's rows, by their own names: under
-- Citus the shards placed here (p_table itself would reach every node's),
-- without Citus p_table itself. Work that must stay within one node's
-- transactions (expiry, retention) walks these.
CREATE FUNCTION ledger._local_tables(p_table regclass)
RETURNS SETOF text
LANGUAGE plpgsql
STABLE
AS $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_extension WHERE extname = 'citus') THEN
        RETURN NEXT p_table::text;
        RETURN;
    END IF;
    RETURN QUERY
        SELECT pg_catalog.shard_name(p_table, s.shardid)
        FROM pg_catalog.pg_dist_shard s
        JOIN pg_catalog.pg_dist_placement p ON p.shardid = s.shardid
        WHERE s.logicalrelid = p_table
          AND p.groupid = (SELECT g.groupid FROM pg_catalog.pg_dist_local_group g)
        ORDER BY s.shardid;
END;
$$;

-- The expiry of the reservations held on this node, table by table
-- (ledger._local_tables), committing after each batch: every account it locks
-- is on this node, so no transaction ever spans nodes. ledger.expire_reservations
-- runs it here, or under Citus on every node at once; _expire_one's statements
-- then run locally, against this node's shards. Bounded by the deadline at the
-- start, so a stream of new expiries cannot keep it running. Not SECURITY
-- DEFINER, like expire_reservations (it commits).
CREATE OR REPLACE PROCEDURE ledger._expire_local_shards(INOUT expired bigint DEFAULT 0, batch_size integer DEFAULT 100)
LANGUAGE plpgsql
AS $$
DECLARE
    v_cutoff timestamptz := clock_timestamp();
    v_table text;
    v_due record;
    v_in_batch integer;
BEGIN
    expired := 0;
    IF batch_size IS NULL OR batch_size < 1 THEN
        PERFORM ledger._invalid('batch_size', 'must be a positive integer');
    END IF;
    FOR v_table IN SELECT ledger._local_tables('ledger.reservations') LOOP
        LOOP
            v_in_batch := 0;
            FOR v_due IN EXECUTE format(
                'SELECT user_id, reservation_id FROM %s WHERE status = ''open'' AND expires_at <= $1'
                ' ORDER BY expires_at LIMIT $2', v_table) USING v_cutoff, batch_size
            LOOP
                v_in_batch := v_in_batch + 1;
                IF ledger._expire_one(v_due.user_id, v_due.reservation_id) THEN
                    expired := expired + 1;
                END IF;
            END LOOP;
            COMMIT;
            EXIT WHEN v_in_batch < batch_size;
        END LOOP;
    END LOOP;
END;
$$;

-- Ends every open reservation whose deadline has passed, in batches of
-- batch_size, each its own transaction (ledger._expire_local_shards).
-- Not SECURITY DEFINER: PostgreSQL refuses COMMIT in such procedures. pg_cron
-- runs it as the superuser who scheduled it; by hand, a DBA does.
-- Under Citus it runs ledger._expire_local_shards on every node at once, over
-- Citus' own connections as that superuser, and adds up what they expired:
-- each node's transactions hold only its own accounts' locks. A node that
-- fails is named in the error; what the others expired stays committed.
CREATE OR REPLACE PROCEDURE ledger.expire_reservations(INOUT expired bigint DEFAULT 0, batch_size integer DEFAULT 100)
LANGUAGE plpgsql
AS $$
DECLARE
    v_failures text;
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_extension WHERE extname = 'citus') THEN
        CALL ledger._expire_local_shards(expired, batch_size);
        RETURN;
    END IF;
    IF batch_size IS NULL OR batch_size < 1 THEN
        PERFORM ledger._invalid('batch_size', 'must be a positive integer');
    END IF;
    SELECT coalesce(sum(r.result::bigint) FILTER (WHERE r.success), 0),
           string_agg(format('node %s: %s', r.nodeid, r.result), '; ') FILTER (WHERE NOT r.success)
    INTO expired, v_failures
    FROM pg_catalog.run_command_on_all_nodes(
        format('CALL ledger._expire_local_shards(NULL, %s)', batch_size)) AS r;
    IF v_failures IS NOT NULL THEN
        RAISE EXCEPTION 'reservations could not be expired on every node (% expired elsewhere): %',
            expired, v_failures;
    END IF;
END;
$$;

ALTER FUNCTION ledger._local_tables(regclass) OWNER TO rewards_owner;
REVOKE ALL ON FUNCTION ledger._local_tables(regclass) FROM PUBLIC;

COMMENT ON PROCEDURE ledger._expire_local_shards(bigint, integer) IS
'Expire the overdue reservations held on this node (its shards under Citus), in transactions of this node alone; ledger.expire_reservations runs it, under Citus on every node.';
COMMENT ON FUNCTION ledger._local_tables(regclass) IS
'The tables on this node holding the given table''s rows: its shards placed here under Citus, else the table itself.';

DO $citus$
BEGIN
    IF EXISTS (SELECT FROM pg_catalog.pg_extension WHERE extname = 'citus') THEN
        PERFORM create_distributed_function('ledger._local_tables(regclass)');
    END IF;
END
$citus$;
