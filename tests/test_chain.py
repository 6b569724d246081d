"""Entries are append-only and chained by hash; tampering is found."""

import hashlib
import json

import psycopg
import pytest

from tests.ledger import commit, credit, debit, entries, reserve, tamper, violated_constraint


def _history(db):
    credit(db, "alice", "c1", 100, source="adnet", external_id="imp-1", metadata={"b": 2, "a": [1, "x"]})
    debit(db, "alice", "d1", 10)
    held = reserve(db, "alice", "r1", 30)
    commit(db, "alice", "m1", held["reservation_id"], 20)
    return entries(db, "alice")


def _verify(db, user="alice"):
    return db.execute("SELECT * FROM ledger.verify_chain(%s)", (user,)).fetchone()


def test_an_untouched_chain_verifies(db):
    rows = _history(db)
    assert _verify(db) == {"ok": True, "entries_checked": len(rows),
                           "first_broken_entry_id": None, "first_broken_seq": None}
    assert _verify(db, "nobody")["ok"] is True


def test_each_hash_is_sha256_of_the_previous_hash_and_the_entry(db):
    rows = _history(db)
    assert rows[0]["prev_hash"] == bytes(32)
    for previous, entry in zip(rows, rows[1:]):
        assert entry["prev_hash"] == previous["hash"]
    first = rows[0]
    canonical = db.execute(
        "SELECT jsonb_build_array(user_id, entry_id, seq, kind, amount, available_delta, reserved_delta,"
        " available_after, reserved_after, reservation_id, reason, action_source, action_external_id,"
        " metadata, idempotency_key, (extract(epoch FROM created_at) * 1000000)::bigint)::text AS t"
        " FROM ledger.entries WHERE entry_id = %s", (first["entry_id"],)
    ).fetchone()["t"]
    assert json.loads(canonical)[3] == "credit"
    assert first["hash"] == hashlib.sha256(first["prev_hash"] + canonical.encode()).digest()
    head = db.execute("SELECT last_entry_hash FROM ledger.accounts WHERE user_id = 'alice'").fetchone()
    assert head["last_entry_hash"] == rows[-1]["hash"]


@pytest.mark.parametrize("statement", [
    "UPDATE ledger.entries SET amount = amount + 1",
    "DELETE FROM ledger.entries",
    "TRUNCATE ledger.entries",
])
def test_entries_refuse_updates_and_deletes_even_for_a_superuser(db, statement):
    _history(db)
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        db.execute(statement)
    assert len(entries(db, "alice")) == 4




def test_a_changed_amount_is_found_at_that_entry(db):
    rows = _history(db)
    tamper(db, "UPDATE ledger.entries SET reason = 'bonus' WHERE entry_id = %s", (rows[1]["entry_id"],))
    result = _verify(db)
    assert (result["ok"], result["first_broken_entry_id"], result["first_broken_seq"]) == (False, rows[1]["entry_id"], 2)


def test_a_rehashed_entry_breaks_the_next_link(db):
    rows = _history(db)
    # The attacker recomputes the tampered entry's own hash, but cannot fix the
    # chain after it without rewriting every later entry and the account head.
    tamper(db, "UPDATE ledger.entries SET metadata = '{\"forged\": true}' WHERE entry_id = %s", (rows[1]["entry_id"],))
    # ROW(e.*): under Citus `e` is a shard's row, of the shard table's own type.
    tamper(db, "UPDATE ledger.entries e SET hash = ledger._entry_hash(e.prev_hash, ROW(e.*)::ledger.entries)"
               " WHERE entry_id = %s",
            (rows[1]["entry_id"],))
    result = _verify(db)
    assert (result["ok"], result["first_broken_seq"]) == (False, 3)


def test_a_deleted_entry_is_found(db):
    rows = _history(db)
    tamper(db, "DELETE FROM ledger.entries WHERE entry_id = %s", (rows[2]["entry_id"],))
    result = _verify(db)
    assert (result["ok"], result["first_broken_seq"]) == (False, 4)


def test_a_deleted_last_entry_is_found_by_the_account_head(db):
    rows = _history(db)
    tamper(db, "DELETE FROM ledger.entries WHERE entry_id = %s", (rows[-1]["entry_id"],))
    result = _verify(db)
    assert (result["ok"], result["entries_checked"], result["first_broken_entry_id"]) == (False, 3, None)


def test_the_cli_reports_a_broken_chain(db, monkeypatch, capsys):
    from app import cli

    rows = _history(db)
    monkeypatch.setenv("REWARDS_DATABASE", db.info.dbname)
    assert cli.main(["ledger", "verify", "alice"]) == 0
    tamper(db, "UPDATE ledger.entries SET reason = 'forged' WHERE entry_id = %s", (rows[0]["entry_id"],))
    assert cli.main(["ledger", "verify", "alice"]) == 2
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["first_broken_entry_id"] == rows[0]["entry_id"]


def test_a_tampered_entry_must_still_obey_the_kind_rules(db):
    rows = _history(db)
    with pytest.raises(psycopg.errors.CheckViolation) as raised:
        tamper(db, "UPDATE ledger.entries SET amount = 1 WHERE entry_id = %s", (rows[0]["entry_id"],))
    assert violated_constraint(raised.value) == "entries_well_formed"
