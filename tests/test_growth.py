"""Growth without downtime: a bank's clients (bench/bank.py) keep going while a
third worker joins the cluster and the shards are rebalanced onto it (driven
through Citus' own functions, as bench/growth.py does), and afterwards every
request was answered (a success, or a business 409 or a 429, each retried with
its key) and every check of bench/verify.py holds. On the Citus pass of
`make test` only."""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from app.ledger import queries
from app.ledger.client import Call, Ledger
from app.operations import citus, cluster, migrate, processes
from app.settings import Settings
from bench import serve
from bench.bank import Load
from bench.growth import rebalance
from bench.verify import verify
from tests.conftest import SETTINGS
from tests.databases import Topology

pytestmark = pytest.mark.citus


@pytest.fixture
def growing(topology: Topology) -> Iterator[tuple[str, Settings]]:
    """A database of the test's own on the cluster, made as `make run` makes the
    service's, and a server prepared to join it: a cluster of the test's own,
    made like every node `make run` makes, with that database and the extension.
    (Not a clone of the tests' template: Citus records the database it was made
    in by name, and would look for the template's name on the new node.)"""
    if not topology.citus:
        pytest.skip("needs a Citus coordinator with workers: the second pass of `make test`")
    name = f"rewards_grow_{uuid.uuid4().hex[:10]}"
    data_dir = Path(tempfile.mkdtemp(prefix="test-growth-", dir=SETTINGS.data_dir))
    newcomer = dataclasses.replace(SETTINGS, data_dir=data_dir, pg_port=processes.free_port(), pg_host=None,
                                   database=name)
    nodes = [dataclasses.replace(node, database=name) for node in topology.nodes]
    try:
        cluster.start_node(newcomer)
        for node in (*nodes, newcomer):
            with psycopg.connect(node.superuser_conninfo("postgres"), autocommit=True) as admin:
                admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        with psycopg.connect(newcomer.superuser_conninfo(), autocommit=True) as conn:
            conn.execute("CREATE EXTENSION citus")
        with psycopg.connect(SETTINGS.superuser_conninfo(name), autocommit=True) as conn:
            # Few shards, so that the rebalance makes a few moves, not a dozen.
            conn.execute(sql.SQL("ALTER DATABASE {} SET citus.shard_count = 6").format(sql.Identifier(name)))
        citus.prepare(nodes[0], nodes[1:])
        migrate.upgrade(SETTINGS.superuser_conninfo(name))
        yield name, newcomer
    finally:
        cluster.down(newcomer)
        shutil.rmtree(data_dir, ignore_errors=True)
        topology.drop(name)


def test_a_third_worker_joins_under_load_and_nothing_is_lost(growing):
    database, newcomer = growing
    conninfo = SETTINGS.superuser_conninfo(database)
    key = serve.api_key(SETTINGS, database)
    slot = f"grow_{database}"
    with serve.audit_consumer(SETTINGS, database, slot), \
            serve.api(SETTINGS, database, workers=1) as (url, _):
        load = Load(url, key, clients=8, accounts=300, replays=0.05)
        load.start()
        time.sleep(3)
        load.mark("move started")
        with Ledger.connect(conninfo) as ledger:
            ledger(Call(queries.CITUS_ADD_NODE, {"host": str(newcomer.socket_dir), "port": newcomer.pg_port}))
        rebalance(dataclasses.replace(SETTINGS, database=database))
        load.mark("move ended")
        time.sleep(2)
        run = load.finish()
        verdict = verify(run, conninfo)

    assert run.problems(allowed=frozenset({409, 429})) == []
    assert verdict.problems == []
    during = [r for r in run.requests if r.acknowledged and r.attempts[0].sent >= run.marks["move started"]
              and r.attempts[-1].sent <= run.marks["move ended"]]
    assert len(during) > 100  # the load went on while the node joined and the shards moved
    with psycopg.connect(conninfo) as conn:
        placed = conn.execute("SELECT count(*) FROM citus_shards WHERE nodeport = %s"
                              " AND citus_table_type = 'distributed'", (newcomer.pg_port,)).fetchone()[0]
    assert placed > 0
