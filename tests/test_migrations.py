"""Migrations: a database migrated to head equals one built fresh from the
current-state files (app.operations.migrate.SCHEMA_FILES), both in what
`pg_dump --schema-only` shows and in what it does not (seed rows, pg_partman's
configuration, pg_cron's jobs, the roles and their memberships); upgrading again
changes nothing; a new revision runs the SQL file named like it."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from psycopg import sql
from psycopg.rows import dict_row

from app.operations import cluster, migrate, processes
from app.settings import PROJECT_ROOT, Settings
from tests.conftest import SETTINGS

# The project's roles: cluster-wide, so only a cluster of their own shows what a
# build creates (in the shared one they exist already and both builds skip them).
ROLE_PATTERN = r"rewards\_%"


@contextmanager
def _empty_database(settings: Settings = SETTINGS, name: str | None = None) -> Iterator[str]:
    name = name or f"rewards_mig_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(settings.superuser_conninfo("postgres"), autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        try:
            yield name
        finally:
            admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


def _head() -> str:
    """The newest revision of migrations/versions."""
    return ScriptDirectory(str(PROJECT_ROOT / "migrations")).get_current_head()


def _schema_dump(dbname: str, settings: Settings = SETTINGS) -> str:
    dump = subprocess.run(
        [str(settings.pg_bin / "pg_dump"), "--schema-only",
         "--exclude-table=public.alembic_version", "-d", settings.superuser_conninfo(dbname)],
        check=True, capture_output=True, text=True,
    ).stdout
    # Comments name the database; \restrict lines carry a random key per dump.
    return re.sub(r"^(--|\\restrict |\\unrestrict ).*$", "", dump, flags=re.MULTILINE)


def test_the_revisions_are_one_line_numbered_by_their_files():
    """Branches merged side by side can each add the next number: git sees two
    new files, not a conflict, and alembic would then apply only one of them."""
    versions = sorted((PROJECT_ROOT / "migrations" / "versions").glob("[0-9][0-9][0-9][0-9]_*.py"))
    chain = [(script.revision, script.down_revision)
             for script in ScriptDirectory(str(PROJECT_ROOT / "migrations")).walk_revisions()][::-1]
    numbers = [path.name[:4] for path in versions]
    assert numbers == [f"{n:04d}" for n in range(1, len(versions) + 1)]
    assert chain == [(number, previous) for number, previous in zip(numbers, [None, *numbers])]


def test_migrated_schema_equals_the_fresh_schema():
    with _empty_database() as migrated, _empty_database() as fresh:
        migrate.upgrade(SETTINGS.superuser_conninfo(migrated))
        migrate.build_fresh(SETTINGS.superuser_conninfo(fresh))
        migrated_dump, fresh_dump = _schema_dump(migrated), _schema_dump(fresh)
    assert "CREATE FUNCTION ledger.credit" in fresh_dump
    assert migrated_dump == fresh_dump


def test_upgrading_twice_is_a_no_op(database):
    dbname = database
    before = _schema_dump(dbname)
    migrate.upgrade(SETTINGS.superuser_conninfo(dbname))
    assert _schema_dump(dbname) == before
    with psycopg.connect(SETTINGS.superuser_conninfo(dbname)) as conn:
        versions = conn.execute("SELECT version_num FROM public.alembic_version").fetchall()
    assert versions == [(_head(),)]


def test_a_plain_alembic_upgrade_leaves_public_executing_nothing(database):
    """The guard against PostgreSQL's default EXECUTE for PUBLIC runs in
    migrations/env.py, so the Alembic command line ends with it too, not only
    `rewards db migrate`: a function PUBLIC could run is closed by the upgrade."""
    public_may_run = "SELECT has_function_privilege('public', 'ledger.stray()', 'EXECUTE') AS runs"
    with psycopg.connect(SETTINGS.superuser_conninfo(database), autocommit=True, row_factory=dict_row) as conn:
        conn.execute("CREATE FUNCTION ledger.stray() RETURNS integer LANGUAGE sql AS 'SELECT 1'")
        assert conn.execute(public_may_run).fetchone()["runs"]
        subprocess.run([sys.executable, "-m", "alembic", "-c", str(PROJECT_ROOT / "alembic.ini"), "upgrade", "head"],
                       check=True, capture_output=True, cwd=PROJECT_ROOT,
                       env={**os.environ, "REWARDS_DATABASE": database})
        assert not conn.execute(public_may_run).fetchone()["runs"]


def test_the_schema_status_only_reads(database):
    """`rewards db status` (Alembic's current) leaves the privileges alone: it
    must answer while a Citus worker is down, where the guard would fail."""
    public_may_run = "SELECT has_function_privilege('public', 'ledger.stray()', 'EXECUTE') AS runs"
    with psycopg.connect(SETTINGS.superuser_conninfo(database), autocommit=True, row_factory=dict_row) as conn:
        conn.execute("CREATE FUNCTION ledger.stray() RETURNS integer LANGUAGE sql AS 'SELECT 1'")
        migrate.current(SETTINGS.superuser_conninfo(database))
        assert conn.execute(public_may_run).fetchone()["runs"]


# --- What pg_dump --schema-only does not see --------------------------------


def _state(settings: Settings, dbname: str) -> dict[str, Any]:
    """What a build left in the cluster: its schema, and the rows and settings
    that live outside it."""
    with psycopg.connect(settings.superuser_conninfo(dbname), autocommit=True, row_factory=dict_row) as conn:
        tables = conn.execute(
            """SELECT n.nspname AS schema, c.relname AS name
               FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
               WHERE n.nspname IN ('ledger', 'api', 'audit') AND c.relkind IN ('r', 'p')
               ORDER BY 1, 2"""
        ).fetchall()
        rows = {
            f"{t['schema']}.{t['name']}": conn.execute(
                sql.SQL("SELECT to_jsonb(t) AS row FROM {} t ORDER BY to_jsonb(t)::text").format(
                    sql.Identifier(t["schema"], t["name"]))
            ).fetchall()
            for t in tables
        }
        # pg_partman 4.7 keeps no timestamps or counters in part_config: every
        # column is configuration, so all of them are compared.
        partman = conn.execute(
            """SELECT to_jsonb(p) AS config FROM partman.part_config p
               WHERE p.parent_table LIKE 'audit.%' ORDER BY p.parent_table"""
        ).fetchall()
        cron = conn.execute(
            """SELECT jobname, schedule, command, database, username, nodename, nodeport, active
               FROM cron.job ORDER BY jobname"""
        ).fetchall()
        roles = conn.execute(
            """SELECT rolname, rolsuper, rolinherit, rolcreaterole, rolcreatedb, rolcanlogin,
                      rolreplication, rolconnlimit, rolbypassrls, rolvaliduntil, rolconfig
               FROM pg_catalog.pg_roles WHERE rolname LIKE %s ORDER BY rolname""",
            (ROLE_PATTERN,),
        ).fetchall()
        memberships = conn.execute(
            """SELECT r.rolname AS role, m.rolname AS member, g.rolname AS grantor, a.admin_option
               FROM pg_catalog.pg_auth_members a
               JOIN pg_catalog.pg_roles r ON r.oid = a.roleid
               JOIN pg_catalog.pg_roles m ON m.oid = a.member
               JOIN pg_catalog.pg_roles g ON g.oid = a.grantor
               WHERE r.rolname LIKE %(pattern)s OR m.rolname LIKE %(pattern)s
               ORDER BY 1, 2""",
            {"pattern": ROLE_PATTERN},
        ).fetchall()
        extensions = conn.execute("SELECT extname, extversion FROM pg_catalog.pg_extension ORDER BY 1").fetchall()
    return {
        "schema": _schema_dump(dbname, settings), "rows": rows, "partman": partman, "cron": cron,
        "roles": roles, "memberships": memberships, "extensions": extensions,
    }


def _drop_project_roles(settings: Settings) -> None:
    with psycopg.connect(settings.superuser_conninfo("postgres"), autocommit=True) as conn:
        names = conn.execute(
            "SELECT rolname FROM pg_catalog.pg_roles WHERE rolname LIKE %s", (ROLE_PATTERN,)
        ).fetchall()
        for (name,) in names:
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))


@pytest.fixture(scope="module")
def builds() -> Iterator[dict[str, dict[str, Any]]]:
    """The state each build leaves, taken in turn in a throwaway cluster of its
    own: there the roles do not exist before the build, and pg_cron serves the
    build's database (cron.database_name), so the schedule blocks really run."""
    data_dir = Path(tempfile.mkdtemp(prefix="test-builds-", dir=SETTINGS.data_dir))
    scratch = dataclasses.replace(
        SETTINGS, data_dir=data_dir, pg_port=processes.free_port(), pg_host=None,
        database="rewards_build", citus="off",
    )
    try:
        cluster.start_node(scratch)
        states = {}
        for name, build in (("migrated", migrate.upgrade), ("fresh", migrate.build_fresh)):
            with _empty_database(scratch, scratch.database) as dbname:
                build(scratch.superuser_conninfo(dbname))
                states[name] = _state(scratch, dbname)
            _drop_project_roles(scratch)
        yield states
    finally:
        cluster.down(scratch)
        shutil.rmtree(data_dir, ignore_errors=True)


def test_in_the_cron_database_the_schemas_are_equal_too(builds):
    assert "CREATE EXTENSION IF NOT EXISTS pg_cron" in builds["fresh"]["schema"]
    assert builds["migrated"]["schema"] == builds["fresh"]["schema"]
    assert builds["migrated"]["extensions"] == builds["fresh"]["extensions"]


def test_the_seed_rows_are_equal(builds):
    # ledger.settings holds the one seeded row; every other table starts empty.
    assert len(builds["fresh"]["rows"]["ledger.settings"]) == 1
    assert builds["migrated"]["rows"] == builds["fresh"]["rows"]


def test_the_partman_configuration_is_equal(builds):
    assert [c["config"]["parent_table"] for c in builds["fresh"]["partman"]] == [
        "audit.entries", "audit.reservation_events"]
    assert builds["migrated"]["partman"] == builds["fresh"]["partman"]


def test_the_cron_jobs_are_equal(builds):
    assert [job["jobname"] for job in builds["fresh"]["cron"]] == [
        "rewards-audit-partitions", "rewards-audit-retention", "rewards-expire-idempotency-keys",
        "rewards-expire-notifications", "rewards-expire-reservations", "rewards-settle-lots"]
    assert builds["migrated"]["cron"] == builds["fresh"]["cron"]


def test_the_roles_and_their_memberships_are_equal(builds):
    assert [role["rolname"] for role in builds["fresh"]["roles"]] == [
        "rewards_api", "rewards_audit_writer", "rewards_auditor", "rewards_notifier", "rewards_owner"]
    assert builds["migrated"]["roles"] == builds["fresh"]["roles"]
    assert builds["migrated"]["memberships"] == builds["fresh"]["memberships"]


# --- New revisions ------------------------------------------------------------


@pytest.mark.parametrize("message, expected", [
    ("add x", "9999_add_x"),
    ("Rename a column, its view's column and every function reading it",
     "9999_rename_a_column_its_view_s_column_and_"),
])
def test_a_new_revision_runs_the_sql_file_named_like_it(tmp_path, message, expected):
    shutil.copytree(PROJECT_ROOT / "migrations", tmp_path / "migrations",
                    ignore=shutil.ignore_patterns("__pycache__"))
    config = Config(str(PROJECT_ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(tmp_path / "migrations"))
    command.revision(config, message=message, rev_id="9999")
    [script] = (tmp_path / "migrations" / "versions").glob("9999_*.py")
    assert script.stem == expected
    text = script.read_text()
    assert f'run_sql_file("migrations/sql/{expected}.sql")' in text
    assert f"down_revision = '{_head()}'" in text
