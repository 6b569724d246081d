-- Funds each bench account once, so debits spend: client c (of -c C, each run
-- with -t :per) credits bench-(c * :per + 1) to bench-(c * :per + :per), one
-- per transaction. A pgbench variable lives for the client's whole run, so :n
-- (set to 0 with -D) counts that client's transactions.
\set n :n + 1
\set uid :client_id * :per + :n
SELECT status FROM ledger.credit('bench-' || :uid, 'fund-' || :uid, 10000000, 'bench funding', NULL, NULL, '{}');
