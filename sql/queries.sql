-- Every query the Python code runs, by name. app/queries.py loads this file;
-- Python never builds SQL text. Parameters use psycopg's %(name)s style, and
-- every argument is passed, so the server never expands defaults.

-- name: verify_chain
SELECT ok, entries_checked, first_broken_entry_id, first_broken_seq
FROM ledger.verify_chain(%(user_id)s);

-- name: expire_reservations
CALL ledger.expire_reservations(NULL, %(batch_size)s);

-- name: settle_lots
CALL ledger.settle_lots(NULL, %(batch_size)s);

-- name: credit
SELECT * FROM ledger.credit(%(user_id)s, %(key)s, %(amount)s, %(reason)s,
                            %(action_source)s, %(action_external_id)s, %(metadata)s,
                            %(pending_seconds)s, %(expiry_seconds)s);

-- name: credit_many
-- Item i is element i of each array; one row per item, in input order.
SELECT * FROM ledger.credit_many(%(user_id)s, %(user_ids)s::text[], %(keys)s::text[], %(amounts)s::bigint[],
                                 %(reasons)s::text[], %(action_sources)s::text[],
                                 %(action_external_ids)s::text[], %(metadata)s::jsonb[]);

-- name: debit
SELECT * FROM ledger.debit(%(user_id)s, %(key)s, %(amount)s, %(reason)s, %(metadata)s);

-- name: reserve
SELECT * FROM ledger.reserve(%(user_id)s, %(key)s, %(amount)s, %(ttl_seconds)s,
                             %(reason)s, %(metadata)s);

-- name: commit_reservation
SELECT * FROM ledger.commit_reservation(%(user_id)s, %(key)s, %(reservation_id)s, %(amount)s,
                                        %(reason)s, %(metadata)s);

-- name: release_reservation
SELECT * FROM ledger.release_reservation(%(user_id)s, %(key)s, %(reservation_id)s,
                                         %(reason)s, %(metadata)s);

-- name: refund
SELECT * FROM ledger.refund(%(user_id)s, %(key)s, %(action_source)s, %(action_external_id)s,
                            %(reason)s, %(metadata)s);

-- name: balance
SELECT * FROM ledger.balance(%(user_id)s);

-- name: entries_page
SELECT * FROM ledger.entries_page(%(user_id)s, %(before_seq)s, %(limit)s);

-- name: reservation
SELECT * FROM ledger.reservation(%(user_id)s, %(reservation_id)s);

-- name: authenticate_v2
SELECT * FROM api.authenticate_v2(%(secret_hash)s);

-- name: limit_key
SELECT * FROM api.limit_key(%(key_id)s, %(sources)s, %(rate_tier)s);

-- name: claim_action
SELECT rules.claim_action(%(action_key)s, %(user_id)s) AS owner;

-- name: act
SELECT * FROM rules.act(%(user_id)s, %(key)s, %(source)s, %(external_id)s, %(type)s, %(value)s,
                        %(occurred_at)s, %(metadata)s, %(claimed)s);

-- name: refill_budget_slice
SELECT rules.refill_budget_slice(%(campaign_id)s, %(user_id)s, %(points)s);

-- name: budget_report
SELECT * FROM rules.budget_report(%(campaign_id)s);

-- name: put_rule
SELECT * FROM rules.put_rule(%(actor)s, %(action_type)s, %(fixed_points)s, %(points_per_unit)s,
                             %(unit_value)s, %(daily_cap)s, %(lifetime_cap)s, %(enabled)s,
                             %(pending_seconds)s, %(expiry_seconds)s);

-- name: enable_rule
SELECT * FROM rules.enable_rule(%(actor)s, %(action_type)s, %(enabled)s);

-- name: list_rules
SELECT * FROM rules.list_rules();

-- name: put_campaign
SELECT * FROM rules.put_campaign(%(actor)s, %(campaign_id)s, %(name)s, %(starts_at)s, %(ends_at)s,
                                 %(multiplier_percent)s, %(bonus_points)s, %(action_types)s, %(sources)s,
                                 %(budget)s, %(enabled)s);

-- name: enable_campaign
SELECT * FROM rules.enable_campaign(%(actor)s, %(campaign_id)s, %(enabled)s);

-- name: list_campaigns
SELECT * FROM rules.list_campaigns();

-- name: list_changes
SELECT * FROM rules.list_changes(%(before_id)s, %(limit)s);

-- name: create_key
SELECT * FROM api.create_key(%(name)s, %(secret_hash)s, %(scopes)s);

-- name: list_keys
SELECT * FROM api.list_keys();

-- name: revoke_key
SELECT * FROM api.revoke_key(%(key_id)s);

-- name: callback_salts
SELECT api.callback_salts(%(source)s) AS salts;

-- name: create_callback_source
SELECT * FROM api.create_callback_source(%(source)s, %(salt)s, %(fingerprint)s);

-- name: rotate_callback_secret
SELECT * FROM api.rotate_callback_secret(%(source)s, %(salt)s, %(fingerprint)s);

-- name: finish_callback_rotation
SELECT * FROM api.finish_callback_rotation(%(source)s);

-- name: disable_callback_source
SELECT * FROM api.disable_callback_source(%(source)s);

-- name: list_callback_sources
SELECT * FROM api.list_callback_sources();

-- name: ping
SELECT 1 AS ok;

-- name: slot_status
-- wal_status 'lost': max_slot_wal_keep_size invalidated the slot, which can
-- never deliver again.
SELECT slot_name, wal_status FROM pg_replication_slots WHERE slot_name = %(slot)s;

-- name: create_slot
SELECT lsn FROM pg_create_logical_replication_slot(%(slot)s, 'wal2json');

-- name: drop_slot
SELECT pg_drop_replication_slot(%(slot)s);

-- name: peek_changes
-- Every change to the ledger schema but those of the tables the history does
-- not keep, named exactly: a table the consumer does not know, such as a Citus
-- shard (ledger.entries_102008, which is what a server decodes when
-- citus.enable_change_data_capture is off), still comes through, and
-- app.audit.stream refuses it rather than confirm past it.
SELECT lsn, data FROM pg_logical_slot_peek_changes(
    %(slot)s, NULL, %(max_changes)s,
    'format-version', '2', 'include-timestamp', '1',
    'add-tables', 'ledger.*',
    'filter-tables', 'ledger.accounts,ledger.idempotency_keys,ledger.settings,ledger.lots',
    'actions', 'insert,update');

-- name: confirm_changes
SELECT end_lsn FROM pg_replication_slot_advance(%(slot)s, %(lsn)s::pg_lsn);

-- name: audit_insert_entry
INSERT INTO audit.entries (
    user_id, entry_id, seq, kind, amount, available_delta, reserved_delta, available_after,
    reserved_after, reservation_id, reason, action_source, action_external_id, metadata,
    idempotency_key, created_at, prev_hash, hash, committed_at, lsn)
VALUES (
    %(user_id)s, %(entry_id)s, %(seq)s, %(kind)s, %(amount)s, %(available_delta)s, %(reserved_delta)s,
    %(available_after)s, %(reserved_after)s, %(reservation_id)s, %(reason)s, %(action_source)s,
    %(action_external_id)s, %(metadata)s::jsonb, %(idempotency_key)s, %(created_at)s::timestamptz,
    decode(%(prev_hash)s, 'hex'), decode(%(hash)s, 'hex'),  -- wal2json writes bytea as bare hex
    %(committed_at)s::timestamptz, %(lsn)s::pg_lsn)
ON CONFLICT DO NOTHING;

-- name: audit_insert_reservation_event
INSERT INTO audit.reservation_events (
    user_id, reservation_id, status, amount, committed_amount, reason, expires_at, event_at,
    committed_at, lsn)
VALUES (
    %(user_id)s, %(reservation_id)s, %(status)s, %(amount)s, %(committed_amount)s, %(reason)s,
    %(expires_at)s::timestamptz, %(event_at)s::timestamptz, %(committed_at)s::timestamptz, %(lsn)s::pg_lsn)
ON CONFLICT DO NOTHING;

-- name: audit_save_progress
INSERT INTO audit.stream_progress (slot_name, lsn, committed_at, applied_at)
VALUES (%(slot)s, %(lsn)s::pg_lsn, %(committed_at)s::timestamptz, now())
ON CONFLICT (slot_name) DO UPDATE
SET lsn = EXCLUDED.lsn, committed_at = EXCLUDED.committed_at, applied_at = EXCLUDED.applied_at;

-- name: citus_installed
SELECT EXISTS (SELECT FROM pg_extension WHERE extname = 'citus') AS citus;

-- name: shard_ranges
-- The hash range of each shard of ledger.accounts, which names its colocation
-- group: every ledger table is colocated with it (app.ledger.shards). Only run
-- where citus_installed.
SELECT s.shardid AS shard_id, s.shardminvalue::integer AS min_hash, s.shardmaxvalue::integer AS max_hash
FROM pg_catalog.pg_dist_shard s
JOIN pg_catalog.pg_dist_partition p ON p.logicalrelid = s.logicalrelid
WHERE s.logicalrelid = 'ledger.accounts'::regclass AND p.partmethod = 'h'
ORDER BY min_hash;

-- name: audit_nodes
-- Under Citus, the nodes whose WAL carries ledger changes, each read through a
-- slot of its own: every active primary worker, from the moment it is
-- registered (so its slot is made before a rebalance moves anything there)
-- until it is removed (a drained worker's last changes are still read), and
-- the coordinator when it holds shards of a distributed table or is to get some.
SELECT n.nodeid, n.groupid, n.nodename AS host, n.nodeport AS port
FROM pg_dist_node n
WHERE n.noderole = 'primary' AND n.isactive
  AND (n.groupid <> 0 OR n.shouldhaveshards OR EXISTS (
      SELECT FROM pg_dist_placement p
      JOIN pg_dist_shard s ON s.shardid = p.shardid
      JOIN pg_dist_partition t ON t.logicalrelid = s.logicalrelid
      WHERE p.groupid = n.groupid AND t.partmethod = 'h'))
ORDER BY n.groupid, n.nodeid;

-- name: audit_mark
-- On the slot's node: a transaction holding only a logical message, whose LSN
-- the slot is confirmed past once everything committed before it is applied.
SELECT pg_logical_emit_message(true, 'rewards', %(text)s)::text AS lsn;

-- name: audit_confirmed_past
SELECT confirmed_flush_lsn >= %(lsn)s::pg_lsn AS confirmed
FROM pg_replication_slots WHERE slot_name = %(slot)s;

-- name: audit_lag
-- On the slot's node (a Citus worker has no audit schema).
SELECT s.slot_name,
       pg_wal_lsn_diff(pg_current_wal_lsn(), s.confirmed_flush_lsn)::bigint AS lag_bytes,
       s.confirmed_flush_lsn::text AS confirmed_lsn,
       s.wal_status
FROM pg_replication_slots s
WHERE s.slot_name = %(slot)s;

-- name: audit_progress
-- On the history's node: the last transaction applied from the slot.
SELECT committed_at AS last_committed_at, applied_at AS last_applied_at
FROM audit.stream_progress WHERE slot_name = %(slot)s;

-- name: metrics_slots
-- On each node, for the consumer's metrics: every replication slot (the audit
-- stream's logical ones, a standby's physical one), the WAL it keeps from being
-- recycled (from its restart_lsn, what the disk really holds for it), and the
-- bytes still writable before max_slot_wal_keep_size invalidates it (NULL:
-- unlimited). A node in recovery measures against what it has received.
SELECT slot_name AS slot, slot_type AS type, active,
       pg_wal_lsn_diff(CASE WHEN pg_is_in_recovery() THEN pg_last_wal_receive_lsn()
                            ELSE pg_current_wal_lsn() END, restart_lsn)::bigint AS retained_bytes,
       safe_wal_size AS safe_wal_bytes
FROM pg_replication_slots ORDER BY slot_name;

-- name: metrics_standbys
-- On each node: the physical standbys streaming from it (a walsender that
-- holds a logical slot, such as a Citus shard move's, is not a standby) and
-- how far each has replayed (a WAL receiver that replays nothing, such as
-- pg_receivewal, how far it has flushed).
SELECT r.application_name AS standby, r.state, r.sync_state,
       pg_wal_lsn_diff(pg_current_wal_lsn(), coalesce(r.replay_lsn, r.flush_lsn))::bigint AS lag_bytes,
       coalesce(extract(epoch FROM r.replay_lag), 0)::float8 AS lag_seconds
FROM pg_stat_replication r
LEFT JOIN pg_replication_slots s ON s.active_pid = r.pid
WHERE coalesce(s.slot_type, 'physical') = 'physical'
ORDER BY r.application_name;

-- name: metrics_synchronous
-- Whether the node's commits wait for a standby.
SELECT current_setting('synchronous_standby_names') <> '' AS synchronous;

-- name: metrics_notifications_dead
-- Where the history is (through the partial index notifications_dead).
SELECT count(*) AS dead FROM audit.notifications WHERE status = 'dead';

-- name: reconcile_accounts_after
SELECT user_id FROM ledger.accounts WHERE user_id > %(after)s ORDER BY user_id LIMIT %(limit)s;

-- name: reconcile
SELECT user_id, finding, detail FROM audit.reconcile(%(user_ids)s, %(confirmed_seqs)s);

-- name: reconcile_last_seqs
SELECT user_id, last_seq FROM ledger.accounts WHERE user_id = ANY (%(user_ids)s);

-- name: stream_barrier
SELECT audit.stream_barrier() AS marks;

-- name: stream_behind
SELECT nodeid, slot_name, confirmed_lsn::text AS confirmed_lsn, mark_lsn::text AS mark_lsn
FROM audit.stream_behind(%(marks)s::jsonb, %(slots)s::text[]) ORDER BY nodeid, slot_name;

-- name: repair_history
SELECT audit.repair_history(%(user_id)s) AS copied;

-- name: count_accounts
SELECT count(*) AS accounts FROM ledger.accounts;

-- name: notifications_claim
UPDATE audit.notifications n
SET next_attempt_at = now() + make_interval(secs => %(lease_seconds)s)
FROM (
    SELECT notification_id FROM audit.notifications
    WHERE status = 'pending' AND next_attempt_at <= now()
    ORDER BY next_attempt_at
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
) due
WHERE n.notification_id = due.notification_id
RETURNING n.notification_id, n.payload, n.attempts;

-- name: notification_delivered
UPDATE audit.notifications
SET status = 'delivered', delivered_at = now(), attempts = attempts + 1, last_error = NULL
WHERE notification_id = %(notification_id)s;

-- name: notification_failed
UPDATE audit.notifications
SET attempts = attempts + 1,
    last_error = %(error)s,
    status = CASE WHEN attempts + 1 >= %(max_attempts)s THEN 'dead' ELSE 'pending' END,
    next_attempt_at = now() + make_interval(secs => %(retry_in_seconds)s)
WHERE notification_id = %(notification_id)s
RETURNING status;

-- name: notifications_dead
SELECT notification_id, user_id, entry_id, kind, attempts, last_error, created_at
FROM audit.notifications WHERE status = 'dead' ORDER BY notification_id;

-- name: notification_resend
UPDATE audit.notifications
SET status = 'pending', attempts = 0, next_attempt_at = now(), last_error = NULL
WHERE notification_id = %(notification_id)s AND status = 'dead'
RETURNING notification_id;

-- name: audit_retention
SELECT history_retention::text AS retention, history_horizon AS horizon FROM audit.settings;

-- name: audit_set_retention
-- A bad interval is refused here (SQLSTATE 22007), not at the next drop.
UPDATE audit.settings SET history_retention = %(retention)s::interval;

-- name: refund_shortfall
SELECT refund_shortfall FROM ledger.settings;

-- name: set_refund_shortfall
UPDATE ledger.settings SET refund_shortfall = %(shortfall)s;

-- name: idempotency_retention
SELECT idempotency_retention::text AS retention FROM ledger.settings;

-- name: check_idempotency_retention
-- The table's rule (its CHECK holds it all the same), checked first so that a
-- refusal is 22023 naming the argument. No row when the value is allowed.
SELECT ledger._invalid('retention', format('must be at least a day and longer than the longest hold (%%s)',
                                           s.max_reservation_ttl))
FROM ledger.settings s, (SELECT %(retention)s::interval AS keep) r
WHERE NOT (r.keep >= interval '1 day' AND r.keep > s.max_reservation_ttl);

-- name: set_idempotency_retention
UPDATE ledger.settings SET idempotency_retention = %(retention)s::interval;

-- name: notification_retention
SELECT notification_retention::text AS retention FROM audit.settings;

-- name: check_notification_retention
-- As check_idempotency_retention, for audit.settings' rule.
SELECT ledger._invalid('retention', 'must be longer than nothing')
WHERE NOT %(retention)s::interval > interval '0';

-- name: set_notification_retention
UPDATE audit.settings SET notification_retention = %(retention)s::interval;

-- name: audit_backfill
SELECT audit.backfill() AS entries;

-- name: database_exists
SELECT 1 FROM pg_database WHERE datname = %(name)s;

-- name: create_citus
CREATE EXTENSION IF NOT EXISTS citus;

-- name: citus_set_coordinator
SELECT citus_set_coordinator_host(%(host)s, %(port)s);

-- name: citus_worker_count
SELECT count(*) AS workers FROM pg_dist_node WHERE groupid <> 0 AND noderole = 'primary';

-- name: citus_node_holds_shards
SELECT citus_set_node_property(%(host)s, %(port)s, 'shouldhaveshards', %(holds)s);

-- name: citus_add_node
-- Returns the node's id, the one it already has when it is registered.
SELECT citus_add_node(%(host)s, %(port)s) AS nodeid;

-- name: close_routines_to_public
-- After a migration and after a node is added: Citus made the functions on
-- the workers executable by PUBLIC.
SELECT ledger._close_routines_to_public();

-- name: routines_closable
-- Whether the database has ledger._close_routines_to_public (revision 0030 on).
SELECT to_regprocedure('ledger._close_routines_to_public()') IS NOT NULL AS present;

-- name: citus_version
SELECT extversion AS version FROM pg_extension WHERE extname = 'citus';

-- name: cluster_nodes
-- Every node with the shards it holds: distributed tables' shards and bytes
-- (what a rebalance moves), and reference tables' shards (one on every node).
SELECT n.nodeid, n.nodename AS host, n.nodeport AS port,
       CASE WHEN n.groupid = 0 THEN 'coordinator' ELSE 'worker' END AS role,
       n.shouldhaveshards, n.isactive AS active,
       coalesce(s.shards, 0)::int AS shards, coalesce(s.bytes, 0)::bigint AS bytes,
       coalesce(s.reference_shards, 0)::int AS reference_shards
FROM pg_dist_node n
LEFT JOIN (
    SELECT nodename, nodeport,
           count(*) FILTER (WHERE citus_table_type = 'distributed') AS shards,
           sum(shard_size) FILTER (WHERE citus_table_type = 'distributed') AS bytes,
           count(*) FILTER (WHERE citus_table_type = 'reference') AS reference_shards
    FROM citus_shards GROUP BY nodename, nodeport
) s ON s.nodename = n.nodename AND s.nodeport = n.nodeport
WHERE n.noderole = 'primary'
ORDER BY n.groupid, n.nodeid;

-- name: node_slots
-- This node's logical slots and how far each is behind the node's WAL; run on
-- the node itself, or on every node through cluster_slots.
SELECT coalesce(json_agg(json_build_object(
           'slot', slot_name, 'plugin', plugin, 'database', database, 'active', active,
           'confirmed_flush_lsn', confirmed_flush_lsn::text,
           'lag_bytes', pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint)
       ORDER BY slot_name), '[]'::json) AS slots
FROM pg_replication_slots WHERE slot_type = 'logical';

-- name: cluster_slots
-- A command (node_slots) on every active node, over Citus' own connections.
SELECT nodeid, success, result FROM run_command_on_all_nodes(%(command)s);

-- name: budget_anchors_missing
-- The shards of ledger.accounts with no budget anchor of their own range: split
-- since rules._place_budget_anchors ran (a move keeps ranges). The anchors
-- read apart first: a reference table joins no local catalog.
WITH anchors AS MATERIALIZED (SELECT hash_min, hash_max FROM rules.budget_anchors)
SELECT count(*) AS missing FROM pg_catalog.pg_dist_shard s
WHERE s.logicalrelid = 'ledger.accounts'::regclass
  AND NOT EXISTS (SELECT FROM anchors a
                  WHERE a.hash_min = s.shardminvalue::integer AND a.hash_max = s.shardmaxvalue::integer);

-- name: place_budget_anchors
-- One anchor per shard of ledger.accounts again, in one transaction.
SELECT rules._place_budget_anchors();

-- name: write_functions_distribution
-- How each write function is distributed (pg_dist_object): by which argument,
-- with force_delegation, colocated with the accounts. The write functions are
-- what the API may call that writes: ledger's public SECURITY DEFINER
-- functions that are not STABLE (the reads are); `many`: it takes the users
-- of many items (p_user_ids), each of which must be in p_user_id's shard.
SELECT p.proname AS name, p.oid::regprocedure::text AS signature,
       d.objid IS NOT NULL AS distributed,
       p.proargnames[d.distribution_argument_index + 1] AS distribution_argument,
       coalesce(d.force_delegation, false) AS force_delegation,
       coalesce(d.colocationid = (SELECT colocationid FROM pg_dist_partition
                                  WHERE logicalrelid = to_regclass('ledger.accounts')), false) AS colocated,
       'p_user_ids' = ANY (p.proargnames) AS many
FROM pg_proc p
LEFT JOIN pg_dist_object d ON d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.objsubid = 0
WHERE p.pronamespace = to_regnamespace('ledger') AND p.prokind = 'f' AND p.prosecdef
  AND p.provolatile = 'v' AND left(p.proname, 1) <> '_'
ORDER BY p.proname, signature;

-- name: ha_primary
-- On the pg_auto_failover monitor: the node that takes writes now (none
-- during a failover, before the standby is promoted): one that has reported a
-- state in which it takes writes and has been assigned one. Not
-- pgautofailover.get_primary, which names a node as soon as it is assigned
-- such a state (the standby, before its promotion is done), else the node
-- failed over from by its last report, else raises an error
-- (docs/ARCHITECTURE.md).
SELECT nodename AS name, nodehost AS host, nodeport AS port
FROM pgautofailover.current_state(%(formation)s)
WHERE current_group_state::text IN ('single', 'primary', 'wait_primary', 'join_primary', 'apply_settings')
  AND assigned_group_state::text IN ('single', 'primary', 'wait_primary', 'join_primary', 'apply_settings')
ORDER BY reported_tli DESC, node_id
LIMIT 1;

-- name: ha_nodes
SELECT nodename AS name, nodehost AS host, nodeport AS port, node_id,
       current_group_state::text AS reported_state, assigned_group_state::text AS assigned_state,
       health = 1 AS healthy, reported_tli AS timeline, reported_lsn::text AS lsn
FROM pgautofailover.current_state(%(formation)s)
ORDER BY node_id;

-- name: ha_standbys
-- On the monitor: the nodes it has seen streaming as a standby, that pass its
-- health checks now (the listener looks for slot copies on these alone).
SELECT nodename AS name, nodeport AS port
FROM pgautofailover.current_state(%(formation)s)
WHERE current_group_state::text IN ('catchingup', 'secondary') AND health = 1
ORDER BY node_id;

-- name: ha_perform_failover
SELECT pgautofailover.perform_failover(%(formation)s, 0);

-- name: ha_listen
LISTEN state;

-- name: ha_node_role
SELECT pg_is_in_recovery() AS in_recovery,
       current_setting('synchronous_commit') AS synchronous_commit,
       current_setting('synchronous_standby_names') AS synchronous_standby_names;

-- name: ha_replication
-- On the primary: each standby, whether commits wait for it, and how far
-- behind it is.
SELECT application_name AS standby, state, sync_state,
       pg_wal_lsn_diff(pg_current_wal_lsn(), flush_lsn)::bigint AS flush_lag_bytes,
       pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)::bigint AS replay_lag_bytes,
       extract(epoch FROM replay_lag)::float8 AS replay_lag_seconds,
       flush_lsn::text AS flush_lsn
FROM pg_stat_replication
ORDER BY application_name;

-- name: ha_logical_slots
SELECT slot_name AS slot FROM pg_replication_slots WHERE slot_type = 'logical' ORDER BY slot_name;

-- name: ha_server_port
SELECT current_setting('port')::int AS port;

-- Growing and shrinking the cluster (`rewards cluster add-node`, `rebalance`,
-- `drain`), run on the coordinator.

-- name: node_facts
-- What a server says about itself, compared before it joins: run on the
-- coordinator, and on the new node through the coordinator's own connection
-- (node_run), in the service database either way.
SELECT json_build_object(
    'server_version', current_setting('server_version'),
    'server_version_num', current_setting('server_version_num')::int,
    'preload', current_setting('shared_preload_libraries'),
    'wal_level', current_setting('wal_level'),
    'change_data_capture', current_setting('citus.enable_change_data_capture', true),
    'output_plugin_libraries', current_setting('output_plugin_libraries', true),
    'node_conninfo', current_setting('citus.node_conninfo', true),
    'free_slots', current_setting('max_replication_slots')::int - (SELECT count(*) FROM pg_replication_slots),
    'citus', (SELECT extversion FROM pg_extension WHERE extname = 'citus'),
    'available', (SELECT coalesce(json_object_agg(name, versions), '{}'::json) FROM (
        SELECT name, json_agg(version ORDER BY version) AS versions
        FROM pg_available_extension_versions GROUP BY name) v),
    'roles', (SELECT coalesce(json_agg(rolname ORDER BY rolname), '[]'::json)
              FROM pg_roles WHERE starts_with(rolname, 'rewards_'))
)::text AS facts;

-- name: node_run
-- A command on a server through the coordinator's own connection to it, as
-- Citus makes them (citus.node_conninfo, a password from pg_dist_authinfo or
-- .pgpass), whether the server is registered in pg_dist_node or not.
SELECT success, result
FROM master_run_on_worker(ARRAY[%(host)s], ARRAY[%(port)s::int], ARRAY[%(command)s], false);

-- name: node_reachable
-- Whether Citus reaches the server as the current user; when not, why comes as
-- a WARNING.
SELECT citus_check_connection_to_node(%(host)s, %(port)s) AS reached;

-- name: act_as
-- The current user until the transaction ends: whom Citus connects as.
SELECT set_config('role', %(role)s, true);

-- name: login_roles
-- The roles Citus connects to the nodes as: this superuser, and each of the
-- project's roles that logs in (the services' sessions, whose distributed
-- queries and delegated calls reach the workers as themselves).
SELECT rolname AS role FROM pg_roles
WHERE rolcanlogin AND (rolname = current_user OR starts_with(rolname, 'rewards_'))
ORDER BY rolname <> current_user, rolname;

-- name: distributed_extensions
-- The extensions Citus creates on every node, at the coordinator's version.
SELECT e.extname AS name, e.extversion AS version
FROM pg_dist_object d JOIN pg_extension e ON d.classid = 'pg_extension'::regclass AND d.objid = e.oid
ORDER BY 1;

-- name: citus_node
SELECT nodeid, groupid, shouldhaveshards, isactive FROM pg_dist_node
WHERE nodename = %(host)s AND nodeport = %(port)s AND noderole = 'primary';

-- name: citus_remove_node
SELECT citus_remove_node(%(host)s, %(port)s);

-- name: node_shards
-- Shards of distributed tables placed on the node (what a drain moves off).
SELECT count(*)::int AS shards FROM citus_shards
WHERE nodename = %(host)s AND nodeport = %(port)s AND citus_table_type = 'distributed';

-- name: cleanup_orphaned_resources
-- Drop now what shard moves left to drop later (the placements they moved
-- away from): a removed node's records would stay in pg_dist_cleanup and make
-- every later move of those shards fail.
CALL citus_cleanup_orphaned_resources();

-- name: node_leftovers
-- What pg_dist_cleanup still has to drop on the node.
SELECT count(*)::int AS leftovers
FROM pg_dist_cleanup c JOIN pg_dist_node n ON n.groupid = c.node_group_id
WHERE n.nodename = %(host)s AND n.nodeport = %(port)s;

-- name: nodes_wal_level
-- Every node's wal_level: a shard move copies with logical replication.
SELECT n.nodename AS host, n.nodeport AS port, r.success, r.result AS wal_level
FROM run_command_on_all_nodes('SHOW wal_level') r JOIN pg_dist_node n USING (nodeid)
ORDER BY n.groupid, n.nodeid;

-- name: tables_without_replica_identity
-- Distributed tables a shard move could not keep writable while it copies
-- (shard_transfer_mode 'auto' refuses them): no primary key or replica identity.
SELECT p.logicalrelid::text AS name
FROM pg_dist_partition p JOIN pg_class c ON c.oid = p.logicalrelid
WHERE p.partmethod = 'h'
  AND c.relreplident <> 'f'
  AND NOT EXISTS (SELECT FROM pg_index i WHERE i.indrelid = c.oid
                  AND ((c.relreplident = 'd' AND i.indisprimary) OR (c.relreplident = 'i' AND i.indisreplident)))
ORDER BY 1;

-- name: checks_a_move_cannot_apply
-- CHECK constraints of Citus tables calling a function their table's owner may
-- execute only as a superuser (neither it nor PUBLIC has EXECUTE, nor owns it).
-- A shard move applies the rows written during its copy as a member of that
-- owner that is no superuser: the first such row fails there, and the move
-- never catches up.
SELECT DISTINCT c.conrelid::regclass::text AS table_name, c.conname AS constraint_name,
       f.oid::regprocedure::text AS function, t.relowner::regrole::text AS owner
FROM pg_dist_partition p
JOIN pg_class t ON t.oid = p.logicalrelid
JOIN pg_constraint c ON c.conrelid = t.oid AND c.contype = 'c'
JOIN pg_depend d ON d.classid = 'pg_constraint'::regclass AND d.objid = c.oid
                AND d.refclassid = 'pg_proc'::regclass
JOIN pg_proc f ON f.oid = d.refobjid
WHERE f.proowner <> t.relowner
  AND f.proacl IS NOT NULL
  AND NOT EXISTS (SELECT FROM aclexplode(f.proacl) a
                  WHERE a.privilege_type = 'EXECUTE' AND a.grantee IN (0, t.relowner))
ORDER BY 1, 2;

-- name: distributed_row_counts
-- Rows per distributed table, counted across its shards (query_to_xml runs
-- each table's count, the table named through format('%%I')).
SELECT p.logicalrelid::text AS name,
       (xpath('/row/c/text()', query_to_xml(format('SELECT count(*) AS c FROM %%I.%%I', n.nspname, c.relname),
                                            false, true, '')))[1]::text::bigint AS rows
FROM pg_dist_partition p
JOIN pg_class c ON c.oid = p.logicalrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE p.partmethod = 'h'
ORDER BY 1;

-- name: rebalance_start
-- A background job of shard moves (NULL: nothing to move); drain_only moves
-- only the shards of nodes marked to hold none. 'auto' copies with logical
-- replication, writes going on, and refuses a table without replica identity.
SELECT citus_rebalance_start(drain_only => %(drain_only)s, shard_transfer_mode => 'auto') AS job_id;

-- name: rebalance_status
-- The latest rebalance job and its tasks (empty before the first).
SELECT job_id, state::text AS state, started_at, finished_at, details FROM citus_rebalance_status();

-- name: rebalance_stop
SELECT citus_rebalance_stop();
