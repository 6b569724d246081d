"""The API's role executes the public functions and can do nothing else."""

import re
import uuid
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.rows import dict_row

from tests.ledger import balance, commit, credit, debit, release, reserve

QUERIES = Path(__file__).resolve().parent.parent / "sql" / "queries.sql"

PUBLIC_CALLS = [
    "SELECT * FROM ledger.credit('alice', 'p1', 10, 'x', NULL, NULL, '{}')",
    "SELECT * FROM ledger.debit('alice', 'p2', 1, 'x', '{}')",
    "SELECT * FROM ledger.reserve('alice', 'p3', 1, 60, 'x', '{}')",
    "SELECT * FROM ledger.commit_reservation('alice', 'p4', 1, NULL)",
    "SELECT * FROM ledger.release_reservation('alice', 'p5', 2)",
    "SELECT * FROM ledger.balance('alice')",
    "SELECT * FROM ledger.entries_page('alice', NULL, 10)",
    "SELECT * FROM ledger.reservation('alice', 1)",
    "SELECT * FROM ledger.verify_chain('alice')",
]

REFUSED = [
    "SELECT * FROM ledger.accounts",
    "SELECT * FROM ledger.entries",
    "SELECT * FROM ledger.balances",
    "SELECT * FROM ledger.idempotency_keys",
    "INSERT INTO ledger.accounts (user_id, available) VALUES ('mallory', 1000000)",
    "UPDATE ledger.accounts SET available = 1000000",
    "DELETE FROM ledger.reservations",
    "UPDATE ledger.settings SET max_amount = 1",
    "SELECT nextval('ledger.entries_entry_id_seq')",
    "SELECT ledger._lock_account('alice')",
    "SELECT ledger._invalid('a', 'b')",
    "SELECT rules._budget_anchor('alice')",
    "SELECT rules._claim_budget(1, 'alice', 10)",
    "SELECT rules._place_budget_anchors()",
    "CALL ledger.expire_reservations()",
    # the rules administration's tables: only through its functions
    "SELECT * FROM rules.rules",
    "UPDATE rules.campaigns SET enabled = false",
    "UPDATE rules.budget_slices SET remaining = 1000000",
    "DELETE FROM rules.campaign_budgets",
    "INSERT INTO rules.changes (actor, subject, subject_id, operation, after) VALUES ('x', 'rule', 'x', 'create', '{}')",
    "SELECT nextval('rules.campaigns_campaign_id_seq')",
    "SELECT rules.check_change('x', true)",
]


def test_the_api_role_can_run_every_public_function(api_db):
    for call in PUBLIC_CALLS:
        api_db.execute(call)
    assert credit(api_db, "bob", "k", 10)["status"] == "ok"
    assert debit(api_db, "bob", "d", 4)["available"] == 6
    held = reserve(api_db, "bob", "r", 3)
    assert commit(api_db, "bob", "c", held["reservation_id"])["status"] == "ok"
    assert release(api_db, "bob", "x", held["reservation_id"])["status"] == "reservation_committed"
    assert balance(api_db, "bob")["available"] == 3


@pytest.mark.parametrize("statement", REFUSED)
def test_the_api_role_cannot_touch_tables_or_private_functions(api_db, statement):
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        api_db.execute(statement)


def test_no_application_role_may_update_or_delete_entries(db):
    grants = db.execute(
        """SELECT grantee, privilege_type FROM information_schema.role_table_grants
           WHERE table_schema = 'ledger' AND table_name = 'entries'
             AND privilege_type IN ('UPDATE', 'DELETE', 'TRUNCATE')"""
    ).fetchall()
    assert grants == []


def test_public_write_functions_run_as_the_owner_not_a_superuser(db):
    owners = db.execute(
        """SELECT p.proname, r.rolname, p.prosecdef FROM pg_proc p
           JOIN pg_roles r ON r.oid = p.proowner
           JOIN pg_namespace n ON n.oid = p.pronamespace
           WHERE n.nspname = 'ledger' AND p.proname IN ('credit', 'debit', 'reserve',
                 'commit_reservation', 'release_reservation', 'refund')"""
    ).fetchall()
    assert len(owners) == 6
    assert all(row["rolname"] == "rewards_owner" and row["prosecdef"] for row in owners)
    assert db.execute("SELECT rolsuper FROM pg_roles WHERE rolname = 'rewards_owner'").fetchone()["rolsuper"] is False


ROLES = ("rewards_api", "rewards_auditor", "rewards_audit_writer", "rewards_notifier")
SCHEMAS = ["ledger", "rules", "api", "audit"]
# What the login roles may execute, on this node: a function in the project's
# schemas that the role can reach (USAGE on its schema) and run.
EXECUTABLE = """
SELECT r.rolname AS role, format('%%s.%%s', n.nspname, p.proname) AS function
FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace, pg_roles r
WHERE n.nspname = ANY (%(schemas)s) AND r.rolname = ANY (%(roles)s)
  AND has_schema_privilege(r.oid, n.oid, 'USAGE') AND has_function_privilege(r.oid, p.oid, 'EXECUTE')
ORDER BY 1, 2"""
# Granted to PUBLIC, whether or not a schema's USAGE hides it today.
PUBLIC_EXECUTE = """
SELECT format('%%s.%%s', n.nspname, p.proname) AS function
FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
WHERE n.nspname = ANY (%(schemas)s)
  AND EXISTS (SELECT FROM aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) a
              WHERE a.grantee = 0 AND a.privilege_type = 'EXECUTE')"""
# The API's role runs the public functions the code calls (sql/queries.sql),
# and besides them only the first api.authenticate, for API processes of
# before authenticate_v2.
API_BESIDES_QUERIES = {"api.authenticate"}
# Every right granted to the role on a table, view or sequence of the
# project's schemas.
RELATION_RIGHTS = """
SELECT format('%%s.%%s', n.nspname, c.relname) AS relation, a.privilege_type AS privilege
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace,
     aclexplode(c.relacl) a
WHERE n.nspname = ANY (%(schemas)s) AND a.grantee = %(role)s::regrole
ORDER BY 1, 2"""
RULES_ADMINISTRATION = ("put_rule", "enable_rule", "list_rules", "put_campaign", "enable_campaign",
                        "list_campaigns", "refill_budget_slice", "budget_report", "list_changes")


def _executable(topology, database: str) -> dict[str, list[dict]]:
    """Node by node (the coordinator and every worker: a delegated call runs
    on a worker, as its caller), what each role may execute, and PUBLIC."""
    found = {}
    for node in topology.nodes:
        with psycopg.connect(node.superuser_conninfo(database), row_factory=dict_row) as conn:
            args = {"schemas": SCHEMAS, "roles": list(ROLES)}
            rows = conn.execute(EXECUTABLE, args).fetchall()
            rows += [{"role": "PUBLIC", **row} for row in conn.execute(PUBLIC_EXECUTE, args).fetchall()]
            found[f"{node.pg_host or node.socket_dir}:{node.pg_port}"] = rows
    return found


def test_no_role_can_execute_a_private_helper_on_any_node(topology, database):
    for node, rows in _executable(topology, database).items():
        private = [row for row in rows if row["function"].split(".")[1].startswith("_")]
        assert private == [], node


def test_public_executes_nothing_of_the_project_on_any_node(topology, database):
    for node, rows in _executable(topology, database).items():
        assert [row for row in rows if row["role"] == "PUBLIC"] == [], node


def test_the_api_role_executes_only_what_the_code_calls(topology, database):
    called = set(re.findall(r"\b((?:ledger|rules|api|audit)\.[a-z][a-z0-9_]*)\(", QUERIES.read_text()))
    for node, rows in _executable(topology, database).items():
        api = {row["function"] for row in rows if row["role"] == "rewards_api"}
        assert "rules.act" in api and "ledger.credit" in api, node
        assert api - called - API_BESIDES_QUERIES == set(), node


def test_the_auditor_executes_only_the_chain_check(topology, database):
    for node, rows in _executable(topology, database).items():
        assert {row["function"] for row in rows if row["role"] == "rewards_auditor"} == {"audit.verify_chain"}, node


def test_the_api_role_holds_no_right_on_any_table_on_any_node(topology, database):
    """Not even on the rules tables its administration writes: those functions
    write them as their owner."""
    for node in topology.nodes:
        with psycopg.connect(node.superuser_conninfo(database), row_factory=dict_row) as conn:
            rights = conn.execute(RELATION_RIGHTS, {"schemas": SCHEMAS, "role": "rewards_api"}).fetchall()
        assert rights == [], f"{node.pg_host or node.socket_dir}:{node.pg_port}"


def test_the_rules_administration_runs_as_the_tables_owner(db):
    """SECURITY DEFINER to the superuser who owns the tables (under Citus its
    connections to the workers are made as the owner, who must log in there),
    with a search_path a caller cannot put anything of its own in front of."""
    functions = db.execute(
        """SELECT p.proname, p.prosecdef, p.proconfig, p.proowner = c.relowner AS owns_the_tables, r.rolsuper
           FROM pg_proc p JOIN pg_roles r ON r.oid = p.proowner, pg_class c
           WHERE p.pronamespace = 'rules'::regnamespace AND p.proname = ANY (%s)
             AND c.oid = 'rules.campaigns'::regclass""", (list(RULES_ADMINISTRATION),)).fetchall()
    assert len(functions) == len(RULES_ADMINISTRATION)
    assert all(f["prosecdef"] and f["owns_the_tables"] and f["rolsuper"] for f in functions), functions
    assert {tuple(f["proconfig"]) for f in functions} == {("search_path=pg_catalog, pg_temp",)}


def test_the_history_records_the_callers_actor(api_db, db):
    """The change's actor is the one the API passes (its key's name), not a role."""
    api_db.execute("SELECT * FROM rules.put_rule('key-ops', 'privs_probe', 5, NULL, NULL, NULL, NULL, true, NULL, NULL)")
    api_db.execute("SELECT * FROM rules.enable_rule('key-audit', 'privs_probe', false)")
    rows = db.execute("SELECT actor, operation FROM rules.changes WHERE subject_id = 'privs_probe' ORDER BY change_id")
    assert rows.fetchall() == [{"actor": "key-ops", "operation": "create"}, {"actor": "key-audit", "operation": "disable"}]


def test_a_member_of_the_tables_owner_may_run_the_entries_check_on_every_node(topology, database):
    """A Citus shard move writes the rows of its catch-up as a role that is a
    member of the tables' owner but no superuser (citus_shard_move_subscription_role_*):
    it must be able to run what the entries_well_formed CHECK calls, or the
    first entry written during a move fails on the target and the move never ends."""
    role = f"test_move_{uuid.uuid4().hex[:8]}"
    for node in topology.nodes:
        with psycopg.connect(node.superuser_conninfo(database), autocommit=True, row_factory=dict_row) as conn:
            owner = conn.execute("SELECT relowner::regrole::text AS owner FROM pg_class "
                                 "WHERE oid = 'ledger.entries'::regclass").fetchone()["owner"]
            conn.execute("SET citus.enable_ddl_propagation = off")  # this node's own role, as Citus makes it
            conn.execute(sql.SQL("CREATE ROLE {} NOSUPERUSER IN ROLE {}").format(sql.Identifier(role),
                                                                                  sql.Identifier(owner)))
            try:
                allowed = conn.execute(
                    "SELECT has_function_privilege(%s, 'ledger._entry_well_formed(text, bigint, bigint, bigint, "
                    "bigint, bigint, text, text, text, bytea, bytea)', 'EXECUTE') AS allowed", (role,)).fetchone()
            finally:
                conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
            assert allowed == {"allowed": True}, node.pg_port
