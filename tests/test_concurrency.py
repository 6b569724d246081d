"""Many connections at once: one effect per key, never below zero, and every
balance equal to its ledger afterwards."""

from concurrent.futures import ThreadPoolExecutor

import psycopg
from psycopg.rows import dict_row

from app.ledger import calls
from app.ledger.client import Ledger
from tests.ledger import balance, commit, credit, debit, entries, reserve, unreconciled_accounts

CLIENTS = 50


def _together(dsn, work, count=CLIENTS):
    """Run work(conn, i) on `count` connections that all start at once."""
    conns = [psycopg.connect(dsn, autocommit=True, row_factory=dict_row) for _ in range(count)]
    try:
        with ThreadPoolExecutor(max_workers=count) as pool:
            return list(pool.map(lambda i: work(conns[i], i), range(count)))
    finally:
        for conn in conns:
            conn.close()


def test_a_duplicate_storm_on_one_key_makes_one_entry(db, dsn):
    results = _together(dsn, lambda conn, i: credit(conn, "alice", "same-key", 25))

    assert len(entries(db, "alice")) == 1
    assert balance(db, "alice")["available"] == 25
    assert sum(1 for r in results if not r["replayed"]) == 1
    assert {r["entry_id"] for r in results} == {entries(db, "alice")[0]["entry_id"]}
    assert len({tuple((k, v) for k, v in r.items() if k != "replayed") for r in results}) == 1


def test_one_action_under_many_keys_earns_once(db, dsn):
    results = _together(dsn, lambda conn, i: credit(conn, "alice", f"key-{i}", 10, source="adnet", external_id="imp-1"))
    assert sorted(r["status"] for r in results).count("ok") == 1
    assert balance(db, "alice")["available"] == 10


def test_a_redemption_storm_never_overspends(db, dsn):
    credit(db, "alice", "fund", 100)

    results = _together(dsn, lambda conn, i: debit(conn, "alice", f"spend-{i}", 7))

    spent = [r for r in results if r["status"] == "ok"]
    assert len(spent) == 100 // 7
    assert all(r["status"] == "insufficient_points" for r in results if r["status"] != "ok")
    assert all(r["available"] >= 0 for r in results)
    assert balance(db, "alice")["available"] == 100 - 7 * len(spent)
    assert unreconciled_accounts(db) == []


def test_a_reservation_storm_never_overholds_and_each_commits_once(db, dsn):
    credit(db, "alice", "fund", 100)

    holds = _together(dsn, lambda conn, i: reserve(conn, "alice", f"hold-{i}", 9))
    held = [h for h in holds if h["status"] == "ok"]
    assert len(held) == 100 // 9

    # every hold committed twice at once under different keys: one wins each
    commits = _together(
        dsn, lambda conn, i: commit(conn, "alice", f"commit-{i}", held[i // 2]["reservation_id"], 5),
        count=2 * len(held),
    )
    assert sorted(c["status"] for c in commits).count("ok") == len(held)
    assert {c["status"] for c in commits} == {"ok", "reservation_committed"}
    after = balance(db, "alice")
    assert (after["available"], after["reserved"]) == (100 - 5 * len(held), 0)
    assert unreconciled_accounts(db) == []


def test_mixed_traffic_on_many_accounts_reconciles(db, dsn):
    def work(conn, i):
        user = f"user-{i % 5}"
        credit(conn, user, f"c-{i}", 20)
        debit(conn, user, f"d-{i}", 15)
        hold = reserve(conn, user, f"r-{i}", 10)
        if hold["status"] == "ok":
            commit(conn, user, f"m-{i}", hold["reservation_id"], 3)

    _together(dsn, work)

    assert unreconciled_accounts(db) == []
    # One call per account: under Citus a call runs on its user's worker, and
    # may not be nested in a query over the accounts.
    users = [row["user_id"] for row in db.execute("SELECT user_id FROM ledger.accounts").fetchall()]
    verified = [Ledger(db)(calls.verify_chain(user)) for user in users]
    assert verified and all(check.ok for check in verified)
