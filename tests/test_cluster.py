"""`REWARDS_CITUS=on REWARDS_CITUS_WORKERS=2 make run` on a cluster of the tests'
own (own_cluster, tests/conftest.py, which tests/test_cluster_growth.py grows
and shrinks next and `rewards down` stops last): a coordinator and two workers,
each a PostgreSQL cluster with its own data folder and port, brought up by the
code `make run` runs (cluster.up), and `rewards cluster status` on it."""

from __future__ import annotations

import dataclasses
import json
import shutil
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql

from app.ledger import calls
from app.ledger.client import Ledger
from app.ledger.results import Status
from app.operations import citus, cluster
from app.operations.processes import free_port
from app.settings import Settings
from tests.clusters import SHARDS_PER_TABLE, connect, rewards
from tests.conftest import SETTINGS
from tests.test_secrets import AWKWARD

pytestmark = pytest.mark.citus

WORKERS = 2


@pytest.fixture(scope="module")
def coordinator(own_cluster: Settings) -> Settings:
    """The coordinator's settings, its two workers up and registered, migrated."""
    return own_cluster


@pytest.fixture
def conn(coordinator: Settings) -> Iterator[psycopg.Connection]:
    with connect(coordinator) as conn:
        yield conn


def _workers(coordinator: Settings) -> list[Settings]:
    return [citus.worker_settings(coordinator, i) for i in range(1, WORKERS + 1)]


def _nodes(conn: psycopg.Connection) -> list[dict]:
    return conn.execute(
        "SELECT groupid, nodename, nodeport, shouldhaveshards, isactive FROM pg_dist_node ORDER BY nodeport"
    ).fetchall()


def test_each_worker_is_a_cluster_of_its_own_registered_with_the_coordinator(coordinator, conn):
    workers = _workers(coordinator)
    assert _nodes(conn) == [
        {"groupid": 0, "nodename": str(coordinator.socket_dir), "nodeport": coordinator.pg_port,
         "shouldhaveshards": False, "isactive": True},  # with workers, the coordinator holds no shards
        *({"groupid": i, "nodename": str(w.socket_dir), "nodeport": w.pg_port, "shouldhaveshards": True,
           "isactive": True} for i, w in enumerate(workers, start=1)),
    ]
    assert [w.data_dir for w in workers] == [coordinator.data_dir / f"worker-{i}" for i in range(1, WORKERS + 1)]
    assert [w.pg_port for w in workers] == [coordinator.pg_port + i for i in range(1, WORKERS + 1)]
    identities = set()
    for node in (coordinator, *workers):
        with psycopg.connect(node.superuser_conninfo()) as on_node:
            identities.add(on_node.execute("SELECT system_identifier FROM pg_control_system()").fetchone()[0])
            assert on_node.execute("SELECT extversion FROM pg_extension WHERE extname = 'citus'").fetchone()
    assert len(identities) == 1 + WORKERS  # three initdbs, not one server


def test_the_tables_are_distributed_with_their_shards_on_the_workers_only(coordinator, conn):
    tables = conn.execute(
        "SELECT logicalrelid::text AS name FROM pg_dist_partition WHERE partmethod = 'h' ORDER BY 1"
    ).fetchall()
    assert [t["name"] for t in tables] == [
        "ledger.accounts", "ledger.entries", "ledger.idempotency_keys", "ledger.lots", "ledger.reservations",
        "rules.action_claims", "rules.budget_slices", "rules.earnings"]
    ports = conn.execute(
        "SELECT nodeport, count(*) AS shards FROM citus_shards WHERE citus_table_type = 'distributed'"
        " GROUP BY nodeport ORDER BY nodeport").fetchall()
    assert [p["nodeport"] for p in ports] == [w.pg_port for w in _workers(coordinator)]
    assert len({p["shards"] for p in ports}) == 1  # spread evenly


def test_make_run_again_changes_nothing_but_the_api_password_which_reaches_every_node(coordinator, conn):
    """The API's password, here one awkward to quote, is set on the coordinator
    only: Citus carries it. Every service role logs in on every node. (The
    cluster's own password is put back after: supervisord's environment lines,
    which the audit consumer started later gets it from, cannot hold this one.)"""
    cluster.up(dataclasses.replace(coordinator, api_password=AWKWARD))
    try:
        assert len(_nodes(conn)) == 1 + WORKERS
        for node in (coordinator, *_workers(coordinator)):
            with psycopg.connect(dataclasses.replace(node, api_password=AWKWARD).api_conninfo()) as api:
                assert api.execute("SELECT current_user").fetchone()[0] == "rewards_api"
            for role in ("rewards_audit_writer", "rewards_notifier", "rewards_auditor"):
                with psycopg.connect(node.local_conninfo(role)) as login:
                    assert login.execute("SELECT current_user").fetchone()[0] == role
            with psycopg.connect(node.superuser_conninfo()) as on_node:
                owner = on_node.execute("SELECT rolcanlogin FROM pg_roles WHERE rolname = 'rewards_owner'").fetchone()
                assert owner == (False,)
    finally:
        conn.execute(sql.SQL("ALTER ROLE rewards_api PASSWORD {}").format(sql.Literal(coordinator.api_password)))


def test_a_credit_through_the_client_lands_on_a_worker(coordinator, conn):
    user = f"u-{uuid.uuid4().hex[:8]}"
    with Ledger.connect(coordinator.api_conninfo()) as ledger:
        outcome = ledger(calls.credit(user, "c1", 100, "ad view"))
    assert outcome.status is Status.OK and outcome.available == 100
    shard = conn.execute(
        "SELECT shard_name, nodeport FROM citus_shards"
        " WHERE shardid = get_shard_id_for_distribution_column('ledger.entries', %s::text)", (user,)).fetchone()
    schema, table = shard["shard_name"].split(".")
    for worker in _workers(coordinator):
        with psycopg.connect(worker.superuser_conninfo()) as on_worker:
            present = on_worker.execute("SELECT to_regclass(%s)", (shard["shard_name"],)).fetchone()[0]
            if worker.pg_port != shard["nodeport"]:
                assert present is None
                continue
            rows = on_worker.execute(sql.SQL("SELECT amount FROM {} WHERE user_id = %s").format(
                sql.Identifier(schema, table)), (user,)).fetchall()
            assert rows == [(100,)]


def test_cluster_status_as_json(coordinator):
    worker = _workers(coordinator)[0]
    with psycopg.connect(worker.superuser_conninfo(), autocommit=True) as on_worker:
        on_worker.execute("SELECT pg_create_logical_replication_slot('status_probe', 'wal2json')")
    try:
        done = rewards(coordinator, "cluster", "status", "--json")
    finally:
        with psycopg.connect(worker.superuser_conninfo(), autocommit=True) as on_worker:
            on_worker.execute("SELECT pg_drop_replication_slot('status_probe')")
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)
    assert status["topology"] == "citus" and status["citus"].startswith("13.")
    nodes = {node["port"]: node for node in status["nodes"]}
    assert nodes[coordinator.pg_port]["role"] == "coordinator" and nodes[coordinator.pg_port]["shards"] == 0
    workers = [nodes[w.pg_port] for w in _workers(coordinator)]
    assert all(w["role"] == "worker" and w["shouldhaveshards"] and w["active"] and w["bytes"] > 0 for w in workers)
    assert sum(w["shards"] for w in workers) == 8 * SHARDS_PER_TABLE  # eight hash-distributed tables
    assert status["skew"] == {"shards": 1.0, "bytes": pytest.approx(1.0, abs=0.1), "nodes": WORKERS}
    [probe] = [s for s in nodes[worker.pg_port]["slots"] if s["slot"] == "status_probe"]
    assert probe["slot"] == "status_probe" and probe["plugin"] == "wal2json" and probe["lag_bytes"] >= 0
    assert probe["confirmed_flush_lsn"]
    assert [f["name"] for f in status["functions"]] == [
        "commit_reservation", "credit", "credit_many", "debit", "refund", "release_reservation", "reserve"]
    assert all(f["delegated"] and f["distribution_argument"] == "p_user_id" for f in status["functions"])
    assert status["problems"] == []
    # The same, for a person.
    text = rewards(coordinator, "cluster", "status")
    assert text.returncode == 0, text.stderr
    assert "a coordinator and 2 workers" in text.stdout and "ledger.release_reservation" in text.stdout


def test_cluster_status_fails_when_a_write_function_is_not_delegated(coordinator, conn):
    signature = "ledger.debit(text, text, bigint, text, jsonb)"
    redistribute = ("SELECT create_distributed_function(%s, 'p_user_id', colocate_with => 'ledger.accounts',"
                    " force_delegation => %s)")
    conn.execute(redistribute, (signature, False))
    try:
        done = rewards(coordinator, "cluster", "status", "--json")
    finally:
        conn.execute(redistribute, (signature, True))
    assert done.returncode == 1
    assert done.stderr.strip() == "rewards: ledger.debit is not delegated: without force_delegation"
    debit = next(f for f in json.loads(done.stdout)["functions"] if f["name"] == "debit")
    assert debit["distributed"] and not debit["force_delegation"] and not debit["delegated"]
    assert rewards(coordinator, "cluster", "status").returncode == 0  # put back


def test_cluster_status_of_a_database_without_citus_is_a_single_node(coordinator, conn):
    plain = f"plain_{uuid.uuid4().hex[:8]}"
    conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(plain)))
    try:
        done = rewards(coordinator, "cluster", "status", REWARDS_DATABASE=plain)
        as_json = rewards(coordinator, "cluster", "status", "--json", REWARDS_DATABASE=plain)
    finally:
        conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(plain)))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == (f"single node (no citus extension in database {plain}): "
                                           f"{coordinator.socket_dir}:{coordinator.pg_port}")
    assert as_json.returncode == 0 and json.loads(as_json.stdout)["topology"] == "single-node"


def test_cluster_status_of_a_stopped_database_is_one_line(coordinator):
    done = rewards(coordinator, "cluster", "status", REWARDS_PG_PORT=str(free_port()), REWARDS_PG_HOST="127.0.0.1")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().startswith("rewards: the database did not answer") and "\n" not in done.stderr.strip()


def test_without_the_extension_citus_on_says_so_and_changes_nothing(tmp_path):
    """A PostgreSQL whose pg_config finds no citus: a copy of its programs' folder
    with nothing but pg_config, whose library folder is then next to it, empty."""
    bin_dir = tmp_path / "pg" / "bin"
    bin_dir.mkdir(parents=True)
    shutil.copy2(SETTINGS.pg_bin / "pg_config", bin_dir)
    settings = dataclasses.replace(SETTINGS, data_dir=tmp_path / "data", pg_port=free_port(), pg_bin=bin_dir,
                                   citus="on", citus_workers=WORKERS)
    done = rewards(settings, "up", REWARDS_BOUNCER_PORT=str(free_port()), REWARDS_API_PORT=str(free_port()))
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip() == (f"REWARDS_CITUS=on but the citus extension is not installed in the PostgreSQL "
                                   f"of {bin_dir}: nothing was changed")
    assert not settings.data_dir.exists()


def test_workers_without_citus_on_are_refused_before_anything_is_made(tmp_path):
    settings = dataclasses.replace(SETTINGS, data_dir=tmp_path / "data", citus="auto", citus_workers=WORKERS)
    with pytest.raises(SystemExit, match="REWARDS_CITUS_WORKERS=2 needs REWARDS_CITUS=on"):
        cluster.up(settings)
    assert not settings.data_dir.exists()
