"""Migrations: a database migrated to head equals one built fresh from sql/schema.sql,
and upgrading again changes nothing."""

from __future__ import annotations

import re
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from psycopg import sql

from app import migrate
from app.settings import PROJECT_ROOT
from tests.conftest import SETTINGS


@contextmanager
def _empty_database() -> Iterator[str]:
    name = f"rewards_mig_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(SETTINGS.superuser_conninfo("postgres"), autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        try:
            yield name
        finally:
            admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


def _schema_dump(dbname: str) -> str:
    dump = subprocess.run(
        [str(SETTINGS.pg_bin / "pg_dump"), "--schema-only",
         "--exclude-table=public.alembic_version", "-d", SETTINGS.superuser_conninfo(dbname)],
        check=True, capture_output=True, text=True,
    ).stdout
    # Comments name the database; \restrict lines carry a random key per dump.
    return re.sub(r"^(--|\\restrict |\\unrestrict ).*$", "", dump, flags=re.MULTILINE)


def test_migrated_schema_equals_the_fresh_schema():
    with _empty_database() as migrated, _empty_database() as fresh:
        migrate.upgrade(SETTINGS.superuser_conninfo(migrated))
        with psycopg.connect(SETTINGS.superuser_conninfo(fresh), autocommit=True) as conn:
            conn.execute((PROJECT_ROOT / "sql" / "schema.sql").read_text())
        migrated_dump, fresh_dump = _schema_dump(migrated), _schema_dump(fresh)
    assert "CREATE FUNCTION ledger.credit" in fresh_dump
    assert migrated_dump == fresh_dump


def test_upgrading_twice_is_a_no_op(postgresql):
    dbname = postgresql.info.dbname
    before = _schema_dump(dbname)
    migrate.upgrade(SETTINGS.superuser_conninfo(dbname))
    assert _schema_dump(dbname) == before
    with psycopg.connect(SETTINGS.superuser_conninfo(dbname)) as conn:
        versions = conn.execute("SELECT version_num FROM public.alembic_version").fetchall()
    assert versions == [("0003",)]
