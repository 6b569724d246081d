"""ledger.credit_many: many credits in one transaction, each item answered with
what ledger.credit would have answered for it alone (after the items before
it), a refusal or an error of one item touching no other, accounts locked in
one order so that concurrent calls cannot deadlock, and, under Citus, the
call delegated whole to the worker holding its shard."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict

import psycopg
import pytest
from psycopg.rows import dict_row

from app.ledger import calls
from app.ledger.client import Ledger
from app.ledger.errors import Fault, InvalidArgument, OtherShard
from app.ledger.results import ItemResult
from tests.ledger import (balance, credit, credit_many, entries, row_counts, unreconciled_accounts,
                          users_of_one_shard)

Credit = calls.Credit

# The per-call fields of an answer: equal between two calls only by chance.
DRAWN = ("entry_id", "created_at")


@pytest.fixture
def on_citus(db: psycopg.Connection) -> None:
    if not db.execute("SELECT 1 FROM pg_extension WHERE extname = 'citus'").fetchone():
        pytest.skip("about Citus' shards and delegation: the Citus pass of `make test`")


def _outcome(row: dict) -> dict:
    """An item's answer as the single call's Outcome, as a dict."""
    return asdict(ItemResult(**row).outcome())


def test_items_are_answered_in_order_each_as_a_single_credit_would_be(db):
    alice, bob = users_of_one_shard(db, 2)
    answers = credit_many(db, [
        Credit(alice, "k1", 10, "ad view"),
        Credit(bob, "k1", 20, "ad view", metadata={"campaign": "spring"}),
        Credit(alice, "k2", 30, "ad view", "adnet", "imp-1"),
        Credit(alice, "k3", 40, "ad view", "adnet", "imp-1"),   # the same action again
        Credit(alice, "k1", 10, "ad view"),                      # the same request again
        Credit(alice, "k1", 11, "ad view"),                      # the same key, another request
    ])

    assert [a["item"] for a in answers] == [1, 2, 3, 4, 5, 6]
    assert [(a["status"], a["user_id"], a["available"], a["replayed"]) for a in answers] == [
        ("ok", alice, 10, False), ("ok", bob, 20, False), ("ok", alice, 40, False),
        ("action_already_credited", alice, 40, False), ("ok", alice, 10, True),
        ("idempotency_key_reused", alice, 40, False)]
    assert answers[4]["entry_id"] == answers[0]["entry_id"]  # one key, one effect
    assert [(e["seq"], e["idempotency_key"], e["available_after"]) for e in entries(db, alice)] == [
        (1, "k1", 10), (2, "k2", 40)]
    assert all(a["error_sqlstate"] is None for a in answers)

    # The same items as single calls, for two other users, answer the same.
    carol, dave = users_of_one_shard(db, 2)
    singles = [credit(db, *args) for args in [
        (carol, "k1", 10), (dave, "k1", 20, "ad view", None, None, {"campaign": "spring"}),
        (carol, "k2", 30, "ad view", "adnet", "imp-1"), (carol, "k3", 40, "ad view", "adnet", "imp-1"),
        (carol, "k1", 10), (carol, "k1", 11)]]
    renamed = {alice: carol, bob: dave}
    for answer, single in zip(answers, singles, strict=True):
        answered = _outcome(answer) | {"user_id": renamed[answer["user_id"]]}
        assert {k: v for k, v in answered.items() if k not in DRAWN} == {
            k: v for k, v in single.items() if k not in DRAWN}
    assert unreconciled_accounts(db) == []


def test_a_call_that_replays_answers_each_item_as_it_first_did(db):
    alice, bob = users_of_one_shard(db, 2)
    items = [Credit(alice, "k1", 10, "x"), Credit(bob, "k1", 5, "x"), Credit(alice, "k1", 10, "x")]
    first = credit_many(db, items)
    before = row_counts(db)

    again = credit_many(db, items)

    assert again == [a | {"replayed": True} for a in first[:2]] + [first[2]]
    assert row_counts(db) == before


def test_an_invalid_item_is_answered_with_its_own_error_and_the_others_are_applied(db):
    alice, bob = users_of_one_shard(db, 2)
    answers = credit_many(db, [
        Credit(alice, "k1", 10, "x"),
        Credit(bob, "k1", 0, "x"),
        Credit("not a user", "k1", 5, "x"),
        Credit(alice, "k2", 5, "x", "adnet", None),
        Credit(alice, "k3", 5, "x"),
    ])

    assert [a["status"] for a in answers] == ["ok", None, None, None, "ok"]
    assert [(a["error_sqlstate"], a["error_column"]) for a in answers[1:4]] == [
        ("22023", "amount"), ("22023", "user_id"), ("22023", "action")]
    for answer, alone in zip(answers[1:4], [(bob, "k1", 0), ("not a user", "k1", 5),
                                            (alice, "k2", 5, "x", "adnet", None)], strict=True):
        with pytest.raises(InvalidArgument) as single:
            credit(db, *alone)
        with pytest.raises(InvalidArgument) as item:
            _outcome(answer)
        assert (str(item.value), item.value.field) == (str(single.value), single.value.field)
    # Nothing of the invalid items was written: bob has no account, alice two entries.
    assert db.execute("SELECT 1 FROM ledger.accounts WHERE user_id = %s", (bob,)).fetchone() is None
    assert [e["idempotency_key"] for e in entries(db, alice)] == ["k1", "k3"]


def test_an_item_that_raises_fails_alone_and_the_others_are_applied_once(db):
    alice, bob = users_of_one_shard(db, 2)
    db.execute("ALTER TABLE ledger.entries ADD CONSTRAINT test_no_boom CHECK (reason <> 'boom') NOT VALID")
    answers = credit_many(db, [
        Credit(alice, "k1", 10, "x"),
        Credit(bob, "k1", 20, "boom"),
        Credit(alice, "k2", 30, "x"),
        Credit(bob, "k2", 40, "x"),
        Credit(alice, "k3", 50, "boom"),
    ])

    assert [a["status"] for a in answers] == ["ok", None, "ok", "ok", None]
    assert {a["error_sqlstate"] for a in (answers[1], answers[4])} == {"23514"}
    with pytest.raises(Fault, match="test_no_boom"):
        _outcome(answers[1])
    # Applied again after each failure, each surviving item is applied once.
    assert [(e["seq"], e["idempotency_key"]) for e in entries(db, alice)] == [(1, "k1"), (2, "k2")]
    assert [(e["seq"], e["idempotency_key"]) for e in entries(db, bob)] == [(1, "k2")]
    assert (answers[2]["available"], answers[3]["available"]) == (40, 40)
    # a success keeps its key on its entry: no record for any of them
    assert db.execute("SELECT count(*) AS n FROM ledger.idempotency_keys").fetchone()["n"] == 0
    assert unreconciled_accounts(db) == []
    # A key whose item failed was not used: it works afterwards, as after a failed single call.
    assert credit_many(db, [Credit(bob, "k1", 20, "x")])[0]["status"] == "ok"


def test_a_new_user_whose_items_all_raise_gets_no_account(db):
    alice, carol = users_of_one_shard(db, 2)
    db.execute("ALTER TABLE ledger.entries ADD CONSTRAINT test_no_boom CHECK (reason <> 'boom') NOT VALID")
    answers = credit_many(db, [Credit(alice, "k1", 10, "x"), Credit(carol, "k1", 20, "boom"),
                               Credit(carol, "k2", 30, "boom")])

    assert [a["status"] for a in answers] == ["ok", None, None]
    # as after a single credit that raised: nothing of carol's, not even an empty account
    assert db.execute("SELECT user_id FROM ledger.accounts WHERE user_id = ANY(%s)",
                      ([alice, carol],)).fetchall() == [{"user_id": alice}]


def test_an_overflow_fails_its_item_alone_as_it_fails_a_single_credit(db):
    rich, poor = users_of_one_shard(db, 2)
    credit(db, rich, "fund", 1)
    db.execute("UPDATE ledger.accounts SET available = 9223372036854775000 WHERE user_id = %s", (rich,))
    answers = credit_many(db, [Credit(rich, "k1", 10_000, "x"), Credit(poor, "k1", 10, "x")])

    with pytest.raises(InvalidArgument) as single:
        credit(db, rich, "k1", 10_000, "x")
    with pytest.raises(InvalidArgument) as item:
        _outcome(answers[0])
    assert str(item.value) == str(single.value) == "bigint out of range"
    assert answers[1]["status"] == "ok"


def test_the_item_count_is_bounded(db):
    alice, = users_of_one_shard(db, 1)
    db.execute("UPDATE ledger.settings SET max_batch_items = 3")
    with pytest.raises(InvalidArgument, match="must be 1-3 items") as refused:
        credit_many(db, [Credit(alice, f"k{i}", 1, "x") for i in range(4)])
    assert refused.value.field == "items"
    with pytest.raises(InvalidArgument, match="must be 1-3 items"):
        Ledger(db)(calls.credit_many(alice, []))
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="each argument array of the same length"):
        db.execute("SELECT * FROM ledger.credit_many(%s, ARRAY[%s], ARRAY['k'], ARRAY[1, 2]::bigint[],"
                   " ARRAY['x'], ARRAY[NULL], ARRAY[NULL], ARRAY['{}']::jsonb[])", (alice, alice))
    assert len(credit_many(db, [Credit(alice, f"k{i}", 1, "x") for i in range(3)])) == 3


def test_concurrent_calls_over_the_same_users_in_any_order_never_deadlock(db, dsn):
    users = users_of_one_shard(db, 6)
    rounds, clients = 10, 8

    def work(i: int) -> list[dict]:
        shuffled = random.Random(i)
        with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as conn:
            answers = []
            for r in range(rounds):
                order = shuffled.sample(users, len(users))
                answers += credit_many(conn, [Credit(u, f"c{i}-r{r}", 1, "x") for u in order])
            return answers

    with ThreadPoolExecutor(max_workers=clients) as pool:
        answers = [a for batch in pool.map(work, range(clients)) for a in batch]

    assert {a["status"] for a in answers} == {"ok"}
    assert all(balance(db, u)["available"] == rounds * clients for u in users)
    assert unreconciled_accounts(db) == []


def test_an_item_of_another_shard_is_answered_so_and_writes_nothing(db, on_citus):
    here, = users_of_one_shard(db, 1)
    elsewhere = next(u for u in (f"{here}-{i}" for i in range(1000)) if db.execute(
        "SELECT get_shard_id_for_distribution_column('ledger.accounts', %s::text) <>"
        " get_shard_id_for_distribution_column('ledger.accounts', %s::text) AS other", (u, here)).fetchone()["other"])
    answers = credit_many(db, [Credit(here, "k1", 1, "x"), Credit(elsewhere, "k1", 1, "x")], shard_user=here)

    assert answers[0]["status"] == "ok"
    assert answers[1]["error_sqlstate"] == "0A000"
    with pytest.raises(OtherShard):
        _outcome(answers[1])
    assert entries(db, elsewhere) == []


def test_a_call_runs_wholly_on_the_worker_of_its_shard(db, on_citus):
    from tests.test_citus import _remote_commands

    users = users_of_one_shard(db, 3)
    answers = []
    sent = _remote_commands(db, lambda: answers.extend(credit_many(db, [Credit(u, "k1", 1, "x") for u in users])))

    assert {a["status"] for a in answers} == {"ok"}
    # One statement crosses to a worker: the call itself, not its inner queries.
    assert len([s for s in sent if "ledger." in s]) == 1
    assert any("ledger.credit_many(" in s for s in sent)


def test_the_cluster_check_finds_credit_many_and_how_it_must_be_delegated(db, on_citus):
    from app.operations import citus

    found = {f.name: f for f in citus.write_functions(Ledger(db))}
    assert {"credit", "credit_many", "debit", "reserve", "commit_reservation", "release_reservation"} <= set(found)
    assert [f.name for f in found.values() if not f.delegated] == []
    assert [f.name for f in found.values() if f.many] == ["credit_many"]
    # With force_delegation its items' queries could touch p_user_id's rows alone: not delegated as it must be.
    db.execute("SELECT create_distributed_function(%s::regprocedure, 'p_user_id', colocate_with => 'ledger.accounts',"
               " force_delegation => true)", (found["credit_many"].signature,))
    many = next(f for f in citus.write_functions(Ledger(db)) if f.name == "credit_many")
    assert not many.delegated and "force_delegation" in many.why_not()
