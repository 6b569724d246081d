"""The same migrations on Citus: tables distributed by user_id and colocated,
settings a reference table, the functions distributed by their user argument."""

from __future__ import annotations

import dataclasses
import shutil
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql
from psycopg.rows import dict_row

from app.operations import cluster, migrate
from tests.conftest import SETTINGS
from tests.ledger import balance, commit, credit, debit, reserve, unreconciled_accounts

pytestmark = pytest.mark.citus


def _citus_missing_reason() -> str | None:
    with psycopg.connect(SETTINGS.superuser_conninfo("postgres")) as conn:
        available = conn.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'citus'").fetchone()
        preload = conn.execute("SHOW shared_preload_libraries").fetchone()[0]
    if not available:
        return "the citus extension is not installed in this PostgreSQL (it is in no package registry here)"
    if "citus" not in preload:
        return "citus is installed but not preloaded (REWARDS_CITUS=off?): restart with `make stop run`"
    return None


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
    for name in ("credit", "debit", "reserve", "commit_reservation", "release_reservation"):
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


# --- a coordinator and a worker: every shard on the worker -------------------

@pytest.fixture(scope="module")
def two_node_db() -> Iterator[str]:
    """A database on the project's cluster as coordinator, with a second cluster
    (under the data folder, next port) as its only worker."""
    reason = _citus_missing_reason()
    if reason:
        pytest.skip(reason)
    worker = dataclasses.replace(SETTINGS, data_dir=SETTINGS.data_dir / "citus-worker",
                                 pg_port=SETTINGS.pg_port + 1)
    cluster.start_node(worker)
    name = f"rewards_2node_{uuid.uuid4().hex[:10]}"
    nodes = (SETTINGS, worker)
    try:
        for node in nodes:
            with psycopg.connect(node.superuser_conninfo("postgres"), autocommit=True) as admin:
                admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            with psycopg.connect(node.superuser_conninfo(name), autocommit=True) as conn:
                conn.execute("CREATE EXTENSION citus")
        with psycopg.connect(SETTINGS.superuser_conninfo(name), autocommit=True) as conn:
            conn.execute("SELECT citus_set_coordinator_host(%s, %s)", (str(SETTINGS.socket_dir), SETTINGS.pg_port))
            conn.execute("SELECT citus_add_node(%s, %s)", (str(worker.socket_dir), worker.pg_port))
        migrate.upgrade(SETTINGS.superuser_conninfo(name))
        yield name
    finally:
        for node in reversed(nodes):
            with psycopg.connect(node.superuser_conninfo("postgres"), autocommit=True) as admin:
                admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        cluster.down(worker)
        # A new worker each run, as on a fresh machine.
        shutil.rmtree(worker.data_dir)


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


def test_every_shard_is_on_the_worker(coordinator):
    ports = coordinator.execute(
        "SELECT DISTINCT nodeport FROM citus_shards WHERE table_name::text LIKE 'ledger.%'"
        " AND citus_table_type = 'distributed'"
    ).fetchall()
    assert ports == [{"nodeport": SETTINGS.pg_port + 1}]


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


def test_rewards_citus_on_makes_a_distributed_single_node():
    """What REWARDS_CITUS=on does for `rewards db up`, on a cluster of its own."""
    with psycopg.connect(SETTINGS.superuser_conninfo("postgres")) as conn:
        if not conn.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'citus'").fetchone():
            pytest.skip("the citus extension is not installed in this PostgreSQL (it is in no package registry here)")
    node = dataclasses.replace(SETTINGS, data_dir=SETTINGS.data_dir / "citus-on", pg_port=SETTINGS.pg_port + 2,
                               citus="on")
    try:
        cluster.up(node)
        cluster.up(node)  # safe to repeat
        with psycopg.connect(node.superuser_conninfo(), autocommit=True, row_factory=dict_row) as conn:
            distributed = conn.execute(
                "SELECT count(*) AS n FROM pg_dist_partition WHERE logicalrelid::text LIKE 'ledger.%'"
            ).fetchone()["n"]
            assert distributed == 5  # four tables by user_id, settings as a reference table
            assert credit(conn, "alice", "c1", 10)["status"] == "ok"
            assert balance(conn, "alice")["available"] == 10
    finally:
        cluster.down(node)
        shutil.rmtree(node.data_dir, ignore_errors=True)
