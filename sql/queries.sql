-- Every query the Python code runs, by name. app/queries.py loads this file;
-- Python never builds SQL text. Parameters use psycopg's %(name)s style, and
-- every argument is passed, so the server never expands defaults.

-- name: verify_chain
SELECT ok, entries_checked, first_broken_entry_id, first_broken_seq
FROM ledger.verify_chain(%(user_id)s);

-- name: expire_reservations
CALL ledger.expire_reservations(NULL, %(batch_size)s);

-- name: credit
SELECT * FROM ledger.credit(%(user_id)s, %(key)s, %(amount)s, %(reason)s,
                            %(action_source)s, %(action_external_id)s, %(metadata)s);

-- name: debit
SELECT * FROM ledger.debit(%(user_id)s, %(key)s, %(amount)s, %(reason)s, %(metadata)s);

-- name: reserve
SELECT * FROM ledger.reserve(%(user_id)s, %(key)s, %(amount)s, %(ttl_seconds)s,
                             %(reason)s, %(metadata)s);

-- name: commit_reservation
SELECT * FROM ledger.commit_reservation(%(user_id)s, %(key)s, %(reservation_id)s, %(amount)s,
                                        %(reason)s, %(metadata)s);

-- name: release_reservation
SELECT * FROM ledger.release_reservation(%(user_id)s, %(key)s, %(reservation_id)s,
                                         %(reason)s, %(metadata)s);

-- name: balance
SELECT * FROM ledger.balance(%(user_id)s);

-- name: entries_page
SELECT * FROM ledger.entries_page(%(user_id)s, %(before_seq)s, %(limit)s);

-- name: reservation
SELECT * FROM ledger.reservation(%(user_id)s, %(reservation_id)s);

-- name: authenticate
SELECT * FROM api.authenticate(%(secret_hash)s);

-- name: create_key
SELECT * FROM api.create_key(%(name)s, %(secret_hash)s, %(scopes)s);

-- name: list_keys
SELECT * FROM api.list_keys();

-- name: revoke_key
SELECT * FROM api.revoke_key(%(key_id)s);

-- name: ping
SELECT 1 AS ok;
