"""Bounded waits: the README's table of them ("Bounded waits") is what the code
sets (the roles' settings on every node, PgBouncer's ini, the API's pool), and
PostgreSQL enforces the roles' bounds on the ledger's own calls, which come back
as the ledger's Overloaded, having written nothing."""

from __future__ import annotations

import re
import threading
import time

import psycopg
import pytest
from psycopg import sql

from app.api.pool import make_pool
from app.ledger import calls
from app.ledger.client import Ledger
from app.ledger.errors import Overloaded
from app.operations import processes
from app.settings import PROJECT_ROOT, load
from tests.conftest import SETTINGS


def _readme_waits() -> list[dict[str, str]]:
    text = (PROJECT_ROOT / "README.md").read_text()
    section = text.split("\n## Bounded waits\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")][1:]  # past the header
    names = ("who", "what", "bound", "set_by", "then")
    return [dict(zip(names, (cell.strip() for cell in row.strip("|").split(" | ")), strict=True)) for row in rows]


def _role_waits() -> dict[tuple[str, str], str]:
    """(role, setting) -> value, as the README promises them."""
    promised = {}
    for row in _readme_waits():
        if found := re.fullmatch(r"`(\w+)` of `(rewards_\w+)`", row["set_by"]):
            promised[(found.group(2), found.group(1))] = row["bound"].split()[0].strip("`")
    return promised


def _bouncer_waits() -> dict[str, str]:
    promised = {}
    for row in _readme_waits():
        if found := re.fullmatch(r"PgBouncer `(\w+)`", row["set_by"]):
            promised[found.group(1)] = re.fullmatch(r"([\d.]+) s", row["bound"]).group(1)
    return promised


def test_every_row_of_the_readme_is_checked_here():
    rows = _readme_waits()
    checked = len(_role_waits()) + len(_bouncer_waits()) + sum(
        row["set_by"].startswith(("`REWARDS_", "`connect_timeout` of the pool")) for row in rows)
    assert len(rows) > 15 and checked == len(rows)


def test_the_roles_waits_are_set_on_every_node(topology):
    promised = _role_waits()
    assert ("rewards_api", "lock_timeout") in promised
    for node in topology.nodes:
        with psycopg.connect(node.superuser_conninfo()) as conn:
            rows = conn.execute(
                "SELECT rolname, unnest(rolconfig) FROM pg_roles WHERE rolname LIKE 'rewards\\_%'").fetchall()
        set_here = {(role, setting.split("=", 1)[0]): setting.split("=", 1)[1] for role, setting in rows}
        assert set_here == promised, node.pg_port


def test_the_bouncer_waits_are_in_its_ini(tmp_path):
    promised = _bouncer_waits()
    assert set(promised) >= {"query_wait_timeout", "query_timeout", "server_connect_timeout", "server_login_retry"}
    ini = dict(re.findall(r"^(\w+) = (.*)$", processes.PGBOUNCER_INI, flags=re.MULTILINE))
    assert {name: ini.get(name) for name in promised} == promised


def test_the_api_s_own_waits_are_its_settings():
    rows = {row["set_by"].split()[0].strip("`"): row for row in _readme_waits()}
    defaults = load({})
    assert rows["REWARDS_POOL_WAIT_SECONDS"]["bound"] == f"{defaults.pool_wait_seconds} s"
    assert f"({defaults.max_in_flight})" in rows["REWARDS_MAX_IN_FLIGHT"]["set_by"]
    pool = make_pool(defaults)
    assert pool.timeout == defaults.pool_wait_seconds
    assert rows["connect_timeout"]["bound"] == f"{pool.kwargs['connect_timeout']} s"


def test_the_start_waits_are_settings(tmp_path):
    # uvicorn's own 5 s health check killed API workers still importing on a
    # loaded machine, and `rewards up` gave a service 30 s.
    defaults = load({})
    assert defaults.start_seconds >= 120 and defaults.api_worker_healthcheck_seconds >= 60
    settings = load({"REWARDS_START_SECONDS": "1", "REWARDS_API_WORKER_HEALTHCHECK_SECONDS": "45"})
    command = processes.api_command(settings, 2)
    assert command[command.index("--timeout-worker-healthcheck") + 1] == "45"
    with pytest.raises(SystemExit, match="nothing did not come up within 1 s"):
        processes._wait_for(lambda: False, "nothing", tmp_path / "nothing.log", settings.start_seconds)


# --- Enforced on the ledger's calls -------------------------------------------


def _locked(dsn: str, user: str, ready: threading.Event, release: threading.Event) -> None:
    """Hold the account's row lock, as a long transaction of someone else's would."""
    with psycopg.connect(dsn) as conn:
        conn.execute("SELECT 1 FROM ledger.accounts WHERE user_id = %s FOR UPDATE", (user,))
        ready.set()
        release.wait(30)


@pytest.fixture
def locked_account(dsn, db):
    """A user whose account row another transaction holds for the test's length."""
    user = "locked-user"
    Ledger(db)(calls.credit(user, "first", 10, "task"))
    ready, release = threading.Event(), threading.Event()
    holder = threading.Thread(target=_locked, args=(dsn, user, ready, release))
    holder.start()
    assert ready.wait(10)
    yield user
    release.set()
    holder.join()


def _refused_after(conninfo: str, user: str) -> tuple[Overloaded, float]:
    started = time.monotonic()
    with Ledger.connect(conninfo) as ledger, pytest.raises(Overloaded) as refused:
        ledger(calls.credit(user, "blocked", 5, "task"))
    return refused.value, time.monotonic() - started


def test_a_call_waits_for_a_lock_at_most_lock_timeout(database, locked_account, db):
    refused, waited = _refused_after(SETTINGS.api_conninfo(database), locked_account)
    assert "lock_timeout" in str(refused)
    assert 0.5 <= waited < 1.0  # the role's 500ms, not its 1s statement_timeout
    assert db.execute("SELECT available FROM ledger.accounts WHERE user_id = %s", (locked_account,)).fetchone() == {"available": 10}


def test_a_call_runs_at_most_statement_timeout(topology, database, locked_account, db):
    # With the lock wait allowed longer, the statement's own bound ends it. Set
    # for this database on every node: a Citus worker runs the call in a session
    # of its own, which a session SET on the coordinator does not reach.
    for node in topology.nodes:
        with psycopg.connect(node.superuser_conninfo(database), autocommit=True) as conn:
            conn.execute("SELECT set_config('citus.enable_ddl_propagation', 'off', false)")
            conn.execute(sql.SQL("ALTER ROLE rewards_api IN DATABASE {} SET lock_timeout = '10s'").format(
                sql.Identifier(database)))
    refused, waited = _refused_after(SETTINGS.api_conninfo(database), locked_account)
    assert "statement_timeout" in str(refused)
    assert 1.0 <= waited < 2.0
    assert db.execute("SELECT available FROM ledger.accounts WHERE user_id = %s", (locked_account,)).fetchone() == {"available": 10}


def test_a_session_idle_in_a_transaction_is_ended(database):
    with psycopg.connect(SETTINGS.api_conninfo(database)) as conn:
        conn.execute("SELECT 1")  # a transaction opens, and then nothing comes
        time.sleep(5.5)
        with pytest.raises(psycopg.errors.IdleInTransactionSessionTimeout):
            conn.execute("SELECT 1")
