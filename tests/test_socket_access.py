"""Who may use the cluster's Unix socket: root and the cluster's own OS user,
as any role; any other OS user gets nothing there, and TCP always needs the
role's password."""

from __future__ import annotations

import os
import subprocess

import psycopg
import pytest

from app.operations import cluster
from tests.conftest import SETTINGS

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="switching OS users needs root")


def _psql_as(os_user: str, conninfo: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["runuser", "-u", os_user, "--", "psql", conninfo, "-Atc", "SELECT current_user"],
                          capture_output=True, text=True, timeout=30)


def test_every_project_role_is_mapped_for_the_socket(db):
    made = {row["rolname"] for row in db.execute("SELECT rolname FROM pg_roles WHERE rolname LIKE 'rewards%'")}
    assert made == set(cluster.PROJECT_ROLES)


def test_no_rule_trusts_anyone(db):
    rules = db.execute("SELECT type, database, user_name, auth_method FROM pg_hba_file_rules").fetchall()
    assert rules and all(rule["auth_method"] != "trust" for rule in rules), rules


def test_another_os_user_cannot_use_the_socket():
    done = _psql_as("nobody", SETTINGS.superuser_conninfo("postgres"))
    assert done.returncode != 0 and "postgres" not in done.stdout


def test_the_clusters_own_os_user_can_as_any_role():
    for role in (SETTINGS.pg_superuser, "rewards_audit_writer"):
        done = _psql_as(SETTINGS.pg_os_user, SETTINGS.local_conninfo(role, "postgres"))
        assert done.returncode == 0 and done.stdout.strip() == role, done.stderr


def test_tcp_needs_the_password_even_for_the_superuser():
    with pytest.raises(psycopg.OperationalError, match="password"):
        psycopg.connect(f"host=127.0.0.1 port={SETTINGS.pg_port} user={SETTINGS.pg_superuser} dbname=postgres "
                        "password=wrong", connect_timeout=5)
