-- One balance read.
\set uid random(1, :users)
SELECT available FROM ledger.balance('bench-' || :uid);
