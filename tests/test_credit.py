from tests.ledger import balance, credit, entries, row_counts


def test_credit_adds_points_and_returns_the_entry(db):
    result = credit(db, "alice", "k1", 100, metadata={"campaign": "spring"})

    assert result["status"] == "ok"
    assert result["replayed"] is False
    assert (result["amount"], result["available"], result["reserved"]) == (100, 100, 0)
    [entry] = entries(db, "alice")
    assert entry["entry_id"] == result["entry_id"]
    assert (entry["kind"], entry["seq"], entry["available_after"]) == ("credit", 1, 100)
    assert entry["metadata"] == {"campaign": "spring"}
    assert balance(db, "alice") | {"updated_at": None} == {
        "user_id": "alice", "available": 100, "reserved": 0, "lifetime_earned": 100,
        "last_seq": 1, "updated_at": None, "pending": 0, "next_expiry_at": None, "next_expiry_amount": None,
        "owed": 0,
    }


def test_replay_returns_the_original_result_and_writes_nothing(db):
    first = credit(db, "alice", "k1", 100)
    credit(db, "alice", "k2", 5)
    before = row_counts(db)

    again = credit(db, "alice", "k1", 100)

    assert again == first | {"replayed": True}
    assert row_counts(db) == before
    assert balance(db, "alice")["available"] == 105


def test_same_key_with_a_different_request_is_refused_and_writes_nothing(db):
    credit(db, "alice", "k1", 100)
    before = row_counts(db)

    for changed in (
        credit(db, "alice", "k1", 101),
        credit(db, "alice", "k1", 100, reason="other"),
        credit(db, "alice", "k1", 100, metadata={"x": 1}),
        credit(db, "alice", "k1", 100, source="adnet", external_id="imp-1"),
    ):
        assert changed["status"] == "idempotency_key_reused"
        assert changed["entry_id"] is None
        assert changed["available"] == 100
    assert row_counts(db) == before


def test_key_reuse_across_operations_is_refused(db):
    credit(db, "alice", "k1", 100)
    refused = db.execute("SELECT * FROM ledger.debit('alice', 'k1', 100, 'ad view', '{}')").fetchone()
    assert refused["status"] == "idempotency_key_reused"
    assert balance(db, "alice")["available"] == 100


def test_keys_belong_to_their_user(db):
    assert credit(db, "alice", "shared-key", 10)["status"] == "ok"
    assert credit(db, "bob", "shared-key", 20)["status"] == "ok"
    assert balance(db, "bob")["available"] == 20


def test_a_verified_action_earns_once_whatever_the_key(db):
    first = credit(db, "alice", "k1", 50, source="adnet", external_id="impression-9")
    before = row_counts(db)

    second = credit(db, "alice", "k2", 50, source="adnet", external_id="impression-9")

    assert first["status"] == "ok"
    assert second["status"] == "action_already_credited"
    assert second["entry_id"] is None
    assert balance(db, "alice")["available"] == 50
    after = row_counts(db)
    assert after["entries"] == before["entries"]
    # The refusal is remembered under its key, so its retry answers the same.
    assert credit(db, "alice", "k2", 50, source="adnet", external_id="impression-9") == second | {"replayed": True}


def test_the_same_action_for_another_user_or_source_is_its_own(db):
    assert credit(db, "alice", "k1", 50, source="adnet", external_id="e1")["status"] == "ok"
    assert credit(db, "bob", "k1", 50, source="adnet", external_id="e1")["status"] == "ok"
    assert credit(db, "alice", "k2", 50, source="store", external_id="e1")["status"] == "ok"


def test_balance_of_an_unknown_user_is_zero_and_creates_nothing(db):
    before = row_counts(db)
    assert balance(db, "nobody") == {
        "user_id": "nobody", "available": 0, "reserved": 0, "lifetime_earned": 0,
        "last_seq": 0, "updated_at": None, "pending": 0, "next_expiry_at": None, "next_expiry_amount": None,
        "owed": 0,
    }
    assert row_counts(db) == before


def test_entries_page_walks_newest_first_by_keyset(db):
    for i in range(7):
        credit(db, "alice", f"k{i}", i + 1)
    pages, before = [], None
    while True:
        page = db.execute("SELECT * FROM ledger.entries_page('alice', %s, 3)", (before,)).fetchall()
        if not page:
            break
        pages.append([row["amount"] for row in page])
        before = page[-1]["seq"]
    assert pages == [[7, 6, 5], [4, 3, 2], [1]]
