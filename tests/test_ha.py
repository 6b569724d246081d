"""REWARDS_HA=on: a trio of the test's own (monitor, primary, synchronous
standby, on free ports in a folder of its own, with PgBouncer and the listener
that points it at the primary), built once for the module. Commits wait for
the standby; a planned switchover and the loss of the primary's whole node
keep every acknowledged write, and writes go through again; the audit stream
makes its slot on the new primary and the history ends up complete."""

from __future__ import annotations

import dataclasses
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from prometheus_client import REGISTRY
from psycopg.rows import dict_row

from app import cli
from app.audit import reconcile
from app.audit.stream import Stream
from app.ledger import calls
from app.ledger.client import Ledger
from app.ledger.errors import LedgerError, Unavailable, translated
from app.operations import ha, processes
from app.operations.supervisor import Supervisor
from app.settings import Settings
from tests.conftest import SETTINGS

pytestmark = [
    pytest.mark.skipif(shutil.which("pg_autoctl") is None,
                       reason="pg_autoctl is not installed (Debian's postgresql-15-auto-failover; `make install`)"),
    pytest.mark.single_node("pg_auto_failover runs a primary and a standby, without Citus"),
]

SLOT = "rewards_audit"


def _three_free_ports() -> int:
    """A port whose next two are free as well (the monitor's and its nodes')."""
    while True:
        base = processes.free_port()
        if base + 2 > 65535:
            continue
        probes = []
        try:
            for port in (base + 1, base + 2):
                probe = socket.socket()
                probes.append(probe)
                probe.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for probe in probes:
                probe.close()


def _environment(settings: Settings) -> dict[str, str]:
    """The variables that make the CLI's load() find this trio."""
    return {"REWARDS_DATA_DIR": str(settings.data_dir), "REWARDS_PG_PORT": str(settings.pg_port),
            "REWARDS_BOUNCER_PORT": str(settings.bouncer_port), "REWARDS_HA": "on", "REWARDS_CITUS": "off",
            "REWARDS_CITUS_WORKERS": "0", "REWARDS_API_DB_PASSWORD": settings.required("api_password")}


@pytest.fixture(scope="module")
def trio() -> Iterator[Settings]:
    # Inside the project's data folder, which the cluster's OS user can reach
    # (pytest's own temporary folders are root's alone).
    settings = dataclasses.replace(
        SETTINGS, data_dir=SETTINGS.data_dir / f"test-ha-{uuid.uuid4().hex[:8]}", pg_port=_three_free_ports(),
        bouncer_port=processes.free_port(), ha=True, citus="off", citus_workers=0, audit_metrics_port=0)
    stopping = threading.Event()
    follower = threading.Thread(target=ha.follow, kwargs={
        "settings": settings, "retarget": lambda port: processes.bouncer_retarget(settings, port),
        "stop": stopping.is_set, "poll_seconds": 0.5}, daemon=True)
    try:
        ha.up(settings)
        processes.bouncer_up(settings)
        follower.start()
        yield settings
    finally:
        stopping.set()
        if follower.is_alive():
            follower.join(timeout=10)
        processes.bouncer_down(settings)
        ha.down(settings)
        Supervisor.of(settings).close()
        shutil.rmtree(settings.data_dir, ignore_errors=True)


def _bouncer(settings: Settings) -> Ledger:
    # PgBouncer in transaction mode: nothing prepared, as the API connects. A
    # login PgBouncer refuses while its node is gone is the Unavailable the
    # API's pool reports when it can open no connection.
    with translated():
        return Ledger(psycopg.connect(settings.bouncer_conninfo(), autocommit=True, prepare_threshold=None,
                                      connect_timeout=3))


def _present(settings: Settings, keys: list[str]) -> set[str]:
    """Which of these idempotency keys the primary holds an entry for."""
    with psycopg.connect(settings.superuser_conninfo(), autocommit=True) as conn:
        rows = conn.execute("SELECT idempotency_key FROM ledger.entries WHERE idempotency_key = ANY (%(keys)s)",
                            {"keys": keys}).fetchall()
    return {row[0] for row in rows}


class Writer(threading.Thread):
    """A small write load through PgBouncer: credits one after another, each
    retried with its key until acknowledged (as a client of the API would)."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(daemon=True)
        self.settings = settings
        self.run_id = uuid.uuid4().hex[:8]
        # (when the attempt that was acknowledged began, when it was, its key)
        self.acknowledged: list[tuple[float, float, str]] = []
        self.failures: list[tuple[float, Exception]] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        ledger: Ledger | None = None
        number = 0
        while not self.stopping.is_set():
            key = f"ha-{self.run_id}-{number}"
            while not self.stopping.is_set():
                began = time.monotonic()
                try:
                    if ledger is None or ledger.closed:
                        ledger = _bouncer(self.settings)
                    ledger(calls.credit(f"ha-user-{number % 7}", key, 1, "ha test"))
                    self.acknowledged.append((began, time.monotonic(), key))
                    break
                except (LedgerError, psycopg.Error) as exc:
                    self.failures.append((time.monotonic(), exc))
                    if ledger is not None:
                        ledger.close()
                    time.sleep(0.1)
            number += 1
            time.sleep(0.02)
        if ledger is not None:
            ledger.close()

    def keys(self) -> list[str]:
        return [key for _, _, key in self.acknowledged]

    def first_acknowledged_after(self, moment: float) -> float | None:
        """When the first write begun after `moment` was acknowledged (one in
        flight at that moment may have committed just before it)."""
        return next((at for began, at, _ in self.acknowledged if began > moment), None)


def _catch_up(stream: Stream, timeout: float = 60.0) -> None:
    """Poll until the slot has nothing more, reconnecting (to whichever node is
    primary) when the database goes away, as `rewards audit run` does."""
    deadline = time.monotonic() + timeout
    idle = 0
    while idle < 3:
        assert time.monotonic() < deadline, "the audit stream did not catch up"
        try:
            idle = 0 if stream.poll() else idle + 1
        except Unavailable:
            stream.close()
            time.sleep(0.5)


def _history_complete(settings: Settings) -> None:
    with psycopg.connect(settings.superuser_conninfo(), autocommit=True, row_factory=dict_row) as conn:
        missing = conn.execute(
            "SELECT count(*) AS n FROM ledger.entries e WHERE NOT EXISTS "
            "(SELECT 1 FROM audit.entries h WHERE h.user_id = e.user_id AND h.entry_id = e.entry_id)").fetchone()
        counts = conn.execute("SELECT (SELECT count(*) FROM ledger.entries) AS ledger, "
                              "(SELECT count(*) FROM audit.entries) AS history").fetchone()
    assert missing["n"] == 0
    assert counts["ledger"] == counts["history"]
    report = reconcile.reconcile(settings.superuser_conninfo())
    assert report.findings == []


def test_commits_wait_for_the_standby(trio: Settings) -> None:
    current = ha.primary(trio)
    assert current is not None
    primary_node = next(n for n in ha.nodes(trio) if n.port == current.port)
    standby_node = next(n for n in ha.nodes(trio) if n.port != current.port)
    with psycopg.connect(ha.node_conninfo(trio, primary_node), autocommit=True, row_factory=dict_row) as conn:
        role = conn.execute("SELECT current_setting('synchronous_commit') AS commit, "
                            "current_setting('synchronous_standby_names') AS names").fetchone()
        replication = conn.execute("SELECT application_name, sync_state FROM pg_stat_replication").fetchall()
        # The transaction's own WAL ends before its commit record: once the
        # commit returns, the standby must have flushed past it.
        with conn.transaction():
            Ledger(conn)(calls.credit("ha-sync", f"sync-{uuid.uuid4().hex}", 5, "two disks"))
            written = conn.execute("SELECT pg_current_wal_insert_lsn() AS lsn").fetchone()["lsn"]
    assert role["commit"] in ("on", "remote_write", "remote_apply")
    assert [(r["application_name"], r["sync_state"]) for r in replication] == [
        (f"pgautofailover_standby_{_node_id(trio, standby_node)}", "quorum")]
    assert role["names"] == f"ANY 1 (pgautofailover_standby_{_node_id(trio, standby_node)})"
    with psycopg.connect(ha.node_conninfo(trio, standby_node), autocommit=True) as conn:
        flushed = conn.execute("SELECT pg_wal_lsn_diff(pg_last_wal_receive_lsn(), %(lsn)s::pg_lsn) >= 0",
                               {"lsn": written}).fetchone()[0]
    assert flushed
    assert ha.status(trio)["problems"] == []


def _node_id(settings: Settings, node: ha.Node) -> int:
    return next(row["node_id"] for row in ha.status(settings)["nodes"] if row["port"] == node.port)


def test_a_planned_switchover_keeps_every_acknowledged_write(trio: Settings, monkeypatch, capsys) -> None:
    before = ha.primary(trio)
    writer = Writer(trio)
    writer.start()
    time.sleep(1)
    for name, value in _environment(trio).items():
        monkeypatch.setenv(name, value)
    assert cli.main(["ha", "failover"]) == 0
    switched = time.monotonic()
    time.sleep(1)
    writer.stopping.set()
    writer.join(timeout=30)
    after = ha.primary(trio)
    assert after is not None and before is not None and after.port != before.port
    assert f"to {after.name}" in capsys.readouterr().out
    assert set(writer.keys()) <= _present(trio, writer.keys())
    # Meanwhile calls were refused as unavailable (the old primary going, or
    # answering read-only as a standby before PgBouncer was pointed away);
    # once the command has returned, every write goes through.
    assert {type(exc) for _, exc in writer.failures} <= {Unavailable}, {repr(exc) for _, exc in writer.failures}
    assert writer.first_acknowledged_after(switched) is not None
    assert [exc for at, exc in writer.failures if at > switched] == []
    assert ha.bouncer_target(trio) == after.port


def test_losing_the_primary_node_keeps_every_acknowledged_write(trio: Settings) -> None:
    stream = Stream(trio.local_conninfo("rewards_audit_writer"), trio.local_conninfo("rewards_audit_writer"), SLOT)
    stream.ensure_slot()
    writer = Writer(trio)
    writer.start()
    time.sleep(2)
    _catch_up(stream)
    lost = ha.primary(trio)
    assert lost is not None
    lost_node = next(n for n in ha.nodes(trio) if n.port == lost.port)
    ha.kill_node(trio, lost_node, keep_down=True)
    killed = time.monotonic()
    # A bound on a hang, not a figure: how soon writes come back is measured
    # by bench/chaos.py (bench/RESULTS.md, "Faults under load").
    deadline = killed + 180
    # Once the monitor fails the lost node over, ha.primary (the node `follow`
    # points PgBouncer at) never names it again: pgautofailover.get_primary
    # named it, by its last report, until the standby was promoted.
    failing_over = False
    while writer.first_acknowledged_after(killed) is None and time.monotonic() < deadline:
        named = ha.primary(trio)
        failing_over = failing_over or next(
            row for row in ha.status(trio)["nodes"] if row["port"] == lost.port)["assigned_state"] != "primary"
        assert not (failing_over and named is not None and named.port == lost.port), ha.status(trio)
        time.sleep(0.2)
    back = writer.first_acknowledged_after(killed)
    time.sleep(2)
    writer.stopping.set()
    writer.join(timeout=30)
    assert back is not None, f"writes still fail: {writer.failures[-3:]}; {ha.status(trio)}"
    assert {type(exc) for _, exc in writer.failures} <= {Unavailable}, {repr(exc) for _, exc in writer.failures}
    # The monitor's table may name the new primary a moment after it takes writes.
    deadline = time.monotonic() + 30
    while (promoted := ha.primary(trio)) is None or promoted.port == lost.port:
        assert time.monotonic() < deadline, f"the monitor still names {lost.name}: {ha.status(trio)}"
        time.sleep(0.5)
    assert set(writer.keys()) <= _present(trio, writer.keys())
    # The consumer, reconnected to the promoted standby, finds no slot there,
    # makes one and copies from the ledger what the history lacks.
    _catch_up(stream)
    stream.close()
    _history_complete(trio)
    # The lost node comes back as the standby, without the slot copy it held.
    ha.restart_node(trio, lost_node)
    deadline = time.monotonic() + 120
    while not ha.settled(trio) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ha.settled(trio)
    with psycopg.connect(ha.node_conninfo(trio, lost_node), autocommit=True) as conn:
        # The listener drops it once the monitor finds the node healthy again.
        deadline = time.monotonic() + 30
        while conn.execute("SELECT count(*) FROM pg_replication_slots WHERE slot_type = 'logical'").fetchone()[0]:
            assert time.monotonic() < deadline, "the standby kept its copy of the logical slot"
            time.sleep(0.5)


def _retarget_failures() -> float:
    return REGISTRY.get_sample_value("rewards_ha_retarget_failures_total") or 0.0


def test_the_listener_lives_through_a_retarget_that_fails(trio: Settings) -> None:
    # What processes.bouncer_retarget raises while a PgBouncer that died is restarted.
    done: list[int] = []

    def retarget(port: int) -> None:
        if len(done) < 2:
            done.append(0)
            raise ProcessLookupError("no PgBouncer runs with .../pgbouncer/pgbouncer.ini")
        done.append(port)

    before = _retarget_failures()
    stopping = threading.Event()
    listener = threading.Thread(target=ha.follow, kwargs={
        "settings": trio, "retarget": retarget, "stop": stopping.is_set, "poll_seconds": 0.2}, daemon=True)
    listener.start()
    try:
        deadline = time.monotonic() + 60
        while len(done) < 3:
            assert listener.is_alive(), "the listener ended on a failed retarget"
            assert time.monotonic() < deadline, f"the retarget was not tried again: {done}"
            time.sleep(0.1)
        current = ha.primary(trio)
        assert current is not None and done[2] == current.port
        # At least: the trio's own follower counts into the same process-wide series.
        assert _retarget_failures() - before >= 2
        time.sleep(1)
        assert listener.is_alive() and len(done) == 3  # pointed once it worked, and left there
    finally:
        stopping.set()
        listener.join(timeout=10)


class _Reached:
    """The nodes the slot cleanup opens a connection to, for one Settings
    object (the trio's own listener runs the same code meanwhile)."""

    def __init__(self, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
        self.nodes: list[str] = []
        conninfo = ha.node_conninfo

        def recording(of: Settings, node: ha.Node, dbname: str | None = None) -> str:
            if of is settings:
                self.nodes.append(node.name)
            return conninfo(of, node, dbname)

        monkeypatch.setattr(ha, "node_conninfo", recording)


def _settled_and_healthy(settings: Settings) -> None:
    deadline = time.monotonic() + 120
    while not (ha.settled(settings) and ha.status(settings)["problems"] == []):
        assert time.monotonic() < deadline, ha.status(settings)
        time.sleep(0.5)


def test_slot_copies_are_looked_for_only_on_a_standby_once(trio: Settings, monkeypatch) -> None:
    _settled_and_healthy(trio)
    probe = dataclasses.replace(trio)
    reached = _Reached(probe, monkeypatch)
    current = ha.primary(trio)
    standby = next(n for n in ha.nodes(trio) if current is not None and n.port != current.port)
    cleaned: set[int] = set()
    with psycopg.connect(ha.monitor_conninfo(trio), autocommit=True) as monitor:
        ha.drop_stale_slots(probe, monitor, cleaned)
        assert reached.nodes == [standby.name]
        ha.drop_stale_slots(probe, monitor, cleaned)
    assert reached.nodes == [standby.name]


def test_a_standby_that_is_down_is_not_waited_for(trio: Settings, monkeypatch) -> None:
    _settled_and_healthy(trio)
    current = ha.primary(trio)
    standby = next(n for n in ha.nodes(trio) if current is not None and n.port != current.port)
    probe = dataclasses.replace(trio)
    reached = _Reached(probe, monkeypatch)
    ha.kill_node(trio, standby, keep_down=True)
    try:
        deadline = time.monotonic() + 60
        while next(row for row in ha.status(trio)["nodes"] if row["port"] == standby.port)["healthy"]:
            assert time.monotonic() < deadline, f"the monitor still finds {standby.name} healthy"
            time.sleep(0.5)
        with psycopg.connect(ha.monitor_conninfo(trio), autocommit=True) as monitor:
            assert ha.drop_stale_slots(probe, monitor, set()) == []
        assert reached.nodes == []
    finally:
        ha.restart_node(trio, standby)
    _settled_and_healthy(trio)
