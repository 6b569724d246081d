"""Tests run against the project's real PostgreSQL cluster (`rewards db up`), on
the topology it has: a single node, or a Citus coordinator with workers (the
second pass of `make test`). Each test gets its own database, cloned on every
node from a template migrated once per session (tests/databases.py), so tests
never see each other's rows.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg
import pytest
from psycopg.rows import dict_row

from app.operations import cluster
from app.operations.processes import free_port
from app.settings import Settings, load
from tests.databases import Topology

SETTINGS = load()


def pytest_sessionstart(session: pytest.Session) -> None:
    if not cluster.is_running(SETTINGS):
        pytest.exit(
            f"the project's PostgreSQL is not running at {SETTINGS.pg_data}: "
            "`make test` starts it, or run `uv run rewards db up`",
            returncode=3,
        )


def pytest_report_header(config: pytest.Config) -> str:
    return f"topology: {Topology.of(SETTINGS).name} (PostgreSQL on port {SETTINGS.pg_port})"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On a Citus cluster, what is known not to work there yet is expected to
    fail, strictly (so a fix shows as a failure until the mark goes), and what is
    about a single node alone is skipped; each says why."""
    if not Topology.of(SETTINGS).citus:
        return
    for item in items:
        if gap := item.get_closest_marker("citus_gap"):
            item.add_marker(pytest.mark.xfail(reason=f"on Citus: {gap.args[0]}", strict=True))
        if only := item.get_closest_marker("single_node"):
            item.add_marker(pytest.mark.skip(reason=f"single node only: {only.args[0]}"))


@pytest.fixture(scope="session")
def topology() -> Iterator[Topology]:
    """The cluster's nodes, with the migrated template built on them."""
    topology = Topology.of(SETTINGS)
    topology.build_template()
    yield topology


@pytest.fixture
def database(topology: Topology) -> Iterator[str]:
    """The name of this test's own database, on every node."""
    name = f"rewards_test_{uuid.uuid4().hex[:12]}"
    topology.clone(name)
    try:
        yield name
    finally:
        topology.drop(name)


@pytest.fixture
def dsn(database: str) -> str:
    """Superuser conninfo of this test's database, for extra connections."""
    return SETTINGS.superuser_conninfo(database)


@pytest.fixture
def db(dsn: str) -> Iterator[psycopg.Connection]:
    """Superuser connection to this test's database, autocommit, rows as dicts."""
    with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as conn:
        yield conn


@pytest.fixture
def api_db(database: str) -> Iterator[psycopg.Connection]:
    """The API's role, over TCP with its password, as the service connects."""
    conninfo = SETTINGS.api_conninfo(database)
    with psycopg.connect(conninfo, autocommit=True, row_factory=dict_row) as conn:
        yield conn


@pytest.fixture(scope="session")
def own_cluster() -> Iterator[Settings]:
    """A Citus cluster of the tests' own (tests/clusters.py), one for
    tests/test_cluster.py and tests/test_cluster_growth.py, which run one after
    the other: its start-up and its stop are minutes on a loaded machine. A
    coordinator and two workers, a free port for a third, few shards a table,
    its own PgBouncer. Built in the Citus pass of `make test` only: it is the
    same cluster in both passes."""
    if not Topology.of(SETTINGS).citus:
        pytest.skip("a Citus cluster of the tests' own is built in the Citus pass of `make test`")
    from tests.clusters import SHARDS_PER_TABLE, local_cluster  # noqa: PLC0415 (it imports SETTINGS from here)

    with local_cluster(workers=2, spare_ports=1, shards_per_table=SHARDS_PER_TABLE, bouncer_port=free_port(),
                       audit_metrics_port=0) as settings:
        yield settings
