-- A shard move under writes never finished: Citus copies the shard to the new
-- node, then applies what was written meanwhile through a logical replication
-- subscription owned by a role it makes for the move, a member of the tables'
-- owner (the migrating superuser since 0009) but not a superuser. The owner had
-- never been granted USAGE on the ledger schema (a superuser needs none), so
-- the apply worker failed with "permission denied for schema ledger", retried
-- every 5 s, and the move stayed in its catching-up phase for good. With Citus,
-- the grant reaches every node, and a node added later, like the others.
GRANT USAGE ON SCHEMA ledger TO CURRENT_USER;
