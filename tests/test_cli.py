"""The `rewards` command: a refused input or a stopped database ends in one clear
line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from app.operations.processes import free_port
from app.settings import PROJECT_ROOT
from tests.ledger import balance, credit, debit, entries


def _rewards(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "app.cli", *args], cwd=PROJECT_ROOT, capture_output=True,
                          text=True, timeout=60, env={**os.environ, **env})


def _one_clear_line(done: subprocess.CompletedProcess[str], code: int, says: str) -> None:
    assert done.returncode == code, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rewards: ") and says in lines[0], done.stderr


def test_a_key_with_an_empty_name_is_refused_in_one_line(db):
    done = _rewards("keys", "create", "--name", "", "--scopes", "points:read", REWARDS_DATABASE=db.info.dbname)
    _one_clear_line(done, 2, "name")
    assert db.execute("SELECT count(*) AS n FROM api.keys").fetchone()["n"] == 0


def test_an_unknown_scope_is_refused_in_one_line(db):
    done = _rewards("keys", "create", "--name", "x", "--scopes", "points:fly", REWARDS_DATABASE=db.info.dbname)
    _one_clear_line(done, 2, "points:fly")


def test_a_second_rotation_of_a_source_is_refused_in_one_line(db):
    assert _rewards("sources", "create", "adnet", REWARDS_DATABASE=db.info.dbname).returncode == 0
    rotated = _rewards("sources", "rotate", "adnet", REWARDS_DATABASE=db.info.dbname)
    assert rotated.returncode == 0 and rotated.stdout.strip().splitlines()[-1].startswith("rcs_")
    _one_clear_line(_rewards("sources", "rotate", "adnet", REWARDS_DATABASE=db.info.dbname), 2, "under way")
    assert db.execute("SELECT count(*) AS n FROM api.callback_secrets").fetchone()["n"] == 2


def test_a_bad_retention_interval_is_refused_in_one_line(db):
    done = _rewards("audit", "retention", "--keep", "seven years", REWARDS_DATABASE=db.info.dbname)
    _one_clear_line(done, 2, "interval")


@pytest.mark.parametrize("command", [
    ["keys", "list"],
    ["keys", "create", "--name", "x", "--scopes", "points:read"],
    ["keys", "revoke", "1"],
    ["sources", "list"],
    ["ledger", "verify", "alice"],
    ["ledger", "expire"],
    ["ledger", "settle"],
    ["reconcile"],
    ["audit", "status"],
    ["audit", "retention"],
    ["notify", "dead"],
    ["notify", "resend", "1"],
    ["refunds", "create", "alice", "store", "o-1"],
    ["refunds", "shortfall"],
    ["db", "migrate"],
], ids=" ".join)
def test_a_stopped_database_is_one_line_not_a_traceback(command, tmp_path):
    # Nothing listens on this port: the database is, as far as the CLI can tell, stopped.
    done = _rewards(*command, REWARDS_PG_PORT=str(free_port()), REWARDS_PG_HOST="127.0.0.1")
    _one_clear_line(done, 1, "the database did not answer")


def test_setup_on_a_stopped_database_or_with_workers_it_cannot_register_is_one_line(tmp_path):
    elsewhere = {"REWARDS_DATA_DIR": str(tmp_path), "REWARDS_PG_HOST": "127.0.0.1", "REWARDS_PG_PORT": str(free_port())}
    _one_clear_line(_rewards("setup", **elsewhere, REWARDS_CITUS="off"), 1, "the database did not answer")
    _one_clear_line(_rewards("setup", "--worker", "worker1:5432", **elsewhere, REWARDS_CITUS="off"), 2,
                    "REWARDS_CITUS=on")
    _one_clear_line(_rewards("setup", "--worker", "worker1", **elsewhere, REWARDS_CITUS="on"), 2, "HOST:PORT")
    _one_clear_line(_rewards("setup", **elsewhere, REWARDS_CITUS="off", REWARDS_HA="on"), 2, "unset REWARDS_HA")


def test_the_command_line_leaves_the_slow_imports_to_the_commands_that_need_them():
    """supervisord starts the audit consumer and the sender as `rewards audit run`
    and `rewards notify run`: a restart must not first spend seconds importing
    Alembic and SQLAlchemy (migrations), nor Redis (the stack's own start)."""
    done = subprocess.run([sys.executable, "-c", "import sys, app.cli; print(' '.join(sorted(sys.modules)))"],
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60, check=True)
    loaded = {name.split(".")[0] for name in done.stdout.split()}
    assert not loaded & {"alembic", "sqlalchemy", "redis"}


def test_the_retention_of_keys_and_notifications_is_shown_set_and_refused_in_one_line(db):
    name = db.info.dbname
    assert _rewards("ledger", "retention", REWARDS_DATABASE=name).stdout == "idempotency records: kept 30 days\n"
    done = _rewards("ledger", "retention", "--keep", "90 days", REWARDS_DATABASE=name)
    assert done.returncode == 0 and done.stdout == "idempotency records: kept 90 days\n", done.stderr
    # A day, but no longer than the longest hold (7 days): a hold's commit retried later would be a new request.
    _one_clear_line(_rewards("ledger", "retention", "--keep", "3 days", REWARDS_DATABASE=name), 2, "longest hold")
    done = _rewards("notify", "retention", "--keep", "12 hours", REWARDS_DATABASE=name)
    assert done.returncode == 0 and done.stdout == "delivered notifications: kept 12:00:00\n", done.stderr
    _one_clear_line(_rewards("notify", "retention", "--keep", "0 days", REWARDS_DATABASE=name), 2, "retention")
    assert db.execute("SELECT (SELECT idempotency_retention::text FROM ledger.settings) AS keys, "
                      "(SELECT notification_retention::text FROM audit.settings) AS sent").fetchone() == {
        "keys": "90 days", "sent": "12:00:00"}


def test_a_refund_from_the_command_line_reverses_the_action_once_and_refusals_are_one_line(db):
    name = db.info.dbname
    credit(db, "alice", "c-1", 50, "purchase", source="store", external_id="o-1")
    debit(db, "alice", "d-1", 30)
    done = _rewards("refunds", "create", "alice", "store", "o-1", "--reason", "returned", REWARDS_DATABASE=name)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("alice\tstore o-1\trefunded 50 points (last entry "), done.stdout
    assert done.stdout.rstrip().endswith("available 0\treserved 0"), done.stdout
    # The same command again replays the answer (its key is made from the action).
    again = _rewards("refunds", "create", "alice", "store", "o-1", "--reason", "returned", "--json",
                     REWARDS_DATABASE=name)
    assert again.returncode == 0, again.stderr
    assert {k: v for k, v in json.loads(again.stdout).items() if k in ("status", "amount", "replayed")} == {
        "status": "ok", "amount": 50, "replayed": True}
    _one_clear_line(_rewards("refunds", "create", "alice", "store", "o-1", "--key", "another",
                             REWARDS_DATABASE=name), 2, "refunded already")
    _one_clear_line(_rewards("refunds", "create", "bob", "store", "o-1", REWARDS_DATABASE=name), 2, "no credit")
    parts = [(e["kind"], e["amount"]) for e in entries(db, "alice") if e["kind"] in ("reversal", "owed")]
    assert parts == [("reversal", 20), ("owed", 30)]
    assert (balance(db, "alice")["available"], balance(db, "alice")["owed"]) == (0, 30)


def test_the_refund_shortfall_is_shown_and_set(db):
    name = db.info.dbname
    assert _rewards("refunds", "shortfall", REWARDS_DATABASE=name).stdout.startswith("refund shortfall: owe ")
    done = _rewards("refunds", "shortfall", "--set", "write_off", REWARDS_DATABASE=name)
    assert done.returncode == 0 and done.stdout.startswith("refund shortfall: write_off "), done.stderr
    assert db.execute("SELECT refund_shortfall FROM ledger.settings").fetchone()["refund_shortfall"] == "write_off"
    refused = _rewards("refunds", "shortfall", "--set", "forgive", REWARDS_DATABASE=name)
    assert refused.returncode == 2 and "invalid choice" in refused.stderr and "Traceback" not in refused.stderr

