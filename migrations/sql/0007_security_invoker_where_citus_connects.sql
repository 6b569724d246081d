-- ===========================================================================
-- Functions that reach other nodes run as their caller (revision 0007)
--
-- Under Citus the coordinator opens its connections to the workers as the
-- current user, which inside a SECURITY DEFINER function is its owner,
-- rewards_owner: a role that cannot log in, so on a cluster with workers these
-- functions failed ("role rewards_owner is not permitted to log in"). They are
-- the ones that run on the coordinator and touch a distributed or reference
-- table: the key administration (writes of the reference table api.keys, run
-- by the superuser through `rewards keys`), the reconciler and its repair (the
-- superuser, `rewards reconcile`) and the backfill (the audit consumer's
-- rewards_audit_writer). They now run with their caller's rights; no one else
-- may execute them, as before. The consumer gets exactly what the backfill
-- reads, the ledger's entries and reservations (which its replication slot
-- carries anyway), and the repair it calls. The ledger's own functions stay
-- SECURITY DEFINER: Citus runs each wholly on the worker holding its user,
-- connecting as the caller. Single node: the same results, run by the same
-- roles.
-- ===========================================================================

ALTER FUNCTION api.create_key(text, bytea, text[]) SECURITY INVOKER;
ALTER FUNCTION api.revoke_key(bigint) SECURITY INVOKER;
ALTER FUNCTION api.list_keys() SECURITY INVOKER;
ALTER FUNCTION audit.reconcile(text[]) SECURITY INVOKER;
ALTER FUNCTION audit.repair_history(text) SECURITY INVOKER;
ALTER FUNCTION audit.backfill() SECURITY INVOKER;

-- Under Citus a GRANT on a distributed table reaches its shards on every node.
GRANT EXECUTE ON FUNCTION audit.repair_history(text) TO rewards_audit_writer;
GRANT USAGE ON SCHEMA ledger TO rewards_audit_writer;
GRANT SELECT ON ledger.entries, ledger.reservations TO rewards_audit_writer;
