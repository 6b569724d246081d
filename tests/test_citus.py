"""The same migrations on Citus: tables distributed by user_id and colocated,
settings a reference table, the functions distributed by their user argument;
and what else must work there: API keys, the audit stream (one slot per node,
with change data capture), reconciliation, repair and backfill, expiry.

Single node (`citus_db`: the project's cluster as a coordinator holding its
shards) and coordinator + worker (`two_node_db`: a second cluster of this
module's own as the only worker), each where its bug shows."""

from __future__ import annotations

import dataclasses
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.rows import dict_row

from app.audit import reconcile
from app.audit.stream import Stream, UnknownChange, discover, run
from app.ledger import calls, keys, queries
from app.ledger.client import Call, Ledger
from app.operations import cluster, migrate, processes
from app.settings import Settings
from tests.conftest import SETTINGS
from tests.ledger import balance, commit, credit, debit, entries, reserve, tamper, unreconciled_accounts

pytestmark = pytest.mark.citus

# What a node needs for the audit stream under Citus, the line every node's
# machine conf needs where citus is preloaded: at start, citus then
# puts its wrapped decoders first on dynamic_library_path, so a slot made with
# 'wal2json' names the distributed table (ledger.entries), not its shards.
CDC_CONF = "citus.enable_change_data_capture = on\n"


def _citus_missing_reason() -> str | None:
    with psycopg.connect(SETTINGS.superuser_conninfo("postgres")) as conn:
        available = conn.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'citus'").fetchone()
        preload = conn.execute("SHOW shared_preload_libraries").fetchone()[0]
    if not available:
        return "the citus extension is not installed in this PostgreSQL (it is in no package registry here)"
    if "citus" not in preload:
        return "citus is installed but not preloaded (REWARDS_CITUS=off?): restart with `make stop run`"
    return None


def _own_node(name: str, extra_conf: str = "") -> Settings:
    """A cluster of this module's own: a free port and a data folder nobody else
    uses (`make run` starts its workers on the ports after the coordinator's)."""
    data_dir = Path(tempfile.mkdtemp(prefix=f"test-{name}-", dir=SETTINGS.data_dir))
    node = dataclasses.replace(SETTINGS, data_dir=data_dir, pg_port=processes.free_port(), pg_host=None)
    cluster.start_node(node)
    if extra_conf:
        # Read at start like the machine's own conf.d file: restart to apply.
        (node.pg_data / "conf.d" / "30-test.conf").write_text(extra_conf)
        cluster.down(node)
        cluster.start_node(node)
    return node


def _remove_node(node: Settings) -> None:
    cluster.down(node)
    shutil.rmtree(node.data_dir, ignore_errors=True)


def _create_citus_database(nodes: tuple[Settings, ...], name: str) -> None:
    for node in nodes:
        with psycopg.connect(node.superuser_conninfo("postgres"), autocommit=True) as admin:
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        with psycopg.connect(node.superuser_conninfo(name), autocommit=True) as conn:
            conn.execute("CREATE EXTENSION citus")


def _drop_database(nodes: tuple[Settings, ...], name: str) -> None:
    for node in reversed(nodes):
        with psycopg.connect(node.superuser_conninfo("postgres"), autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture(scope="module")
def citus_db() -> Iterator[str]:
    reason = _citus_missing_reason()
    if reason:
        pytest.skip(reason)
    name = f"rewards_citus_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(SETTINGS.superuser_conninfo("postgres"), autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        with psycopg.connect(SETTINGS.superuser_conninfo(name), autocommit=True) as conn:
            conn.execute("CREATE EXTENSION citus")
            # A single-node cluster: the coordinator holds the shards itself.
            coordinator = (str(SETTINGS.socket_dir), SETTINGS.pg_port)
            conn.execute("SELECT citus_set_coordinator_host(%s, %s)", coordinator)
            conn.execute("SELECT citus_set_node_property(%s, %s, 'shouldhaveshards', true)", coordinator)
        migrate.upgrade(SETTINGS.superuser_conninfo(name))
        yield name
    finally:
        with psycopg.connect(SETTINGS.superuser_conninfo("postgres"), autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def cdb(citus_db: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(SETTINGS.superuser_conninfo(citus_db), autocommit=True, row_factory=dict_row) as conn:
        yield conn


def test_tables_are_distributed_by_user_and_colocated(cdb):
    tables = cdb.execute(
        """SELECT logicalrelid::text AS name, partmethod, colocationid,
                  column_to_column_name(logicalrelid, partkey) AS column
           FROM pg_dist_partition WHERE logicalrelid::text LIKE 'ledger.%'"""
    ).fetchall()
    by_name = {t["name"]: t for t in tables}
    distributed = ["ledger.accounts", "ledger.entries", "ledger.reservations", "ledger.idempotency_keys"]
    assert all(by_name[n]["partmethod"] == "h" and by_name[n]["column"] == "user_id" for n in distributed)
    assert len({by_name[n]["colocationid"] for n in distributed}) == 1
    assert by_name["ledger.settings"]["partmethod"] == "n"  # reference table


def test_write_functions_are_distributed_by_their_user_argument(cdb):
    functions = cdb.execute(
        """SELECT p.proname, d.distribution_argument_index, d.force_delegation
           FROM pg_dist_object d JOIN pg_proc p ON d.classid = 'pg_proc'::regclass AND d.objid = p.oid
           WHERE p.pronamespace = 'ledger'::regnamespace"""
    ).fetchall()
    by_name = {f["proname"]: f for f in functions}
    for name in ("credit", "debit", "reserve", "commit_reservation", "release_reservation", "refund"):
        assert by_name[name]["distribution_argument_index"] == 0
        assert by_name[name]["force_delegation"] is True


def test_the_ledger_works_on_citus(cdb):
    user = f"u-{uuid.uuid4().hex[:8]}"
    assert credit(cdb, user, "c1", 100)["status"] == "ok"
    assert credit(cdb, user, "c1", 100)["replayed"] is True
    assert debit(cdb, user, "d1", 500)["status"] == "insufficient_points"
    held = reserve(cdb, user, "r1", 40)
    assert commit(cdb, user, "m1", held["reservation_id"], 30)["status"] == "ok"
    assert balance(cdb, user)["available"] == 70
    assert cdb.execute("SELECT ok FROM ledger.verify_chain(%s)", (user,)).fetchone()["ok"] is True
    assert unreconciled_accounts(cdb) == []


def _keys_work(conninfo: str) -> None:
    """Make, list, use and revoke a key, as `rewards keys` and the API do."""
    with Ledger.connect(conninfo) as ledger:
        key, secret = keys.create(ledger, "citus", ["points:read", "admin", "points:read"])
        assert key.scopes == ["admin", "points:read"]  # sorted, each once
        assert key.key_id in [k.key_id for k in ledger(calls.list_keys())]
        assert ledger(calls.authenticate_v2(keys.secret_hash(secret))).key_id == key.key_id
        revoked = ledger(calls.revoke_key(key.key_id))
        assert revoked.revoked_at is not None
        assert ledger(calls.revoke_key(key.key_id)).revoked_at == revoked.revoked_at  # once
        assert ledger(calls.authenticate_v2(keys.secret_hash(secret))) is None


def test_api_keys_are_made_and_revoked_on_citus(citus_db):
    # api.keys is a reference table: a subquery in the INSERT's VALUES and
    # now() inside a COALESCE were both refused there.
    _keys_work(SETTINGS.superuser_conninfo(citus_db))


def _history(conn: psycopg.Connection, user: str) -> list[dict]:
    return conn.execute(
        "SELECT user_id, entry_id, seq, kind, amount, available_delta, reserved_delta, available_after,"
        " reserved_after, reservation_id, reason, action_source, action_external_id, metadata,"
        " idempotency_key, created_at, prev_hash, hash FROM audit.entries WHERE user_id = %s ORDER BY seq",
        (user,)).fetchall()


def _reconciled(dbname: str, batch_size: int = 2, **options) -> reconcile.Report:
    return _reconciled_at(SETTINGS, dbname, batch_size, **options)


def _reconciled_at(node: Settings, dbname: str, batch_size: int = 2, **options) -> reconcile.Report:
    return reconcile.reconcile(node.superuser_conninfo(dbname), batch_size=batch_size, **options)


def test_reconcile_finds_and_repairs_on_citus(cdb, citus_db):
    users = [f"r-{uuid.uuid4().hex[:8]}" for _ in range(3)]
    for user in users:
        credit(cdb, user, "c1", 100)
        held = reserve(cdb, user, "r1", 30)
        commit(cdb, user, "m1", held["reservation_id"], 20)
    cdb.execute("SELECT audit.repair_history(NULL)")
    ours = lambda report: [f for f in report.findings if f["user_id"] in users]  # noqa: E731
    assert ours(_reconciled(citus_db)) == []

    gone = entries(cdb, users[1])[1]
    cdb.execute("DELETE FROM audit.entries WHERE entry_id = %s", (gone["entry_id"],))
    cdb.execute("UPDATE ledger.accounts SET available = available + 7 WHERE user_id = %s", (users[2],))
    tamper(cdb, "UPDATE ledger.entries SET reason = 'forged' WHERE user_id = %s AND seq = 2", (users[0],))
    found = ours(_reconciled(citus_db))
    assert sorted((f["user_id"], f["finding"]) for f in found) == sorted([
        (users[0], "chain_broken"), (users[1], "entries_missing_from_history"),
        (users[2], "balance_differs_from_entries")])
    by_finding = {f["finding"]: f["detail"] for f in found}
    assert by_finding["chain_broken"] == {"first_broken_entry_id": entries(cdb, users[0])[1]["entry_id"],
                                          "first_broken_seq": 2}
    assert by_finding["entries_missing_from_history"] == {"entry_ids": [gone["entry_id"]]}
    balance_detail = by_finding["balance_differs_from_entries"]
    assert balance_detail["account"]["available"] == balance_detail["entries"]["available"] + 7 == 87

    repaired = _reconciled(citus_db, repair=True)
    assert repaired.repaired[users[1]] == 1
    assert (users[1], "entries_missing_from_history") not in [
        (f["user_id"], f["finding"]) for f in ours(_reconciled(citus_db))]


def _overdue(conn: psycopg.Connection, users: list[str]) -> list[int]:
    """A one-second hold for each user, left to run out."""
    held = []
    for user in users:
        credit(conn, user, "fund", 10)
        held.append(reserve(conn, user, "hold", 4, ttl=1)["reservation_id"])
    time.sleep(1.2)
    return held


def _expired_everything(conn: psycopg.Connection, users: list[str]) -> None:
    for user in users:
        assert (balance(conn, user)["available"], balance(conn, user)["reserved"]) == (10, 0)
        assert entries(conn, user)[-1]["kind"] == "expire"
    assert [a for a in unreconciled_accounts(conn) if a["user_id"] in users] == []


def test_expiry_on_citus(cdb):
    users = [f"x-{uuid.uuid4().hex[:8]}" for _ in range(5)]
    _overdue(cdb, users)
    assert cdb.execute("CALL ledger.expire_reservations(NULL, 2)").fetchone()["expired"] == 5
    _expired_everything(cdb, users)
    assert cdb.execute("CALL ledger.expire_reservations(NULL, 2)").fetchone()["expired"] == 0


# --- the audit stream ----------------------------------------------------------

def _drain(stream: Stream) -> None:
    while stream.poll():
        pass


def _confirmed_lsn(conn: psycopg.Connection, slot: str) -> str:
    return conn.execute("SELECT confirmed_flush_lsn::text AS lsn FROM pg_replication_slots WHERE slot_name = %s",
                        (slot,)).fetchone()["lsn"]


@pytest.fixture(scope="module")
def cdc_db() -> Iterator[tuple[Settings, str]]:
    """A single-node Citus database (the coordinator holds its shards) on a
    cluster of its own that has change data capture on, as every node needs."""
    reason = _citus_missing_reason()
    if reason:
        pytest.skip(reason)
    node = _own_node("citus-cdc", CDC_CONF)
    name = "rewards_cdc"
    try:
        _create_citus_database((node,), name)
        with psycopg.connect(node.superuser_conninfo(name), autocommit=True) as conn:
            here = (str(node.socket_dir), node.pg_port)
            conn.execute("SELECT citus_set_coordinator_host(%s, %s)", here)
            conn.execute("SELECT citus_set_node_property(%s, %s, 'shouldhaveshards', true)", here)
        migrate.upgrade(node.superuser_conninfo(name))
        yield node, name
    finally:
        _remove_node(node)


def test_with_change_data_capture_each_entry_reaches_the_history_once(cdc_db, monkeypatch):
    node, name = cdc_db
    with psycopg.connect(node.superuser_conninfo(name), autocommit=True, row_factory=dict_row) as conn:
        # What the setting does at start: citus' wrapped decoders come first.
        assert conn.execute("SHOW dynamic_library_path").fetchone()["dynamic_library_path"] == (
            "$libdir/citus_decoders:$libdir")
        writer = node.local_conninfo("rewards_audit_writer", name)  # as `rewards audit run` connects
        stream = Stream(writer, writer, slot="audit_cdc")
        stream.ensure_slot()
        try:
            users = [f"cdc-{i}" for i in range(3)]
            for user in users:
                credit(conn, user, "c1", 100)
            held = reserve(conn, users[0], "r1", 40)
            commit(conn, users[0], "m1", held["reservation_id"], 30)

            # Killed between the history's commit and the slot's confirmation:
            # the batch comes again and lands once.
            monkeypatch.setattr(stream, "confirm", lambda lsn: (_ for _ in ()).throw(KeyboardInterrupt()))
            with pytest.raises(KeyboardInterrupt):
                stream.poll()
            monkeypatch.undo()
            _drain(stream)
            assert stream.poll() == 0

            for user in users:
                assert _history(conn, user) == entries(conn, user)  # each entry once, as in the ledger
            assert conn.execute("SELECT count(*) AS n FROM audit.entries").fetchone()["n"] == 5
            statuses = conn.execute("SELECT status FROM audit.reservation_events ORDER BY event_at").fetchall()
            assert [row["status"] for row in statuses] == ["open", "committed"]
            kinds = conn.execute("SELECT kind FROM audit.notifications ORDER BY entry_id").fetchall()
            assert sorted(row["kind"] for row in kinds) == ["commit", "credit", "credit", "credit"]
            assert stream.lag()["lag_seconds"] == 0.0
            assert [f for f in _reconciled_at(node, name, slot="audit_cdc").findings] == []
        finally:
            stream.drop_slot()
            stream.close()


def test_without_change_data_capture_shard_names_are_refused_and_nothing_is_confirmed(cdb, citus_db):
    superuser = SETTINGS.superuser_conninfo(citus_db)
    stream = Stream(superuser, SETTINGS.local_conninfo("rewards_audit_writer", citus_db), slot="audit_no_cdc")
    stream.ensure_slot()
    try:
        source, _ = stream._connections()
        # What a node without citus.enable_change_data_capture decodes with,
        # whatever this cluster has: wal2json itself, which names the shards.
        source.conn.execute("SET dynamic_library_path = '$libdir'")
        user = f"nocdc-{uuid.uuid4().hex[:8]}"
        credit(cdb, user, "c1", 10)
        confirmed = _confirmed_lsn(cdb, stream.slot)
        with pytest.raises(UnknownChange) as refused:
            stream.poll()
        assert re.fullmatch(r"(accounts|entries|idempotency_keys)_\d+", refused.value.table)
        assert "citus.enable_change_data_capture = on" in str(refused.value)
        assert _history(cdb, user) == []
        assert _confirmed_lsn(cdb, stream.slot) == confirmed  # the slot kept the changes

        # Decoded by citus' wrapper, the same slot delivers them all.
        source.conn.execute("SET dynamic_library_path = '$libdir/citus_decoders:$libdir'")
        _drain(stream)
        assert _history(cdb, user) == entries(cdb, user) != []
    finally:
        stream.drop_slot()
        stream.close()


# --- a coordinator and a worker: every shard on the worker -------------------

@pytest.fixture(scope="module")
def worker() -> Iterator[Settings]:
    """The worker: a cluster of its own, configured like every node `rewards db
    up` makes (citus preloaded), and with change data capture on."""
    reason = _citus_missing_reason()
    if reason:
        pytest.skip(reason)
    node = _own_node("citus-worker", CDC_CONF)
    try:
        yield node
    finally:
        _remove_node(node)  # a new worker each run, as on a fresh machine


@pytest.fixture(scope="module")
def two_node_db(worker: Settings) -> Iterator[str]:
    """A database on the project's cluster as coordinator (no shards), with the
    module's worker as its only worker (every shard)."""
    name = f"rewards_2node_{uuid.uuid4().hex[:10]}"
    nodes = (SETTINGS, worker)
    try:
        _create_citus_database(nodes, name)
        with psycopg.connect(SETTINGS.superuser_conninfo(name), autocommit=True) as conn:
            conn.execute("SELECT citus_set_coordinator_host(%s, %s)", (str(SETTINGS.socket_dir), SETTINGS.pg_port))
            conn.execute("SELECT citus_add_node(%s, %s)", (str(worker.socket_dir), worker.pg_port))
        migrate.upgrade(SETTINGS.superuser_conninfo(name))
        yield name
    finally:
        _drop_database(nodes, name)


@pytest.fixture
def coordinator(two_node_db: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(SETTINGS.superuser_conninfo(two_node_db), autocommit=True, row_factory=dict_row) as conn:
        yield conn


def _remote_commands(conn: psycopg.Connection, call) -> list[str]:
    """What the coordinator sends to workers while `call` runs."""
    seen: list[str] = []
    conn.add_notice_handler(lambda notice: seen.append(notice.message_primary))
    conn.execute("SET citus.log_remote_commands = on")
    conn.execute("SET client_min_messages = log")
    try:
        call()
    finally:
        conn.execute("RESET client_min_messages")
        conn.execute("RESET citus.log_remote_commands")
    return [message for message in seen if message.startswith("issuing")]


def test_every_shard_is_on_the_worker(coordinator, worker):
    ports = coordinator.execute(
        "SELECT DISTINCT nodeport FROM citus_shards WHERE table_name::text LIKE 'ledger.%'"
        " AND citus_table_type = 'distributed'"
    ).fetchall()
    assert ports == [{"nodeport": worker.pg_port}]


def test_a_credit_runs_wholly_on_the_worker_as_one_call(coordinator):
    user = f"u-{uuid.uuid4().hex[:8]}"
    results = []
    sent = _remote_commands(coordinator, lambda: results.append(credit(coordinator, user, "c1", 100)))
    assert results[0]["status"] == "ok"
    # One statement crosses to the worker: the call itself, not its inner queries.
    assert len([s for s in sent if "ledger." in s]) == 1
    assert any("ledger.credit(" in s for s in sent)


def test_a_call_inside_a_transaction_block_is_still_delegated(coordinator):
    user = f"u-{uuid.uuid4().hex[:8]}"

    def in_transaction():
        with coordinator.transaction():
            credit(coordinator, user, "c1", 100)
            debit(coordinator, user, "d1", 30)

    sent = _remote_commands(coordinator, in_transaction)
    assert any("ledger.credit(" in s for s in sent) and any("ledger.debit(" in s for s in sent)
    assert not any("INSERT INTO ledger.entries" in s for s in sent)
    assert balance(coordinator, user)["available"] == 70


def test_the_ledger_holds_its_guarantees_across_nodes(coordinator, two_node_db):
    from tests.test_concurrency import _together

    user = f"u-{uuid.uuid4().hex[:8]}"
    credit(coordinator, user, "fund", 100)
    dsn = SETTINGS.superuser_conninfo(two_node_db)
    storm = _together(dsn, lambda conn, i: credit(conn, user, "same-key", 5), count=20)
    assert len({r["entry_id"] for r in storm}) == 1
    spends = _together(dsn, lambda conn, i: debit(conn, user, f"spend-{i}", 7), count=20)
    assert sum(r["status"] == "ok" for r in spends) == 105 // 7
    assert balance(coordinator, user)["available"] == 0
    credit(coordinator, user, "top-up", 10)
    held = reserve(coordinator, user, "r1", 5)
    assert held["status"] == "ok"
    assert commit(coordinator, user, "m1", held["reservation_id"])["status"] == "ok"
    assert coordinator.execute("SELECT ok FROM ledger.verify_chain(%s)", (user,)).fetchone()["ok"] is True
    assert unreconciled_accounts(coordinator) == []


def test_what_runs_on_the_coordinator_reaches_the_worker_as_its_caller(coordinator, two_node_db):
    """Key administration, backfill, reconcile and repair run on the coordinator
    and touch tables on the worker: Citus connects there as the current user,
    which must be a role that can log in (never the owner, rewards_owner)."""
    _keys_work(SETTINGS.superuser_conninfo(two_node_db))
    users = [f"w-{uuid.uuid4().hex[:8]}" for _ in range(3)]
    for user in users:
        credit(coordinator, user, "c1", 50)
        held = reserve(coordinator, user, "r1", 20)
        commit(coordinator, user, "m1", held["reservation_id"], 5)
    with Ledger.connect(SETTINGS.local_conninfo("rewards_audit_writer", two_node_db)) as writer:
        writer(Call(queries.AUDIT_BACKFILL))  # as the consumer runs it
    for user in users:
        assert _history(coordinator, user) == entries(coordinator, user)
    statuses = coordinator.execute(
        "SELECT status FROM audit.reservation_events WHERE user_id = %s ORDER BY event_at", (users[0],)).fetchall()
    assert [row["status"] for row in statuses] == ["open", "committed"]
    ours = lambda report: [f for f in report.findings if f["user_id"] in users]  # noqa: E731
    assert ours(_reconciled(two_node_db)) == []

    gone = entries(coordinator, users[2])[0]
    coordinator.execute("DELETE FROM audit.entries WHERE entry_id = %s", (gone["entry_id"],))
    report = _reconciled(two_node_db, repair=True)
    assert [(f["user_id"], f["finding"], f["detail"]) for f in ours(report)] == [
        (users[2], "entries_missing_from_history", {"entry_ids": [gone["entry_id"]]})]
    assert report.repaired[users[2]] == 1
    assert ours(_reconciled(two_node_db)) == []
    assert _history(coordinator, users[2]) == entries(coordinator, users[2])


def test_the_worker_s_slot_is_applied_to_the_history_on_the_coordinator(coordinator, two_node_db, worker):
    """One slot per node that holds shards, read there, applied (and backfilled)
    where the history is."""
    before = f"pre-{uuid.uuid4().hex[:8]}"
    credit(coordinator, before, "c1", 5)  # made before the slot: the backfill's
    stream = Stream(worker.local_conninfo("rewards_audit_writer", two_node_db),
                    SETTINGS.local_conninfo("rewards_audit_writer", two_node_db), slot="audit_worker")
    stream.ensure_slot()
    try:
        assert _history(coordinator, before) == entries(coordinator, before)
        users = [f"n-{uuid.uuid4().hex[:8]}" for _ in range(4)]
        for user in users:
            credit(coordinator, user, "c1", 10)
            debit(coordinator, user, "d1", 3)
        _drain(stream)
        for user in users:
            assert _history(coordinator, user) == entries(coordinator, user)
        lag = stream.lag()  # the slot on the worker, the progress on the coordinator
        assert lag["lag_seconds"] == 0.0 and lag["last_committed_at"] is not None
    finally:
        stream.drop_slot()
        stream.close()


def test_expiry_runs_on_the_worker_for_its_shards(coordinator):
    """Each node expires its own shards' holds in its own transactions: the
    coordinator only asks, and never locks an account on another node."""
    users = [f"e-{uuid.uuid4().hex[:8]}" for _ in range(5)]
    _overdue(coordinator, users)
    expired = []
    sent = _remote_commands(coordinator, lambda: expired.append(
        coordinator.execute("CALL ledger.expire_reservations(NULL, 2)").fetchone()["expired"]))
    assert expired == [5]
    assert not [s for s in sent if "FOR UPDATE" in s or "PREPARE TRANSACTION" in s or "ledger.accounts" in s]
    _expired_everything(coordinator, users)


@pytest.fixture
def growing_db(worker: Settings) -> Iterator[tuple[str, Settings]]:
    """A database of its own on the coordinator and the module's worker, and a
    second worker, started but not yet added: the test adds it."""
    newcomer = _own_node("citus-worker-2", CDC_CONF)
    name = f"rewards_grow_{uuid.uuid4().hex[:10]}"
    nodes = (SETTINGS, worker, newcomer)
    try:
        _create_citus_database(nodes, name)
        with psycopg.connect(SETTINGS.superuser_conninfo(name), autocommit=True) as conn:
            # Copying reference tables to a new node, Citus connects to the
            # coordinator itself, by default at localhost over TCP, where this
            # cluster asks for a password: the socket instead (this database only).
            conn.execute("SET citus.enable_ddl_propagation = off")
            conn.execute(sql.SQL("ALTER DATABASE {} SET citus.local_hostname = {}").format(
                sql.Identifier(name), sql.Literal(str(SETTINGS.socket_dir))))
            conn.execute("RESET citus.enable_ddl_propagation")
            conn.execute("SELECT citus_set_coordinator_host(%s, %s)", (str(SETTINGS.socket_dir), SETTINGS.pg_port))
            conn.execute("SELECT citus_add_node(%s, %s)", (str(worker.socket_dir), worker.pg_port))
        migrate.upgrade(SETTINGS.superuser_conninfo(name))
        yield name, newcomer
    finally:
        _drop_database(nodes, name)
        _remove_node(newcomer)


def test_the_consumer_finds_a_new_worker_before_shards_move_there(growing_db, worker):
    """Nodes come from pg_dist_node: a worker added later gets its slot (and
    the backfill) when the consumer looks again, before any shard moves there;
    a shard move then neither loses nor doubles an entry."""
    name, newcomer = growing_db
    writer = SETTINGS.local_conninfo("rewards_audit_writer", name)
    streams = discover(writer, "audit_grow")
    assert [(s.slot, f"port={worker.pg_port}" in s.source_conninfo) for s in streams] == [
        ("audit_grow_node2", True)]  # the coordinator holds no shards here
    with psycopg.connect(SETTINGS.superuser_conninfo(name), autocommit=True, row_factory=dict_row) as conn:
        users = [f"g-{i}" for i in range(8)]
        try:
            for user in users:
                credit(conn, user, "c1", 10)
            run(streams, stop_after_idle=0.5)
            conn.execute("SELECT citus_add_node(%s, %s)", (str(newcomer.socket_dir), newcomer.pg_port))
            run(streams, stop_after_idle=0.5, rediscover=lambda: discover(writer, "audit_grow"),
                rediscover_every=0)
            assert [s.slot for s in streams] == ["audit_grow_node2", "audit_grow_node3"]

            # One account's shards (and their colocated ones) move to the new
            # worker, as a rebalance would (which copies the reference tables first).
            conn.execute("SELECT replicate_reference_tables()")
            moved = users[0]
            shard = conn.execute("SELECT get_shard_id_for_distribution_column('ledger.accounts', %s::text) AS id",
                                 (moved,)).fetchone()["id"]
            conn.execute("SELECT citus_move_shard_placement(%s, %s, %s, %s, %s, 'force_logical'::citus.shard_transfer_mode)",
                         (shard, str(worker.socket_dir), worker.pg_port,
                          str(newcomer.socket_dir), newcomer.pg_port))
            for user in users:
                debit(conn, user, "d1", 3)
            run(streams, stop_after_idle=0.5)
            for user in users:
                assert _history(conn, user) == entries(conn, user)  # each entry once
            assert conn.execute(
                "SELECT count(*) AS n FROM audit.entries WHERE user_id = ANY(%s)", (users,)).fetchone()["n"] == 16
            placed = conn.execute("SELECT nodeport FROM citus_shards WHERE shardid = %s", (shard,)).fetchone()
            assert placed["nodeport"] == newcomer.pg_port
        finally:
            for stream in streams:
                stream.drop_slot()
                stream.close()


def test_rewards_citus_on_makes_a_distributed_single_node():
    """What REWARDS_CITUS=on does for `rewards db up`, on a cluster of its own."""
    with psycopg.connect(SETTINGS.superuser_conninfo("postgres")) as conn:
        if not conn.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'citus'").fetchone():
            pytest.skip("the citus extension is not installed in this PostgreSQL (it is in no package registry here)")
    data_dir = Path(tempfile.mkdtemp(prefix="test-citus-on-", dir=SETTINGS.data_dir))
    node = dataclasses.replace(SETTINGS, data_dir=data_dir, pg_port=processes.free_port(), pg_host=None, citus="on")
    try:
        cluster.up(node)
        cluster.up(node)  # safe to repeat
        with psycopg.connect(node.superuser_conninfo(), autocommit=True, row_factory=dict_row) as conn:
            distributed = conn.execute(
                "SELECT count(*) AS n FROM pg_dist_partition WHERE logicalrelid::text LIKE 'ledger.%'"
            ).fetchone()["n"]
            assert distributed == 6  # five tables by user_id, settings as a reference table
            assert credit(conn, "alice", "c1", 10)["status"] == "ok"
            assert balance(conn, "alice")["available"] == 10
    finally:
        cluster.down(node)
        shutil.rmtree(node.data_dir, ignore_errors=True)
