"""A consumer that stops reading cannot fill the disk: max_slot_wal_keep_size
invalidates its slot (wal_status 'lost'), and the consumer, on its next poll
after the failure, makes the slot again, backfills from the ledger what the
history lacks, and says so in its log and its metrics. Shown for real on a
cluster of this module's own with a 1 MB limit, WAL written until the slot is
lost. Every entry gets its notification once, the ones the backfill copied
as the streamed ones."""

from __future__ import annotations

import dataclasses
from datetime import datetime
import logging
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from prometheus_client import REGISTRY

from app.audit.stream import Stream
from app.ledger import calls
from app.ledger.client import Ledger
from app.ledger.errors import Unavailable
from app.operations import cluster, processes
from app.settings import Settings
from tests.conftest import SETTINGS

pytestmark = pytest.mark.single_node("runs on a single-node cluster of its own, whatever the suite's topology")

SLOT = "rewards_audit"


@pytest.fixture(scope="module")
def own_cluster() -> Iterator[Settings]:
    folder = Path(tempfile.mkdtemp(prefix="slot-lost-", dir=SETTINGS.data_dir))
    settings = dataclasses.replace(SETTINGS, data_dir=folder, pg_port=processes.free_port(), pg_host=None,
                                   citus="off", citus_workers=0, database="rewards")
    try:
        cluster.up(settings)
        yield settings
    finally:
        cluster.down(settings)
        shutil.rmtree(folder, ignore_errors=True)


def _credit_everyone(ledger: Ledger, key: str) -> None:
    for user in ("ann", "bob", "cy"):
        ledger(calls.credit(user, key, 10, "task"))


def _lose_the_slot(admin: psycopg.Connection, ledger: Ledger) -> None:
    admin.execute("ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'")
    admin.execute("SELECT pg_reload_conf()")
    for turn in range(3):  # each switch starts a new 16 MB segment
        _credit_everyone(ledger, f"filler-{turn}")
        admin.execute("SELECT pg_switch_wal()")
    admin.execute("CHECKPOINT")  # where PostgreSQL invalidates the slots past the limit
    assert admin.execute("SELECT wal_status FROM pg_replication_slots WHERE slot_name = %s",
                         (SLOT,)).fetchone() == ("lost",)


def test_an_invalidated_slot_is_made_again_and_the_history_backfilled(own_cluster, caplog):
    conninfo = own_cluster.local_conninfo("rewards_audit_writer")
    stream = Stream(conninfo, conninfo, SLOT)
    with psycopg.connect(own_cluster.superuser_conninfo(), autocommit=True) as admin, \
            Ledger.connect(own_cluster.superuser_conninfo()) as ledger:
        stream.ensure_slot()
        _credit_everyone(ledger, "streamed")
        while stream.poll():
            pass
        # The consumer stops reading; entries go on, which its slot will never deliver.
        _credit_everyone(ledger, "lost-with-the-slot")
        _lose_the_slot(admin, ledger)

        assert stream.lag()["wal_status"] == "lost"
        with pytest.raises(Unavailable, match="can no longer get changes"):
            stream.poll()
        before = REGISTRY.get_sample_value("rewards_audit_slot_invalidations_total", {"slot": SLOT}) or 0
        # What run() does after an interrupted poll: close, and poll again.
        stream.close()
        with caplog.at_level(logging.WARNING, logger="rewards.audit"):
            while stream.poll():
                pass
        _credit_everyone(ledger, "after")
        while stream.poll():
            pass

        assert REGISTRY.get_sample_value("rewards_audit_slot_invalidations_total", {"slot": SLOT}) == before + 1
        assert any("invalidated" in record.message for record in caplog.records)
        assert admin.execute("SELECT wal_status FROM pg_replication_slots WHERE slot_name = %s",
                             (SLOT,)).fetchone() == ("reserved",)
        in_ledger = admin.execute("SELECT entry_id FROM ledger.entries ORDER BY 1").fetchall()
        in_history = admin.execute("SELECT entry_id FROM audit.entries ORDER BY 1").fetchall()
        assert len(in_ledger) == 3 * 6 and in_history == in_ledger
        # Streamed or backfilled, each entry's notification, once, and the same one.
        ledger_rows = admin.execute("SELECT * FROM ledger.entries ORDER BY entry_id").fetchall()
        columns = [column.name for column in admin.execute("SELECT * FROM ledger.entries LIMIT 0").description]
        notified = admin.execute("SELECT entry_id, kind, payload FROM audit.notifications ORDER BY entry_id").fetchall()
        assert [(entry_id, kind) for entry_id, kind, _ in notified] == [
            (row[columns.index("entry_id")], "credit") for row in ledger_rows]
        for row, (_, _, payload) in zip(ledger_rows, notified):
            entry = dict(zip(columns, row))
            assert payload | {"created_at": datetime.fromisoformat(payload["created_at"])} == {
                "id": f"{entry['user_id']}:{entry['entry_id']}", "type": "points.credit",
                "user_id": entry["user_id"], "entry_id": entry["entry_id"], "amount": entry["amount"],
                "balance": {"available": entry["available_after"], "reserved": entry["reserved_after"]},
                "reservation_id": None, "created_at": entry["created_at"]}
    stream.close()
