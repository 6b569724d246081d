-- Every query the Python code runs, by name. app/queries.py loads this file;
-- Python never builds SQL text. Parameters use psycopg's %(name)s style.

-- name: verify_chain
SELECT ok, entries_checked, first_broken_entry_id, first_broken_seq
FROM ledger.verify_chain(%(user_id)s);

-- name: expire_reservations
CALL ledger.expire_reservations(NULL, %(batch_size)s);
