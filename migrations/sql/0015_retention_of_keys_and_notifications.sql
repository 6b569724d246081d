-- ===========================================================================
-- Retention of idempotency records and delivered notifications (revision 0015)
--
-- Both were kept forever. Now ledger.settings.idempotency_retention (30 days
-- by default; at least a day and longer than the longest hold) and
-- audit.settings.notification_retention (30 days) say how long, and pg_cron
-- enforces them every hour in batches of their own transactions:
-- ledger.expire_idempotency_keys (under Citus each node its own shards, run
-- on every node at once, like the reservations' expiry) and
-- audit.expire_notifications (delivered ones only, never pending or parked).
-- ===========================================================================

-- The expiry of the idempotency records held on this node, table by table
-- (ledger._local_tables), batch by batch, each batch its own transaction of
-- this node alone; ledger.expire_idempotency_keys runs it here, or under Citus
-- on every node at once. The cutoff is taken once, at the start: nothing
-- younger than the retention is ever deleted. Not SECURITY DEFINER (it commits).
CREATE PROCEDURE ledger._expire_local_idempotency_keys(INOUT deleted bigint DEFAULT 0,
                                                       batch_size integer DEFAULT 1000)
LANGUAGE plpgsql
AS $$
DECLARE
    v_cutoff timestamptz := clock_timestamp() - (SELECT s.idempotency_retention FROM ledger.settings s);
    v_table text;
    v_in_batch bigint;
BEGIN
    deleted := 0;
    IF batch_size IS NULL OR batch_size < 1 THEN
        PERFORM ledger._invalid('batch_size', 'must be a positive integer');
    END IF;
    FOR v_table IN SELECT ledger._local_tables('ledger.idempotency_keys') LOOP
        LOOP
            EXECUTE format('DELETE FROM %1$s WHERE ctid = ANY (ARRAY('
                           'SELECT ctid FROM %1$s WHERE created_at < $1 ORDER BY created_at LIMIT $2))', v_table)
                USING v_cutoff, batch_size;
            GET DIAGNOSTICS v_in_batch = ROW_COUNT;
            deleted := deleted + v_in_batch;
            COMMIT;
            EXIT WHEN v_in_batch < batch_size;
        END LOOP;
    END LOOP;
END;
$$;

-- Forgets the idempotency records older than settings.idempotency_retention
-- (30 days by default), in batches of batch_size, each its own transaction
-- (ledger._expire_local_idempotency_keys); a retry of such a key is then a new
-- request. Verified actions are not keys: they stay in the entries and earn
-- once, ever. pg_cron runs it every hour. Under Citus it runs on every node at
-- once, as expire_reservations does, and adds up what they deleted.
CREATE PROCEDURE ledger.expire_idempotency_keys(INOUT deleted bigint DEFAULT 0, batch_size integer DEFAULT 1000)
LANGUAGE plpgsql
AS $$
DECLARE
    v_failures text;
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_extension WHERE extname = 'citus') THEN
        CALL ledger._expire_local_idempotency_keys(deleted, batch_size);
        RETURN;
    END IF;
    IF batch_size IS NULL OR batch_size < 1 THEN
        PERFORM ledger._invalid('batch_size', 'must be a positive integer');
    END IF;
    SELECT coalesce(sum(r.result::bigint) FILTER (WHERE r.success), 0),
           string_agg(format('node %s: %s', r.nodeid, r.result), '; ') FILTER (WHERE NOT r.success)
    INTO deleted, v_failures
    FROM pg_catalog.run_command_on_all_nodes(
        format('CALL ledger._expire_local_idempotency_keys(NULL, %s)', batch_size)) AS r;
    IF v_failures IS NOT NULL THEN
        RAISE EXCEPTION 'idempotency keys could not be expired on every node (% deleted elsewhere): %',
            deleted, v_failures;
    END IF;
END;
$$;

-- Forgets the delivered notifications older than
-- audit.settings.notification_retention (30 days by default), batch_size at a
-- time, committing after each batch; a pending or parked one is never
-- touched, however old. The outbox is a plain table where the history is (the
-- coordinator, under Citus), so this runs there. pg_cron runs it every hour.
-- Not SECURITY DEFINER and no SET clause (it commits): every name is qualified.
CREATE PROCEDURE audit.expire_notifications(INOUT deleted bigint DEFAULT 0, batch_size integer DEFAULT 1000)
LANGUAGE plpgsql
AS $$
DECLARE
    v_cutoff timestamptz := pg_catalog.clock_timestamp()
                            - (SELECT s.notification_retention FROM audit.settings s);
    v_in_batch bigint;
BEGIN
    deleted := 0;
    IF batch_size IS NULL OR batch_size < 1 THEN
        RAISE EXCEPTION 'batch_size must be a positive integer' USING ERRCODE = 'invalid_parameter_value',
            COLUMN = 'batch_size';
    END IF;
    LOOP
        DELETE FROM audit.notifications n
        WHERE n.notification_id = ANY (ARRAY(
            SELECT d.notification_id FROM audit.notifications d
            WHERE d.status = 'delivered' AND d.delivered_at < v_cutoff
            ORDER BY d.delivered_at LIMIT batch_size));
        GET DIAGNOSTICS v_in_batch = ROW_COUNT;
        deleted := deleted + v_in_batch;
        COMMIT;
        EXIT WHEN v_in_batch < batch_size;
    END LOOP;
END;
$$;

ALTER PROCEDURE ledger._expire_local_idempotency_keys(bigint, integer) OWNER TO rewards_owner;
ALTER PROCEDURE ledger.expire_idempotency_keys(bigint, integer) OWNER TO rewards_owner;
ALTER PROCEDURE audit.expire_notifications(bigint, integer) OWNER TO rewards_owner;
REVOKE ALL ON PROCEDURE ledger._expire_local_idempotency_keys(bigint, integer),
    ledger.expire_idempotency_keys(bigint, integer), audit.expire_notifications(bigint, integer) FROM PUBLIC;

COMMENT ON PROCEDURE ledger.expire_idempotency_keys(bigint, integer) IS
'Forget idempotency records older than settings.idempotency_retention, committing every batch_size; returns how many. Under Citus each node its own shards'' (ledger._expire_local_idempotency_keys), all at once. Hourly by pg_cron.';
COMMENT ON PROCEDURE ledger._expire_local_idempotency_keys(bigint, integer) IS
'Forget the expired idempotency records held on this node (its shards under Citus), in transactions of this node alone; ledger.expire_idempotency_keys runs it, under Citus on every node.';
COMMENT ON PROCEDURE audit.expire_notifications(bigint, integer) IS
'Forget delivered notifications older than audit.settings.notification_retention, committing every batch_size; never a pending or parked one. Hourly by pg_cron.';

DO $citus$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_extension WHERE extname = 'citus') THEN
        RETURN;
    END IF;
    PERFORM create_distributed_function('ledger._expire_local_idempotency_keys(bigint, integer)');
END
$citus$;

-- The tables last: Citus creates a function on every node over one connection
-- per node, which a parallel change of a distributed table before it in the
-- same transaction would refuse. And inside a DO block: Citus sends a
-- distributed table's DDL to the workers as the text of its statement, which
-- in a file sent as one query would be the whole file.
DO $tables$
BEGIN
    ALTER TABLE ledger.settings ADD COLUMN idempotency_retention interval NOT NULL DEFAULT interval '30 days';
    ALTER TABLE ledger.settings ADD CONSTRAINT settings_idempotency_retention_outlives_retries CHECK (
        idempotency_retention >= interval '1 day' AND idempotency_retention > max_reservation_ttl);
    CREATE INDEX idempotency_keys_created_at ON ledger.idempotency_keys (created_at);
END
$tables$;

ALTER TABLE audit.settings
    ADD COLUMN notification_retention interval NOT NULL DEFAULT interval '30 days',
    ADD CONSTRAINT settings_notification_retention_positive CHECK (notification_retention > interval '0');
CREATE INDEX notifications_delivered ON audit.notifications (delivered_at) WHERE status = 'delivered';

DO $cron$
BEGIN
    IF current_database() IS DISTINCT FROM current_setting('cron.database_name', true) THEN
        RETURN;
    END IF;
    PERFORM cron.schedule('rewards-expire-idempotency-keys', '41 * * * *', 'CALL ledger.expire_idempotency_keys()');
    PERFORM cron.schedule('rewards-expire-notifications', '47 * * * *', 'CALL audit.expire_notifications()');
END
$cron$;
