"""Verified actions earn what the rules say (rules.act; under Citus after
rules.claim_action), on the real database as the API's role: fixed and per-unit
points, campaigns inside their window only, caps and budgets under concurrent
claims, once ever per (source, external id), and refusals that write only
their key."""

from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from datetime import datetime, timedelta, timezone

import psycopg
import pytest
from psycopg.rows import dict_row

from app.ledger import actions, calls
from app.ledger.client import Ledger
from app.ledger.errors import ClaimFirst, InvalidArgument
from app.ledger.results import ActionStatus
from tests.conftest import SETTINGS
from tests.ledger import balance, entries, row_counts, unreconciled_accounts

NOW = datetime.now(timezone.utc)


def act(conn, user, external_id, action_type="ad_view", source="adnet", value=None, key=None, occurred_at=None):
    """The steps the API takes (app.ledger.actions.earn), on one connection."""
    return asdict(actions.earn_on(Ledger(conn), user, key or f"k-{external_id}", source, external_id, action_type,
                                  value, occurred_at, {}))


def rule(conn, action_type, **fields):
    return Ledger(conn)(calls.put_rule("test", action_type, **fields))


def campaign(conn, name, starts=NOW - timedelta(hours=1), ends=NOW + timedelta(hours=1), **fields):
    return Ledger(conn)(calls.put_campaign("test", None, name, starts, ends, **fields))


def _together(database, work, count=20):
    """work(conn, i) on `count` connections at once, as the superuser: the API
    role's lock and statement bounds (sql/roles.sql) would refuse the queue a
    storm on one row makes on a loaded test machine."""
    conns = [psycopg.connect(SETTINGS.superuser_conninfo(database), autocommit=True, row_factory=dict_row)
             for _ in range(count)]
    try:
        with ThreadPoolExecutor(max_workers=count) as pool:
            return list(pool.map(lambda i: work(conns[i], i), range(count)))
    finally:
        for conn in conns:
            conn.close()


def test_a_fixed_rule_earns_its_points_and_says_why(api_db, db):
    rule(api_db, "ad_view", fixed_points=10)
    earned = act(api_db, "alice", "imp-1")
    assert earned["status"] == "ok" and earned["points"] == 10 and earned["rule"] == "ad_view"
    assert earned["base_points"] == 10 and earned["campaign_id"] is None and earned["capped"] is False
    entry = entries(db, "alice")[0]
    assert entry["amount"] == 10 and (entry["action_source"], entry["action_external_id"]) == ("adnet", "imp-1")
    assert entry["metadata"]["earning"]["rule"] == "ad_view"


def test_per_unit_points_round_down(api_db):
    rule(api_db, "purchase", points_per_unit=3, unit_value=100)  # 3 points per currency unit, in cents
    assert act(api_db, "alice", "o-1", "purchase", "store", value=1999)["points"] == 59  # 59.97
    assert act(api_db, "alice", "o-2", "purchase", "store", value=33)["status"] == "not_eligible"  # 0.99
    with pytest.raises(InvalidArgument) as refused:
        act(api_db, "alice", "o-3", "purchase", "store")
    assert refused.value.field == "value"


def test_a_rule_with_lot_terms_makes_each_credit_a_pending_and_expiring_lot(api_db, db):
    made = rule(api_db, "purchase", points_per_unit=1, unit_value=100, pending_seconds=3600, expiry_seconds=7200)
    assert (made.pending_seconds, made.expiry_seconds) == (3600, 7200)
    assert act(api_db, "alice", "o-1", "purchase", "store", value=500)["points"] == 5
    entry = entries(db, "alice")[0]
    assert (entry["kind"], entry["amount"], entry["available_delta"]) == ("credit", 5, 0)
    assert (balance(db, "alice")["available"], balance(db, "alice")["pending"]) == (0, 5)
    lot = db.execute("SELECT * FROM ledger.lots WHERE user_id = 'alice'").fetchone()
    assert lot["entry_id"] == entry["entry_id"] and not lot["matured"]
    assert (lot["available_at"] - lot["created_at"], lot["expires_at"] - lot["created_at"]) == (
        timedelta(hours=1), timedelta(hours=2))
    # a change of the terms applies to the next action, and is in the history
    rule(api_db, "purchase", points_per_unit=1, unit_value=100)
    act(api_db, "alice", "o-2", "purchase", "store", value=300)
    assert (balance(db, "alice")["available"], balance(db, "alice")["pending"]) == (3, 5)
    change = db.execute("SELECT before, after FROM rules.changes ORDER BY change_id DESC LIMIT 1").fetchone()
    assert (change["before"]["pending_seconds"], change["after"]["pending_seconds"]) == (3600, None)
    assert unreconciled_accounts(db) == []


def test_a_rule_may_make_pending_points_that_never_expire(api_db, db):
    made = rule(api_db, "purchase", fixed_points=7, pending_seconds=60)
    assert (made.pending_seconds, made.expiry_seconds) == (60, None)
    assert act(api_db, "alice", "o-1", "purchase", "store")["points"] == 7
    lot = db.execute("SELECT * FROM ledger.lots WHERE user_id = 'alice'").fetchone()
    assert (lot["amount"], lot["expires_at"], lot["matured"]) == (7, None, False)
    assert balance(db, "alice")["pending"] == 7


def test_no_rule_or_a_disabled_one_is_not_eligible_and_writes_only_the_key(api_db, db):
    rule(api_db, "ad_view", fixed_points=10)
    Ledger(api_db)(calls.enable_rule("test", "ad_view", False))
    before = row_counts(db)
    assert act(api_db, "alice", "imp-1")["status"] == "not_eligible"
    assert act(api_db, "alice", "imp-2", "unknown_type")["status"] == "not_eligible"
    after = row_counts(db)
    assert after["entries"] == before["entries"]
    assert after["idempotency_keys"] == before["idempotency_keys"] + 2
    assert db.execute("SELECT count(*) AS n FROM rules.earnings").fetchone()["n"] == 0
    # the change takes effect on the next request
    Ledger(api_db)(calls.enable_rule("test", "ad_view", True))
    assert act(api_db, "alice", "imp-3")["points"] == 10


def test_a_retry_replays_the_answer_and_another_key_earns_nothing_more(api_db, db):
    rule(api_db, "ad_view", fixed_points=10)
    campaign(api_db, "double", multiplier_percent=200)
    first = act(api_db, "alice", "imp-1", key="a")
    again = act(api_db, "alice", "imp-1", key="a")
    assert again == {**first, "replayed": True}
    assert act(api_db, "alice", "imp-1", key="b")["status"] == "action_already_credited"
    assert balance(db, "alice")["available"] == 20


def test_an_action_earns_once_ever_whoever_it_is_reported_for(api_db, db):
    rule(api_db, "ad_view", fixed_points=10)
    assert act(api_db, "alice", "imp-1")["status"] == "ok"
    assert act(api_db, "bob", "imp-1")["status"] == "action_claimed_by_another_user"
    assert balance(db, "bob")["available"] == 0
    assert db.execute("SELECT count(*) AS n FROM ledger.idempotency_keys WHERE user_id = 'bob'").fetchone()["n"] == 0


def _claims(db):
    return [(c["action_key"], c["user_id"]) for c in db.execute(
        "SELECT action_key, user_id FROM rules.action_claims ORDER BY action_key").fetchall()]


def test_act_claims_the_action_with_its_credit_on_a_single_node_and_asks_for_the_claim_under_citus(
        topology, api_db, db):
    rule(api_db, "ad_view", fixed_points=10)
    rule(api_db, "purchase", points_per_unit=1, unit_value=100)
    ledger = Ledger(api_db)
    if topology.citus:
        # The claim's row is on the action's shard: rules.act cannot take it,
        # and refuses to earn until the caller says it did.
        before = row_counts(db)
        with pytest.raises(ClaimFirst):
            ledger(calls.act("alice", "k-1", "adnet", "imp-1", "ad_view"))
        assert row_counts(db) == before and _claims(db) == []
        return
    # One call, one transaction: the claim commits with the credit...
    assert ledger(calls.act("alice", "k-1", "adnet", "imp-1", "ad_view")).points == 10
    assert _claims(db) == [("adnet imp-1", "alice")]
    # ...binds the action for every other user, whom it refuses writing nothing...
    before = row_counts(db)
    refused = ledger(calls.act("bob", "k-1", "adnet", "imp-1", "ad_view"))
    assert (refused.status, refused.available) == (ActionStatus.ACTION_CLAIMED_BY_ANOTHER_USER, None)
    assert row_counts(db) == before
    # ...and goes with its transaction when the call raises.
    with pytest.raises(InvalidArgument):
        ledger(calls.act("alice", "k-2", "store", "o-1", "purchase"))
    assert _claims(db) == [("adnet imp-1", "alice")]
    assert ledger(calls.act("bob", "k-2", "store", "o-1", "purchase", value=500)).points == 5


def test_a_storm_of_users_claiming_one_action_pays_one(api_db, db, database):
    rule(api_db, "ad_view", fixed_points=10)
    results = _together(database, lambda conn, i: act(conn, f"user-{i}", "imp-1"))
    assert [r["status"] for r in results].count("ok") == 1
    assert {r["status"] for r in results} == {"ok", "action_claimed_by_another_user"}
    assert db.execute("SELECT sum(available) AS s FROM ledger.accounts").fetchone()["s"] == 10


def test_a_multiplier_applies_only_inside_its_window(api_db):
    rule(api_db, "ad_view", fixed_points=10)
    campaign(api_db, "triple", starts=NOW - timedelta(days=2), ends=NOW - timedelta(days=1), multiplier_percent=300)
    outside = act(api_db, "alice", "imp-1")
    inside = act(api_db, "alice", "imp-2", occurred_at=NOW - timedelta(days=1, hours=12))
    assert (outside["points"], outside["campaign_id"]) == (10, None)
    assert (inside["points"], inside["campaign_points"]) == (30, 20)


def test_the_best_eligible_campaign_applies_by_type_and_source(api_db):
    rule(api_db, "ad_view", fixed_points=10)
    rule(api_db, "task", fixed_points=100)
    bonus = campaign(api_db, "bonus", bonus_points=5, action_types=["ad_view"])
    campaign(api_db, "other network", multiplier_percent=500, sources=["othernet"])
    half = campaign(api_db, "tasks", multiplier_percent=150, action_types=["task"])
    assert act(api_db, "alice", "imp-1")["campaign_id"] == bonus.campaign_id
    assert act(api_db, "alice", "t-1", "task")["points"] == 150
    assert act(api_db, "alice", "t-1", "task", key="other")["status"] == "action_already_credited"
    Ledger(api_db)(calls.enable_campaign("test", half.campaign_id, False))
    assert act(api_db, "alice", "t-2", "task")["points"] == 100


def test_caps_hold_under_concurrent_claims(api_db, db, database):
    rule(api_db, "ad_view", fixed_points=10, daily_cap=95, lifetime_cap=1000)
    results = _together(database, lambda conn, i: act(conn, "alice", f"imp-{i}"))
    paid = sorted(r["points"] for r in results if r["status"] == "ok")
    assert paid == [5] + [10] * 9  # the tenth is cut to what the day has left
    assert [r["status"] for r in results].count("cap_reached") == 10
    assert balance(db, "alice")["available"] == 95
    counters = db.execute("SELECT day_points, lifetime_points FROM rules.earnings WHERE user_id = 'alice'").fetchone()
    assert counters == {"day_points": 95, "lifetime_points": 95}
    assert unreconciled_accounts(db) == []


def test_a_new_day_starts_the_daily_cap_again_but_not_the_lifetime_one(api_db, db):
    rule(api_db, "ad_view", fixed_points=10, daily_cap=10, lifetime_cap=15)
    assert act(api_db, "alice", "imp-1")["points"] == 10
    assert act(api_db, "alice", "imp-2")["status"] == "cap_reached"
    db.execute("UPDATE rules.earnings SET day = day - 1 WHERE user_id = 'alice'")
    assert act(api_db, "alice", "imp-3")["points"] == 5
    assert act(api_db, "alice", "imp-4")["status"] == "cap_reached"


@pytest.mark.parametrize(("fields", "field"), [
    ({"fixed_points": 0}, "fixed_points"),
    ({"fixed_points": 5, "points_per_unit": 1, "unit_value": 100}, "fixed_points"),
    ({"points_per_unit": 1}, "unit_value"),
    ({"fixed_points": 5, "daily_cap": 0}, "daily_cap"),
    ({"fixed_points": 5, "pending_seconds": 0}, "pending_seconds"),
    ({"fixed_points": 5, "pending_seconds": 60, "expiry_seconds": 60}, "expiry_seconds"),
    ({"fixed_points": 5, "expiry_seconds": 400_000_000}, "expiry_seconds"),  # past max_lot_term
])
def test_a_bad_rule_is_refused_by_the_function(api_db, fields, field):
    with pytest.raises(InvalidArgument) as refused:
        rule(api_db, "ad_view", **fields)
    assert refused.value.field == field


@pytest.mark.parametrize("statement", [
    "INSERT INTO rules.rules (action_type, fixed_points, points_per_unit, unit_value) VALUES ('x', 5, 1, 1)",
    "INSERT INTO rules.rules (action_type) VALUES ('x')",
    "INSERT INTO rules.rules (action_type, fixed_points, pending_seconds, expiry_seconds) VALUES ('x', 5, 60, 30)",
    "INSERT INTO rules.campaigns (name, starts_at, ends_at, multiplier_percent) VALUES ('c', now(), now(), 200)",
    "INSERT INTO rules.campaigns (name, starts_at, ends_at, multiplier_percent, bonus_points)"
    " VALUES ('c', now(), now() + interval '1 day', 200, 5)",
    "INSERT INTO rules.campaigns (name, starts_at, ends_at, bonus_points, sources)"
    " VALUES ('c', now(), now() + interval '1 day', 5, ARRAY['bad source'])",
])
def test_the_tables_hold_the_same_rules_whatever_the_code_does(db, statement):
    with pytest.raises(psycopg.errors.CheckViolation):
        db.execute(statement)


def test_every_change_is_in_the_history_auditors_read(api_db, db):
    rule(api_db, "ad_view", fixed_points=10)
    rule(api_db, "ad_view", fixed_points=12)
    Ledger(api_db)(calls.enable_rule("test", "ad_view", False))
    Ledger(api_db)(calls.enable_rule("test", "ad_view", False))  # already so: nothing recorded
    db.execute("SET ROLE rewards_auditor")
    history = db.execute("SELECT * FROM rules.change_history ORDER BY change_id").fetchall()
    assert [(h["operation"], h["actor"]) for h in history] == [("create", "test"), ("change", "test"),
                                                               ("disable", "test")]
    assert history[0]["before"] is None and history[0]["after"]["fixed_points"] == 10
    assert (history[1]["before"]["fixed_points"], history[1]["after"]["fixed_points"]) == (10, 12)
    assert (history[2]["before"]["enabled"], history[2]["after"]["enabled"]) == (True, False)
    # Its table too (under Citus the view's shard is read as the auditor), and
    # writes nothing.
    assert len(db.execute("SELECT * FROM rules.changes").fetchall()) == 3
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        db.execute("UPDATE rules.changes SET actor = 'nobody'")


def test_the_api_role_cannot_rewrite_history_or_touch_the_earning_tables(api_db):
    rule(api_db, "ad_view", fixed_points=10)
    for statement in ("UPDATE rules.changes SET actor = 'nobody'", "DELETE FROM rules.changes",
                      "SELECT * FROM rules.earnings", "SELECT * FROM rules.action_claims",
                      "SELECT rules._claim_budget(1, 'alice', 10)"):
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            api_db.execute(statement)
