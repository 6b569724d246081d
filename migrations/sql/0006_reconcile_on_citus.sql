-- ===========================================================================
-- audit.reconcile on Citus (revision 0006)
--
-- It compared each account's ledger entries with its history rows in one
-- query, which Citus refuses ("direct joins between distributed and local
-- tables are not supported": ledger.* is distributed, audit.* is a plain table
-- on the coordinator), and checked the chain by calling ledger.verify_chain
-- once per account. Now one statement does the whole batch: one query per
-- ledger table gathers the batch's rows (pushed down to their shards, run
-- first as Citus subplans), and the comparisons run on those results beside
-- the history. The findings, their details and their order are the same as
-- before on a single node. Same signature, owner, grants and comment.
-- ===========================================================================

-- What is wrong with each of the given accounts: one row per finding, none
-- when all agree, in the order of the accounts given and, for each, in the
-- order below. Checks that the balance equals what its entries sum to and its
-- holds equal its open reservations, that its hash chain verifies (the rule of
-- ledger.verify_chain, entry by entry), and that the history holds exactly its
-- entries.
--
-- One statement for the whole batch, so that it plans on Citus too: the ledger
-- side is gathered by one query per table, each restricted to the batch's
-- users and so pushed down to their shards (the MATERIALIZED CTEs, which
-- Citus runs first as subplans), and only those results meet the history,
-- which is a plain table on the coordinator (Citus refuses a direct join of a
-- distributed table with a local one).
CREATE OR REPLACE FUNCTION audit.reconcile(p_user_ids text[])
RETURNS TABLE (user_id text, finding text, detail jsonb)
LANGUAGE plpgsql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN QUERY
    WITH batch AS (
        SELECT b.user_id, b.position FROM unnest(p_user_ids) WITH ORDINALITY AS b(user_id, position)
    ),
    -- The ledger side, one pushed-down query per table for the whole batch.
    accounts AS MATERIALIZED (
        SELECT a.user_id, a.available, a.reserved, a.lifetime_earned, a.last_seq, a.last_entry_hash
        FROM ledger.accounts a WHERE a.user_id = ANY (p_user_ids)
    ),
    entries AS MATERIALIZED (
        SELECT e.user_id, e.entry_id, e.seq, e.available_delta, e.reserved_delta, e.hash,
               CASE WHEN e.kind = 'credit' THEN e.amount ELSE 0 END AS earned,
               -- ledger.verify_chain's rule, entry by entry: its position, its link, its hash
               (e.seq <> row_number() OVER w
                OR e.prev_hash <> coalesce(lag(e.hash) OVER w,
                                           '\x0000000000000000000000000000000000000000000000000000000000000000'::bytea)
                OR e.hash <> ledger._entry_hash(e.prev_hash, ROW(
                       e.user_id, e.entry_id, e.seq, e.kind, e.amount, e.available_delta, e.reserved_delta,
                       e.available_after, e.reserved_after, e.reservation_id, e.reason, e.action_source,
                       e.action_external_id, e.metadata, e.idempotency_key, e.created_at, e.prev_hash,
                       e.hash)::ledger.entries)) AS broken
        FROM ledger.entries e WHERE e.user_id = ANY (p_user_ids)
        WINDOW w AS (PARTITION BY e.user_id ORDER BY e.seq)
    ),
    held AS MATERIALIZED (
        SELECT r.user_id, sum(r.amount) AS held
        FROM ledger.reservations r WHERE r.user_id = ANY (p_user_ids) AND r.status = 'open'
        GROUP BY r.user_id
    ),
    -- Everything below runs where the history is, on these results.
    sums AS (
        SELECT e.user_id, sum(e.available_delta) AS available, sum(e.reserved_delta) AS reserved,
               sum(e.earned) AS earned, max(e.seq) AS last_seq, count(*) AS entries,
               (array_agg(e.hash ORDER BY e.seq DESC))[1] AS last_hash,
               (array_agg(e.entry_id ORDER BY e.seq) FILTER (WHERE e.broken))[1] AS first_broken_entry_id,
               (array_agg(e.seq ORDER BY e.seq) FILTER (WHERE e.broken))[1] AS first_broken_seq
        FROM entries e GROUP BY e.user_id
    ),
    -- An id without an account row compares as NULLs, so it is reported too.
    findings AS (
        SELECT b.position, 1 AS kind, b.user_id, 'balance_differs_from_entries' AS finding,
               jsonb_build_object(
                   'account', jsonb_build_object('available', a.available, 'reserved', a.reserved,
                                                 'lifetime_earned', a.lifetime_earned, 'last_seq', a.last_seq),
                   'entries', jsonb_build_object('available', coalesce(s.available, 0),
                                                 'reserved', coalesce(s.reserved, 0),
                                                 'lifetime_earned', coalesce(s.earned, 0),
                                                 'last_seq', coalesce(s.last_seq, 0))) AS detail
        FROM batch b LEFT JOIN accounts a ON a.user_id = b.user_id LEFT JOIN sums s ON s.user_id = b.user_id
        WHERE (a.available, a.reserved, a.lifetime_earned, a.last_seq) IS DISTINCT FROM
              (coalesce(s.available, 0), coalesce(s.reserved, 0), coalesce(s.earned, 0), coalesce(s.last_seq, 0))
        UNION ALL
        SELECT b.position, 2, b.user_id, 'reserved_differs_from_open_reservations',
               jsonb_build_object('reserved', a.reserved, 'open_reservations', coalesce(h.held, 0))
        FROM batch b LEFT JOIN accounts a ON a.user_id = b.user_id LEFT JOIN held h ON h.user_id = b.user_id
        WHERE a.reserved IS DISTINCT FROM coalesce(h.held, 0)
        UNION ALL
        -- the first entry that breaks, or (ids NULL) an account head that is not its last entry
        SELECT b.position, 3, b.user_id, 'chain_broken',
               jsonb_build_object('first_broken_entry_id', s.first_broken_entry_id, 'first_broken_seq', s.first_broken_seq)
        FROM batch b LEFT JOIN accounts a ON a.user_id = b.user_id LEFT JOIN sums s ON s.user_id = b.user_id
        WHERE s.first_broken_seq IS NOT NULL
           OR (a.user_id IS NOT NULL AND (a.last_entry_hash, a.last_seq) IS DISTINCT FROM (
                  coalesce(s.last_hash, '\x0000000000000000000000000000000000000000000000000000000000000000'::bytea),
                  coalesce(s.entries, 0)))
        UNION ALL
        SELECT b.position, 4, b.user_id, 'entries_missing_from_history',
               jsonb_build_object('entry_ids', to_jsonb(m.entry_ids))
        FROM batch b CROSS JOIN LATERAL (
            SELECT array_agg(e.entry_id ORDER BY e.entry_id) AS entry_ids
            FROM entries e
            WHERE e.user_id = b.user_id AND NOT EXISTS (
                SELECT FROM audit.entries h
                WHERE h.user_id = e.user_id AND h.entry_id = e.entry_id AND h.hash = e.hash)) m
        WHERE m.entry_ids IS NOT NULL
        UNION ALL
        SELECT b.position, 5, b.user_id, 'history_rows_not_in_ledger',
               jsonb_build_object('entry_ids', to_jsonb(x.entry_ids))
        FROM batch b CROSS JOIN LATERAL (
            SELECT array_agg(h.entry_id ORDER BY h.entry_id) AS entry_ids
            FROM audit.entries h
            WHERE h.user_id = b.user_id AND NOT EXISTS (
                SELECT FROM entries e
                WHERE e.user_id = h.user_id AND e.entry_id = h.entry_id AND e.hash = h.hash)) x
        WHERE x.entry_ids IS NOT NULL
    )
    SELECT f.user_id, f.finding, f.detail FROM findings f ORDER BY f.position, f.kind;
END;
$$;
