"""The audit stream as `rewards audit run` drives it, on whichever topology the
suite runs on: one slot per node that carries ledger changes (found in
pg_dist_node under Citus), every entry in the history exactly once, the
reconciler clean."""

from __future__ import annotations

from app.audit import reconcile
from app.audit.stream import discover, run
from tests.conftest import SETTINGS
from tests.ledger import commit, credit, debit, reserve
from tests.test_audit_stream import _history_ids, _ledger_ids


def test_every_node_streams_every_entry_once_and_the_books_agree(db, topology):
    target = SETTINGS.local_conninfo("rewards_audit_writer", db.info.dbname)
    streams = discover(target, f"nodes_{db.info.dbname}")
    assert len(streams) == (len(topology.workers) if topology.citus else 1)
    try:
        for stream in streams:
            stream.ensure_slot()
        for i in range(30):  # thirty users: under Citus, shards on every worker
            user = f"user-{i}"
            credit(db, user, "c", 50)
            held = reserve(db, user, "r", 20)
            commit(db, user, "m", held["reservation_id"], 15)
            debit(db, user, "d", 5)
        run(streams, stop_after_idle=1.0)
        history = _history_ids(db)
        assert history == _ledger_ids(db) and len(history) == len(set(history)) == 30 * 4
        assert reconcile.reconcile(SETTINGS.superuser_conninfo(db.info.dbname),
                                   slot=f"nodes_{db.info.dbname}").findings == []
    finally:
        for stream in streams:
            stream.drop_slot()
            stream.close()
