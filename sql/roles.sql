-- The project's roles. Roles belong to the cluster, not to a database, so each
-- is created only when missing: building a second database in the same cluster
-- (a test's, say) finds them made and changes nothing.
--
-- The first of the current-state files, applied in the order that SCHEMA_FILES
-- in app/operations/migrate.py names: every other file grants to these roles.
-- None of them is a member of another; the audit writer alone is a member of a
-- predefined role (pg_read_all_stats, for the replication metrics it exports).

-- ===========================================================================
-- Roles (cluster-wide, so created only when missing; on the Citus workers too)
-- ===========================================================================

DO $roles$
DECLARE
    v_create constant text := $create$
        DO $do$
        DECLARE
            v_propagation constant text := current_setting('citus.enable_ddl_propagation', true);
        BEGIN
            -- Citus would carry a CREATE ROLE on a worker back to the other nodes
            -- as "create or alter", resetting attributes such as LOGIN there.
            PERFORM pg_catalog.set_config('citus.enable_ddl_propagation', 'off', true);
            IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'rewards_owner') THEN
                -- Owns every ledger object; nobody logs in as it.
                CREATE ROLE rewards_owner NOLOGIN;
            END IF;
            IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'rewards_api') THEN
                -- The API's role: may execute the public functions and nothing else.
                -- `rewards db up` gives it LOGIN and a password.
                CREATE ROLE rewards_api NOLOGIN;
            END IF;
            IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'rewards_auditor') THEN
                -- Reads audit.* and verifies chains; changes nothing anywhere.
                CREATE ROLE rewards_auditor LOGIN;
            END IF;
            IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'rewards_audit_writer') THEN
                -- The stream consumer: reads the replication slot, inserts history.
                CREATE ROLE rewards_audit_writer LOGIN REPLICATION;
            END IF;
            -- The consumer exports each node's standbys and their lag
            -- (app.audit.metrics): pg_stat_replication shows positions and lag
            -- only to superusers and members of pg_read_all_stats.
            GRANT pg_read_all_stats TO rewards_audit_writer;
            IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'rewards_notifier') THEN
                -- The notification sender: works the outbox.
                CREATE ROLE rewards_notifier LOGIN;
            END IF;
            IF v_propagation IS NOT NULL THEN
                PERFORM pg_catalog.set_config('citus.enable_ddl_propagation', v_propagation, true);
            END IF;
        END
        $do$
    $create$;
    v_failures text;
BEGIN
    EXECUTE v_create;
    IF EXISTS (SELECT FROM pg_catalog.pg_extension WHERE extname = 'citus') THEN
        -- Citus does not carry roles that existed before its extension to the
        -- workers: make them there too.
        SELECT string_agg(format('%s:%s: %s', nodename, nodeport, result), '; ') INTO v_failures
        FROM run_command_on_workers(v_create)
        WHERE NOT success;
        IF v_failures IS NOT NULL THEN
            RAISE EXCEPTION 'could not create the project''s roles on the workers: %', v_failures;
        END IF;
    END IF;
END
$roles$;
