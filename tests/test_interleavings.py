"""Fixed interleavings of two sessions, in the style of PostgreSQL's isolation
specs, next to the thread storms of tests/test_concurrency.py.

Each test runs the same steps in the same order every time:

1. session 1 opens a transaction and makes a ledger call, which takes the
   account row lock (ledger._lock_account: SELECT ... FOR UPDATE), and keeps
   the transaction open;
2. session 2, in a thread, makes a conflicting call, and a third connection
   polls pg_blocking_pids() and pg_locks until session 2 is shown to wait on
   session 1 (a deadline fails the test; nothing sleeps to synchronise);
3. session 1 commits (or rolls back), and session 2's answer is checked.

What session 2 waits on is read from pg_locks, not assumed. Every write
function locks the account row before it reads the idempotency key, the
action or the reservation, so an existing account's second writer waits on the
account row: it holds the heavyweight tuple lock on a ledger.accounts row
(granted) and waits for session 1's transaction id (ShareLock, not granted).
It never reaches the unique indexes of idempotency_keys, entries_idempotency_key_once
or entries_action_once
while session 1 is open: once it gets the row, it finds session 1's key, action
or reservation state committed, and answers from them. Only on a user's first
call, when no account row exists yet to lock, does session 2 wait on the
accounts_pkey unique check of the INSERT in _lock_account instead (no tuple lock).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from app.ledger.calls import Credit
from tests.ledger import (
    balance,
    commit,
    credit,
    credit_many,
    debit,
    entries,
    release,
    reserve,
    row_counts,
    unreconciled_accounts,
)

# How long session 2 may take to be seen waiting, or to answer once released.
DEADLINE_SECONDS = 3.0
POLL_SECONDS = 0.002

# What a blocked session can be waiting on (see _waited_on).
ACCOUNT_ROW = "row lock on ledger.accounts"
ACCOUNT_KEY = "unique index ledger.accounts_pkey"


@dataclass
class Sessions:
    s1: psycopg.Connection
    s2: psycopg.Connection
    watch: psycopg.Connection
    pool: ThreadPoolExecutor

    def in_s2(self, step: Callable[..., dict[str, Any]], *args: Any, **kwargs: Any) -> Future:
        """Run step(s2, *args) in a thread; its answer is the future's result."""
        return self.pool.submit(step, self.s2, *args, **kwargs)

    def blocked(self, waiting: Future) -> str:
        """Poll until session 2's backend is blocked by session 1's, and say on what."""
        holder, waiter = self.s1.info.backend_pid, self.s2.info.backend_pid
        deadline = time.monotonic() + DEADLINE_SECONDS
        while True:
            blockers = self.watch.execute("SELECT pg_blocking_pids(%s) AS pids", (waiter,)).fetchone()["pids"]
            if blockers:
                assert blockers == [holder], f"session 2 is blocked by {blockers}, not session 1 ({holder})"
                return self._waited_on(waiter, holder)
            if waiting.done():
                pytest.fail(f"session 2 did not wait for session 1; it answered {waiting.result()}")
            if time.monotonic() > deadline:
                pytest.fail(f"session 2 was not seen waiting for session 1 within {DEADLINE_SECONDS} s")
            time.sleep(POLL_SECONDS)

    def _waited_on(self, waiter: int, holder: int) -> str:
        """Which lock the waiter is queued on, from pg_locks. It always waits for
        session 1's transaction id; a row lock shows as the heavyweight tuple lock
        it holds on that row's table, a unique check as the one table it is
        inserting into (RowExclusiveLock) and that table's unique index."""
        locks = self.watch.execute(
            """SELECT l.locktype, l.mode, l.granted, l.relation::regclass::text AS relation, c.relkind,
                      l.transactionid = h.backend_xid AS on_holder
               FROM pg_locks l
               JOIN pg_stat_activity h ON h.pid = %(holder)s
               LEFT JOIN pg_class c ON c.oid = l.relation
               WHERE l.pid = %(waiter)s AND l.locktype IN ('relation', 'tuple', 'transactionid')""",
            {"waiter": waiter, "holder": holder},
        ).fetchall()
        queued = [lock for lock in locks if not lock["granted"]]
        assert [(q["locktype"], q["mode"], q["on_holder"]) for q in queued] == [
            ("transactionid", "ShareLock", True)
        ], f"session 2 waits on {queued}, not on session 1's transaction"
        rows = {lock["relation"] for lock in locks if lock["locktype"] == "tuple"}
        if rows:
            assert len(rows) == 1, f"session 2 holds tuple locks on {rows}"
            return f"row lock on {rows.pop()}"
        written = sorted(lock["relation"] for lock in locks if lock["locktype"] == "relation"
                         and lock["mode"] == "RowExclusiveLock" and lock["relkind"] in ("r", "p"))
        if len(written) == 1:
            unique = self.watch.execute(
                "SELECT indexrelid::regclass::text AS name FROM pg_index WHERE indrelid = %s::regclass AND indisunique",
                (written[0],),
            ).fetchall()
            if len(unique) == 1:
                return f"unique index {unique[0]['name']}"
        return f"a unique index of {', '.join(written) or 'no table'}"

    def answer(self, waiting: Future) -> dict[str, Any]:
        return waiting.result(timeout=DEADLINE_SECONDS)


@pytest.fixture
def sessions(db: psycopg.Connection, dsn: str) -> Iterator[Sessions]:
    if db.execute("SELECT 1 FROM pg_extension WHERE extname = 'citus'").fetchone():
        pytest.skip("under Citus a delegated call runs in a worker's backend, not the session's own")
    # lock_timeout only bounds a broken test: the steps never wait that long.
    options = "-c lock_timeout=10s -c statement_timeout=10s"
    conns = [psycopg.connect(dsn, autocommit=True, row_factory=dict_row, options=options) for _ in range(3)]
    pool = ThreadPoolExecutor(max_workers=1)
    try:
        yield Sessions(*conns, pool)
    finally:
        conns[0].close()  # rolls back whatever session 1 still holds, freeing session 2
        pool.shutdown(wait=True)
        for conn in conns[1:]:
            conn.close()


def _fund(db: psycopg.Connection, user: str = "alice", amount: int = 100) -> dict[str, Any]:
    """Give the account its points, so that its row exists and can be locked."""
    funded = credit(db, user, "fund", amount)
    assert funded["status"] == "ok"
    return funded


# ---------------------------------------------------------------------------
# No double-spend
# ---------------------------------------------------------------------------

def test_a_second_debit_waits_for_the_first_and_is_refused_once_it_commits(db, sessions):
    _fund(db)
    with sessions.s1.transaction():
        first = debit(sessions.s1, "alice", "spend-1", 70)
        assert (first["status"], first["available"]) == ("ok", 30)
        second = sessions.in_s2(debit, "alice", "spend-2", 70)
        assert sessions.blocked(second) == ACCOUNT_ROW
    refused = sessions.answer(second)

    assert (refused["status"], refused["available"], refused["entry_id"]) == ("insufficient_points", 30, None)
    assert [e["idempotency_key"] for e in entries(db, "alice")] == ["fund", "spend-1"]
    assert balance(db, "alice")["available"] == 30
    assert unreconciled_accounts(db) == []


def test_a_second_debit_waits_for_the_first_and_spends_once_it_rolls_back(db, sessions):
    _fund(db)
    with sessions.s1.transaction():
        debit(sessions.s1, "alice", "spend-1", 70)
        second = sessions.in_s2(debit, "alice", "spend-2", 70)
        assert sessions.blocked(second) == ACCOUNT_ROW
        raise psycopg.Rollback()
    spent = sessions.answer(second)

    assert (spent["status"], spent["available"]) == ("ok", 30)
    assert [e["idempotency_key"] for e in entries(db, "alice")] == ["fund", "spend-2"]
    assert balance(db, "alice")["available"] == 30
    assert unreconciled_accounts(db) == []


def test_a_debit_waits_for_a_reservation_and_is_refused_once_it_commits(db, sessions):
    _fund(db)
    with sessions.s1.transaction():
        hold = reserve(sessions.s1, "alice", "hold-1", 80)
        assert (hold["status"], hold["available"], hold["reserved"]) == ("ok", 20, 80)
        second = sessions.in_s2(debit, "alice", "spend-1", 50)
        assert sessions.blocked(second) == ACCOUNT_ROW
    refused = sessions.answer(second)

    assert (refused["status"], refused["available"], refused["reserved"]) == ("insufficient_points", 20, 80)
    after = balance(db, "alice")
    assert (after["available"], after["reserved"]) == (20, 80)
    assert unreconciled_accounts(db) == []


def test_another_users_write_does_not_wait(db, sessions):
    _fund(db, "alice")
    _fund(db, "bob")
    with sessions.s1.transaction():
        debit(sessions.s1, "alice", "spend-1", 70)
        other = sessions.in_s2(debit, "bob", "spend-1", 70)
        # answered while session 1 still holds alice's row: the lock is per account
        assert sessions.answer(other)["status"] == "ok"
    assert (balance(db, "alice")["available"], balance(db, "bob")["available"]) == (30, 30)


# ---------------------------------------------------------------------------
# Exactly-once effect per idempotency key, and per verified action
# ---------------------------------------------------------------------------

def test_a_retry_waits_for_the_first_call_with_its_key_and_replays_it(db, sessions):
    _fund(db)
    with sessions.s1.transaction():
        first = credit(sessions.s1, "alice", "ad-42", 25, source="adnet", external_id="imp-42")
        retry = sessions.in_s2(credit, "alice", "ad-42", 25, source="adnet", external_id="imp-42")
        assert sessions.blocked(retry) == ACCOUNT_ROW
    replay = sessions.answer(retry)

    assert first["replayed"] is False and replay["replayed"] is True
    assert replay == {**first, "replayed": True}  # same entry id, same balance after, same time
    assert [e["entry_id"] for e in entries(db, "alice") if e["idempotency_key"] == "ad-42"] == [first["entry_id"]]
    assert balance(db, "alice")["available"] == 125
    # the entry holds the key's answer: a success writes no idempotency record
    assert row_counts(db) == {"accounts": 1, "entries": 2, "reservations": 0, "idempotency_keys": 0}


def test_a_key_reused_for_another_amount_waits_and_is_refused_writing_nothing(db, sessions):
    _fund(db)
    with sessions.s1.transaction():
        first = credit(sessions.s1, "alice", "ad-42", 25)
        other = sessions.in_s2(credit, "alice", "ad-42", 30)
        assert sessions.blocked(other) == ACCOUNT_ROW
    after_first = row_counts(db)
    refused = sessions.answer(other)

    assert (refused["status"], refused["entry_id"], refused["available"]) == ("idempotency_key_reused", None, 125)
    assert row_counts(db) == after_first == {"accounts": 1, "entries": 2, "reservations": 0, "idempotency_keys": 0}
    stored = [(e["entry_id"], e["amount"]) for e in entries(db, "alice") if e["idempotency_key"] == "ad-42"]
    assert stored == [(first["entry_id"], 25)]  # the first call's, untouched
    assert balance(db, "alice")["available"] == 125


def test_one_action_under_another_key_waits_and_earns_nothing(db, sessions):
    _fund(db)
    with sessions.s1.transaction():
        first = credit(sessions.s1, "alice", "ad-42", 25, source="adnet", external_id="imp-42")
        again = sessions.in_s2(credit, "alice", "ad-43", 25, source="adnet", external_id="imp-42")
        # the account row, not entries_action_once: the action is checked under the lock
        assert sessions.blocked(again) == ACCOUNT_ROW
    refused = sessions.answer(again)

    assert (refused["status"], refused["entry_id"], refused["available"]) == ("action_already_credited", None, 125)
    credited = [e for e in entries(db, "alice") if e["action_external_id"] == "imp-42"]
    assert [e["entry_id"] for e in credited] == [first["entry_id"]]
    assert balance(db, "alice")["available"] == 125
    # only the refusal gets a record (so a retry of ad-43 replays it); nothing else is written
    assert row_counts(db) == {"accounts": 1, "entries": 2, "reservations": 0, "idempotency_keys": 1}


def test_a_first_call_and_its_retry_on_a_new_account_wait_on_its_key_and_replay(db, sessions):
    # No account row yet: session 1's _lock_account inserts it, and session 2's
    # INSERT ... ON CONFLICT DO NOTHING waits on accounts_pkey for session 1.
    with sessions.s1.transaction():
        first = credit(sessions.s1, "carol", "ad-1", 10)
        retry = sessions.in_s2(credit, "carol", "ad-1", 10)
        assert sessions.blocked(retry) == ACCOUNT_KEY
    replay = sessions.answer(retry)

    assert replay == {**first, "replayed": True}
    assert row_counts(db) == {"accounts": 1, "entries": 1, "reservations": 0, "idempotency_keys": 0}


# ---------------------------------------------------------------------------
# A reservation ends exactly once
# ---------------------------------------------------------------------------

def test_a_release_waits_for_a_commit_of_the_same_reservation_and_is_refused(db, sessions):
    _fund(db)
    hold = reserve(db, "alice", "hold-1", 80)
    with sessions.s1.transaction():
        spent = commit(sessions.s1, "alice", "commit-1", hold["reservation_id"])
        assert (spent["status"], spent["amount"]) == ("ok", 80)
        late = sessions.in_s2(release, "alice", "release-1", hold["reservation_id"])
        # the account row, locked before the reservation row (one lock order)
        assert sessions.blocked(late) == ACCOUNT_ROW
    refused = sessions.answer(late)

    assert (refused["status"], refused["entry_id"]) == ("reservation_committed", None)
    assert (refused["available"], refused["reserved"]) == (20, 0)
    assert [e["kind"] for e in entries(db, "alice")] == ["credit", "reserve", "commit"]
    assert unreconciled_accounts(db) == []


def test_a_release_waits_for_a_commit_that_rolls_back_and_then_releases(db, sessions):
    _fund(db)
    hold = reserve(db, "alice", "hold-1", 80)
    with sessions.s1.transaction():
        commit(sessions.s1, "alice", "commit-1", hold["reservation_id"])
        late = sessions.in_s2(release, "alice", "release-1", hold["reservation_id"])
        assert sessions.blocked(late) == ACCOUNT_ROW
        raise psycopg.Rollback()
    released = sessions.answer(late)

    assert (released["status"], released["available"], released["reserved"]) == ("ok", 100, 0)
    assert [e["kind"] for e in entries(db, "alice")] == ["credit", "reserve", "release"]
    assert unreconciled_accounts(db) == []


# ---------------------------------------------------------------------------
# A call over many accounts (ledger.credit_many)
# ---------------------------------------------------------------------------

def test_a_call_over_many_locks_every_account_in_user_order_before_applying_any(db, sessions):
    _fund(db, "alice")
    _fund(db, "bob")
    with sessions.s1.transaction():
        credit(sessions.s1, "bob", "c1", 5)
        # bob's item first, but alice comes first in user order: alice is
        # locked, then the call waits for bob.
        waiting = sessions.in_s2(credit_many, [Credit("bob", "c2", 7, "x"), Credit("alice", "c2", 7, "x")])
        assert sessions.blocked(waiting) == ACCOUNT_ROW
        with pytest.raises(psycopg.errors.LockNotAvailable):
            sessions.watch.execute("SELECT 1 FROM ledger.accounts WHERE user_id = 'alice' FOR UPDATE NOWAIT")
    answers = sessions.answer(waiting)

    assert [(a["user_id"], a["status"], a["available"]) for a in answers] == [("bob", "ok", 112), ("alice", "ok", 107)]
    assert unreconciled_accounts(db) == []
