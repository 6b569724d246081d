"""The reconciler reports each injected fault and repairs only the history,
and finds nothing wrong with a healthy system: under live traffic (what the
stream has not delivered yet is not missing) and after retention dropped a
month (what is older than the horizon is not missing)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import psycopg
import pytest
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from app.audit import history, reconcile
from app.ledger import calls
from app.ledger.client import Ledger
from tests.conftest import SETTINGS
from tests.ledger import age_lots, commit, credit, debit, entries, reserve, tamper
from tests.test_audit_stream import EveryNode, stream  # noqa: F401  (the fixture)


@contextmanager
def consuming(stream: EveryNode) -> Iterator[None]:  # noqa: F811
    """The consumer at work beside the test, as `rewards audit run` is."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            if not stream.poll():
                stop.wait(0.02)

    worker = threading.Thread(target=loop, daemon=True)
    worker.start()
    try:
        yield
    finally:
        stop.set()
        worker.join()


@pytest.fixture
def streamed(db, stream):  # noqa: F811
    """Three accounts with history, all streamed; the consumer then stopped."""
    for user in ("alice", "bob", "carol"):
        credit(db, user, "c1", 100)
        held = reserve(db, user, "r1", 30)
        commit(db, user, "m1", held["reservation_id"], 20)
        debit(db, user, "d1", 5)
    while stream.poll():
        pass
    return db


@pytest.fixture
def live(streamed, stream):  # noqa: F811
    """The same, with the consumer running."""
    with consuming(stream):
        yield streamed


def _run(db, **options) -> reconcile.Report:
    # The slot the tests' consumer (the `stream` fixture) reads.
    return reconcile.reconcile(SETTINGS.superuser_conninfo(db.info.dbname), batch_size=2,
                               slot=f"audit_{db.info.dbname}", **options)


def test_all_agree(live):
    report = _run(live)
    assert report.accounts_checked == 3 and report.findings == []


def test_a_tampered_balance(live):
    live.execute("UPDATE ledger.accounts SET available = available + 1000 WHERE user_id = 'bob'")
    findings = _run(live).findings
    assert [(f["user_id"], f["finding"]) for f in findings] == [("bob", "balance_differs_from_entries")]
    assert findings[0]["detail"]["account"]["available"] == findings[0]["detail"]["entries"]["available"] + 1000


def test_a_tampered_reservation_hold(live):
    held = reserve(live, "carol", "r2", 10)
    tamper(live, "UPDATE ledger.reservations SET status = 'released', ended_at = now() "
                      "WHERE user_id = 'carol' AND reservation_id = %s", (held["reservation_id"],))
    assert ("carol", "reserved_differs_from_open_reservations") in [
        (f["user_id"], f["finding"]) for f in _run(live).findings]


def test_a_tampered_entry_breaks_the_chain(live):
    target = entries(live, "alice")[1]
    tamper(live, "UPDATE ledger.entries SET reason = 'forged' WHERE entry_id = %s", (target["entry_id"],))
    findings = {f["finding"]: f for f in _run(live).findings if f["user_id"] == "alice"}
    assert findings["chain_broken"]["detail"]["first_broken_entry_id"] == target["entry_id"]


def test_a_history_row_deleted_is_reported_and_repaired(live, tmp_path):
    target = entries(live, "bob")[2]
    live.execute("DELETE FROM audit.entries WHERE entry_id = %s", (target["entry_id"],))
    report = _run(live)
    assert [(f["user_id"], f["finding"], f["detail"]) for f in report.findings] == [
        ("bob", "entries_missing_from_history", {"entry_ids": [target["entry_id"]]})]
    ledger_before = live.execute("SELECT * FROM ledger.entries ORDER BY entry_id").fetchall()

    repaired = _run(live, repair=True)
    assert repaired.repaired == {"bob": 1}
    assert _run(live).findings == []
    assert live.execute("SELECT * FROM ledger.entries ORDER BY entry_id").fetchall() == ledger_before
    copied = live.execute("SELECT lsn FROM audit.entries WHERE entry_id = %s", (target["entry_id"],)).fetchone()
    assert copied["lsn"] is None  # marked as repaired, not live

    reconcile.write_report(report, tmp_path / "report.json")
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["discrepancies"] == 1 and data["by_finding"] == {"entries_missing_from_history": 1}


def test_an_entry_the_stream_has_not_delivered_is_not_missing_but_a_stopped_stream_is_reported(streamed):
    credit(streamed, "carol", "late", 7)  # written, not streamed: nothing consumes the slot
    findings = _run(streamed, stream_wait=0.5).findings
    # one for each slot not past its mark (under Citus, every worker's)
    assert findings and {(f["user_id"], f["finding"]) for f in findings} == {(None, "stream_behind")}
    assert all(f["detail"]["slot_name"].startswith("audit_") for f in findings)


def test_a_node_that_joins_during_a_run_is_waited_on(streamed, monkeypatch):
    """The consumer's slots are looked up when a batch needs them, not once at
    the start: here the slot nobody consumes appears only after the first
    batch (as a node added meanwhile would), and the stream is reported
    behind rather than carol's late entry taken for missing."""
    credit(streamed, "carol", "late", 7)  # written, not streamed; carol is in the second batch
    discover = reconcile.stream.discover
    joined = threading.Event()
    monkeypatch.setattr(reconcile.stream, "discover",
                        lambda target, slot: discover(target, slot) if joined.is_set() else [])
    findings = _run(streamed, stream_wait=0.5, progress=lambda *counts: joined.set()).findings
    assert findings and {(f["user_id"], f["finding"]) for f in findings} == {(None, "stream_behind")}


def test_another_tools_slot_is_not_waited_on(live):
    """A logical slot that is not the consumer's (a DBA's, read by nobody) feeds
    nothing into the history: a batch that finds an entry missing waits only
    for the consumer's slot, and the stream is not reported behind."""
    other = f"dba_{live.info.dbname}"
    live.execute("SELECT pg_create_logical_replication_slot(%s, 'wal2json')", (other,))
    try:
        target = entries(live, "alice")[1]
        live.execute("DELETE FROM audit.entries WHERE entry_id = %s", (target["entry_id"],))
        findings = _run(live, stream_wait=2).findings
    finally:
        live.execute("SELECT pg_drop_replication_slot(%s)", (other,))
    assert [(f["user_id"], f["finding"]) for f in findings] == [("alice", "entries_missing_from_history")]


def test_a_missing_entry_is_still_found_while_the_stream_runs(streamed, stream):  # noqa: F811
    last = entries(streamed, "bob")[-1]
    streamed.execute("DELETE FROM audit.entries WHERE entry_id = %s", (last["entry_id"],))
    with consuming(stream):
        findings = _run(streamed).findings
    assert [(f["user_id"], f["finding"], f["detail"]) for f in findings] == [
        ("bob", "entries_missing_from_history", {"entry_ids": [last["entry_id"]]})]


def test_reconcile_under_live_traffic_is_clean(live, dsn):
    """A writer on every account the whole time, the consumer keeping up as it
    does: entries committed but not yet applied are not findings."""
    stop = threading.Event()
    written = []

    def write() -> None:
        with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as conn:
            while not stop.is_set():
                for user in ("alice", "bob", "carol", "dave"):
                    written.append(credit(conn, user, f"w{len(written)}", 1))

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    try:
        reports = [_run(live) for _ in range(3)]
    finally:
        stop.set()
        writer.join()
    assert len(written) > 20
    assert [report.findings for report in reports] == [[], [], []]


def test_a_forged_history_row(live):
    row = live.execute("SELECT * FROM audit.entries WHERE user_id = 'alice' ORDER BY seq LIMIT 1").fetchone()
    live.execute("UPDATE audit.entries SET hash = sha256(hash) WHERE user_id = 'alice' AND entry_id = %s",
                     (row["entry_id"],))
    findings = {f["finding"] for f in _run(live).findings if f["user_id"] == "alice"}
    assert findings == {"entries_missing_from_history", "history_rows_not_in_ledger"}


def test_the_cli_exits_nonzero_on_a_discrepancy(live, monkeypatch, tmp_path, capsys):
    from app import cli

    monkeypatch.setenv("REWARDS_DATABASE", live.info.dbname)
    report = tmp_path / "r.json"
    assert cli.main(["reconcile", "--report", str(report)]) == 0
    live.execute("UPDATE ledger.accounts SET reserved = reserved + 1 WHERE user_id = 'alice'")
    assert cli.main(["reconcile", "--report", str(report)]) == 1
    out = capsys.readouterr().out
    assert "discrepancies" in out and "alice" in out
    assert json.loads(report.read_text())["discrepancies"] >= 1


def _moved_back(db, user: str, days: int) -> None:
    """The account's entries made `days` older, each rehashed so the chain still
    holds: as if it had been written then (the ledger cannot be told the time)."""
    prev = bytes(32)
    for entry in entries(db, user):
        # Values, not expressions: Citus refuses a time computed from a column in an UPDATE.
        tamper(db, "UPDATE ledger.entries SET created_at = %s, prev_hash = %s WHERE user_id = %s AND entry_id = %s",
               (entry["created_at"] - timedelta(days=days), prev, user, entry["entry_id"]))
        # The row as JSON, hashed on its own (under Citus a shard's row has the shard's type).
        row = db.execute("SELECT to_jsonb(e) AS row FROM ledger.entries e WHERE user_id = %s AND entry_id = %s",
                         (user, entry["entry_id"])).fetchone()["row"]
        prev = db.execute("SELECT ledger._entry_hash(%s, jsonb_populate_record(NULL::ledger.entries, %s)) AS hash",
                          (prev, Jsonb(row))).fetchone()["hash"]
        tamper(db, "UPDATE ledger.entries SET hash = %s WHERE user_id = %s AND entry_id = %s",
               (prev, user, entry["entry_id"]))
    tamper(db, "UPDATE ledger.accounts SET last_entry_hash = %s WHERE user_id = %s", (prev, user))


def test_after_retention_drops_a_month_the_books_still_agree(db):
    credit(db, "alice", "c1", 100)
    debit(db, "alice", "d1", 10)
    _moved_back(db, "alice", days=92)
    credit(db, "bob", "c1", 5)
    stream = EveryNode(SETTINGS.local_conninfo("rewards_audit_writer", db.info.dbname), f"audit_{db.info.dbname}")  # noqa: F811
    try:
        stream.ensure_slot()  # the backfill copies what came before, in its months
        credit(db, "alice", "c2", 7)
        while stream.poll():
            pass
        with consuming(stream):
            assert _run(db).findings == []
            with Ledger.connect(SETTINGS.superuser_conninfo(db.info.dbname)) as ledger:
                ledger(history.set_retention("1 month"))
            db.execute("CALL audit.apply_history_retention()")
            kept = db.execute("SELECT seq FROM audit.entries WHERE user_id = 'alice' ORDER BY seq").fetchall()
            assert [row["seq"] for row in kept] == [3]  # the two old ones went with their month
            checkpoint = db.execute("SELECT seq, hash FROM audit.chain_checkpoints WHERE user_id = 'alice'").fetchone()
            assert checkpoint == {"seq": 2, "hash": entries(db, "alice")[1]["hash"]}

            assert _run(db).findings == []
            assert _run(db, repair=True).repaired == {}
            assert db.execute("SELECT count(*) AS n FROM audit.entries WHERE user_id = 'alice'").fetchone()["n"] == 1
            assert db.execute("SELECT * FROM audit.verify_chain('alice')").fetchone() == {
                "ok": True, "entries_checked": 1, "first_broken_entry_id": None, "first_broken_seq": None}

            # What the history still holds is still checked, from the checkpoint on.
            tamper(db, "UPDATE audit.entries SET amount = 8 WHERE user_id = 'alice' AND seq = 3")
            assert db.execute("SELECT ok, first_broken_seq FROM audit.verify_chain('alice')").fetchone() == {
                "ok": False, "first_broken_seq": 3}
            db.execute("DELETE FROM audit.entries WHERE user_id = 'bob'")
            assert [(f["user_id"], f["finding"]) for f in _run(db).findings] == [
                ("bob", "entries_missing_from_history")]
    finally:
        stream.drop_slot()
        stream.close()


def test_settled_lots_stream_and_reconcile_like_any_entry(db, stream):  # noqa: F811
    """The entry kinds the lots added (mature, lapse) reach the history and agree."""
    credit(db, "dora", "c1", 40, pending=60, expiry=120)
    age_lots(db, "dora", 90)
    assert Ledger(db)(calls.settle_lots(100)).settled == 1
    age_lots(db, "dora", 30)
    assert Ledger(db)(calls.settle_lots(100)).settled == 1
    while stream.poll():
        pass
    assert [e["kind"] for e in entries(db, "dora")] == ["credit", "mature", "lapse"]
    kinds = db.execute("SELECT kind FROM audit.entries WHERE user_id = 'dora' ORDER BY seq").fetchall()
    assert [k["kind"] for k in kinds] == ["credit", "mature", "lapse"]
    report = _run(db)
    assert report.accounts_checked == 1 and report.findings == []
