import time

from tests.ledger import balance, commit, credit, entries, release, reserve, row_counts


def _funded(db, amount=100):
    credit(db, "alice", "fund", amount)


def _state(db, reservation_id):
    return db.execute("SELECT * FROM ledger.reservation('alice', %s)", (reservation_id,)).fetchone()


def test_reserve_moves_points_from_available_to_reserved(db):
    _funded(db)
    held = reserve(db, "alice", "r1", 40, ttl=60)
    assert (held["status"], held["available"], held["reserved"]) == ("ok", 60, 40)
    assert held["reservation_id"] is not None
    assert held["expires_at"] is not None
    state = _state(db, held["reservation_id"])
    assert (state["status"], state["amount"], state["expires_at"]) == ("open", 40, held["expires_at"])


def test_reserve_more_than_available_is_refused(db):
    _funded(db, 10)
    before = row_counts(db)
    refused = reserve(db, "alice", "r1", 11)
    assert refused["status"] == "insufficient_points"
    assert refused["reservation_id"] is None
    after = row_counts(db)
    assert (after["reservations"], after["entries"]) == (before["reservations"], before["entries"])


def test_commit_spends_the_whole_hold(db):
    _funded(db)
    held = reserve(db, "alice", "r1", 40)
    done = commit(db, "alice", "c1", held["reservation_id"])
    assert (done["status"], done["amount"], done["available"], done["reserved"]) == ("ok", 40, 60, 0)
    state = _state(db, held["reservation_id"])
    assert (state["status"], state["committed_amount"]) == ("committed", 40)
    assert state["ended_at"] is not None


def test_commit_for_less_returns_the_rest(db):
    _funded(db)
    held = reserve(db, "alice", "r1", 40)
    done = commit(db, "alice", "c1", held["reservation_id"], 25)
    assert (done["amount"], done["available"], done["reserved"]) == (25, 75, 0)
    last = entries(db, "alice")[-1]
    assert (last["kind"], last["amount"], last["available_delta"], last["reserved_delta"]) == ("commit", 25, 15, -40)


def test_commit_for_more_than_held_is_refused(db):
    _funded(db)
    held = reserve(db, "alice", "r1", 40)
    refused = commit(db, "alice", "c1", held["reservation_id"], 41)
    assert refused["status"] == "amount_exceeds_reservation"
    assert _state(db, held["reservation_id"])["status"] == "open"
    assert balance(db, "alice")["reserved"] == 40


def test_release_returns_the_hold(db):
    _funded(db)
    held = reserve(db, "alice", "r1", 40)
    done = release(db, "alice", "x1", held["reservation_id"])
    assert (done["status"], done["available"], done["reserved"]) == ("ok", 100, 0)
    assert _state(db, held["reservation_id"])["status"] == "released"


def test_a_reservation_ends_exactly_once(db):
    _funded(db)
    held = reserve(db, "alice", "r1", 40)
    rid = held["reservation_id"]
    commit(db, "alice", "c1", rid)
    entries_before = len(entries(db, "alice"))

    assert commit(db, "alice", "c2", rid)["status"] == "reservation_committed"
    assert release(db, "alice", "x1", rid)["status"] == "reservation_committed"
    assert len(entries(db, "alice")) == entries_before
    assert balance(db, "alice")["available"] == 60

    held2 = reserve(db, "alice", "r2", 10)
    release(db, "alice", "x2", held2["reservation_id"])
    assert commit(db, "alice", "c3", held2["reservation_id"])["status"] == "reservation_released"


def test_unknown_and_foreign_reservations_are_not_found(db):
    _funded(db)
    held = reserve(db, "alice", "r1", 40)
    assert commit(db, "alice", "c1", 999_999)["status"] == "reservation_not_found"
    # bob cannot touch alice's reservation
    assert commit(db, "bob", "c1", held["reservation_id"])["status"] == "reservation_not_found"
    assert release(db, "bob", "x1", held["reservation_id"])["status"] == "reservation_not_found"
    assert _state(db, held["reservation_id"])["status"] == "open"


def test_commit_replay_returns_the_original_result(db):
    _funded(db)
    held = reserve(db, "alice", "r1", 40)
    first = commit(db, "alice", "c1", held["reservation_id"], 30)
    assert commit(db, "alice", "c1", held["reservation_id"], 30) == first | {"replayed": True}
    assert commit(db, "alice", "c1", held["reservation_id"], 31)["status"] == "idempotency_key_reused"


def test_a_reserve_replays_from_its_entry_with_its_deadline(db):
    _funded(db)
    held = reserve(db, "alice", "r1", 40, ttl=300)
    before = row_counts(db)
    assert held["expires_at"] is not None
    assert reserve(db, "alice", "r1", 40, ttl=300) == held | {"replayed": True}
    assert reserve(db, "alice", "r1", 40, ttl=301)["status"] == "idempotency_key_reused"
    assert reserve(db, "alice", "r1", 41, ttl=300)["status"] == "idempotency_key_reused"
    assert row_counts(db) == before


def test_expire_reservations_ends_overdue_holds(db):
    _funded(db)
    overdue = reserve(db, "alice", "r1", 30, ttl=1)
    current = reserve(db, "alice", "r2", 20, ttl=3600)
    time.sleep(1.2)

    expired = db.execute("CALL ledger.expire_reservations()").fetchone()["expired"]

    assert expired == 1
    assert _state(db, overdue["reservation_id"])["status"] == "expired"
    assert _state(db, current["reservation_id"])["status"] == "open"
    assert (balance(db, "alice")["available"], balance(db, "alice")["reserved"]) == (80, 20)
    last = entries(db, "alice")[-1]
    assert (last["kind"], last["idempotency_key"], last["reservation_id"]) == ("expire", None, overdue["reservation_id"])
    assert db.execute("CALL ledger.expire_reservations()").fetchone()["expired"] == 0


def test_expiry_runs_in_batches(db):
    _funded(db)
    for i in range(7):
        reserve(db, "alice", f"r{i}", 1, ttl=1)
    time.sleep(1.2)
    assert db.execute("CALL ledger.expire_reservations(NULL, 3)").fetchone()["expired"] == 7
    assert balance(db, "alice")["reserved"] == 0


def test_commit_after_the_deadline_expires_the_hold_instead(db):
    _funded(db)
    held = reserve(db, "alice", "r1", 40, ttl=1)
    time.sleep(1.2)
    late = commit(db, "alice", "c1", held["reservation_id"])
    assert late["status"] == "reservation_expired"
    assert (late["available"], late["reserved"]) == (100, 0)
    assert _state(db, held["reservation_id"])["status"] == "expired"
    assert db.execute("CALL ledger.expire_reservations()").fetchone()["expired"] == 0
    assert release(db, "alice", "x1", held["reservation_id"])["status"] == "reservation_expired"


def test_unknown_reservation_reads_as_nulls(db):
    assert _state(db, 12345)["reservation_id"] is None
