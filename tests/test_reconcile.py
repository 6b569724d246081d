"""The reconciler reports each injected fault and repairs only the history."""

from __future__ import annotations

import json

import pytest

from app.audit import reconcile
from tests.conftest import SETTINGS
from tests.ledger import commit, credit, debit, entries, reserve, tamper
from tests.test_audit_stream import stream  # noqa: F401  (the fixture)


@pytest.fixture
def streamed(db, stream):  # noqa: F811
    """Three accounts with history, all streamed."""
    for user in ("alice", "bob", "carol"):
        credit(db, user, "c1", 100)
        held = reserve(db, user, "r1", 30)
        commit(db, user, "m1", held["reservation_id"], 20)
        debit(db, user, "d1", 5)
    while stream.poll():
        pass
    return db


def _run(db, **options) -> reconcile.Report:
    return reconcile.reconcile(SETTINGS.superuser_conninfo(db.info.dbname), batch_size=2, **options)




def test_all_agree(streamed):
    report = _run(streamed)
    assert report.accounts_checked == 3 and report.findings == []


def test_a_tampered_balance(streamed):
    streamed.execute("UPDATE ledger.accounts SET available = available + 1000 WHERE user_id = 'bob'")
    findings = _run(streamed).findings
    assert [(f["user_id"], f["finding"]) for f in findings] == [("bob", "balance_differs_from_entries")]
    assert findings[0]["detail"]["account"]["available"] == findings[0]["detail"]["entries"]["available"] + 1000


def test_a_tampered_reservation_hold(streamed):
    held = reserve(streamed, "carol", "r2", 10)
    tamper(streamed, "UPDATE ledger.reservations SET status = 'released', ended_at = now() "
                      "WHERE user_id = 'carol' AND reservation_id = %s", (held["reservation_id"],))
    assert ("carol", "reserved_differs_from_open_reservations") in [
        (f["user_id"], f["finding"]) for f in _run(streamed).findings]


def test_a_tampered_entry_breaks_the_chain(streamed):
    target = entries(streamed, "alice")[1]
    tamper(streamed, "UPDATE ledger.entries SET reason = 'forged' WHERE entry_id = %s", (target["entry_id"],))
    findings = {f["finding"]: f for f in _run(streamed).findings if f["user_id"] == "alice"}
    assert findings["chain_broken"]["detail"]["first_broken_entry_id"] == target["entry_id"]


def test_a_history_row_deleted_is_reported_and_repaired(streamed, tmp_path):
    target = entries(streamed, "bob")[2]
    streamed.execute("DELETE FROM audit.entries WHERE entry_id = %s", (target["entry_id"],))
    report = _run(streamed)
    assert [(f["user_id"], f["finding"], f["detail"]) for f in report.findings] == [
        ("bob", "entries_missing_from_history", {"entry_ids": [target["entry_id"]]})]
    ledger_before = streamed.execute("SELECT * FROM ledger.entries ORDER BY entry_id").fetchall()

    repaired = _run(streamed, repair=True)
    assert repaired.repaired == {"bob": 1}
    assert _run(streamed).findings == []
    assert streamed.execute("SELECT * FROM ledger.entries ORDER BY entry_id").fetchall() == ledger_before
    copied = streamed.execute("SELECT lsn FROM audit.entries WHERE entry_id = %s", (target["entry_id"],)).fetchone()
    assert copied["lsn"] is None  # marked as repaired, not streamed

    reconcile.write_report(report, tmp_path / "report.json")
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["discrepancies"] == 1 and data["by_finding"] == {"entries_missing_from_history": 1}


def test_an_entry_that_never_reached_the_history(streamed):
    made = credit(streamed, "carol", "late", 7)  # written, not streamed
    findings = _run(streamed).findings
    assert [(f["user_id"], f["finding"], f["detail"]) for f in findings] == [
        ("carol", "entries_missing_from_history", {"entry_ids": [made["entry_id"]]})]


def test_a_forged_history_row(streamed):
    row = streamed.execute("SELECT * FROM audit.entries WHERE user_id = 'alice' ORDER BY seq LIMIT 1").fetchone()
    streamed.execute("UPDATE audit.entries SET hash = sha256(hash) WHERE user_id = 'alice' AND entry_id = %s",
                     (row["entry_id"],))
    findings = {f["finding"] for f in _run(streamed).findings if f["user_id"] == "alice"}
    assert findings == {"entries_missing_from_history", "history_rows_not_in_ledger"}


def test_the_cli_exits_nonzero_on_a_discrepancy(streamed, monkeypatch, tmp_path, capsys):
    from app import cli

    monkeypatch.setenv("REWARDS_DATABASE", streamed.info.dbname)
    report = tmp_path / "r.json"
    assert cli.main(["reconcile", "--report", str(report)]) == 0
    streamed.execute("UPDATE ledger.accounts SET reserved = reserved + 1 WHERE user_id = 'alice'")
    assert cli.main(["reconcile", "--report", str(report)]) == 1
    out = capsys.readouterr().out
    assert "discrepancies" in out and "alice" in out
    assert json.loads(report.read_text())["discrepancies"] >= 1
