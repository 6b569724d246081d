from tests.ledger import balance, credit, debit, entries, row_counts


def test_debit_spends_available_points(db):
    credit(db, "alice", "c1", 100)
    result = debit(db, "alice", "d1", 30)
    assert (result["status"], result["amount"], result["available"]) == ("ok", 30, 70)
    assert [e["kind"] for e in entries(db, "alice")] == ["credit", "debit"]
    assert balance(db, "alice")["lifetime_earned"] == 100


def test_debit_of_more_than_available_is_refused_without_an_entry(db):
    credit(db, "alice", "c1", 100)
    refused = debit(db, "alice", "d1", 101)
    assert refused["status"] == "insufficient_points"
    assert refused["entry_id"] is None
    assert refused["available"] == 100
    assert len(entries(db, "alice")) == 1
    assert balance(db, "alice")["available"] == 100


def test_debit_can_spend_to_exactly_zero(db):
    credit(db, "alice", "c1", 100)
    assert debit(db, "alice", "d1", 100)["available"] == 0
    assert debit(db, "alice", "d2", 1)["status"] == "insufficient_points"


def test_a_refused_debit_replays_as_refused_even_after_funding(db):
    refused = debit(db, "alice", "d1", 10)
    credit(db, "alice", "c1", 100)
    before = row_counts(db)
    assert debit(db, "alice", "d1", 10) == refused | {"replayed": True}
    assert row_counts(db) == before


def test_a_debit_replays_from_its_entry_and_another_request_under_its_key_is_refused(db):
    credit(db, "alice", "c1", 100)
    first = debit(db, "alice", "d1", 30)
    before = row_counts(db)
    assert debit(db, "alice", "d1", 30) == first | {"replayed": True}
    assert debit(db, "alice", "d1", 31)["status"] == "idempotency_key_reused"
    assert debit(db, "alice", "d1", 30, reason="other")["status"] == "idempotency_key_reused"
    assert credit(db, "alice", "d1", 30)["status"] == "idempotency_key_reused"
    assert row_counts(db) == before and before["idempotency_keys"] == 0  # the entry is the record
