-- One verified action per transaction pair, as the API runs POST /v1/actions:
-- bound to its user (rules.claim_action, on the action's shard), then earned
-- by the rules (rules.act, on the user's shard: the rule, its caps, the
-- campaign in its window), for one of :users accounts, a fresh external id
-- and idempotency key each. pgbench counts the pair as one transaction.
\set uid random(1, :users)
\set ext random(1, 9000000000000000000)
SELECT rules.claim_action('bench-ads ' || :ext, 'bench-' || :uid);
SELECT status FROM rules.act('bench-' || :uid, 'a' || :ext, 'bench-ads', :ext::text, 'ad_view', NULL, NULL, '{}');
