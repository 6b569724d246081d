-- What the alert rules read (ops/prometheus/alerts.yml), exported by the audit
-- consumer: the parked notifications, counted through a partial index at each
-- scrape, and each node's standbys, whose positions and lag pg_stat_replication
-- shows only to members of pg_read_all_stats. The membership is granted on every
-- node, with Citus' propagation off as sql/roles.sql does it, since the
-- consumer reads each node's slots and standbys on that node.

CREATE INDEX notifications_dead ON audit.notifications (notification_id) WHERE status = 'dead';

GRANT SELECT (status) ON audit.notifications TO rewards_audit_writer;

DO $grant$
DECLARE
    v_grant constant text := $do$
        DO $inner$
        DECLARE
            v_propagation constant text := current_setting('citus.enable_ddl_propagation', true);
        BEGIN
            PERFORM pg_catalog.set_config('citus.enable_ddl_propagation', 'off', true);
            GRANT pg_read_all_stats TO rewards_audit_writer;
            IF v_propagation IS NOT NULL THEN
                PERFORM pg_catalog.set_config('citus.enable_ddl_propagation', v_propagation, true);
            END IF;
        END
        $inner$
    $do$;
    v_failures text;
BEGIN
    EXECUTE v_grant;
    IF EXISTS (SELECT FROM pg_catalog.pg_extension WHERE extname = 'citus') THEN
        SELECT string_agg(format('%s:%s: %s', nodename, nodeport, result), '; ') INTO v_failures
        FROM run_command_on_workers(v_grant)
        WHERE NOT success;
        IF v_failures IS NOT NULL THEN
            RAISE EXCEPTION 'could not grant pg_read_all_stats on the workers: %', v_failures;
        END IF;
    END IF;
END
$grant$;
