"""Garbage in: every invalid argument raises SQLSTATE 22023 naming the argument,
which the client raises as InvalidArgument naming the field, and nothing is written."""

import psycopg
import pytest

from app.ledger import calls, queries
from app.ledger.client import Call, Ledger
from app.ledger.errors import InvalidArgument
from app.ledger.limits import MAX_AMOUNT
from app.ledger.results import Outcome
from tests.ledger import credit, reserve, row_counts, violated_constraint


# The named queries with raw parameters, so a test can send what the typed
# calls would never build (NULL metadata, JSON that is not an object).
def _ok_credit(**changes):
    params = {"user_id": "alice", "key": "k1", "amount": 10, "reason": "ad view",
              "action_source": None, "action_external_id": None, "metadata": "{}",
              "pending_seconds": None, "expiry_seconds": None}
    return Call(queries.CREDIT, params | changes, Outcome)


def _ok_reserve(**changes):
    params = {"user_id": "alice", "key": "r1", "amount": 10, "ttl_seconds": 60, "reason": "voucher", "metadata": "{}"}
    return Call(queries.RESERVE, params | changes, Outcome)


CASES = {
    "negative amount": (_ok_credit(amount=-5), "amount"),
    "zero amount": (_ok_credit(amount=0), "amount"),
    "over max amount": (_ok_credit(amount=MAX_AMOUNT + 1), "amount"),
    "null amount": (_ok_credit(amount=None), "amount"),
    "pending zero seconds": (_ok_credit(pending_seconds=0), "pending_seconds"),
    "pending past the longest term": (_ok_credit(pending_seconds=10 * 366 * 86400), "pending_seconds"),
    "expiry before the points mature": (_ok_credit(pending_seconds=60, expiry_seconds=60), "expiry_seconds"),
    "negative expiry": (_ok_credit(expiry_seconds=-1), "expiry_seconds"),
    "empty user": (_ok_credit(user_id=""), "user_id"),
    "overlong user": (_ok_credit(user_id="u" * 65), "user_id"),
    "user with a space": (_ok_credit(user_id="al ice"), "user_id"),
    "user with unicode": (_ok_credit(user_id="alicé"), "user_id"),
    "null user": (_ok_credit(user_id=None), "user_id"),
    "empty key": (_ok_credit(key=""), "idempotency_key"),
    "overlong key": (_ok_credit(key="k" * 256), "idempotency_key"),
    "key with a space": (_ok_credit(key="a b"), "idempotency_key"),
    "key with a newline": (_ok_credit(key="ab\n"), "idempotency_key"),
    "null key": (_ok_credit(key=None), "idempotency_key"),
    "empty reason": (_ok_credit(reason=""), "reason"),
    "overlong reason": (_ok_credit(reason="r" * 201), "reason"),
    "reason with control character": (_ok_credit(reason="a\x07b"), "reason"),
    "null reason": (_ok_credit(reason=None), "reason"),
    "metadata array": (_ok_credit(metadata="[1, 2]"), "metadata"),
    "metadata scalar": (_ok_credit(metadata='"x"'), "metadata"),
    "metadata too large": (_ok_credit(metadata='{"x": "' + "y" * 5000 + '"}'), "metadata"),
    "null metadata": (_ok_credit(metadata=None), "metadata"),
    "source without external id": (_ok_credit(action_source="adnet"), "action"),
    "external id without source": (_ok_credit(action_external_id="e1"), "action"),
    "bad source": (_ok_credit(action_source="ad net", action_external_id="e1"), "action_source"),
    "bad external id": (_ok_credit(action_source="adnet", action_external_id=""), "action_external_id"),
    "debit zero": (calls.debit("alice", "d1", 0, "gift"), "amount"),
    "debit null user": (Call(queries.DEBIT, {"user_id": None, "key": "d1", "amount": 5, "reason": "gift",
                                             "metadata": "{}"}, Outcome), "user_id"),
    "reserve ttl zero": (_ok_reserve(ttl_seconds=0), "ttl_seconds"),
    "reserve ttl negative": (_ok_reserve(ttl_seconds=-1), "ttl_seconds"),
    "reserve ttl over a week": (_ok_reserve(ttl_seconds=7 * 86400 + 1), "ttl_seconds"),
    "reserve ttl null": (_ok_reserve(ttl_seconds=None), "ttl_seconds"),
    "reserve amount over max": (_ok_reserve(amount=MAX_AMOUNT + 1), "amount"),
    "release null id": (calls.release_reservation("alice", "x1", None), "reservation_id"),
    "release negative id": (calls.release_reservation("alice", "x1", -1), "reservation_id"),
    "commit zero amount": (calls.commit_reservation("alice", "c1", 1, 0), "amount"),
    "page limit zero": (calls.entries_page("alice", None, 0), "limit"),
    "page limit huge": (calls.entries_page("alice", None, 501), "limit"),
    "balance of a bad user": (calls.balance("no way"), "user_id"),
}


# A NULL user, sent raw, crashes Citus 13.2's call delegation: the client never
# sends one (test below), and these two run on a single node only.
NULL_USER = pytest.mark.single_node("a NULL distribution argument crashes Citus 13.2 (segfault)")


@pytest.mark.parametrize("call, argument", [
    pytest.param(*case, id=name, marks=[NULL_USER] if name.endswith("null user") else [])
    for name, case in CASES.items()])
def test_invalid_arguments_raise_22023_and_write_nothing(db, call, argument):
    credit(db, "alice", "seed", 100)
    reserve(db, "alice", "seed-hold", 10)
    before = row_counts(db)

    with pytest.raises(InvalidArgument) as raised:
        Ledger(db)(call)

    assert raised.value.__cause__.diag.sqlstate == "22023"
    assert raised.value.field == argument
    assert row_counts(db) == before


def test_an_amount_beyond_bigint_fails_before_the_call(db):
    before = row_counts(db)
    with pytest.raises(psycopg.errors.NumericValueOutOfRange):
        db.execute("SELECT * FROM ledger.credit('alice', 'k', '99999999999999999999'::bigint, 'x', NULL, NULL, '{}')")
    assert row_counts(db) == before


@pytest.mark.parametrize("statement, constraint", [
    ("INSERT INTO ledger.accounts (user_id) VALUES ('bad user')", "accounts_user_id_format"),
    ("INSERT INTO ledger.accounts (user_id) VALUES ('')", "accounts_user_id_format"),
    ("INSERT INTO ledger.idempotency_keys (user_id, idempotency_key, operation, request_hash, status,"
     " available, reserved) VALUES ('alice', 'bad key', 'credit', '\\x00', 'ok', 0, 0)", "idempotency_key_format"),
    ("UPDATE ledger.accounts SET available = -1", "accounts_available_nonnegative"),
    ("UPDATE ledger.accounts SET reserved = -1", "accounts_reserved_nonnegative"),
])
def test_the_tables_hold_the_rules_whatever_the_code_does(db, statement, constraint):
    credit(db, "alice", "seed", 100)
    with pytest.raises(psycopg.errors.CheckViolation) as raised:
        db.execute(statement)
    assert violated_constraint(raised.value) == constraint


@pytest.mark.parametrize("make", [
    lambda: calls.credit(None, "k", 1, "x"), lambda: calls.debit(None, "k", 1, "x"),
    lambda: calls.reserve(None, "k", 1, 60, "x"), lambda: calls.commit_reservation(None, "k", 1),
    lambda: calls.release_reservation(None, "k", 1), lambda: calls.balance(None),
    lambda: calls.entries_page(None, None, 10), lambda: calls.reservation(None, 1), lambda: calls.verify_chain(None),
], ids=["credit", "debit", "reserve", "commit", "release", "balance", "entries", "reservation", "verify"])
def test_the_client_never_sends_a_null_user(make):
    with pytest.raises(InvalidArgument) as raised:
        make()
    assert raised.value.field == "user_id" and raised.value.__cause__ is None
