"""The API's role executes the public functions and can do nothing else."""

import psycopg
import pytest

from tests.ledger import balance, commit, credit, debit, release, reserve

PUBLIC_CALLS = [
    "SELECT * FROM ledger.credit('alice', 'p1', 10, 'x', NULL, NULL, '{}')",
    "SELECT * FROM ledger.debit('alice', 'p2', 1, 'x', '{}')",
    "SELECT * FROM ledger.reserve('alice', 'p3', 1, 60, 'x', '{}')",
    "SELECT * FROM ledger.commit_reservation('alice', 'p4', 1, NULL)",
    "SELECT * FROM ledger.release_reservation('alice', 'p5', 2)",
    "SELECT * FROM ledger.balance('alice')",
    "SELECT * FROM ledger.entries_page('alice', NULL, 10)",
    "SELECT * FROM ledger.reservation('alice', 1)",
    "SELECT * FROM ledger.verify_chain('alice')",
]

REFUSED = [
    "SELECT * FROM ledger.accounts",
    "SELECT * FROM ledger.entries",
    "SELECT * FROM ledger.balances",
    "SELECT * FROM ledger.idempotency_keys",
    "INSERT INTO ledger.accounts (user_id, available) VALUES ('mallory', 1000000)",
    "UPDATE ledger.accounts SET available = 1000000",
    "DELETE FROM ledger.reservations",
    "UPDATE ledger.settings SET max_amount = 1",
    "SELECT nextval('ledger.entries_entry_id_seq')",
    "SELECT ledger._lock_account('alice')",
    "SELECT ledger._invalid('a', 'b')",
    "CALL ledger.expire_reservations()",
]


def test_the_api_role_can_run_every_public_function(api_db):
    for call in PUBLIC_CALLS:
        api_db.execute(call)
    assert credit(api_db, "bob", "k", 10)["status"] == "ok"
    assert debit(api_db, "bob", "d", 4)["available"] == 6
    held = reserve(api_db, "bob", "r", 3)
    assert commit(api_db, "bob", "c", held["reservation_id"])["status"] == "ok"
    assert release(api_db, "bob", "x", held["reservation_id"])["status"] == "reservation_committed"
    assert balance(api_db, "bob")["available"] == 3


@pytest.mark.parametrize("statement", REFUSED)
def test_the_api_role_cannot_touch_tables_or_private_functions(api_db, statement):
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        api_db.execute(statement)


def test_no_application_role_may_update_or_delete_entries(db):
    grants = db.execute(
        """SELECT grantee, privilege_type FROM information_schema.role_table_grants
           WHERE table_schema = 'ledger' AND table_name = 'entries'
             AND privilege_type IN ('UPDATE', 'DELETE', 'TRUNCATE')"""
    ).fetchall()
    assert grants == []


def test_public_write_functions_run_as_the_owner_not_a_superuser(db):
    owners = db.execute(
        """SELECT p.proname, r.rolname, p.prosecdef FROM pg_proc p
           JOIN pg_roles r ON r.oid = p.proowner
           JOIN pg_namespace n ON n.oid = p.pronamespace
           WHERE n.nspname = 'ledger' AND p.proname IN ('credit', 'debit', 'reserve',
                 'commit_reservation', 'release_reservation')"""
    ).fetchall()
    assert len(owners) == 5
    assert all(row["rolname"] == "rewards_owner" and row["prosecdef"] for row in owners)
    assert db.execute("SELECT rolsuper FROM pg_roles WHERE rolname = 'rewards_owner'").fetchone()["rolsuper"] is False
