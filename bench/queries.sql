-- The queries the benchmarks run, by name (loaded like sql/queries.sql).

-- bench/verify.py: the ledger's and the history's rows of one load run's accounts.

-- name: bank_entries
SELECT user_id, entry_id, idempotency_key, kind, amount, available_delta, reserved_delta, reservation_id
FROM ledger.entries
WHERE user_id = ANY(%(users)s);

-- name: bank_accounts
SELECT user_id, available, reserved, last_seq
FROM ledger.accounts
WHERE user_id = ANY(%(users)s);

-- name: bank_history
SELECT entry_id
FROM audit.entries
WHERE user_id = ANY(%(users)s);

-- bench/run.py: how many bench accounts bench/fund.sql funded.
-- name: funded_accounts
SELECT count(*) FROM ledger.accounts WHERE user_id LIKE 'bench-%' AND available > 0;

-- name: vacuum_analyze
VACUUM ANALYZE;
