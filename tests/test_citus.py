"""The same migrations on Citus: tables distributed by user_id and colocated,
settings a reference table, the functions distributed by their user argument."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql
from psycopg.rows import dict_row

from app import migrate
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
        return "citus is installed but not preloaded: restart the cluster with `make stop run`"
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
