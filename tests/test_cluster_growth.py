"""The DBA's commands that grow and shrink a Citus cluster, on the tests' own
(own_cluster, tests/conftest.py: a coordinator and two workers, a few shards a
table so that a rebalance makes a few moves, not dozens; tests/test_cluster.py
ran on it first; here the audit consumer runs as `rewards up` runs it):
`rewards cluster add-node` (a local worker, and a server reached over TCP),
`rebalance` and `drain`, and each of their refusals; then `rewards down`. The
growth without downtime is tested here too: a bank's clients (bench/bank.py)
keep going through the API while the third worker joins and the shards move
onto it, and afterwards every request was answered (a success, a business 409
or a 429, each retried with its key) and every check of bench/verify.py holds.
Run in the Citus pass of `make test`."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from app.operations import citus, cluster, nodes, processes, rebalance, requirements
from app.operations.processes import free_port
from app.operations.supervisor import Supervisor
from app.settings import Settings
from bench import serve
from bench.bank import Load
from bench.verify import verify
from tests.clusters import connect, rewards
from tests.conftest import SETTINGS
from tests.ledger import commit, credit, debit, reserve

pytestmark = pytest.mark.citus

USERS = 40


@pytest.fixture(scope="module")
def coordinator(own_cluster: Settings) -> Settings:
    """Two workers, a ledger with entries on both, and `rewards audit run`
    (stopped with the rest by test_down_stops_the_coordinator_and_every_worker)."""
    processes.worker_up(own_cluster, "audit")
    with connect(own_cluster) as conn:
        _activity(conn, "before")
    return own_cluster


@pytest.fixture
def conn(coordinator: Settings) -> Iterator[psycopg.Connection]:
    with connect(coordinator) as conn:
        yield conn


def _activity(conn: psycopg.Connection, tag: str) -> None:
    """Every kind of entry, for users spread over every shard."""
    for i in range(USERS):
        user = f"user-{i}"
        credit(conn, user, f"c-{tag}", 50)
        held = reserve(conn, user, f"r-{tag}", 20)
        commit(conn, user, f"m-{tag}", held["reservation_id"], 15)
        debit(conn, user, f"d-{tag}", 5)


def _entries(conn: psycopg.Connection, table: str) -> list[tuple[str, int]]:
    rows = conn.execute(sql.SQL("SELECT user_id, entry_id FROM {} ORDER BY 1, 2").format(
        sql.Identifier(*table.split(".")))).fetchall()
    return [(r["user_id"], r["entry_id"]) for r in rows]


def _history_complete(conn: psycopg.Connection, timeout: float = 60.0) -> None:
    """Every ledger entry in the history exactly once, once the consumer caught up."""
    deadline = time.monotonic() + timeout
    while _entries(conn, "audit.entries") != _entries(conn, "ledger.entries") and time.monotonic() < deadline:
        time.sleep(0.5)
    history = _entries(conn, "audit.entries")
    assert history == _entries(conn, "ledger.entries") and len(history) == len(set(history))


def _shards_by_port(conn: psycopg.Connection) -> dict[int, int]:
    rows = conn.execute("SELECT nodeport, count(*) AS shards FROM citus_shards"
                        " WHERE citus_table_type = 'distributed' GROUP BY nodeport").fetchall()
    return {r["nodeport"]: r["shards"] for r in rows}


def _node_ports(conn: psycopg.Connection) -> list[int]:
    return [r["nodeport"] for r in conn.execute("SELECT nodeport FROM pg_dist_node ORDER BY nodeport").fetchall()]


def _slots(node: Settings) -> list[tuple[str, str]]:
    with psycopg.connect(node.superuser_conninfo()) as on_node:
        return on_node.execute("SELECT slot_name, plugin FROM pg_replication_slots ORDER BY 1").fetchall()


def _refused(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 2, (done.stdout, done.stderr)
    message = done.stderr.strip()
    assert message.startswith("rewards: ") and "\n" not in message and "Traceback" not in done.stderr
    return message


# --- Refusals that change nothing --------------------------------------------

def test_on_a_single_node_each_command_says_citus_is_off(coordinator, conn):
    plain = f"plain_{uuid.uuid4().hex[:8]}"
    conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(plain)))
    try:
        for command in (["rebalance", "--wait"], ["rebalance", "--stop"], ["add-node", "--local"],
                        ["drain", "127.0.0.1:5432"]):
            message = _refused(rewards(coordinator, "cluster", *command, REWARDS_DATABASE=plain))
            assert message.startswith(f"rewards: Citus is off: database {plain} on port {coordinator.pg_port} "
                                      "has no citus extension")
    finally:
        conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(plain)))
    assert not (coordinator.data_dir / "worker-3").exists()


def test_a_node_in_the_cluster_already_is_refused(coordinator, conn):
    worker = citus.worker_settings(coordinator, 1)
    message = _refused(rewards(coordinator, "cluster", "add-node", f"{worker.socket_dir}:{worker.pg_port}"))
    assert message == f"rewards: {worker.socket_dir}:{worker.pg_port} is in the cluster already (pg_dist_node; see " \
                      "`rewards cluster status`)"
    assert _refused(rewards(coordinator, "cluster", "add-node", "no-port")).endswith("(node)")


@pytest.fixture(scope="module")
def prepared_server(coordinator: Settings) -> Iterator[Settings]:
    """A server of its own, prepared as a DBA would (citus preloaded and created
    in the service database) but with wal_level = replica."""
    server = dataclasses.replace(coordinator, data_dir=coordinator.data_dir.parent / f"server-{uuid.uuid4().hex[:8]}",
                                 pg_port=free_port(), citus_workers=0)
    cluster.start_worker(server, server)
    Supervisor.of(server).remove(cluster.postgres_program(server, server).name)  # stopped, to change a setting
    (server.pg_data / "conf.d" / "90-test.conf").write_text("wal_level = replica\n")
    cluster.start_node(server)
    try:
        yield server
    finally:
        cluster.delete_worker(server, server)


def test_a_server_without_logical_wal_is_refused_naming_it(coordinator, conn, prepared_server):
    address = f"{prepared_server.socket_dir}:{prepared_server.pg_port}"
    message = _refused(rewards(coordinator, "cluster", "add-node", address))
    assert message == (f"rewards: {address} cannot join the cluster: wal_level is replica there, not logical (no "
                       "audit slot and no shard move without it): set it and restart that server")
    assert prepared_server.pg_port not in _node_ports(conn)


def test_a_server_citus_cannot_log_in_to_is_refused_with_where_the_password_goes(coordinator, conn, prepared_server):
    """Over TCP the superuser has no password there: Citus says why, and the
    refusal says where a password is kept."""
    message = _refused(rewards(coordinator, "cluster", "add-node", f"127.0.0.1:{prepared_server.pg_port}"))
    assert message.startswith(f"rewards: Citus on the coordinator cannot connect to 127.0.0.1:{prepared_server.pg_port}"
                              f" as {coordinator.pg_superuser} (")
    assert "pg_dist_authinfo" in message and ".pgpass" in message
    assert prepared_server.pg_port not in _node_ports(conn)


ENTRY_CHECK = "ledger._entry_well_formed(text, bigint, bigint, bigint, bigint, bigint, text, text, text, bytea, bytea)"


def test_a_check_a_move_could_not_apply_is_refused_naming_the_grant(coordinator, conn):
    """A move writes the rows of its catch-up as a member of the tables' owner
    that is no superuser: a CHECK calling a function only a superuser may
    execute would fail there, again and again, and the move would wait for
    hours. Refused before anything starts (the grant goes to every node)."""
    owner = conn.execute("SELECT relowner::regrole::text AS owner FROM pg_class "
                         "WHERE oid = 'ledger.entries'::regclass").fetchone()["owner"]
    conn.execute(f"REVOKE EXECUTE ON FUNCTION {ENTRY_CHECK} FROM {owner}")
    try:
        message = _refused(rewards(coordinator, "cluster", "rebalance"))
    finally:
        conn.execute(f"GRANT EXECUTE ON FUNCTION {ENTRY_CHECK} TO {owner}")
    function = ENTRY_CHECK.replace(", ", ",")
    assert message == ("rewards: a shard move could not apply the rows written during its copy (it writes them as a "
                       "member of the table's owner that is no superuser, and would wait for hours): ledger.entries "
                       f"entries_well_formed calls {function}, which only a superuser may execute: GRANT EXECUTE ON "
                       f"FUNCTION {function} TO {owner}")
    assert conn.execute("SELECT count(*) AS n FROM pg_dist_background_job WHERE state NOT IN "
                        "('finished', 'cancelled', 'failed')").fetchone() == {"n": 0}


FACTS = {"server_version": "15.18", "server_version_num": 150018, "preload": "citus,pg_cron", "wal_level": "logical",
         "change_data_capture": "on", "output_plugin_libraries": "pgoutput, wal2json", "node_conninfo": "sslmode=require",
         "free_slots": 10, "citus": "13.2-1", "available": {"pg_cron": ["1.4-1"], "pg_partman": ["4.7.2"]},
         "roles": []}
EXTENSIONS = [{"name": "citus", "version": "13.2-1"}, {"name": "pg_cron", "version": "1.4-1"},
              {"name": "pg_partman", "version": "4.7.2"}, {"name": "plpgsql", "version": "1.0"}]


@pytest.mark.parametrize(("there", "said"), [
    ({"server_version": "16.4", "server_version_num": 160004},
     "PostgreSQL 16.4 there, 15.18 on the coordinator: the major versions must be the same"),
    ({"citus": "12.1-1"}, "Citus 12.1-1 there, 13.2-1 on the coordinator: the versions must be the same"),
    ({"citus": None}, "the citus extension is not created in database rewards there: CREATE EXTENSION citus"),
    ({"preload": "pg_cron"}, "citus is not first in shared_preload_libraries there ('pg_cron'): set it and restart "
                             "that server"),
    ({"available": {"pg_cron": ["1.4-1"], "pg_partman": ["5.0.1"]}},
     "extension pg_partman 4.7.2 is not available there (available: 5.0.1)"),
    ({"change_data_capture": None}, "citus.enable_change_data_capture is unset there, not on (the audit stream would "
                                    "see shards instead of tables, and every shard move as new entries)"),
    ({"output_plugin_libraries": "pgoutput"}, "output_plugin_libraries there ('pgoutput') does not allow wal2json"),
    ({"free_slots": 1}, "only 1 replication slots are free there (max_replication_slots): the audit slot and a shard "
                        "move off the node need 2"),
])
def test_each_requirement_names_what_the_server_lacks(there, said):
    assert requirements.missing(FACTS, FACTS | there, EXTENSIONS, "rewards") == [said]


def test_a_server_like_the_coordinator_lacks_nothing():
    assert requirements.missing(FACTS, FACTS | {"server_version": "15.20", "server_version_num": 150020,
                                                "output_plugin_libraries": None}, EXTENSIONS, "rewards") == []


# --- Growing under load, over TCP, and shrinking ------------------------------

def test_a_third_worker_joins_under_load_and_nothing_is_lost(coordinator, conn):
    """`add-node --local`, then the rebalance started, stopped, and resumed to
    its end with `--wait`, all while the bank's clients go on."""
    before = _shards_by_port(conn)
    worker = citus.worker_settings(coordinator, 3)
    key = serve.api_key(coordinator, coordinator.database)
    with serve.api(coordinator, coordinator.database, workers=1) as (url, _):
        load = Load(url, key, clients=8, accounts=300, replays=0.05)
        load.start()
        time.sleep(3)
        load.mark("move started")
        added = rewards(coordinator, "cluster", "add-node", "--local", "--json", timeout=180)
        assert added.returncode == 0, added.stderr
        node = json.loads(added.stdout)
        # Registered, marked to hold shards, holding none yet, its audit slot there already.
        assert _shards_by_port(conn) == before
        started = rewards(coordinator, "cluster", "rebalance", "--json")
        assert started.returncode == 0, started.stderr
        job = json.loads(started.stdout)["job"]
        # Stopped at once, in this process: a few small moves can be over
        # before a second command has even started on a busy machine.
        with nodes.coordinator(coordinator) as ledger:
            stopped_job = rebalance.stop(ledger)
        again = rewards(coordinator, "cluster", "rebalance", "--stop")
        done = rewards(coordinator, "cluster", "rebalance", "--wait", timeout=300)
        load.mark("move ended")
        time.sleep(2)
        run = load.finish()
        verdict = verify(run, coordinator.superuser_conninfo())

    assert (node["host"], node["port"], node["folder"]) == (str(worker.socket_dir), worker.pg_port,
                                                           str(worker.data_dir))
    assert node["slot"] == f"rewards_audit_node{node['nodeid']}" and node["citus"] == "13.2-1"
    assert (node["slot"], "wal2json") in _slots(worker)
    assert cluster.is_running(worker) and worker in citus.local_workers(coordinator)
    assert job["state"] in ("scheduled", "running") and job["total"] > 0
    assert stopped_job.job_id == job["job_id"]
    assert _refused(again).startswith("rewards: no rebalance is running (the latest, job")
    assert done.returncode == 0, (done.stdout, done.stderr)
    assert "post-check: no rows lost; written during the move" in done.stdout
    assert "history: caught up with every node" in done.stdout and "all agree" in done.stdout
    assert done.stderr.splitlines()[-1].endswith("tasks")  # one line per task done, not a bar, off a terminal

    assert run.problems(allowed=frozenset({409, 429})) == []
    assert verdict.problems == []
    during = [r for r in run.requests if r.acknowledged and r.attempts[0].sent >= run.marks["move started"]
              and r.attempts[-1].sent <= run.marks["move ended"]]
    assert len(during) > 100  # the load went on while the node joined and the shards moved
    shards = _shards_by_port(conn)
    # Citus moves colocated shards together, so nodes are even to within one
    # shard of each distributed table.
    tables = conn.execute("SELECT count(*) AS n FROM pg_dist_partition WHERE partmethod = 'h'").fetchone()["n"]
    assert set(shards) == {coordinator.pg_port + i for i in (1, 2, 3)}
    assert max(shards.values()) - min(shards.values()) <= tables, shards
    _activity(conn, "after")  # on the new node too
    _history_complete(conn)
    status = json.loads(rewards(coordinator, "cluster", "status", "--json").stdout)
    assert status["problems"] == [] and status["skew"]["nodes"] == 3


def _restart_with(server: Settings, conf: str, hba_first: str = "") -> None:
    """Stop the server, give it `conf` (its test settings) and lines read before
    the project's pg_hba.conf, start it again. The lines go to a file of their
    own (hba_file): starting a node writes pg_hba.conf anew."""
    Supervisor.of(server).remove(cluster.postgres_program(server, server).name)
    hba = server.pg_data / "test_hba.conf"
    cluster.write_owned(server, hba, hba_first + cluster.PG_HBA)
    cluster.write_owned(server, server.pg_data / "conf.d" / "90-test.conf", f"{conf}hba_file = '{hba}'\n")
    cluster.start_node(server)


def test_a_server_over_tcp_joins_takes_shards_and_leaves_only_once_the_consumer_confirmed(coordinator, conn,
                                                                                        prepared_server):
    """The server refused above, now with wal_level = logical, added by
    127.0.0.1:PORT as a server on another host is: Citus, the shard moves and
    the audit consumer all reach it over TCP (with SSL, as citus.node_conninfo
    requires). Loopback is trusted there, so no password is needed: passwords
    over TCP were tried by hand (README, For DBAs)."""
    _restart_with(prepared_server, "", "host all all 127.0.0.1/32 trust\n")
    port = prepared_server.pg_port
    address = f"127.0.0.1:{port}"
    added = rewards(coordinator, "cluster", "add-node", address, "--json", timeout=180)
    assert added.returncode == 0, added.stderr
    node = json.loads(added.stdout)
    assert (node["host"], node["port"], node["folder"]) == ("127.0.0.1", port, None)
    assert (node["slot"], "wal2json") in _slots(prepared_server)
    moved = rewards(coordinator, "cluster", "rebalance", "--wait", timeout=300)
    assert moved.returncode == 0, (moved.stdout, moved.stderr)
    assert _shards_by_port(conn).get(port, 0) > 0
    _activity(conn, "tcp")

    # Every shard moves off, but the consumer is stopped, so nothing is removed.
    processes.worker_down(coordinator, "audit")
    try:
        message = _refused(rewards(coordinator, "cluster", "drain", address, "--timeout", "5", "--json",
                                   timeout=600))
    finally:
        processes.worker_up(coordinator, "audit")
    assert message == (f"rewards: every shard is off {address}, but the audit consumer has not confirmed its slot "
                       f"{node['slot']} to the end within 5 s: is `rewards audit run` running? The node stays in "
                       "the cluster holding nothing; run `rewards cluster drain` again to finish")
    assert port in _node_ports(conn) and port not in _shards_by_port(conn)
    assert (node["slot"], "wal2json") in _slots(prepared_server)

    # Again, with the consumer back: nothing left to move, confirmed, removed.
    drained = rewards(coordinator, "cluster", "drain", address, "--json", "--timeout", "300", timeout=600)
    assert drained.returncode == 0, (drained.stdout, drained.stderr)
    result = json.loads(drained.stdout)
    assert (result["moves"], result["folder_deleted"], result["slot"]) == (0, None, node["slot"])
    assert port not in _node_ports(conn) and _slots(prepared_server) == []
    _history_complete(conn)


def test_drain_moves_every_shard_off_and_removes_the_node(coordinator, conn):
    worker = citus.worker_settings(coordinator, 3)
    drained = rewards(coordinator, "cluster", "drain", f"{worker.socket_dir}:{worker.pg_port}", "--json", timeout=300)
    assert drained.returncode == 0, (drained.stdout, drained.stderr)
    result = json.loads(drained.stdout)
    assert result["folder_deleted"] == str(worker.data_dir) and result["confirmed_lsn"] not in ("", "-")
    assert worker.pg_port not in _node_ports(conn) and not worker.data_dir.exists()
    assert set(_shards_by_port(conn)) == {coordinator.pg_port + 1, coordinator.pg_port + 2}
    assert conn.execute("SELECT count(*) AS n FROM pg_dist_cleanup").fetchone() == {"n": 0}
    assert worker not in citus.local_workers(coordinator)
    _activity(conn, "drained")
    _history_complete(conn)
    reconciled = rewards(coordinator, "reconcile", "--report", str(coordinator.data_dir / "reconcile.json"))
    assert reconciled.returncode == 0, reconciled.stdout


def test_drain_of_a_node_not_in_the_cluster_is_refused(coordinator):
    message = _refused(rewards(coordinator, "cluster", "drain", "127.0.0.1:1"))
    assert message.startswith("rewards: no node 127.0.0.1:1 in the cluster (pg_dist_node); the workers are: ")


def test_down_stops_the_coordinator_and_every_worker(coordinator):
    """Last on the cluster: `make stop` (rewards down) stops the coordinator and
    every worker, found in the data folder (without REWARDS_CITUS or
    REWARDS_CITUS_WORKERS set)."""
    done = rewards(coordinator, "down", REWARDS_CITUS="", REWARDS_CITUS_WORKERS="",
                   REWARDS_API_PORT=str(free_port()), REWARDS_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    assert done.returncode == 0, done.stderr
    workers = [citus.worker_settings(coordinator, i) for i in (1, 2)]
    assert not any(cluster.is_running(node) for node in (coordinator, *workers))


# --- A test's own database takes a node -----------------------------------------

def test_a_clone_of_the_tests_template_takes_a_new_node_once_nothing_stands_in_its_way(topology, database):
    """tests/databases.py points a clone's own database object in Citus'
    metadata at the clone (CREATE DATABASE ... TEMPLATE copies it naming the
    template); without that, citus_add_node fails on the new node with
    "database rewards_test_template does not exist". First, what the checks of
    `rewards cluster add-node` cannot foresee fails inside citus_add_node as
    it creates the distributed objects there (a schema ledger left on the
    server by its superuser, in which their owner may not create): a refusal
    in one line that registers nothing."""
    if not topology.citus:
        pytest.skip("a clone of the template is a Citus database only in the Citus pass of `make test`")
    server = dataclasses.replace(SETTINGS, data_dir=Path(tempfile.mkdtemp(prefix="test-clone-node-",
                                                                           dir=SETTINGS.data_dir)),
                                 pg_port=free_port(), pg_host=None, database=database, citus_workers=0)
    cluster.start_worker(server, server)
    try:
        with psycopg.connect(server.superuser_conninfo(), autocommit=True) as there:
            there.execute("CREATE SCHEMA ledger")
        address = f"{server.socket_dir}:{server.pg_port}"
        message = _refused(rewards(dataclasses.replace(SETTINGS, database=database), "cluster", "add-node", address))
        assert message.startswith(f"rewards: Citus could not add {address}, so nothing was registered: ")
        assert message.endswith("(SQLSTATE XX000); before it: permission denied for schema ledger"), message
        with psycopg.connect(server.superuser_conninfo(), autocommit=True) as there:
            there.execute("DROP SCHEMA ledger")
        with psycopg.connect(SETTINGS.superuser_conninfo(database), autocommit=True) as on_clone:
            assert on_clone.execute("SELECT count(*) FROM pg_dist_node WHERE nodeport = %s",
                                    (server.pg_port,)).fetchone() == (0,)
            on_clone.execute("SELECT citus_add_node(%s, %s)", (str(server.socket_dir), server.pg_port))
            assert on_clone.execute("SELECT isactive FROM pg_dist_node WHERE nodeport = %s",
                                    (server.pg_port,)).fetchone() == (True,)
            on_clone.execute("SELECT citus_remove_node(%s, %s)", (str(server.socket_dir), server.pg_port))
    finally:
        cluster.delete_worker(server, server)
