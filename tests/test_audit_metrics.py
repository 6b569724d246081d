"""What the audit consumer exports of the nodes for the alert rules
(app.audit.metrics.NodeCollector), read as its role reads it: slots, standbys,
parked notifications, and a node that does not answer."""

from __future__ import annotations

import secrets
import subprocess
import time
import uuid

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from app.audit.metrics import NodeCollector
from app.operations import processes
from tests.conftest import SETTINGS


def _scrape(collector: NodeCollector) -> dict[tuple[str, tuple], float]:
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def _value(samples: dict, name: str, **labels: str) -> float | None:
    """The one sample of `name` whose labels include `labels`."""
    found = [value for (sample, sample_labels), value in samples.items()
             if sample == name and set(labels.items()) <= set(sample_labels)]
    assert len(found) <= 1, found
    return found[0] if found else None


@pytest.fixture
def collector(db):
    writer = SETTINGS.local_conninfo("rewards_audit_writer", db.info.dbname)
    return NodeCollector(lambda: [writer], writer)


@pytest.fixture
def physical_slot(db):
    slot = f"standby_{uuid.uuid4().hex[:8]}"
    db.execute("SELECT pg_create_physical_replication_slot(%s, true)", [slot])
    yield slot
    db.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
               "WHERE slot_name = %s AND NOT active", [slot])


@pytest.fixture
def standby(db, physical_slot, tmp_path):
    """pg_receivewal streaming from the slot over TCP: a walsender and a
    pg_stat_replication row exactly as a standby makes them, in a second."""
    role, password = f"test_standby_{uuid.uuid4().hex[:8]}", secrets.token_hex(16)
    db.execute(f"CREATE ROLE {role} LOGIN REPLICATION PASSWORD '{password}'")
    folder = tmp_path / "wal"
    folder.mkdir()
    receiver = subprocess.Popen(
        [f"{SETTINGS.pg_bin}/pg_receivewal", "-D", folder, "-S", physical_slot, "--no-loop",
         "-d", f"host=127.0.0.1 port={SETTINGS.pg_port} user={role} password={password} "
               f"application_name=test_standby"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while not db.execute("SELECT 1 FROM pg_stat_replication WHERE application_name = 'test_standby' "
                             "AND state = 'streaming'").fetchone():
            assert receiver.poll() is None, receiver.stderr.read().decode()
            assert time.monotonic() < deadline, "pg_receivewal did not stream"
            time.sleep(0.1)
        yield physical_slot
    finally:
        receiver.terminate()
        receiver.wait(10)
        while db.execute("SELECT 1 FROM pg_stat_replication WHERE usename = %s", [role]).fetchone():
            time.sleep(0.1)
        db.execute(f"DROP ROLE {role}")


def test_a_slot_without_its_standby_is_inactive_and_keeps_wal(db, collector, physical_slot):
    samples = _scrape(collector)
    assert _value(samples, "rewards_node_up") == 1
    assert _value(samples, "rewards_slot_active", slot=physical_slot, type="physical") == 0
    assert _value(samples, "rewards_slot_wal_retained_bytes", slot=physical_slot) >= 0
    assert _value(samples, "rewards_replication_standbys") == 0


def test_a_streaming_standby_is_counted_with_its_lag(db, collector, standby):
    # As the audit writer, which sees positions only through pg_read_all_stats.
    samples = _scrape(collector)
    assert _value(samples, "rewards_slot_active", slot=standby, type="physical") == 1
    assert _value(samples, "rewards_replication_standbys") == 1
    assert _value(samples, "rewards_replication_lag_bytes", standby="test_standby") >= 0
    assert _value(samples, "rewards_replication_lag_seconds", standby="test_standby") >= 0
    # Asynchronous: the cluster's commits wait for no standby.
    assert _value(samples, "rewards_replication_synchronous") == 0
    assert _value(samples, "rewards_replication_sync_standbys") == 0


def test_parked_notifications_are_counted(db, collector):
    assert _value(_scrape(collector), "rewards_notifications_dead") == 0
    for entry_id, status in ((1, "dead"), (2, "dead"), (3, "pending"), (4, "delivered")):
        db.execute("INSERT INTO audit.notifications (user_id, entry_id, kind, payload, status) "
                   "VALUES ('alice', %s, 'credit', '{}', %s)", [entry_id, status])
    assert _value(_scrape(collector), "rewards_notifications_dead") == 2


def test_a_node_that_does_not_answer_is_down_and_the_others_still_read(db, collector):
    writer = SETTINGS.local_conninfo("rewards_audit_writer", db.info.dbname)
    port = processes.free_port()
    gone = f"host=127.0.0.1 port={port} user=rewards_audit_writer dbname={db.info.dbname}"
    samples = _scrape(NodeCollector(lambda: [writer, gone], writer))
    up = {dict(labels)["node"]: value for (name, labels), value in samples.items() if name == "rewards_node_up"}
    assert up[f"127.0.0.1:{port}"] == 0
    assert up[f"{SETTINGS.socket_dir}:{SETTINGS.pg_port}"] == 1
    assert _value(samples, "rewards_notifications_dead") == 0
