"""Alembic, driven from Python so the CLI and the tests migrate the same way."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from typing import TYPE_CHECKING

import psycopg

from app.ledger import queries
from app.ledger.errors import translated
from app.settings import PROJECT_ROOT

# The current-state schema (sql/README.md, "Making a change"), in the one order
# it is applied: the roles first, since every schema grants to them; then one
# file per SQL schema, audit last because it reads ledger's types and functions
# and its schedule needs the pg_cron extension that ledger.sql creates.
SCHEMA_FILES = ("sql/roles.sql", "sql/ledger.sql", "sql/api.sql", "sql/audit.sql", "sql/rules.sql")

# Alembic and SQLAlchemy are imported by the functions that use them, not here:
# every `rewards` command imports this module (through app.operations.cluster),
# and the two take seconds to import on a busy machine, which the audit consumer
# and the sender, started again by supervisord, would spend before they resume.
if TYPE_CHECKING:
    from alembic.config import Config


def _config(conninfo: str) -> Config:
    from alembic.config import Config

    config = Config(str(PROJECT_ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(PROJECT_ROOT / "migrations"))
    config.attributes["conninfo"] = conninfo
    return config


def upgrade(conninfo: str, revision: str = "head") -> None:
    from alembic import command

    with _driver_errors():
        command.upgrade(_config(conninfo), revision)


def close_routines_to_public(conninfo: str) -> None:
    """PUBLIC executes none of the project's functions, on any node: Citus
    creates a function on a worker with PostgreSQL's default EXECUTE for PUBLIC
    (ledger._close_routines_to_public). After the migration has committed:
    inside it, the workers' copies of what it changed are locked by it.
    migrations/env.py runs it after every Alembic command, build_fresh after
    its files."""
    with translated(), psycopg.connect(conninfo, autocommit=True) as conn:
        if conn.execute(queries.ROUTINES_CLOSABLE).fetchone()[0]:
            conn.execute(queries.CLOSE_ROUTINES_TO_PUBLIC)


def current(conninfo: str) -> None:
    from alembic import command

    with _driver_errors():
        config = _config(conninfo)
        config.attributes["command"] = "current"  # read only: migrations/env.py leaves the privileges alone
        command.current(config, verbose=True)


@contextmanager
def _driver_errors() -> Iterator[None]:
    """SQLAlchemy wraps the driver's errors; unwrap them so they are translated
    like every other (app.ledger.errors)."""
    from sqlalchemy.exc import DBAPIError

    with translated():
        try:
            yield
        except DBAPIError as exc:
            raise exc.orig from exc


def run_sql_file(path: str) -> None:
    """Run a whole SQL file inside the migration's transaction.

    It goes to psycopg as one simple-protocol query: no bind-parameter parsing of
    the text (SQLAlchemy's would read `:name` inside strings) and dollar-quoted
    bodies pass through untouched.
    """
    from alembic import op  # only importable while a migration runs

    sql_text = (PROJECT_ROOT / path).read_text()
    driver_connection = op.get_bind().connection.driver_connection
    with driver_connection.cursor() as cursor:
        cursor.execute(sql_text)


def build_fresh(conninfo: str) -> None:
    """Build an empty database from the current-state files, without Alembic:
    what migrating to head must equal (tests/test_migrations.py). Each file goes
    to psycopg as one simple-protocol query, as run_sql_file sends a revision's,
    on one autocommit connection, so each file is one transaction."""
    with psycopg.connect(conninfo, autocommit=True) as conn:
        for path in SCHEMA_FILES:
            with conn.cursor() as cursor:
                cursor.execute((PROJECT_ROOT / path).read_text())
    close_routines_to_public(conninfo)
