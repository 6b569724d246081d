-- A redemption: reserve, then commit part of the hold, as two calls (two transactions),
-- the way the API makes them.
\set uid random(1, :users)
\set key random(1, 9000000000000000000)
SELECT reservation_id AS rid FROM ledger.reserve('bench-' || :uid, 'r' || :key, 2, 300, 'bench reserve', '{}') \gset
SELECT status FROM ledger.commit_reservation('bench-' || :uid, 'c' || :key, :rid, 1, 'bench commit', '{}');
