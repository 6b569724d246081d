"""The `rewards` command: a refused input or a stopped database ends in one clear
line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from app.operations.processes import free_port
from app.settings import PROJECT_ROOT


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
