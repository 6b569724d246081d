"""Reservations expire by the database itself: pg_cron runs the expiry each minute."""

from __future__ import annotations

import time

import psycopg
import pytest
from psycopg.rows import dict_row

from tests.conftest import SETTINGS
from tests.ledger import balance, credit, entries, reserve

JOB = "rewards-expire-reservations"


def _cron() -> psycopg.Connection:
    """pg_cron keeps its jobs in the service database, where the migration scheduled ours."""
    return psycopg.connect(SETTINGS.superuser_conninfo(), autocommit=True, row_factory=dict_row)


def test_the_migration_schedules_the_expiry_every_minute():
    with _cron() as cron:
        job = cron.execute(
            "SELECT schedule, command, database, active FROM cron.job WHERE jobname = %s", (JOB,)
        ).fetchone()
    assert job == {"schedule": "* * * * *", "command": "CALL ledger.expire_reservations()",
                   "database": SETTINGS.database, "active": True}


@pytest.mark.slow
def test_the_scheduled_job_expires_a_reservation(db):
    # The job runs in the service database; running its very command on the same
    # schedule in this test's database keeps test rows out of the service ledger.
    credit(db, "alice", "fund", 50)
    held = reserve(db, "alice", "hold", 20, ttl=1)
    with _cron() as cron:
        job = cron.execute("SELECT schedule, command FROM cron.job WHERE jobname = %s", (JOB,)).fetchone()
        test_job = f"{JOB}-{db.info.dbname}"
        cron.execute("SELECT cron.schedule_in_database(%s, %s, %s, %s)",
                     (test_job, job["schedule"], job["command"], db.info.dbname))
        try:
            deadline = time.monotonic() + 150
            while time.monotonic() < deadline:
                state = db.execute("SELECT status FROM ledger.reservation('alice', %s)",
                                   (held["reservation_id"],)).fetchone()
                if state["status"] != "open":
                    break
                time.sleep(1)
        finally:
            cron.execute("SELECT cron.unschedule(%s)", (test_job,))

    assert state["status"] == "expired"
    after = balance(db, "alice")
    assert (after["available"], after["reserved"]) == (50, 0)
    assert entries(db, "alice")[-1]["kind"] == "expire"
