"""The project's own PostgreSQL cluster: created, configured, started and stopped
under the project's data folder, run by an unprivileged OS user because
PostgreSQL refuses to run as root."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg

from app import secrets
from app.ledger import queries
from app.operations import citus, migrate
from app.operations.supervisor import ALIVE, Program, Supervisor
from app.settings import PROJECT_ROOT, Settings

PG_HBA = """\
# Written by `rewards db up`.
# On the Unix socket, the kernel says who connects: only the OS users pg_ident.conf
# maps (root and the cluster's own) may log in, as any role. Everyone else, and
# every role over TCP, needs the role's password.
local   all          all                     peer map=project
host    all          all   127.0.0.1/32      scram-sha-256
host    replication  all   127.0.0.1/32      scram-sha-256
"""

PG_IDENT = """\
# Written by `rewards db up`: the OS users that may use the socket, and as which
# roles (PostgreSQL 15 has no wildcard for the role: each is listed).
# MAP      OS USER   ROLE
{lines}
"""

# The roles sql/roles.sql makes (tests/test_socket_access.py holds the two equal).
PROJECT_ROLES = ("rewards_owner", "rewards_api", "rewards_audit_writer", "rewards_notifier", "rewards_auditor")


def as_owner(settings: Settings, *command: str | Path) -> list[str]:
    """The command, run as the cluster's OS user when we are root."""
    argv = [str(part) for part in command]
    if os.geteuid() == 0:
        return ["runuser", "-u", settings.pg_os_user, "--", *argv]
    return argv


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=True, text=True, capture_output=True)


def _ensure_os_user(settings: Settings) -> None:
    if os.geteuid() != 0:
        return
    try:
        pwd.getpwnam(settings.pg_os_user)
    except KeyError:
        _run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", settings.pg_os_user])


def _grant_traverse(settings: Settings, folder: Path) -> None:
    """Let the OS user reach the data folder: a clone under /root, say, is closed
    to other users, so grant search (x) on just the ancestors that need it."""
    if os.geteuid() != 0:
        return
    for ancestor in reversed(folder.parents):
        probe = subprocess.run(as_owner(settings, "test", "-x", ancestor), check=False)
        if probe.returncode != 0:
            _run(["setfacl", "-m", f"u:{settings.pg_os_user}:x", str(ancestor)])


def _citus_installed(settings: Settings) -> bool:
    """The library and the extension's control file, where this PostgreSQL looks."""
    pkglibdir = _run([str(settings.pg_bin / "pg_config"), "--pkglibdir"]).stdout.strip()
    sharedir = _run([str(settings.pg_bin / "pg_config"), "--sharedir"]).stdout.strip()
    return Path(pkglibdir, "citus.so").exists() and Path(sharedir, "extension", "citus.control").exists()


def _knows_setting(settings: Settings, name: str) -> bool:
    described = _run(as_owner(settings, settings.pg_bin / "postgres", "--describe-config")).stdout
    return any(line.split("\t", 1)[0] == name for line in described.splitlines())


def use_citus(settings: Settings) -> bool:
    if settings.citus == "off":
        return False
    installed = _citus_installed(settings)
    if settings.citus == "on" and not installed:
        raise SystemExit(f"REWARDS_CITUS=on but the citus extension is not installed in the PostgreSQL of "
                         f"{settings.pg_bin}: nothing was changed")
    return installed


def check(settings: Settings) -> None:
    """Refuse, before anything is created or started, a cluster that cannot be built."""
    if settings.citus_workers < 0:
        raise SystemExit(f"REWARDS_CITUS_WORKERS is a number of workers, not {settings.citus_workers}")
    if settings.citus_workers and settings.citus != "on":
        raise SystemExit(f"REWARDS_CITUS_WORKERS={settings.citus_workers} needs REWARDS_CITUS=on (it is "
                         f"{settings.citus}): nothing was changed")
    use_citus(settings)
    for node in _nodes(settings):
        if not is_running(node) and port_taken(node.pg_port):
            raise SystemExit(f"port {node.pg_port} (for {node.pg_data}) is taken by another program: nothing was "
                             "changed")


def port_taken(port: int) -> bool:
    """Something listens on the port (as PostgreSQL binds: connections of a server
    just stopped, in TIME_WAIT, do not count)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def machine_conf(settings: Settings, port: bool = True) -> str:
    """What `rewards db up` writes beside ops/postgresql.conf on every node
    (docker-compose.yml gives its nodes the same: tests/test_compose.py)."""
    preload = (["citus"] if use_citus(settings) else []) + ["pg_cron"]
    lines = [
        "# Written by `rewards db up` for this machine.",
        # A pg_auto_failover node's port is on its keeper's command line, so
        # that every node's files are the same (pg_rewind copies them across).
        f"port = {settings.pg_port}" if port else "# port: given by pg_autoctl run",
        f"unix_socket_directories = '{settings.socket_dir}'",
        # citus must come first when present.
        f"shared_preload_libraries = '{','.join(preload)}'",
        f"cron.database_name = '{settings.database}'",
        # Only the cluster's OS user (and root, which ignores it) may open the socket.
        "unix_socket_permissions = 0700",
    ]
    if use_citus(settings):
        # Logical decoding names the distributed table, not its shard, and a
        # shard move emits nothing: what the audit stream needs on every node.
        lines.append("citus.enable_change_data_capture = on")
        # Where Citus reaches this node from itself (copying reference tables to
        # a new node, the rebalancer's jobs): the socket, not a password over TCP.
        lines.append(f"citus.local_hostname = '{settings.socket_dir}'")
    # Since 15.19 only listed plugins may decode; older servers lack the setting.
    if _knows_setting(settings, "output_plugin_libraries"):
        lines.append("output_plugin_libraries = 'pgoutput, test_decoding, wal2json'")
    return "\n".join(lines) + "\n"


def write_owned(settings: Settings, path: Path, text: str) -> None:
    """Written whole or not at all, with the mode the file had: a running node
    may reload while its files are written again (a pg_autoctl keeper sends
    its own SIGHUPs), and a pg_ident.conf it read half-written stayed in force,
    refusing the keeper's own logins, until the next reload, which never came
    (tests/test_ha.py's trio hung so)."""
    # A name of its own per call: two writers of one file (`rewards up` and the
    # HA follower's retarget) must not rename each other's half-written file.
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    partial = Path(name)
    try:
        with os.fdopen(handle, "w") as out:
            out.write(text)
        partial.chmod(path.stat().st_mode & 0o7777 if path.exists() else 0o644)
        if os.geteuid() == 0:
            shutil.chown(partial, settings.pg_os_user, settings.pg_os_user)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def make_folders(settings: Settings) -> None:
    """The data, socket and log folders, the cluster's OS user's."""
    for folder in (settings.data_dir, settings.socket_dir, settings.log_file.parent):
        folder.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(folder, settings.pg_os_user, settings.pg_os_user)
    _grant_traverse(settings, settings.data_dir)


def initdb(settings: Settings, pg_data: Path) -> None:
    """A new cluster in `pg_data` (unless there is one) that reads conf.d."""
    if (pg_data / "PG_VERSION").exists():
        return
    pg_data.parent.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        shutil.chown(pg_data.parent, settings.pg_os_user, settings.pg_os_user)
    _run(as_owner(
        settings, settings.pg_bin / "initdb",
        "-D", pg_data, "-U", settings.pg_superuser,
        "--encoding=UTF8", "--locale=C.UTF-8", "--data-checksums",
        "--auth-local=trust", "--auth-host=scram-sha-256",
    ))
    with (pg_data / "postgresql.conf").open("a") as conf:
        conf.write("\ninclude_dir = 'conf.d'\n")
    (pg_data / "conf.d").mkdir(exist_ok=True)
    if os.geteuid() == 0:
        shutil.chown(pg_data / "conf.d", settings.pg_os_user, settings.pg_os_user)


def _initdb(settings: Settings) -> None:
    make_folders(settings)
    initdb(settings, settings.pg_data)


def configure(settings: Settings, pg_data: Path, port: bool = True, roles: tuple[str, ...] = ()) -> None:
    """The project's settings, this machine's, and who may connect."""
    conf_d = pg_data / "conf.d"
    write_owned(settings, conf_d / "10-project.conf", (PROJECT_ROOT / "ops" / "postgresql.conf").read_text())
    write_owned(settings, conf_d / "20-machine.conf", machine_conf(settings, port))
    access(settings, pg_data, roles)


def access(settings: Settings, pg_data: Path, roles: tuple[str, ...] = ()) -> None:
    """pg_hba.conf and pg_ident.conf: peer on the socket (for the project's roles
    and `roles`), passwords over TCP."""
    write_owned(settings, pg_data / "pg_hba.conf", PG_HBA)
    write_owned(settings, pg_data / "pg_ident.conf", PG_IDENT.format(lines="\n".join(
        f"project    {user:<9} {role}" for user in _socket_users(settings)
        for role in (settings.pg_superuser, *PROJECT_ROLES, *roles))))


def _configure(settings: Settings) -> None:
    configure(settings, settings.pg_data)


def _socket_users(settings: Settings) -> list[str]:
    """Root, the cluster's OS user, and whoever runs this (when not root)."""
    me = pwd.getpwuid(os.geteuid()).pw_name
    return list(dict.fromkeys(["root", settings.pg_os_user, me]))


def is_running(settings: Settings) -> bool:
    status = subprocess.run(
        as_owner(settings, settings.pg_bin / "pg_ctl", "status", "-D", settings.pg_data),
        check=False, capture_output=True,
    )
    return status.returncode == 0


def postgres_program(node: Settings, home: Settings) -> Program:
    """A node's PostgreSQL, in the foreground under the supervisord of `home`'s
    data folder (the coordinator's, for a local Citus worker). With
    REWARDS_HA=on the node's pg_auto_failover keeper takes this place and runs
    PostgreSQL itself."""
    name = "postgres" if node.data_dir == home.data_dir else f"postgres-{node.data_dir.relative_to(home.data_dir)}"
    return Program(
        name=name, command=[str(node.pg_bin / "postgres"), "-D", str(node.pg_data)], log_file=node.log_file,
        user=node.pg_os_user if os.geteuid() == 0 else None, priority=100,
        # Its own home, not supervisord's (root's): libpq looks there for
        # client certificates when Citus connects to a node over TCP with SSL,
        # and a home it may not enter fails every such connection.
        environment={"HOME": pwd.getpwnam(node.pg_os_user).pw_dir} if os.geteuid() == 0 else {},
        # SIGTERM would be a smart shutdown, waiting for every client to leave
        # (PgBouncer and the audit stream never do) until supervisord kills it.
        # SIGINT is the fast one: clients are disconnected, then the shutdown
        # checkpoint is written, and that may take minutes after a busy spell:
        # supervisord must wait for it, not SIGKILL it mid-checkpoint (which
        # costs a crash recovery at the next start). Only the postmaster is
        # signalled, never its process group: the postmaster stops its backends.
        stopsignal="INT", stopwaitsecs=600, stopasgroup=False,
        startsecs=2)


def _start(settings: Settings, home: Settings) -> None:
    supervisor = Supervisor.of(home)
    program = postgres_program(settings, home)
    if is_running(settings):
        if supervisor.status(program.name).state not in ALIVE:
            # Started by something else (a `rewards up` from before supervision,
            # or the orphan of a killed supervisord): stopped cleanly, then
            # handed to supervisord, which cannot adopt a running process.
            _stop(settings)
        else:
            _run(as_owner(settings, settings.pg_bin / "pg_ctl", "reload", "-D", settings.pg_data))
    supervisor.ensure(program)


def wait_ready(settings: Settings) -> None:
    timeout = settings.start_seconds
    deadline = time.monotonic() + timeout
    while True:
        try:
            with psycopg.connect(settings.superuser_conninfo("postgres"), connect_timeout=2):
                return
        except psycopg.OperationalError as exc:
            if time.monotonic() > deadline:
                tail = "".join(settings.log_file.read_text().splitlines(keepends=True)[-8:]) \
                    if settings.log_file.exists() else "(no log)"
                raise SystemExit(f"PostgreSQL of {settings.pg_data} did not answer within {timeout:.0f} s "
                                 f"({exc}); its log ends:\n{tail}") from exc
            time.sleep(0.2)


def _nodes(settings: Settings) -> list[Settings]:
    """The coordinator (or the single node) first, then its local Citus workers."""
    return [settings, *(citus.local_workers(settings) if settings.citus == "on" else [])]


def _create_database(settings: Settings) -> None:
    # CREATE DATABASE takes no bind parameters: the name is quoted by psycopg.sql,
    # the one place Python composes SQL.
    with psycopg.connect(settings.superuser_conninfo("postgres"), autocommit=True) as conn:
        if not conn.execute(queries.DATABASE_EXISTS, {"name": settings.database}).fetchone():
            conn.execute(psycopg.sql.SQL("CREATE DATABASE {}").format(psycopg.sql.Identifier(settings.database)))


def _let_api_log_in(settings: Settings) -> None:
    # ALTER ROLE takes no bind parameters either: the password is quoted by psycopg.sql.
    with psycopg.connect(settings.superuser_conninfo(), autocommit=True) as conn:
        conn.execute(
            psycopg.sql.SQL("ALTER ROLE rewards_api LOGIN PASSWORD {}").format(
                psycopg.sql.Literal(settings.required("api_password"))
            )
        )


def start_node(settings: Settings, home: Settings | None = None) -> None:
    """Create (once), configure and start a cluster, without touching its databases:
    enough for a Citus worker, whose schema the coordinator manages. It runs
    under the supervisord of `home`'s data folder (its own by default)."""
    _ensure_os_user(settings)
    _initdb(settings)
    _configure(settings)
    _start(settings, home or settings)
    wait_ready(settings)


def up(settings: Settings) -> None:
    """Create (once), configure, start and migrate; with REWARDS_CITUS=on, also its
    local workers, each node with the service database and the extension, all
    registered before the migration distributes. Safe to run again."""
    check(settings)
    settings = secrets.ensure(settings)
    nodes = _nodes(settings)
    for node in nodes:
        start_node(node, settings)
    setup(settings, nodes[1:])


def setup(settings: Settings, workers: list[Settings]) -> None:
    """On nodes that run already: the service database on each; under
    REWARDS_CITUS=on the extension on each and the workers registered, so that
    the migration distributes; then the migration, and the API's role let in."""
    for node in (settings, *workers):
        _create_database(node)
    if settings.citus == "on":
        citus.prepare(settings, workers)
    migrate.upgrade(settings.superuser_conninfo())
    _let_api_log_in(settings)


def start_worker(worker: Settings, home: Settings) -> None:
    """A new local Citus worker, made and started as every node is (under the
    supervisord of `home`'s data folder), with the service database and the
    extension; registering it is the coordinator's business
    (app.operations.nodes)."""
    start_node(worker, home)
    _create_database(worker)
    citus.create_extension(worker)


def delete_worker(worker: Settings, home: Settings) -> None:
    """Stop a local worker and delete its folder: `rewards up` starts it no more."""
    Supervisor.of(home).remove(postgres_program(worker, home).name)
    _stop(worker)
    shutil.rmtree(worker.data_dir)


def _stop(settings: Settings) -> None:
    """A fast shutdown (pg_ctl's -m fast is the SIGINT supervisord sends)."""
    if (settings.pg_data / "PG_VERSION").exists() and is_running(settings):
        _run(as_owner(settings, settings.pg_bin / "pg_ctl", "stop", "-w", "-t", "600", "-m", "fast",
                      "-D", settings.pg_data))


def down(settings: Settings) -> None:
    """Stop the cluster and every local worker in its data folder; with nothing
    else left in it to run, its supervisord stops too."""
    supervisor = Supervisor.of(settings)
    for node in (*citus.local_workers(settings), settings):
        supervisor.remove(postgres_program(node, settings).name)
        _stop(node)  # one not run by supervisord
