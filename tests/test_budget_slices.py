"""Campaign budgets as sliced counters (rules.budget_slices): under a storm of
concurrent claims the budget is paid exactly, never more, the last points
once; a change of the budget gathers the slices back; what is left when a
campaign ends is reported. On both topologies (under Citus each slice is on the
shard of the users it serves)."""

from __future__ import annotations

import dataclasses
from datetime import datetime, timedelta, timezone

import pytest

from app.ledger import calls
from app.ledger.client import Ledger
from app.ledger.errors import InvalidArgument, Overloaded
from app.operations import citus
from tests.conftest import SETTINGS
from tests.ledger import unreconciled_accounts
from tests.test_earning import _together, act, campaign, rule


def _claim(conn, user: str, external_id: str) -> dict:
    """As a client does: a 503 (Overloaded, nothing written) is tried again."""
    for _ in range(20):
        try:
            return act(conn, user, external_id)
        except Overloaded:
            continue
    raise AssertionError(f"{user} was refused as overloaded every time")


def _report(conn, campaign_id: int):
    return Ledger(conn)(calls.budget_report(campaign_id))


def test_a_storm_of_claims_pays_the_budget_exactly_and_the_last_points_once(api_db, db, database):
    rule(api_db, "ad_view", fixed_points=10)
    promo = campaign(api_db, "storm", bonus_points=7, budget=1000)
    results = _together(database, lambda conn, i: [_claim(conn, f"user-{i}-{n}", f"imp-{i}-{n}") for n in range(15)],
                        count=16)
    claims = [r for batch in results for r in batch]
    assert len(claims) == 240 and all(r["status"] == "ok" and r["base_points"] == 10 for r in claims)
    paid = [r["campaign_points"] or 0 for r in claims]
    # 240 claims of 7 would be 1680: the budget bounds them, to the last point
    # (1000 is no multiple of 7, so some claim got less than 7, and said so).
    assert sum(paid) == 1000 and max(paid) == 7
    assert all(r["budget_exhausted"] for r in claims if (r["campaign_points"] or 0) < 7)
    report = _report(api_db, promo.campaign_id)
    assert (report.budget, report.awarded, report.left_points) == (1000, 1000, 0)
    # The ledger agrees: the campaign's points are in the entries, once each.
    credited = db.execute("SELECT sum((metadata->'earning'->>'campaign_points')::bigint) AS n FROM ledger.entries"
                          " WHERE metadata->'earning'->>'campaign_id' = %s", [str(promo.campaign_id)]).fetchone()
    assert credited["n"] == 1000
    assert unreconciled_accounts(db) == []


def test_a_new_budget_gathers_the_slices_and_keeps_what_was_paid(api_db):
    rule(api_db, "ad_view", fixed_points=10)
    promo = campaign(api_db, "growing", bonus_points=7, budget=10)
    assert [act(api_db, f"u{i}", f"imp-{i}")["campaign_points"] for i in range(3)] == [7, 3, None]
    with pytest.raises(InvalidArgument) as refused:
        Ledger(api_db)(calls.put_campaign("test", promo.campaign_id, "growing", promo.starts_at, promo.ends_at,
                                          bonus_points=7, budget=9))
    assert refused.value.field == "budget"
    Ledger(api_db)(calls.put_campaign("test", promo.campaign_id, "growing", promo.starts_at, promo.ends_at,
                                      bonus_points=7, budget=24))
    assert [act(api_db, f"v{i}", f"imp-v{i}")["campaign_points"] for i in range(3)] == [7, 7, None]
    report = _report(api_db, promo.campaign_id)
    assert (report.awarded, report.left_points) == (24, 0)


def test_what_is_left_when_a_campaign_ends_is_reported(api_db, db):
    rule(api_db, "ad_view", fixed_points=10)
    now = datetime.now(timezone.utc)
    promo = campaign(api_db, "short", starts=now - timedelta(hours=1), ends=now + timedelta(hours=1),
                     bonus_points=5, budget=1000)
    for i in range(4):
        assert act(api_db, f"u{i}", f"imp-{i}")["campaign_points"] == 5
    running = _report(api_db, promo.campaign_id)
    assert (running.ended, running.awarded, running.left_points) == (False, 20, 980)
    assert running.in_slices + running.unallocated == 980
    db.execute("UPDATE rules.campaigns SET ends_at = now() - interval '1 second' WHERE campaign_id = %s",
               [promo.campaign_id])
    ended = _report(api_db, promo.campaign_id)
    assert (ended.ended, ended.awarded, ended.left_points) == (True, 20, 980)
    assert _report(api_db, 10**9) is None


def test_a_split_shard_is_reported_until_its_anchors_are_placed(topology, api_db, db, database):
    if not topology.citus:
        pytest.skip("shards are split under Citus only (a single node's anchors are fixed ranges)")
    settings = dataclasses.replace(SETTINGS, database=database)
    assert citus.status(settings).budget_anchors_missing == 0
    shard = db.execute("""SELECT s.shardid, s.shardminvalue::integer AS lo, s.shardmaxvalue::integer AS hi,
                                 p.groupid FROM pg_dist_shard s JOIN pg_dist_placement p USING (shardid)
                          WHERE s.logicalrelid = 'ledger.accounts'::regclass ORDER BY 2 LIMIT 1""").fetchone()
    middle = (shard["lo"] + shard["hi"]) // 2
    node = db.execute("SELECT nodeid FROM pg_dist_node WHERE groupid = %s", [shard["groupid"]]).fetchone()["nodeid"]
    db.execute("SELECT citus_split_shard_by_split_points(%s, ARRAY[%s], ARRAY[%s, %s], 'block_writes')",
               [shard["shardid"], str(middle), node, node])
    state = citus.status(settings)
    assert state.budget_anchors_missing == 2 and "rewards cluster place-anchors" in state.problems[-1]
    assert citus.place_budget_anchors(settings) == 0
    assert citus.status(settings).problems == []
    # A user of each half claims on a budget: each draws from a slice on its own shard.
    rule(api_db, "ad_view", fixed_points=10)
    campaign(api_db, "after-split", bonus_points=5, budget=100)
    users = {}
    for n in range(2000):
        hashed = db.execute("SELECT hashtext(%s) AS h", [f"u{n}"]).fetchone()["h"]
        if shard["lo"] <= hashed <= shard["hi"]:
            users.setdefault(hashed <= middle, f"u{n}")
        if len(users) == 2:
            break
    assert [act(api_db, user, f"imp-{user}")["campaign_points"] for user in users.values()] == [5, 5]
