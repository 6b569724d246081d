"""Pending and expiring points: a credit with terms makes a lot; redemptions
spend the soonest-expiring points first; the settlement job matures pending
lots and lapses what is left of expired ones, as ledger entries."""

from __future__ import annotations

import re

import psycopg
import pytest

from app.ledger import calls
from app.ledger.client import Ledger
from tests.conftest import SETTINGS
from tests.ledger import (
    age_lots,
    balance,
    commit,
    credit,
    debit,
    entries,
    release,
    reserve,
    unreconciled_accounts,
    violated_constraint,
)


def _lots(db: psycopg.Connection, user: str) -> list[tuple[int, int, bool]]:
    return [(r["amount"], r["remaining"], r["matured"]) for r in db.execute(
        "SELECT amount, remaining, matured FROM ledger.lots WHERE user_id = %s ORDER BY lot_id", (user,))]


def _settle(db: psycopg.Connection, batch_size: int = 100) -> int:
    """The job's own command, by the call `rewards ledger settle` makes."""
    return Ledger(db)(calls.settle_lots(batch_size)).settled


def _reconciled(db: psycopg.Connection, user: str) -> None:
    assert unreconciled_accounts(db) == []
    assert db.execute("SELECT * FROM audit.reconcile(ARRAY[%s]::text[], ARRAY[0]::bigint[])"
                      " WHERE finding <> 'entries_missing_from_history'", (user,)).fetchall() == []
    assert db.execute("SELECT ok FROM ledger.verify_chain(%s)", (user,)).fetchone()["ok"]


def test_a_plain_credit_makes_no_lot(db):
    credit(db, "alice", "c1", 100)
    assert _lots(db, "alice") == []
    assert balance(db, "alice") | {"updated_at": None} == {
        "user_id": "alice", "available": 100, "reserved": 0, "lifetime_earned": 100, "last_seq": 1,
        "updated_at": None, "pending": 0, "next_expiry_at": None, "next_expiry_amount": None,
        "owed": 0}


def test_pending_points_show_and_cannot_be_spent_until_they_mature(db):
    credit(db, "alice", "c1", 30)
    done = credit(db, "alice", "c2", 70, pending=3600)
    assert (done["status"], done["available"]) == ("ok", 30)
    assert (balance(db, "alice")["available"], balance(db, "alice")["pending"]) == (30, 70)
    assert reserve(db, "alice", "r1", 31)["status"] == "insufficient_points"
    assert debit(db, "alice", "d1", 31)["status"] == "insufficient_points"
    assert _settle(db) == 0

    age_lots(db, "alice", 3600)
    assert _settle(db) == 1
    after = balance(db, "alice")
    assert (after["available"], after["pending"], after["lifetime_earned"]) == (100, 0, 100)
    assert [e["kind"] for e in entries(db, "alice")][-1] == "mature"
    assert _lots(db, "alice") == [(70, 0, True)]  # no expiry: plain available points now
    assert debit(db, "alice", "d2", 100)["status"] == "ok"
    _reconciled(db, "alice")


def test_a_redemption_matures_its_own_due_points_first(db):
    credit(db, "alice", "c1", 50, pending=60)
    age_lots(db, "alice", 60)
    assert debit(db, "alice", "d1", 50)["status"] == "ok"
    assert [e["kind"] for e in entries(db, "alice")] == ["credit", "mature", "debit"]
    _reconciled(db, "alice")


def test_redemptions_spend_the_soonest_expiry_first_across_lots(db):
    credit(db, "alice", "plain", 100)
    credit(db, "alice", "late", 40, expiry=3 * 86400)
    credit(db, "alice", "soon", 30, expiry=86400)
    credit(db, "alice", "middle", 20, expiry=2 * 86400)
    assert balance(db, "alice")["next_expiry_amount"] == 30

    assert debit(db, "alice", "d1", 45)["status"] == "ok"       # all of soon, 15 of middle
    assert _lots(db, "alice") == [(40, 40, True), (30, 0, True), (20, 5, True)]
    held = reserve(db, "alice", "r1", 60)                          # 5 of middle, all of late, 15 plain
    assert _lots(db, "alice") == [(40, 0, True), (30, 0, True), (20, 0, True)]
    assert balance(db, "alice")["next_expiry_at"] is None
    commit(db, "alice", "k1", held["reservation_id"], 20)          # spends middle's 5 and 15 of late
    assert _lots(db, "alice") == [(40, 25, True), (30, 0, True), (20, 0, True)]
    assert balance(db, "alice") | {"updated_at": None, "next_expiry_at": None} == {
        "user_id": "alice", "available": 125, "reserved": 0, "lifetime_earned": 190, "last_seq": 7,
        "updated_at": None, "pending": 0, "next_expiry_at": None, "next_expiry_amount": 25, "owed": 0}
    _reconciled(db, "alice")


def test_a_released_hold_gives_its_points_back_to_their_lots(db):
    credit(db, "alice", "plain", 10)
    credit(db, "alice", "lot", 50, expiry=86400)
    held = reserve(db, "alice", "r1", 55)
    assert _lots(db, "alice") == [(50, 0, True)]
    release(db, "alice", "k1", held["reservation_id"])
    assert _lots(db, "alice") == [(50, 50, True)]
    assert balance(db, "alice")["next_expiry_amount"] == 50
    _reconciled(db, "alice")


def test_the_remainder_of_an_expired_lot_lapses_and_the_rest_stays(db):
    credit(db, "alice", "plain", 100)
    credit(db, "alice", "old", 50, expiry=60)
    assert debit(db, "alice", "d1", 20)["status"] == "ok"          # from the lot: 30 left in it
    age_lots(db, "alice", 61)
    assert _settle(db) == 1
    assert _settle(db) == 0
    after = balance(db, "alice")
    assert (after["available"], after["next_expiry_at"]) == (100, None)
    lapse = entries(db, "alice")[-1]
    assert (lapse["kind"], lapse["amount"], lapse["idempotency_key"]) == ("lapse", 30, None)
    assert _lots(db, "alice") == [(50, 0, True)]
    _reconciled(db, "alice")


def test_a_pending_lot_with_an_expiry_matures_then_lapses(db):
    credit(db, "alice", "c1", 40, pending=60, expiry=120)
    age_lots(db, "alice", 90)
    assert _settle(db) == 1
    assert (balance(db, "alice")["available"], balance(db, "alice")["next_expiry_amount"]) == (40, 40)
    age_lots(db, "alice", 30)
    assert _settle(db) == 1
    assert [e["kind"] for e in entries(db, "alice")] == ["credit", "mature", "lapse"]
    assert balance(db, "alice")["available"] == 0
    _reconciled(db, "alice")


def test_a_debit_never_spends_points_past_their_expiry(db):
    credit(db, "alice", "c1", 50, expiry=60)
    age_lots(db, "alice", 61)
    assert debit(db, "alice", "d1", 10)["status"] == "insufficient_points"
    assert [e["kind"] for e in entries(db, "alice")] == ["credit", "lapse"]
    _reconciled(db, "alice")


def test_a_retry_of_a_credit_with_terms_replays_and_other_terms_are_another_request(db):
    first = credit(db, "alice", "c1", 10, pending=60)
    assert credit(db, "alice", "c1", 10, pending=60) == first | {"replayed": True}
    assert credit(db, "alice", "c1", 10, pending=61)["status"] == "idempotency_key_reused"
    assert credit(db, "alice", "c1", 10)["status"] == "idempotency_key_reused"
    assert len(_lots(db, "alice")) == 1


def test_the_settlement_works_in_batches_across_accounts(db):
    for n in range(7):
        credit(db, f"user{n}", "c1", 5, pending=60)
        age_lots(db, f"user{n}", 60)
    assert _settle(db, batch_size=2) == 7
    assert db.execute("SELECT sum(available) AS s, sum(pending) AS p FROM ledger.accounts").fetchone() == {
        "s": 35, "p": 0}
    assert unreconciled_accounts(db) == []


@pytest.mark.parametrize("change, constraint", [
    ("UPDATE ledger.accounts SET expiring = available + 1", "accounts_counters_valid"),
    ("UPDATE ledger.lots SET remaining = amount + 1", "lots_remaining"),
    ("UPDATE ledger.lots SET matured = false, remaining = 0", "lots_pending_whole"),
    ("UPDATE ledger.lots SET expires_at = available_at", "lots_terms"),
])
def test_the_tables_hold_the_lot_rules_whatever_the_code_does(db, change, constraint):
    credit(db, "alice", "c1", 10, expiry=60)
    with pytest.raises(psycopg.errors.CheckViolation) as refused:
        db.execute(change)
    # under Citus the shard's copy of the constraint, with the shard's number
    assert re.fullmatch(rf"{constraint}(_\d+)?", violated_constraint(refused.value))


def test_the_migration_schedules_the_settlement_every_minute():
    with psycopg.connect(SETTINGS.superuser_conninfo(), autocommit=True) as cron:
        job = cron.execute("SELECT schedule, command FROM cron.job WHERE jobname = 'rewards-settle-lots'").fetchone()
    assert job == ("* * * * *", "CALL ledger.settle_lots()")
