"""Idempotency records (refusals and the ends of reservations: a success keeps
its key on its entry, forever) and delivered notifications are forgotten after their
retention, by the database itself, in batches: never a key younger than the
window, never a notification still to deliver or parked. Under Citus each
node forgets its own shards' keys."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import psycopg
import pytest
from psycopg.rows import dict_row

from tests.conftest import SETTINGS
from tests.ledger import commit, credit, debit, reserve, tamper

DAY = timedelta(days=1)


def _keys(db) -> list[tuple[str, str]]:
    return [(r["user_id"], r["idempotency_key"]) for r in db.execute(
        "SELECT user_id, idempotency_key FROM ledger.idempotency_keys ORDER BY 1, 2").fetchall()]


def _aged(db, user: str, key: str, age: timedelta) -> None:
    tamper(db, "UPDATE ledger.idempotency_keys SET created_at = %s WHERE user_id = %s AND idempotency_key = %s",
           (datetime.now(timezone.utc) - age, user, key))


def test_keys_older_than_the_window_are_forgotten_and_no_younger_one(db):
    users = [f"user-{i}" for i in range(8)]  # under Citus, keys on every worker
    for user in users:
        # refusals keep a record (a success keeps its key on its entry: below)
        for key in ("old", "edge", "new"):
            assert debit(db, user, key, 1)["status"] == "insufficient_points"
        _aged(db, user, "old", 31 * DAY)
        _aged(db, user, "edge", 30 * DAY - timedelta(minutes=5))  # just inside the 30-day window
    assert db.execute("SELECT idempotency_retention FROM ledger.settings").fetchone() == {
        "idempotency_retention": 30 * DAY}
    # Batches of 3: several transactions per node.
    done = db.execute("CALL ledger.expire_idempotency_keys(NULL, 3)").fetchone()
    assert done["deleted"] == len(users)
    assert _keys(db) == sorted((user, key) for user in users for key in ("edge", "new"))
    assert db.execute("CALL ledger.expire_idempotency_keys()").fetchone()["deleted"] == 0
    # The forgotten key is a new request now; the others still replay.
    credit(db, users[0], "fund", 5)
    assert debit(db, users[0], "old", 1)["status"] == "ok"
    assert debit(db, users[0], "edge", 1)["status"] == "insufficient_points"
    assert debit(db, users[0], "edge", 1)["replayed"] is True


def test_a_success_keeps_its_key_on_its_entry_which_retention_never_forgets(db):
    first = credit(db, "alice", "k-1", 5)
    assert _keys(db) == []  # no record to forget: the entry answers a retry
    db.execute("CALL ledger.expire_idempotency_keys()")
    assert credit(db, "alice", "k-1", 5) == {**first, "replayed": True}
    assert credit(db, "alice", "k-1", 6)["status"] == "idempotency_key_reused"


def test_a_commit_past_its_record_s_retention_replays_from_its_entry(db):
    credit(db, "alice", "fund", 100)
    held = reserve(db, "alice", "r1", 40)
    first = commit(db, "alice", "c1", held["reservation_id"])
    _aged(db, "alice", "c1", 31 * DAY)
    assert db.execute("CALL ledger.expire_idempotency_keys()").fetchone()["deleted"] == 1
    assert commit(db, "alice", "c1", held["reservation_id"]) == first | {"replayed": True}
    # the entry cannot tell "the whole hold" from its amount named: both replay
    assert commit(db, "alice", "c1", held["reservation_id"], 40) == first | {"replayed": True}
    assert commit(db, "alice", "c1", held["reservation_id"], 30)["status"] == "idempotency_key_reused"
    assert credit(db, "alice", "c1", 5)["status"] == "idempotency_key_reused"


def test_the_window_must_outlive_the_longest_hold(db):
    with pytest.raises(psycopg.errors.CheckViolation):
        db.execute("UPDATE ledger.settings SET idempotency_retention = interval '6 days'")  # holds last 7
    db.execute("UPDATE ledger.settings SET idempotency_retention = interval '8 days'")


def _notification(db, entry_id: int, status: str, age: timedelta) -> None:
    at = datetime.now(timezone.utc) - age
    db.execute("INSERT INTO audit.notifications (user_id, entry_id, kind, payload, status, created_at, delivered_at)"
               " VALUES ('alice', %s, 'credit', '{}', %s, %s, %s)",
               (entry_id, status, at, at if status == "delivered" else None))


def test_only_delivered_notifications_older_than_theirs_are_forgotten(db):
    for entry_id in range(1, 6):
        _notification(db, entry_id, "delivered", 31 * DAY)
    _notification(db, 10, "delivered", 29 * DAY)
    _notification(db, 11, "pending", 400 * DAY)
    _notification(db, 12, "dead", 400 * DAY)
    assert db.execute("CALL audit.expire_notifications(NULL, 2)").fetchone()["deleted"] == 5
    left = db.execute("SELECT entry_id, status FROM audit.notifications ORDER BY entry_id").fetchall()
    assert [(r["entry_id"], r["status"]) for r in left] == [(10, "delivered"), (11, "pending"), (12, "dead")]


def test_both_are_scheduled_in_the_service_database():
    with psycopg.connect(SETTINGS.superuser_conninfo(), row_factory=dict_row) as cron:
        jobs = cron.execute("SELECT jobname, schedule, command FROM cron.job WHERE jobname IN"
                            " ('rewards-expire-idempotency-keys', 'rewards-expire-notifications')"
                            " ORDER BY jobname").fetchall()
    assert jobs == [
        {"jobname": "rewards-expire-idempotency-keys", "schedule": "41 * * * *",
         "command": "CALL ledger.expire_idempotency_keys()"},
        {"jobname": "rewards-expire-notifications", "schedule": "47 * * * *",
         "command": "CALL audit.expire_notifications()"}]
