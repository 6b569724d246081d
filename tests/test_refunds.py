"""Refunds of verified actions (ledger.refund): pending points cancelled,
available ones taken back from the action's own lot first, spent ones owed and
paid off by later credits (or written off, by the setting), each part an entry
naming the action; retries replay, refusals write only their key; balance ==
sum of entries and the reconciler agrees throughout."""

from __future__ import annotations

from dataclasses import asdict

import psycopg
import pytest

from app.ledger import calls
from app.ledger.client import Ledger
from app.ledger.errors import InvalidArgument, Refused
from tests.ledger import (
    age_lots,
    balance,
    credit,
    debit,
    entries,
    release,
    reserve,
    row_counts,
    tamper,
    unreconciled_accounts,
)


def refund(conn, user, key, external_id, source="store", reason="returned", metadata=None):
    return asdict(Ledger(conn)(calls.refund(user, key, source, external_id, reason, metadata)))


def _lots(db, user):
    return [(r["amount"], r["remaining"]) for r in db.execute(
        "SELECT amount, remaining FROM ledger.lots WHERE user_id = %s ORDER BY lot_id", (user,))]


def _refund_entries(db, user):
    return [(e["kind"], e["amount"], e["available_delta"]) for e in entries(db, user)
            if e["kind"] in ("cancel", "reversal", "owed", "write_off", "repay")]


def _reconciled(db, user):
    assert unreconciled_accounts(db) == []
    assert db.execute("SELECT * FROM audit.reconcile(ARRAY[%s]::text[], ARRAY[0]::bigint[])"
                      " WHERE finding <> 'entries_missing_from_history'", (user,)).fetchall() == []
    assert db.execute("SELECT ok FROM ledger.verify_chain(%s)", (user,)).fetchone()["ok"]


def test_a_refund_of_pending_points_cancels_them_for_good(db):
    credit(db, "alice", "c1", 10)
    credit(db, "alice", "c2", 40, source="store", external_id="o-1", pending=3600)
    done = refund(db, "alice", "r1", "o-1")
    assert (done["status"], done["amount"], done["available"]) == ("ok", 40, 10)
    assert (balance(db, "alice")["pending"], balance(db, "alice")["owed"]) == (0, 0)
    cancel = entries(db, "alice")[-1]
    assert (cancel["kind"], cancel["amount"], cancel["available_delta"]) == ("cancel", 40, 0)
    assert (cancel["action_source"], cancel["action_external_id"]) == ("store", "o-1")
    assert cancel["metadata"]["refund_of_entry_id"] == entries(db, "alice")[1]["entry_id"]
    age_lots(db, "alice", 7200)
    assert Ledger(db)(calls.settle_lots(100)).settled == 0  # the closed lot never matures
    assert balance(db, "alice")["available"] == 10
    _reconciled(db, "alice")


def test_a_refund_takes_back_the_actions_own_lot_first_then_in_spending_order(db):
    credit(db, "alice", "c1", 50, expiry=3600)                                        # soonest expiry
    credit(db, "alice", "c2", 40, source="store", external_id="o-1", expiry=7200)     # the refunded one
    credit(db, "alice", "c3", 10)                                                     # no expiry
    debit(db, "alice", "d1", 20)  # from the soonest lot
    assert _lots(db, "alice") == [(50, 30), (40, 40)]
    done = refund(db, "alice", "r1", "o-1")
    assert (done["amount"], done["available"]) == (40, 40)
    assert _lots(db, "alice") == [(50, 30), (40, 0)]  # its own points, not the soonest lot's
    assert _refund_entries(db, "alice") == [("reversal", 40, -40)]
    debit(db, "alice", "d2", 35)  # the soonest lot's 30, then 5 without expiry
    credit(db, "alice", "c4", 20, source="store", external_id="o-2", expiry=7200)
    debit(db, "alice", "d3", 15)  # 15 of the new lot
    refund(db, "alice", "r2", "o-2")  # its own 5, then 5 without expiry, then 10 owed
    assert _lots(db, "alice")[2] == (20, 0)
    assert (balance(db, "alice")["available"], balance(db, "alice")["owed"]) == (0, 10)
    _reconciled(db, "alice")


def test_a_refund_of_a_plain_credit_takes_points_without_expiry_before_any_lot(db):
    credit(db, "alice", "c1", 30, source="store", external_id="o-1")
    credit(db, "alice", "c2", 50, expiry=3600)
    debit(db, "alice", "d1", 20)  # from the lot
    refund(db, "alice", "r1", "o-1")
    assert _lots(db, "alice") == [(50, 30)]
    assert (balance(db, "alice")["available"], balance(db, "alice")["next_expiry_amount"]) == (30, 30)
    _reconciled(db, "alice")


def test_points_already_spent_are_owed_and_later_credits_pay_them_off_first(db):
    credit(db, "alice", "c1", 100, source="store", external_id="o-1")
    debit(db, "alice", "d1", 90)
    done = refund(db, "alice", "r1", "o-1")
    assert (done["status"], done["amount"], done["available"], done["reserved"]) == ("ok", 100, 0, 0)
    assert _refund_entries(db, "alice") == [("reversal", 10, -10), ("owed", 90, 0)]
    assert balance(db, "alice")["owed"] == 90
    _reconciled(db, "alice")

    paid = credit(db, "alice", "c2", 50)
    assert (paid["status"], paid["amount"], paid["available"]) == ("ok", 50, 0)
    assert credit(db, "alice", "c2", 50) == paid | {"replayed": True}  # the same answer again
    assert (balance(db, "alice")["available"], balance(db, "alice")["owed"]) == (0, 40)
    credit(db, "alice", "c3", 30, expiry=3600)  # from its lot
    assert _lots(db, "alice") == [(30, 0)]
    credit(db, "alice", "c4", 25, pending=3600)  # pays once it matures
    assert (balance(db, "alice")["pending"], balance(db, "alice")["owed"]) == (25, 10)
    age_lots(db, "alice", 3601)
    assert Ledger(db)(calls.settle_lots(100)).settled == 1
    assert (balance(db, "alice")["available"], balance(db, "alice")["owed"]) == (15, 0)
    assert [k for k, _, _ in _refund_entries(db, "alice")] == ["reversal", "owed", "repay", "repay", "repay"]
    _reconciled(db, "alice")


@pytest.mark.parametrize("shortfall", ["owe", "write_off"])
def test_points_a_reservation_holds_are_not_refunded_as_spent(db, shortfall):
    """Held points come back when the hold is released: owed or written off at
    the refund, they would be counted twice. The refund is refused, writing
    nothing (not even its key), and the same request succeeds after."""
    db.execute("UPDATE ledger.settings SET refund_shortfall = %s", (shortfall,))
    credit(db, "alice", "c1", 100, source="store", external_id="o-1", expiry=3600)
    held = reserve(db, "alice", "h1", 60)
    before = row_counts(db)
    with pytest.raises(Refused, match="60 of the points to refund are held by open reservations"):
        refund(db, "alice", "r1", "o-1")
    assert row_counts(db) == before
    release(db, "alice", "h2", held["reservation_id"])
    done = refund(db, "alice", "r1", "o-1")
    assert (done["status"], done["amount"], done["available"], done["replayed"]) == ("ok", 100, 0, False)
    assert _refund_entries(db, "alice") == [("reversal", 100, -100)]
    assert (balance(db, "alice")["owed"], _lots(db, "alice")) == (0, [(100, 0)])
    _reconciled(db, "alice")


def test_with_write_off_the_loss_is_recorded_and_nothing_owed(db):
    db.execute("UPDATE ledger.settings SET refund_shortfall = 'write_off'")
    credit(db, "alice", "c1", 100, source="store", external_id="o-1")
    debit(db, "alice", "d1", 80)
    done = refund(db, "alice", "r1", "o-1")
    assert (done["amount"], done["available"]) == (100, 0)
    assert _refund_entries(db, "alice") == [("reversal", 20, -20), ("write_off", 80, 0)]
    assert balance(db, "alice")["owed"] == 0
    assert credit(db, "alice", "c2", 10)["available"] == 10
    _reconciled(db, "alice")
    with pytest.raises(psycopg.errors.CheckViolation):
        db.execute("UPDATE ledger.settings SET refund_shortfall = 'forgive'")


def test_a_retry_replays_and_refusals_write_only_their_key(db):
    credit(db, "alice", "c1", 100, source="store", external_id="o-1")
    first = refund(db, "alice", "r1", "o-1")
    before = row_counts(db)
    assert refund(db, "alice", "r1", "o-1") == first | {"replayed": True}
    assert refund(db, "alice", "r1", "o-1", reason="other")["status"] == "idempotency_key_reused"
    assert row_counts(db) == before
    for key, external_id, source, status in (("r2", "o-1", "store", "action_already_refunded"),
                                             ("r3", "o-2", "store", "action_not_found"),
                                             ("r4", "o-1", "adnet", "action_not_found")):
        refused = refund(db, "alice", key, external_id, source)
        assert (refused["status"], refused["entry_id"], refused["available"]) == (status, None, 0)
        assert refund(db, "alice", key, external_id, source) == refused | {"replayed": True}
    assert row_counts(db) == before | {"idempotency_keys": before["idempotency_keys"] + 3}
    _reconciled(db, "alice")


def test_points_that_lapsed_are_not_taken_back_again(db):
    credit(db, "alice", "c1", 40, source="store", external_id="o-1", expiry=3600)
    credit(db, "alice", "c2", 40, source="store", external_id="o-2", expiry=3600)
    debit(db, "alice", "d1", 30)  # 30 of the first lot
    age_lots(db, "alice", 3601)
    refused = refund(db, "alice", "r1", "o-2")  # settles first: both lots lapse
    assert (refused["status"], balance(db, "alice")["available"]) == ("action_points_expired", 0)
    done = refund(db, "alice", "r2", "o-1")  # earned 40, 10 lapsed: 30 spent, owed
    assert (done["status"], done["amount"], balance(db, "alice")["owed"]) == ("ok", 30, 30)
    _reconciled(db, "alice")


def test_an_invalid_refund_raises_and_writes_nothing(db):
    before = row_counts(db)
    for source, external_id, field in (("bad source", "o-1", "action_source"), ("store", "", "action_external_id")):
        with pytest.raises(InvalidArgument) as refused:
            refund(db, "alice", "r1", external_id, source)
        assert refused.value.field == field
    assert row_counts(db) == before


def test_the_reconciler_sees_owed_points_that_no_entry_explains(db):
    credit(db, "alice", "c1", 10, source="store", external_id="o-1")
    debit(db, "alice", "d1", 10)
    refund(db, "alice", "r1", "o-1")
    tamper(db, "UPDATE ledger.accounts SET owed = 0 WHERE user_id = 'alice'")
    found = db.execute("SELECT finding, detail FROM audit.reconcile(ARRAY['alice']::text[], ARRAY[0]::bigint[])"
                       " WHERE finding = 'balance_differs_from_entries'").fetchone()
    assert (found["detail"]["account"]["owed"], found["detail"]["entries"]["owed"]) == (0, 10)


def test_a_refunds_part_must_name_the_action(db):
    """entries_well_formed: a reversal without its action is no entry."""
    shape = ("SELECT ledger._entry_well_formed('reversal', 1, 5, -5, 0, NULL::bigint, %s::text, %s::text,"
             " NULL::text, decode(repeat('00', 32), 'hex'), decode(repeat('00', 32), 'hex')) AS ok")
    assert db.execute(shape, ("store", "o-1")).fetchone()["ok"] is True
    assert db.execute(shape, (None, None)).fetchone()["ok"] is False
