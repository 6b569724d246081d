"""The history is partitioned by month (pg_partman makes them ahead); retention
is a setting, applied by the database itself."""

from __future__ import annotations

from datetime import datetime, timezone

import psycopg
from psycopg.rows import dict_row

from tests.conftest import SETTINGS
from tests.ledger import credit
from tests.test_audit_stream import stream  # noqa: F401  (the fixture)


def _partitions(db, parent: str) -> list[str]:
    return [r["name"] for r in db.execute(
        "SELECT c.relname AS name FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = %s::regclass ORDER BY 1", (parent,)).fetchall()]


def test_entries_land_in_their_month(db, stream):  # noqa: F811
    credit(db, "alice", "c1", 5)
    while stream.poll():
        pass
    month = datetime.now(timezone.utc).strftime("p%Y_%m")
    where = db.execute("SELECT tableoid::regclass::text AS part FROM audit.entries").fetchone()["part"]
    assert where == f"audit.entries_{month}"
    assert f"entries_{month}" in _partitions(db, "audit.entries")
    assert f"reservation_events_{month}" in _partitions(db, "audit.reservation_events")


def test_retention_drops_old_months_and_moves_the_horizon(db):
    before = _partitions(db, "audit.entries")
    month = datetime.now(timezone.utc).strftime("p%Y_%m")
    older = [p for p in before if p < f"entries_{month}" and p != "entries_default"]
    assert older, "pg_partman premakes months behind the current one"
    assert db.execute("CALL audit.apply_history_retention()").fetchone()["dropped"] == 0  # kept forever
    db.execute("UPDATE audit.settings SET history_retention = '1 month'")
    assert db.execute("CALL audit.apply_history_retention()").fetchone()["dropped"] > 0
    after = _partitions(db, "audit.entries")
    assert f"entries_{month}" in after and "entries_default" in after
    assert len(after) < len(before)
    assert len(_partitions(db, "audit.reservation_events")) < len(before)
    horizon = db.execute("SELECT history_horizon FROM audit.settings").fetchone()["history_horizon"]
    assert horizon <= datetime.now(timezone.utc) and horizon.day == 1
    # pg_partman's own retention stays off: it would drop months without their checkpoints.
    assert db.execute("SELECT count(*) AS n FROM partman.part_config WHERE retention IS NOT NULL").fetchone()["n"] == 0


def test_maintenance_is_scheduled_in_the_service_database():
    with psycopg.connect(SETTINGS.superuser_conninfo(), row_factory=dict_row) as cron:
        job = cron.execute("SELECT schedule, command FROM cron.job WHERE jobname = 'rewards-audit-partitions'").fetchone()
        retention = cron.execute("SELECT schedule, command FROM cron.job WHERE jobname = 'rewards-audit-retention'").fetchone()
    assert job == {"schedule": "17 * * * *", "command": "CALL partman.run_maintenance_proc(p_jobmon := false)"}
    assert retention == {"schedule": "27 * * * *", "command": "CALL audit.apply_history_retention()"}
