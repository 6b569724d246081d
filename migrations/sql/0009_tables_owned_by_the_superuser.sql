-- ===========================================================================
-- The tables belong to the superuser (revision 0009)
--
-- Citus creates and copies a table's shards on another node, when a node is
-- added (reference tables) or a shard moves (a rebalance, a drain), over
-- connections made as the table's owner. The owner was rewards_owner, which
-- cannot log in, so a cluster could not grow: "role rewards_owner is not
-- permitted to log in". The ledger's tables and api.keys now belong to the
-- superuser who migrates (who must log in on every node for Citus anyway), and
-- rewards_owner, which still owns the functions, views and types and so is
-- still what the SECURITY DEFINER functions run as, works the tables through
-- grants of exactly what those functions do. It can no longer alter a table,
-- disable its triggers or grant itself back UPDATE on the entries. The rights
-- of every other role are unchanged. Under Citus each statement reaches the
-- shards on every node.
-- ===========================================================================

DO $owner$
BEGIN
    ALTER TABLE ledger.accounts OWNER TO CURRENT_USER;
    ALTER TABLE ledger.entries OWNER TO CURRENT_USER;
    ALTER TABLE ledger.reservations OWNER TO CURRENT_USER;
    ALTER TABLE ledger.idempotency_keys OWNER TO CURRENT_USER;
    ALTER TABLE ledger.settings OWNER TO CURRENT_USER;
    ALTER TABLE api.keys OWNER TO CURRENT_USER;
END
$owner$;

-- The new owner takes the old one's privileges, so it too has no UPDATE,
-- DELETE or TRUNCATE on the entries.

-- The grants in the order a fresh build makes them (the consumer's come from
-- sql/audit.sql, after the ledger's).
REVOKE SELECT ON ledger.entries, ledger.reservations FROM rewards_audit_writer;
GRANT SELECT, INSERT, UPDATE ON ledger.accounts, ledger.reservations TO rewards_owner;
GRANT SELECT, INSERT ON ledger.entries, ledger.idempotency_keys TO rewards_owner;
GRANT SELECT ON ledger.settings TO rewards_owner;
GRANT USAGE ON SEQUENCE ledger.entries_entry_id_seq, ledger.reservations_reservation_id_seq TO rewards_owner;
GRANT SELECT ON ledger.entries, ledger.reservations TO rewards_audit_writer;
GRANT SELECT ON api.keys TO rewards_owner;
