"""The history is partitioned by month and kept by pg_partman; retention is a setting."""

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


def test_retention_drops_old_months_at_maintenance(db):
    before = _partitions(db, "audit.entries")
    month = datetime.now(timezone.utc).strftime("p%Y_%m")
    older = [p for p in before if p < f"entries_{month}" and p != "entries_default"]
    assert older, "pg_partman premakes months behind the current one"
    db.execute("UPDATE partman.part_config SET retention = '1 month' WHERE parent_table = 'audit.entries'")
    db.execute("CALL partman.run_maintenance_proc(p_jobmon := false)")
    after = _partitions(db, "audit.entries")
    assert f"entries_{month}" in after
    assert len(after) < len(before)


def test_maintenance_is_scheduled_in_the_service_database():
    with psycopg.connect(SETTINGS.superuser_conninfo(), row_factory=dict_row) as cron:
        job = cron.execute("SELECT schedule, command FROM cron.job WHERE jobname = 'rewards-audit-partitions'").fetchone()
    assert job == {"schedule": "17 * * * *", "command": "CALL partman.run_maintenance_proc(p_jobmon := false)"}
