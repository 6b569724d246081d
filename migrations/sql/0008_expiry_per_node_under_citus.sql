-- ===========================================================================
-- Expiry per node under Citus (revision 0008)
--
-- ledger.expire_reservations ran, under Citus, as one transaction driven from
-- the coordinator: it read the overdue reservations of every shard and expired
-- them statement by statement over its connections to the workers, holding up
-- to batch_size account locks on several nodes until a two-phase commit. Now
-- each node expires the reservations of its own shards in transactions of its
-- own (ledger._expire_local_shards, distributed so that every node, a worker
-- added later included, has it), and expire_reservations, still what pg_cron
-- and `rewards ledger expire` call, runs it on every node at once and adds up
-- the counts. Without Citus it does what it did. Same signature and grants.
-- ===========================================================================

-- Under Citus, the expiry of the reservations whose shards are on this node,
-- shard by shard, committing after each batch: every account it locks is on
-- this node, so no transaction ever spans nodes. ledger.expire_reservations
-- runs it on every node at once. It reads each local shard of
-- ledger.reservations by its own name (the distributed table would be every
-- node's), and _expire_one's statements run locally, against this node's
-- shards. Not SECURITY DEFINER, like expire_reservations (it commits).
CREATE PROCEDURE ledger._expire_local_shards(INOUT expired bigint DEFAULT 0, batch_size integer DEFAULT 100)
LANGUAGE plpgsql
AS $$
DECLARE
    v_cutoff timestamptz := clock_timestamp();
    v_shard text;
    v_due record;
    v_in_batch integer;
BEGIN
    expired := 0;
    IF batch_size IS NULL OR batch_size < 1 THEN
        PERFORM ledger._invalid('batch_size', 'must be a positive integer');
    END IF;
    FOR v_shard IN
        SELECT format('ledger.%I', 'reservations_' || s.shardid)
        FROM pg_catalog.pg_dist_shard s
        JOIN pg_catalog.pg_dist_placement p ON p.shardid = s.shardid
        WHERE s.logicalrelid = 'ledger.reservations'::regclass
          AND p.groupid = (SELECT g.groupid FROM pg_catalog.pg_dist_local_group g)
        ORDER BY s.shardid
    LOOP
        LOOP
            v_in_batch := 0;
            FOR v_due IN EXECUTE format(
                'SELECT user_id, reservation_id FROM %s WHERE status = ''open'' AND expires_at <= $1'
                ' ORDER BY expires_at LIMIT $2', v_shard) USING v_cutoff, batch_size
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

-- Ends every open reservation whose deadline has passed, committing after each
-- batch so no account stays locked for long. Bounded by the deadline at the
-- start, so a stream of new expiries cannot keep it running.
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
    v_cutoff timestamptz := clock_timestamp();
    v_due record;
    v_in_batch integer;
    v_failures text;
BEGIN
    expired := 0;
    IF batch_size IS NULL OR batch_size < 1 THEN
        PERFORM ledger._invalid('batch_size', 'must be a positive integer');
    END IF;
    IF EXISTS (SELECT FROM pg_catalog.pg_extension WHERE extname = 'citus') THEN
        SELECT coalesce(sum(r.result::bigint) FILTER (WHERE r.success), 0),
               string_agg(format('node %s: %s', r.nodeid, r.result), '; ') FILTER (WHERE NOT r.success)
        INTO expired, v_failures
        FROM pg_catalog.run_command_on_all_nodes(
            format('CALL ledger._expire_local_shards(NULL, %s)', batch_size)) AS r;
        IF v_failures IS NOT NULL THEN
            RAISE EXCEPTION 'reservations could not be expired on every node (% expired elsewhere): %',
                expired, v_failures;
        END IF;
        RETURN;
    END IF;
    LOOP
        v_in_batch := 0;
        FOR v_due IN
            SELECT user_id, reservation_id FROM ledger.reservations
            WHERE status = 'open' AND expires_at <= v_cutoff
            ORDER BY expires_at
            LIMIT batch_size
        LOOP
            v_in_batch := v_in_batch + 1;
            IF ledger._expire_one(v_due.user_id, v_due.reservation_id) THEN
                expired := expired + 1;
            END IF;
        END LOOP;
        EXIT WHEN v_in_batch < batch_size;
        COMMIT;
    END LOOP;
END;
$$;

ALTER PROCEDURE ledger._expire_local_shards(bigint, integer) OWNER TO rewards_owner;
REVOKE ALL ON PROCEDURE ledger._expire_local_shards(bigint, integer) FROM PUBLIC;

COMMENT ON PROCEDURE ledger.expire_reservations(bigint, integer) IS
'Expire every open reservation past its deadline, committing every batch_size; returns how many it expired. Under Citus each node expires its own shards'' reservations (ledger._expire_local_shards), all at once. Run each minute by pg_cron; CALL it by hand at any time.';

COMMENT ON PROCEDURE ledger._expire_local_shards(bigint, integer) IS
'Under Citus: expire the overdue reservations of the shards on this node, in transactions of this node alone; ledger.expire_reservations runs it on every node.';

DO $citus$
BEGIN
    IF EXISTS (SELECT FROM pg_catalog.pg_extension WHERE extname = 'citus') THEN
        PERFORM create_distributed_function('ledger._expire_local_shards(bigint, integer)');
    END IF;
END
$citus$;
