-- ===========================================================================
-- Shard moves may check the entries they copy (revision 0034)
--
-- Revision 0030 took EXECUTE on every routine from PUBLIC, and with it from
-- the role a Citus shard move applies the rows written during its copy as: a
-- member of the tables' owner that is no superuser. The entries_well_formed
-- CHECK calls ledger._entry_well_formed, so the first entry written during a
-- move failed on the target ("permission denied for function
-- _entry_well_formed"), again every 5 s, and the move waited for a catch-up
-- that never came (citus.logical_replication_timeout, 2 hours). The tables'
-- owner (the superuser running the migrations) gets EXECUTE explicitly, which
-- its members inherit; Citus gives the grant to every node, a new one too.
-- ===========================================================================

GRANT EXECUTE ON FUNCTION ledger._entry_well_formed(text, bigint, bigint, bigint, bigint, bigint, text, text, text,
                                                    bytea, bytea) TO CURRENT_USER;
