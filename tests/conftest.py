"""Tests run against the project's real PostgreSQL cluster (`rewards db up`).

Each test gets its own database, cloned from a template that is migrated once per
session (pytest-postgresql's noproc factory), so tests never see each other's rows.
"""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest
from psycopg.rows import dict_row
from pytest_postgresql import factories

from app.operations import cluster, migrate
from app.settings import load

SETTINGS = load()
TEST_DATABASE = "rewards_test"


def pytest_sessionstart(session: pytest.Session) -> None:
    if not cluster.is_running(SETTINGS):
        pytest.exit(
            f"the project's PostgreSQL is not running at {SETTINGS.pg_data}: "
            "`make test` starts it, or run `uv run rewards db up`",
            returncode=3,
        )


def _migrate_template(host: str, port: int, user: str, dbname: str, **_: object) -> None:
    migrate.upgrade(f"host={host} port={port} user={user} dbname={dbname}")


postgresql_noproc = factories.postgresql_noproc(
    host=str(SETTINGS.socket_dir),
    port=SETTINGS.pg_port,
    user=SETTINGS.pg_superuser,
    dbname=TEST_DATABASE,
    load=[_migrate_template],
)
postgresql = factories.postgresql("postgresql_noproc")


@pytest.fixture
def dsn(postgresql: psycopg.Connection) -> str:
    """Superuser conninfo of this test's database, for extra connections."""
    return SETTINGS.superuser_conninfo(postgresql.info.dbname)


@pytest.fixture
def db(dsn: str) -> Iterator[psycopg.Connection]:
    """Superuser connection to this test's database, autocommit, rows as dicts."""
    with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as conn:
        yield conn


@pytest.fixture
def api_db(postgresql: psycopg.Connection) -> Iterator[psycopg.Connection]:
    """The API's role, over TCP with its password, as the service connects."""
    conninfo = SETTINGS.api_conninfo(postgresql.info.dbname)
    with psycopg.connect(conninfo, autocommit=True, row_factory=dict_row) as conn:
        yield conn
