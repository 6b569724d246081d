-- One verified action, as the API runs POST /v1/actions (app.ledger.actions):
-- on a single node one transaction, rules.act, which claims the action beside
-- its credit; under Citus (:distributed is 1, bench/run.py) two, the claim on
-- the action's shard (rules.claim_action) and then rules.act on the user's,
-- told it was claimed. The rules: ad_view, 10 points, daily and lifetime caps
-- it stays under, a 2x campaign in its window. For one of :users accounts, a
-- fresh external id and idempotency key each; pgbench counts one claim as one
-- transaction.
\set uid random(1, :users)
\set ext random(1, 9000000000000000000)
\if :distributed
SELECT rules.claim_action('bench-ads ' || :ext, 'bench-' || :uid);
\endif
SELECT status FROM rules.act('bench-' || :uid, 'a' || :ext, 'bench-ads', :ext::text, 'ad_view', NULL, NULL, '{}',
                             :distributed::boolean);
