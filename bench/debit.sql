-- One immediate debit per transaction; accounts are funded by bench/run.py first,
-- so this measures spends, not refusals.
\set uid random(1, :users)
\set key random(1, 9000000000000000000)
SELECT status FROM ledger.debit('bench-' || :uid, 'k' || :key, 1, 'bench debit', '{}');
