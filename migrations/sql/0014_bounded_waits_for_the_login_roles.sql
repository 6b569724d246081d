-- ===========================================================================
-- Bounded waits for the login roles (revision 0014)
--
-- Each role that logs in gets its statement, lock and idle-in-transaction
-- timeouts as role settings, on every node (sql/roles.sql says why each value;
-- README "Bounded waits" lists them with the waits around them). Sessions
-- opened before this keep their settings: PgBouncer's server connections are
-- replaced within its server_lifetime, or at once with a RECONNECT on its
-- console.
-- ===========================================================================

DO $waits$
DECLARE
    v_set constant text := $set$
        DO $do$
        DECLARE
            v_propagation constant text := current_setting('citus.enable_ddl_propagation', true);
        BEGIN
            -- Set on each node by us, as the roles were made (revision 0001).
            PERFORM pg_catalog.set_config('citus.enable_ddl_propagation', 'off', true);
            ALTER ROLE rewards_api SET lock_timeout = '500ms';
            ALTER ROLE rewards_api SET statement_timeout = '1s';
            ALTER ROLE rewards_api SET idle_in_transaction_session_timeout = '5s';
            ALTER ROLE rewards_audit_writer SET statement_timeout = 0;
            ALTER ROLE rewards_audit_writer SET lock_timeout = '5s';
            ALTER ROLE rewards_audit_writer SET idle_in_transaction_session_timeout = '1min';
            ALTER ROLE rewards_notifier SET statement_timeout = '10s';
            ALTER ROLE rewards_notifier SET lock_timeout = '1s';
            ALTER ROLE rewards_notifier SET idle_in_transaction_session_timeout = '10s';
            ALTER ROLE rewards_auditor SET statement_timeout = '15min';
            ALTER ROLE rewards_auditor SET lock_timeout = '10s';
            ALTER ROLE rewards_auditor SET idle_in_transaction_session_timeout = '10min';
            IF v_propagation IS NOT NULL THEN
                PERFORM pg_catalog.set_config('citus.enable_ddl_propagation', v_propagation, true);
            END IF;
        END
        $do$
    $set$;
    v_failures text;
BEGIN
    EXECUTE v_set;
    IF EXISTS (SELECT FROM pg_catalog.pg_extension WHERE extname = 'citus') THEN
        SELECT string_agg(format('%s:%s: %s', nodename, nodeport, result), '; ') INTO v_failures
        FROM run_command_on_workers(v_set)
        WHERE NOT success;
        IF v_failures IS NOT NULL THEN
            RAISE EXCEPTION 'could not set the roles'' waits on the workers: %', v_failures;
        END IF;
    END IF;
END
$waits$;
