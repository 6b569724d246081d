"""The change stream: ledger rows reach the history exactly once, whatever
crashes in between; the auditor reads and changes nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import psycopg
import pytest

from app.audit.stream import Stream, discover, run
from app.operations import processes
from app.settings import PROJECT_ROOT
from tests.conftest import SETTINGS
from tests.ledger import commit, credit, debit, reserve


def _lsn(text: str) -> int:
    high, low = text.split("/")
    return (int(high, 16) << 32) + int(low, 16)


class EveryNode:
    """The streams of every node that carries ledger changes (one on a single
    node, one per worker under Citus), driven as one, as `rewards audit run`
    drives them: the slot is the name given to it."""

    def __init__(self, target: str, slot: str) -> None:
        self.slot = slot
        self.streams = discover(target, slot)

    def ensure_slot(self) -> None:
        for stream in self.streams:
            stream.ensure_slot()

    def poll(self) -> int:
        return sum(stream.poll() for stream in self.streams)

    def lag(self) -> dict:
        lags = [lag for stream in self.streams if (lag := stream.lag())]
        committed = [lag["last_committed_at"] for lag in lags if lag["last_committed_at"]]
        return {"lag_bytes": sum(lag["lag_bytes"] for lag in lags),
                "lag_seconds": max(lag["lag_seconds"] for lag in lags),
                "last_committed_at": max(committed) if committed else None,
                "confirmed": {lag["slot_name"]: _lsn(lag["confirmed_lsn"]) for lag in lags}}

    def drop_slot(self) -> None:
        for stream in self.streams:
            stream.drop_slot()

    def close(self) -> None:
        for stream in self.streams:
            stream.close()


@pytest.fixture
def stream(db):
    dbname = db.info.dbname
    stream = EveryNode(SETTINGS.local_conninfo("rewards_audit_writer", dbname), f"audit_{dbname}")
    stream.ensure_slot()
    yield stream
    stream.drop_slot()
    stream.close()


def _history_ids(db) -> list[int]:
    return [r["entry_id"] for r in db.execute("SELECT entry_id FROM audit.entries ORDER BY entry_id").fetchall()]


def _ledger_ids(db) -> list[int]:
    return [r["entry_id"] for r in db.execute("SELECT entry_id FROM ledger.entries ORDER BY entry_id").fetchall()]


def test_a_credit_appears_in_the_history(db, stream):
    made = credit(db, "alice", "c1", 100, metadata={"campaign": "x"})
    assert stream.poll() == 1
    row = db.execute("SELECT * FROM audit.entries").fetchone()
    ledger_row = db.execute("SELECT * FROM ledger.entries").fetchone()
    assert row["entry_id"] == made["entry_id"]
    assert {k: row[k] for k in ledger_row} == ledger_row
    assert row["committed_at"] is not None and row["lsn"] is not None
    assert stream.poll() == 0


def test_reservations_and_notifications_are_recorded(db, stream):
    credit(db, "alice", "c1", 100)
    held = reserve(db, "alice", "r1", 40)
    commit(db, "alice", "m1", held["reservation_id"], 30)
    debit(db, "alice", "d1", 5)
    while stream.poll():
        pass
    events = db.execute("SELECT status, amount, committed_amount FROM audit.reservation_events ORDER BY event_at").fetchall()
    assert events == [{"status": "open", "amount": 40, "committed_amount": None},
                      {"status": "committed", "amount": 40, "committed_amount": 30}]
    kinds = [r["kind"] for r in db.execute("SELECT kind FROM audit.notifications ORDER BY entry_id").fetchall()]
    assert kinds == ["credit", "commit", "debit"]  # a reserve is not news to the user
    payload = db.execute("SELECT payload FROM audit.notifications WHERE kind = 'commit'").fetchone()["payload"]
    assert payload["balance"] == {"available": 70, "reserved": 0} and payload["id"].startswith("alice:")


def _crashes(stream: EveryNode) -> int:
    """Poll each node once; how many of them were killed doing it."""
    crashed = 0
    for node in stream.streams:
        try:
            node.poll()
        except KeyboardInterrupt:
            crashed += 1
    return crashed


def test_a_crash_between_commit_and_confirm_duplicates_nothing(db, stream, monkeypatch):
    for i in range(10):
        credit(db, f"user-{i % 3}", f"k{i}", 5)

    def crash(self, lsn):
        raise KeyboardInterrupt("killed before confirming")

    monkeypatch.setattr(Stream, "confirm", crash)
    assert _crashes(stream) >= 1
    monkeypatch.undo()
    assert len(_history_ids(db)) == 10  # committed before the crash

    credit(db, "user-0", "k-after", 5)
    while stream.poll():
        pass
    assert _history_ids(db) == _ledger_ids(db)


def test_a_crash_before_the_history_commit_loses_nothing(db, stream, monkeypatch):
    for i in range(5):
        credit(db, "alice", f"k{i}", 5)

    def die_while_applying(self, target, batch):
        raise KeyboardInterrupt("killed mid-batch")

    monkeypatch.setattr(Stream, "_apply", die_while_applying)
    assert _crashes(stream) >= 1
    monkeypatch.undo()
    stream.close()  # the next consumer starts afresh
    while stream.poll():
        pass
    assert _history_ids(db) == _ledger_ids(db)


def test_killing_the_consumer_process_repeatedly_loses_and_duplicates_nothing(db, stream):
    dbname = db.info.dbname
    env = {**os.environ, "REWARDS_DATABASE": dbname, "REWARDS_AUDIT_METRICS_PORT": "0"}
    command = [sys.executable, "-m", "app.cli", "audit", "run", "--slot", stream.slot]
    written = 0
    for round_no in range(4):
        consumer = subprocess.Popen(command, cwd=PROJECT_ROOT, env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for i in range(40):
            credit(db, f"user-{i % 7}", f"r{round_no}-{i}", 3)
            written += 1
        time.sleep(0.3 + 0.2 * round_no)
        consumer.send_signal(signal.SIGKILL)
        consumer.wait()
    stream.close()
    run([stream], stop_after_idle=1.0)
    history = _history_ids(db)
    assert len(history) == len(set(history)) == written
    assert history == _ledger_ids(db)


def test_the_lag_is_reported(db, stream):
    credit(db, "alice", "c1", 1)
    time.sleep(0.2)
    behind = stream.lag()
    while stream.poll():
        pass
    caught_up = stream.lag()
    # The bytes are counted to the node's WAL end, which anything else on the
    # node moves too (another database, Citus' own daemon: 3,176 bytes behind
    # against 6,272 caught up, once): the slot's confirmed position is what the
    # consumer moved.
    assert behind["lag_bytes"] > 0 and caught_up["lag_bytes"] >= 0
    moved = {slot: caught_up["confirmed"][slot] - lsn for slot, lsn in behind["confirmed"].items()}
    assert min(moved.values()) >= 0 and max(moved.values()) > 0, moved
    assert behind["lag_seconds"] >= 0.2 and caught_up["lag_seconds"] == 0.0
    assert caught_up["last_committed_at"] is not None


@pytest.mark.parametrize("statement", [
    "INSERT INTO audit.entries SELECT * FROM audit.entries",
    "UPDATE audit.entries SET amount = 1",
    "DELETE FROM audit.entries",
    "UPDATE audit.notifications SET status = 'dead'",
    "INSERT INTO ledger.accounts (user_id) VALUES ('mallory')",
    "SELECT ledger.credit('mallory', 'k', 1, 'x', NULL, NULL, '{}')",
    "UPDATE ledger.accounts SET available = 1",
    "CREATE TABLE audit.mine (x int)",
])
def test_the_auditor_is_refused_every_write(db, stream, statement):
    credit(db, "alice", "c1", 1)
    while stream.poll():
        pass
    with psycopg.connect(SETTINGS.local_conninfo("rewards_auditor", db.info.dbname)) as auditor:
        assert auditor.execute("SELECT count(*) FROM audit.entries").fetchone()[0] == 1
        assert auditor.execute("SELECT ok FROM audit.verify_chain('alice')").fetchone()[0] is True
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            auditor.execute(statement)


def test_the_consumer_serves_its_lag_as_metrics(db, stream):
    port = processes.free_port()
    env = {**os.environ, "REWARDS_DATABASE": db.info.dbname, "REWARDS_AUDIT_METRICS_PORT": str(port)}
    consumer = subprocess.Popen([sys.executable, "-m", "app.cli", "audit", "run", "--slot", stream.slot],
                                cwd=PROJECT_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        credit(db, "alice", "c1", 1)
        deadline = time.monotonic() + 20
        text = ""
        while time.monotonic() < deadline:
            try:
                text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
            except httpx.HTTPError:
                text = ""
            if all(f'rewards_audit_lag_bytes{{slot="{node.slot}"}}' in text for node in stream.streams) \
                    and _history_ids(db) == _ledger_ids(db):
                break
            time.sleep(0.3)
    finally:
        consumer.terminate()
        consumer.wait()
    for node in stream.streams:  # each node's slot: the single node's is the name given
        assert f'rewards_audit_lag_bytes{{slot="{node.slot}"}}' in text
        assert f'rewards_audit_lag_seconds{{slot="{node.slot}"}}' in text
    assert _history_ids(db) == _ledger_ids(db)


def test_a_new_slot_backfills_what_came_before_it(db):
    credit(db, "alice", "before-1", 10)
    held = reserve(db, "alice", "before-2", 4)
    commit(db, "alice", "before-3", held["reservation_id"])
    conninfo = SETTINGS.local_conninfo("rewards_audit_writer", db.info.dbname)
    late = EveryNode(conninfo, f"late_{db.info.dbname}")
    try:
        late.ensure_slot()
        credit(db, "alice", "after-1", 1)
        while late.poll():
            pass
        assert _history_ids(db) == _ledger_ids(db)
        statuses = [r["status"] for r in db.execute(
            "SELECT status FROM audit.reservation_events ORDER BY event_at").fetchall()]
        assert statuses == ["open", "committed"]
        assert db.execute("SELECT ok FROM audit.verify_chain('alice')").fetchone()["ok"] is True
    finally:
        late.drop_slot()
        late.close()
