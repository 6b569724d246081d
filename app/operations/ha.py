"""REWARDS_HA=on: pg_auto_failover keeps a primary and a synchronous standby,
watched by a monitor, each its own cluster on a loopback port with its own
data folder (monitor on REWARDS_PG_PORT, node1 and node2 on the next two),
all run by the cluster's OS user as one `pg_autoctl run` keeper per node.

What the rest of the project sees: the service database answers on whichever
node is primary (libpq's target_session_attrs=read-write over both ports, see
Settings.db_ports), and PgBouncer is pointed at the primary by `follow`, a
listener of the monitor's state notifications (docs/ARCHITECTURE.md says why).

pg_autoctl talks to the monitor and to the other node over TCP with
passwords: three roles of its own, their passwords generated here once and kept
in a passfile of the data folder that only the OS user can read."""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from prometheus_client import Counter, Gauge
from psycopg.rows import dict_row

from app.ledger import queries
from app.operations import cluster, migrate
from app.operations.supervisor import ALIVE, Program, Supervisor
from app.settings import Settings

log = logging.getLogger("rewards.ha")

FAST_STOP_SECONDS = 90

FORMATION = "default"
MONITOR_DATABASE = "pg_auto_failover"
NODES = ("node1", "node2")
# pg_autoctl's roles: nodes reach the monitor as autoctl_node, the monitor
# checks nodes as pgautofailover_monitor, the standby streams (and pg_rewind
# reads) as pgautofailover_replicator.
ROLES = {"autoctl_node": "monitor", "pgautofailover_monitor": "nodes", "pgautofailover_replicator": "nodes"}
# The states in which a node serves as the standby that commits wait for.
# Seconds: see _monitor_conf.
UNHEALTHY_AFTER_SECONDS = 8
DEMOTE_AFTER_SECONDS = 10
PARTITIONED_AFTER_SECONDS = 7


class HAError(SystemExit):
    """The trio could not be made, or did not get where it was asked to go."""


@dataclass(frozen=True)
class Node:
    """One pg_auto_failover node of the data folder: the monitor, node1 or node2."""

    name: str
    port: int
    home: Path

    @property
    def pg_data(self) -> Path:
        return self.home / "pg"

    @property
    def state_dir(self) -> Path:
        # pg_autoctl's own configuration and state (XDG folders; the OS user has no home).
        return self.home / "pg_autoctl"


def monitor(settings: Settings) -> Node:
    return Node("monitor", settings.pg_port, settings.data_dir / "ha" / "monitor")


def nodes(settings: Settings) -> list[Node]:
    return [Node(name, port, settings.data_dir / "ha" / name) for name, port in zip(NODES, settings.db_ports)]


def _passfile(settings: Settings) -> Path:
    return settings.data_dir / "ha" / "passfile"


def _log_file(settings: Settings, node: Node) -> Path:
    return settings.log_dir / f"ha-{node.name}.log"


# --- Connections ------------------------------------------------------------

def node_conninfo(settings: Settings, node: Node, dbname: str | None = None) -> str:
    """The superuser on one node's socket (all nodes share the socket folder)."""
    return (f"host={settings.socket_dir} port={node.port} user={settings.pg_superuser} "
            f"dbname={dbname or settings.database} connect_timeout=3")


def monitor_conninfo(settings: Settings) -> str:
    return node_conninfo(settings, monitor(settings), MONITOR_DATABASE)


def _monitor_uri(settings: Settings) -> str:
    # No password: pg_autoctl reads autoctl_node's from the passfile.
    return f"postgres://autoctl_node@127.0.0.1:{settings.pg_port}/{MONITOR_DATABASE}?sslmode=disable"


def _fetch(conninfo: str, query: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    with psycopg.connect(conninfo, autocommit=True, row_factory=dict_row) as conn:
        return conn.execute(query, params or {}).fetchall()


@dataclass(frozen=True)
class Primary:
    name: str
    host: str
    port: int


def primary(settings: Settings) -> Primary | None:
    """The node the monitor says takes writes now."""
    with psycopg.connect(monitor_conninfo(settings), autocommit=True) as conn:
        return _primary_on(conn)


def wait_for_primary(settings: Settings, timeout: float = 60.0) -> Primary:
    """The primary, waited for while a failover promotes the standby (there is
    none until it has)."""
    deadline = time.monotonic() + timeout
    while (current := primary(settings)) is None:
        if time.monotonic() > deadline:
            raise HAError(f"no node took writes within {timeout:.0f} s; see `rewards ha status`")
        time.sleep(0.3)
    return current


def _primary_on(conn: psycopg.Connection) -> Primary | None:
    row = conn.execute(queries.HA_PRIMARY, {"formation": FORMATION}).fetchone()
    return Primary(*row) if row and row[2] else None


# --- pg_autoctl -------------------------------------------------------------

def _environment(settings: Settings, node: Node) -> dict[str, str]:
    """What every pg_autoctl of a node runs with (and the Postgres it starts)."""
    return {
        "PATH": f"{settings.pg_bin}:/usr/local/bin:/usr/bin:/bin",
        "PGHOST": str(settings.socket_dir),
        "PGUSER": settings.pg_superuser,
        "PGPASSFILE": str(_passfile(settings)),
        "XDG_CONFIG_HOME": str(node.state_dir),
        "XDG_DATA_HOME": str(node.state_dir),
        "XDG_RUNTIME_DIR": str(node.state_dir),
    }


def _autoctl(settings: Settings, node: Node, *args: str | Path) -> list[str]:
    env = [f"{key}={value}" for key, value in _environment(settings, node).items()]
    return cluster.as_owner(settings, "env", *env, "pg_autoctl", *args, "--pgdata", node.pg_data)


def _run_autoctl(settings: Settings, node: Node, *args: str | Path, check: bool = True) -> str:
    result = subprocess.run(_autoctl(settings, node, *args), capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise HAError(f"pg_autoctl {' '.join(map(str, args))} on {node.name} failed:\n"
                      f"{(result.stdout + result.stderr).strip()[-2000:]}")
    return result.stdout


def keeper_program(settings: Settings, node: Node) -> Program:
    """The node's keeper in the foreground, a program of the data folder's
    supervisord: it starts, watches and restarts the node's PostgreSQL and
    carries out the monitor's decisions (with REWARDS_HA=on it takes the place
    of cluster.postgres_program)."""
    return Program(
        name=f"ha-{node.name}", command=["pg_autoctl", "run", "--pgdata", str(node.pg_data)],
        log_file=_log_file(settings, node), user=settings.pg_os_user if os.geteuid() == 0 else None,
        environment=_environment(settings, node), priority=100 if node.name == "monitor" else 110,
        # SIGINT is pg_autoctl's fast stop (PostgreSQL's fast shutdown), waited
        # for as long as a shutdown checkpoint may take; the keeper stops its
        # own children and PostgreSQL.
        stopsignal="INT", stopwaitsecs=600, stopasgroup=False, startsecs=2)


def keeper_running(settings: Settings, node: Node) -> bool:
    result = subprocess.run(_autoctl(settings, node, "status"), capture_output=True, text=True, check=False)
    return result.returncode == 0


def _start_keeper(settings: Settings, node: Node) -> None:
    supervisor = Supervisor.of(settings)
    program = keeper_program(settings, node)
    if supervisor.status(program.name).state not in ALIVE and keeper_running(settings, node):
        # Started by something else (a `rewards up` from before supervision):
        # stopped cleanly, then handed to supervisord.
        _run_autoctl(settings, node, "stop", "--fast", check=False)
        _wait(f"the {node.name} keeper stopping", lambda: not keeper_running(settings, node), 120, [])
    supervisor.ensure(program)


def _stop_keeper(settings: Settings, node: Node) -> None:
    """The keeper stopped (fast) and taken out of supervisord. A fast stop that
    has not ended in FAST_STOP_SECONDS (a primary with a process that still
    waits for a standby that is gone: see `down`) is made an immediate one,
    which the next start recovers from the WAL, instead of waiting out
    supervisord's bound."""
    stopper = threading.Thread(target=Supervisor.of(settings).remove, args=(keeper_program(settings, node).name,))
    stopper.start()
    stopper.join(FAST_STOP_SECONDS)
    if stopper.is_alive():
        log.warning("the %s keeper did not stop in %s s; stopping it immediately", node.name, FAST_STOP_SECONDS)
        _run_autoctl(settings, node, "stop", "--immediate", check=False)
        stopper.join()


def kill_node(settings: Settings, node: Node, keep_down: bool = False) -> None:
    """SIGKILL to a node's keeper, its children and its PostgreSQL at once
    (supervisord gives each program a process group of its own). supervisord
    then starts the keeper again, unless `keep_down`: a machine lost for good,
    so that the standby must take over (the tests)."""
    supervisor = Supervisor.of(settings)
    name = keeper_program(settings, node).name
    pid = supervisor.pid(name)
    if pid is None:
        raise HAError(f"the {node.name} keeper is not running")
    group = os.getpgid(pid)
    if not keep_down:
        os.killpg(group, signal.SIGKILL)
        return
    # Killed first and taken out of supervisord after, the keeper would be
    # started again in between (autorestart), bring its PostgreSQL up as the
    # primary and then get a fast stop. So the group is frozen (SIGSTOP: it
    # does nothing more, as a machine that died), supervisord is told to stop
    # the program (its SIGINT waits, undelivered), and only once supervisord
    # counts it as stopping, so that its exit is not one to restart, is the
    # group killed.
    os.killpg(group, signal.SIGSTOP)
    stopper = threading.Thread(target=supervisor.remove, args=(name,))
    stopper.start()
    try:
        _wait(f"supervisord stopping the {node.name} keeper",
              lambda: supervisor.status(name).state in ("STOPPING", "STOPPED", "ABSENT"), 30, [])
    finally:
        os.killpg(group, signal.SIGKILL)
        stopper.join()


def restart_node(settings: Settings, node: Node) -> None:
    """A lost node's keeper started again: it rejoins as the standby."""
    _start_keeper(settings, node)


# --- Making the trio --------------------------------------------------------

def _ensure_passfile(settings: Settings) -> dict[str, str]:
    path = _passfile(settings)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        # Hex: nothing a passfile or a conninfo would need to escape.
        path.write_text("".join(f"*:*:*:{role}:{secrets.token_hex(24)}\n" for role in ROLES))
        path.chmod(0o600)
        if os.geteuid() == 0:
            shutil.chown(path.parent, settings.pg_os_user, settings.pg_os_user)
            shutil.chown(path, settings.pg_os_user, settings.pg_os_user)
    return {line.split(":")[3]: line.split(":")[4] for line in path.read_text().splitlines() if line}


def _set_passwords(settings: Settings, conninfo: str, where: str, passwords: dict[str, str]) -> None:
    # ALTER ROLE takes no bind parameters: psycopg.sql quotes the role and password.
    with psycopg.connect(conninfo, autocommit=True) as conn:
        for role, password in passwords.items():
            if ROLES[role] == where:
                conn.execute(psycopg.sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                    psycopg.sql.Identifier(role), psycopg.sql.Literal(password)))


def _monitor_conf(settings: Settings) -> str:
    return "\n".join([
        "# Written by `rewards up`: the pg_auto_failover monitor (pg_autoctl's own",
        "# settings come first, in postgresql-auto-failover.conf).",
        f"unix_socket_directories = '{settings.socket_dir}'",
        "unix_socket_permissions = 0700",
        # pg_autoctl sizes shared_buffers for a machine of its own; the
        # monitor holds a few rows.
        "shared_buffers = 64MB",
        "work_mem = 4MB",
        "maintenance_work_mem = 64MB",
        "effective_cache_size = 256MB",
        # How soon a lost primary is replaced. A node is failed over once the
        # monitor's health checks fail and its keeper has not reported for
        # node_considered_unhealthy_timeout; the standby then takes writes
        # after primary_demote_timeout, the time the old primary's keeper,
        # if it still runs but is cut off, has to stop it by itself (its
        # network_partition_timeout, set below this on each node). pg_autoctl's
        # defaults (20 s + 30 s) keep writes refused for about 50 s; these
        # about 20 s. An isolated old primary can acknowledge nothing
        # meanwhile: its commits wait for the standby that is being promoted.
        "pgautofailover.health_check_period = 2000",
        "pgautofailover.health_check_timeout = 2000",
        "pgautofailover.health_check_retry_delay = 1000",
        f"pgautofailover.node_considered_unhealthy_timeout = {UNHEALTHY_AFTER_SECONDS * 1000}",
        f"pgautofailover.primary_demote_timeout = {DEMOTE_AFTER_SECONDS * 1000}",
    ]) + "\n"


def _wait(what: str, ready: Callable[[], bool], timeout: float, log_files: list[Path]) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if ready():
                return
        except psycopg.Error:
            pass
        if time.monotonic() > deadline:
            tails = "\n".join(f"{path}:\n{path.read_text()[-1500:] if path.exists() else '(none)'}"
                              for path in log_files)
            raise HAError(f"{what} did not happen within {timeout:.0f} s; the logs end:\n{tails}")
        time.sleep(0.3)


def _states(settings: Settings) -> dict[str, tuple[str, str]]:
    return {row["name"]: (row["reported_state"], row["assigned_state"])
            for row in _fetch(monitor_conninfo(settings), queries.HA_NODES, {"formation": FORMATION})}


def settled(settings: Settings) -> bool:
    """One primary and one standby, each where the monitor wants it, and the
    primary's commits waiting for that standby now (the monitor's table alone
    still holds the states of before a restart)."""
    states = sorted(_states(settings).values())
    if states != [("primary", "primary"), ("secondary", "secondary")]:
        return False
    current = primary(settings)
    node = next((n for n in nodes(settings) if current is not None and n.port == current.port), None)
    if node is None:
        return False
    with psycopg.connect(node_conninfo(settings, node), autocommit=True, row_factory=dict_row) as conn:
        role = conn.execute(queries.HA_NODE_ROLE).fetchone()
        standbys = conn.execute(queries.HA_REPLICATION).fetchall()
    return (not role["in_recovery"] and bool(role["synchronous_standby_names"])
            and [r["sync_state"] in ("sync", "quorum") and r["state"] == "streaming" for r in standbys] == [True])


def check(settings: Settings) -> None:
    """Refuse, before anything is made, what the trio cannot be."""
    if settings.citus == "on" or settings.citus_workers:
        raise HAError("REWARDS_HA=on runs one primary and its standby; it does not combine with REWARDS_CITUS=on "
                      "or REWARDS_CITUS_WORKERS: nothing was changed")
    if shutil.which("pg_autoctl") is None:
        raise HAError("REWARDS_HA=on needs pg_autoctl (Debian's postgresql-15-auto-failover; `make install`): "
                      "nothing was changed")
    for node in (monitor(settings), *nodes(settings)):
        if (not (node.pg_data / "PG_VERSION").exists() or not keeper_running(settings, node)) \
                and cluster.port_taken(node.port):
            raise HAError(f"port {node.port} (for the HA {node.name}) is taken by another program: nothing was "
                          "changed")


def _make_monitor(settings: Settings, node: Node, passwords: dict[str, str]) -> None:
    cluster.initdb(settings, node.pg_data)
    cluster.access(settings, node.pg_data, tuple(ROLES))
    cluster.write_owned(settings, node.pg_data / "conf.d" / "20-machine.conf", _monitor_conf(settings))
    if not (node.home / "made").exists():
        _run_autoctl(settings, node, "create", "monitor", "--pgport", str(node.port), "--hostname", "127.0.0.1",
                     "--no-ssl", "--skip-pg-hba")
        _run_autoctl(settings, node, "config", "set", "postgresql.listen_addresses", "127.0.0.1")
        cluster.write_owned(settings, node.home / "made", "")
    _reload(settings, node)
    _start_keeper(settings, node)
    _wait("the monitor answering", lambda: bool(_fetch(monitor_conninfo(settings), queries.PING)),
          60, [_log_file(settings, node)])
    _set_passwords(settings, monitor_conninfo(settings), "monitor", passwords)


def _reload(settings: Settings, node: Node) -> None:
    """Our files, written again, reach a running node (a setting that needs a
    restart waits for one)."""
    if keeper_running(settings, node):
        subprocess.run(cluster.as_owner(settings, settings.pg_bin / "pg_ctl", "reload", "-D", node.pg_data),
                       capture_output=True, check=False)


def _create_node(settings: Settings, node: Node) -> None:
    _run_autoctl(settings, node, "create", "postgres", "--pgport", str(node.port), "--pghost", settings.socket_dir,
                 "--listen", "127.0.0.1", "--hostname", "127.0.0.1", "--username", settings.pg_superuser,
                 "--dbname", settings.database, "--name", node.name, "--monitor", _monitor_uri(settings),
                 "--pgctl", settings.pg_bin / "pg_ctl", "--no-ssl", "--skip-pg-hba")
    cluster.write_owned(settings, node.home / "made", "")


def _configure_keeper(settings: Settings, node: Node) -> None:
    _run_autoctl(settings, node, "config", "set", "timeout.network_partition_timeout",
                 str(PARTITIONED_AFTER_SECONDS))


def _node_answers(settings: Settings, node: Node) -> bool:
    return bool(_fetch(node_conninfo(settings, node), queries.HA_NODE_ROLE))


def up(settings: Settings) -> None:
    """Make (once) and start the monitor, the primary and its standby, then
    migrate the primary; safe to run again (each node's files are written
    again and its keeper started unless it runs)."""
    check(settings)
    cluster._ensure_os_user(settings)
    cluster.make_folders(settings)
    passwords = _ensure_passfile(settings)
    mon = monitor(settings)
    _make_monitor(settings, mon, passwords)
    first, second = nodes(settings)
    logs = [_log_file(settings, n) for n in (mon, first, second)]
    fresh = not (first.home / "made").exists() and not (second.home / "made").exists()
    if fresh:
        # The first node is a cluster of ours (the project's initdb options and
        # files) that pg_autoctl adopts as the primary; the second is copied
        # from it by pg_autoctl (pg_basebackup).
        cluster.initdb(settings, first.pg_data)
        cluster.configure(settings, first.pg_data, port=False, roles=tuple(ROLES))
        _create_node(settings, first)
        _configure_keeper(settings, first)
        _start_keeper(settings, first)
        _wait("node1 becoming the primary", lambda: _node_answers(settings, first), 90, logs)
        _set_passwords(settings, node_conninfo(settings, first), "nodes", passwords)
    for node in (first, second):
        if not (node.home / "made").exists():
            _create_node(settings, node)
        _configure_keeper(settings, node)
        if (node.pg_data / "PG_VERSION").exists():
            cluster.configure(settings, node.pg_data, port=False, roles=tuple(ROLES))
        _start_keeper(settings, node)
    _wait("a primary and a synchronous standby", lambda: settled(settings), 180, logs)
    for node in (first, second):
        _reload(settings, node)
    migrate.upgrade(settings.superuser_conninfo())
    cluster._let_api_log_in(settings)


def _waits_for_a_standby(settings: Settings, node: Node) -> bool:
    with psycopg.connect(node_conninfo(settings, node), autocommit=True, row_factory=dict_row) as conn:
        return bool(conn.execute(queries.HA_NODE_ROLE).fetchone()["synchronous_standby_names"])


def down(settings: Settings) -> None:
    """Stop the standby, then the primary once its commits no longer wait for
    the standby, then the monitor (last, so it does not see its nodes go and
    fail over).

    The primary is stopped only after the monitor has turned its synchronous
    replication off (wait_primary, once the standby is seen gone): a commit
    waiting for the standby then is released. A backend gives its wait up when
    the fast stop ends it, but pg_cron's launcher (1.4, which commits every
    minute here) does not, and waits on for a standby that will not come back:
    the fast stop never ends."""
    running = [n for n in nodes(settings) if (n.pg_data / "PG_VERSION").exists()]
    current = None
    try:
        current = primary(settings)
    except psycopg.Error:
        pass
    running.sort(key=lambda n: current is not None and n.port == current.port)
    for node in running:
        if current is not None and node.port == current.port and len(running) > 1:
            try:
                _wait("the primary's synchronous replication turned off",
                      lambda node=node: not _waits_for_a_standby(settings, node), 60, [])
            except HAError:
                log.warning("the %s primary still waits for its standby; stopping it anyway", node.name)
        _stop_keeper(settings, node)
    _stop_keeper(settings, monitor(settings))


# --- For operators: status and a planned switchover -------------------------

def status(settings: Settings) -> dict[str, Any]:
    """The nodes as the monitor sees them, and replication as the primary does."""
    report: dict[str, Any] = {"formation": FORMATION, "monitor": f"127.0.0.1:{settings.pg_port}",
                              "nodes": [], "primary": None, "replication": [], "problems": []}
    try:
        report["nodes"] = _fetch(monitor_conninfo(settings), queries.HA_NODES, {"formation": FORMATION})
        current = primary(settings)
    except psycopg.Error as exc:
        report["problems"].append(f"the monitor did not answer: {str(exc).strip().splitlines()[0]}")
        return report
    if current is None:
        report["problems"].append("no node is primary (a failover under way?)")
        return report
    report["primary"] = current.name
    node = next(n for n in nodes(settings) if n.port == current.port)
    try:
        role = _fetch(node_conninfo(settings, node), queries.HA_NODE_ROLE)[0]
        report["replication"] = _fetch(node_conninfo(settings, node), queries.HA_REPLICATION)
    except psycopg.Error as exc:
        report["problems"].append(f"the primary {node.name} did not answer: {str(exc).strip().splitlines()[0]}")
        return report
    report["synchronous_commit"] = role["synchronous_commit"]
    report["synchronous_standby_names"] = role["synchronous_standby_names"]
    synchronous = [r for r in report["replication"] if r["sync_state"] in ("sync", "quorum")]
    if not synchronous or not role["synchronous_standby_names"] or role["synchronous_commit"] in ("off", "local"):
        report["problems"].append("no synchronous standby: commits are acknowledged on one disk only")
    for row in report["nodes"]:
        if not row["healthy"]:
            report["problems"].append(f"{row['name']} fails the monitor's health checks")
        elif row["reported_state"] != row["assigned_state"]:
            report["problems"].append(f"{row['name']} is {row['reported_state']}, on its way to "
                                      f"{row['assigned_state']}")
    return report


def switchover(settings: Settings, timeout: float = 120.0) -> dict[str, Any]:
    """A planned failover: the standby is promoted once it has every
    acknowledged commit, the old primary rejoins as its standby. Returns when
    the two are settled again and PgBouncer points at the new primary."""
    before = primary(settings)
    if before is None or not settled(settings):
        raise HAError("a switchover needs a primary and a standby that are settled; see `rewards ha status`")
    started = time.monotonic()
    with psycopg.connect(monitor_conninfo(settings), autocommit=True) as conn:
        conn.execute(queries.HA_PERFORM_FAILOVER, {"formation": FORMATION})
    logs = [_log_file(settings, n) for n in (monitor(settings), *nodes(settings))]

    def done() -> bool:
        after = primary(settings)
        return after is not None and after.port != before.port and settled(settings)

    _wait("the switchover", done, timeout, logs)
    promoted = primary(settings)
    assert promoted is not None
    _wait("PgBouncer reaching the new primary", lambda: bouncer_target(settings) == promoted.port, 30, logs)
    return {"from": before.name, "to": promoted.name, "seconds": round(time.monotonic() - started, 1)}


def bouncer_target(settings: Settings) -> int:
    """The node PgBouncer hands the API's queries to now."""
    with psycopg.connect(settings.bouncer_conninfo(), autocommit=True, connect_timeout=3,
                         prepare_threshold=None) as conn:
        return conn.execute(queries.HA_SERVER_PORT).fetchone()[0]


# --- The listener that points PgBouncer at the primary ----------------------

# The listener's connections to a standby: on loopback, so one that takes
# longer is a node to come back to at the next poll, not one to wait for.
FOLLOW_CONNECT_SECONDS = 2

RETARGET_FAILURES = Counter(
    "rewards_ha_retarget_failures", "Times `rewards ha follow` could not point PgBouncer at the primary (its file "
    "or its SIGHUP failed); tried again at the next poll")
BOUNCER_BEHIND = Gauge(
    "rewards_ha_bouncer_behind", "1 while the monitor names a primary that PgBouncer has not been pointed at")


def drop_stale_slots(settings: Settings, monitor_conn: psycopg.Connection, cleaned: set[int]) -> list[str]:
    """Logical slots on a standby are copies of the old primary's (pg_rewind and
    pg_basebackup bring them along) that PostgreSQL 15 cannot decode from: they
    only pin WAL, and would hand a stale position to a consumer if the node
    were promoted. Dropped; the consumer makes its slot where the primary is.

    Only a node the monitor sees as a healthy standby is reached, once each
    time it becomes one (`cleaned` holds the ports done and is kept by the
    caller): never the primary, whose slot is the consumer's, and never a node
    that is down or failing the monitor's health checks, which is looked at
    once it is back instead of being waited for."""
    standbys = {port for _, port in monitor_conn.execute(queries.HA_STANDBYS, {"formation": FORMATION}).fetchall()}
    cleaned.intersection_update(standbys)
    dropped = []
    for node in nodes(settings):
        if node.port not in standbys or node.port in cleaned:
            continue
        try:
            with psycopg.connect(node_conninfo(settings, node), autocommit=True, row_factory=dict_row,
                                 connect_timeout=FOLLOW_CONNECT_SECONDS,
                                 # a standby that logs in and then stalls must not hold up the retarget
                                 options=f"-c statement_timeout={FOLLOW_CONNECT_SECONDS * 1000}") as conn:
                if not conn.execute(queries.HA_NODE_ROLE).fetchone()["in_recovery"]:
                    continue  # promoted since the monitor's answer: its slot is the consumer's
                for row in conn.execute(queries.HA_LOGICAL_SLOTS).fetchall():
                    conn.execute(queries.DROP_SLOT, {"slot": row["slot"]})
                    dropped.append(f"{node.name}:{row['slot']}")
            cleaned.add(node.port)
        except psycopg.Error:
            continue  # gone again, or starting: looked at on the next poll
    return dropped


def follow(settings: Settings, retarget: Callable[[int], None], stop: Callable[[], bool] = lambda: False,
           poll_seconds: float = 1.0) -> None:
    """Forever: whenever the monitor names another primary, `retarget(port)`
    (rewrite PgBouncer's [databases] entry and reload it). Woken by the
    monitor's NOTIFY on every state change, and every `poll_seconds` anyway,
    so a notification lost while reconnecting costs at most that long. A
    monitor that does not answer is retried; the current target stays. A
    retarget that fails (PgBouncer down while supervisord restarts it) is
    logged, counted and tried again at the next poll: it never ends the
    listener, which is the only thing that would point PgBouncer away."""
    target: int | None = None
    cleaned: set[int] = set()
    failures = 0
    while not stop():
        try:
            with psycopg.connect(monitor_conninfo(settings), autocommit=True) as conn:
                conn.execute(queries.HA_LISTEN)
                log.info("following the monitor", extra={"fields": {"monitor": settings.pg_port}})
                while not stop():
                    current = _primary_on(conn)
                    if current is not None and current.port != target:
                        BOUNCER_BEHIND.set(1)
                        try:
                            retarget(current.port)
                        except Exception as exc:  # noqa: BLE001 - whatever it was, the listener must go on
                            failures += 1
                            RETARGET_FAILURES.inc()
                            log.warning("could not point PgBouncer at the primary, trying again", extra={"fields": {
                                "node": current.name, "port": current.port, "error": str(exc).strip(),
                                "attempt": failures}})
                        else:
                            log.info("PgBouncer now points at the primary", extra={"fields": {
                                "node": current.name, "port": current.port, "was": target,
                                "after_failures": failures}})
                            target, failures = current.port, 0
                            BOUNCER_BEHIND.set(0)
                    for slot in drop_stale_slots(settings, conn, cleaned):
                        log.info("dropped a logical slot left on a standby", extra={"fields": {"slot": slot}})
                    any(True for _ in conn.notifies(timeout=poll_seconds, stop_after=1))
        except psycopg.Error as exc:
            log.warning("the monitor did not answer, retrying", extra={"fields": {"error": str(exc).strip()}})
            time.sleep(1)
