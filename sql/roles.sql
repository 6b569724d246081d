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
-- and their waits
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
            -- Bounded waits (README, "Bounded waits"). Set on the role, every
            -- time, so that they hold in each of its sessions (a SET in a
            -- session would not survive PgBouncer's transaction pooling) and on
            -- every node (a Citus worker runs a delegated call in a session of
            -- the caller's role). A session may still SET its own.
            -- The API: a call takes milliseconds (p99 74 ms over HTTP at
            -- saturation, bench/RESULTS.md). One that waits half a second for an
            -- account's lock, or runs a second, is stuck behind something that
            -- is not the ledger's own traffic: refused (503 overloaded) well
            -- inside the client's patience. It never holds a transaction open.
            ALTER ROLE rewards_api SET lock_timeout = '500ms';
            ALTER ROLE rewards_api SET statement_timeout = '1s';
            ALTER ROLE rewards_api SET idle_in_transaction_session_timeout = '5s';
            -- The consumer's backfill copies the whole ledger and a peek after
            -- an outage decodes all the WAL since, so no statement bound (0 even
            -- if the server's default changes); but it queues behind no lock for
            -- long (it retries) and leaves no transaction open.
            ALTER ROLE rewards_audit_writer SET statement_timeout = 0;
            ALTER ROLE rewards_audit_writer SET lock_timeout = '5s';
            ALTER ROLE rewards_audit_writer SET idle_in_transaction_session_timeout = '1min';
            -- The sender's statements are small: it leases its rows rather than
            -- holding them while it sends, and retries what failed.
            ALTER ROLE rewards_notifier SET statement_timeout = '10s';
            ALTER ROLE rewards_notifier SET lock_timeout = '1s';
            ALTER ROLE rewards_notifier SET idle_in_transaction_session_timeout = '10s';
            -- People at a prompt: a forgotten query or an open transaction must
            -- not hold a snapshot (vacuum) or a lock (partition retention) for
            -- hours. A longer report SETs its own statement_timeout.
            ALTER ROLE rewards_auditor SET statement_timeout = '15min';
            ALTER ROLE rewards_auditor SET lock_timeout = '10s';
            ALTER ROLE rewards_auditor SET idle_in_transaction_session_timeout = '10min';
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
