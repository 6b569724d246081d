-- One credit per transaction, to one of :users accounts, with a fresh idempotency key.
\set uid random(1, :users)
\set key random(1, 9000000000000000000)
SELECT status FROM ledger.credit('bench-' || :uid, 'k' || :key, 10, 'bench credit', NULL, NULL, '{}', NULL, NULL);
