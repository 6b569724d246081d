"""The processes beside the database: PgBouncer in front of it, Redis for the
shared rate limits, the API, the audit stream and the notification sender, each
a program of the data folder's supervisord (app.operations.supervisor), which
starts it again whenever it exits. Each start is safe to repeat."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

from app import secrets
from app.operations import cluster, ha
from app.operations.supervisor import ALIVE, Program, Status, Supervisor
from app.settings import PROJECT_ROOT, Settings

PGBOUNCER_INI = """\
; Written by `rewards up`.
[databases]
* = host={pg_host} port={pg_port}

[pgbouncer]
listen_addr = {listen_addr}
listen_port = {bouncer_port}
unix_socket_dir =
auth_type = scram-sha-256
auth_file = {userlist}
; One server connection per transaction: the API runs one function call per
; transaction and prepares nothing.
pool_mode = transaction
max_client_conn = 4000
default_pool_size = 24
reserve_pool_size = 4
reserve_pool_timeout = 1
server_reset_query =
; Bounded waits (README, "Bounded waits"). A query waits at most 1 s for a
; server connection (then "query_wait_timeout": 503 unavailable), after the
; API's own 0.5 s for a pool connection; and at most 3 s in all, its wait and
; the role's 1 s statement_timeout included, should the server not answer at
; all (then "query_timeout"). A server login that hangs is given up after 2 s;
; after a failed one, new clients are refused at once for 1 s (not the default
; 15 s, which would keep the service down that long after PostgreSQL is back).
; A client idle in a transaction holds a server connection: ended after 5 s,
; as the role's idle_in_transaction_session_timeout would. Idle clients outside
; one cost nothing in transaction pooling and are the API pool's own to close.
query_wait_timeout = 1
query_timeout = 3
server_connect_timeout = 2
server_login_retry = 1
idle_transaction_timeout = 5
ignore_startup_parameters = extra_float_digits
"""


def _supervisor(settings: Settings) -> Supervisor:
    return Supervisor.of(settings)


def _owner(settings: Settings) -> str | None:
    # PgBouncer and Redis, like PostgreSQL, are run as the cluster's OS user.
    return settings.pg_os_user if os.geteuid() == 0 else None


def _retire_daemon(pid_file: Path) -> None:
    """Stop what a `rewards up` from before supervision left running (it wrote
    this pid file), so that its supervised successor gets the port."""
    try:
        pid = int(pid_file.read_text().strip())
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            os.kill(pid, 0)
            time.sleep(0.1)
    except (FileNotFoundError, ValueError, ProcessLookupError, PermissionError):
        pass
    pid_file.unlink(missing_ok=True)


# --- PgBouncer --------------------------------------------------------------

def _bouncer_dir(settings: Settings) -> Path:
    return settings.data_dir / "pgbouncer"


def bouncer_files(settings: Settings, pg_port: int) -> None:
    """PgBouncer's ini and auth file in the data folder (see _write_ini)."""
    folder = _bouncer_dir(settings)
    folder.mkdir(parents=True, exist_ok=True)
    userlist = folder / "userlist.txt"
    userlist.write_text(_userlist_line("rewards_api", settings.required("api_password")))
    userlist.chmod(0o600)
    _write_ini(settings, pg_port)
    if os.geteuid() == 0:
        for path in (folder, userlist):
            shutil.chown(path, settings.pg_os_user, settings.pg_os_user)


def _bouncer_ini(settings: Settings) -> Path:
    return _bouncer_dir(settings) / "pgbouncer.ini"


def bouncer_program(settings: Settings) -> Program:
    # SIGINT is PgBouncer's safe shutdown: transactions under way finish first.
    return Program("pgbouncer", ["pgbouncer", str(_bouncer_ini(settings))], settings.log_dir / "pgbouncer.log",
                   user=_owner(settings), priority=200, stopsignal="INT", stopwaitsecs=30)


def bouncer_up(settings: Settings, pg_port: int | None = None) -> None:
    """Write PgBouncer's files and start it, or have it re-read them. Its one
    database entry points at `pg_port` (the cluster's, or with REWARDS_HA=on the
    primary's, which `rewards ha follow` keeps up to date; during a failover,
    once the standby is promoted)."""
    if pg_port is None:
        pg_port = ha.wait_for_primary(settings).port if settings.ha else settings.pg_port
    bouncer_files(settings, pg_port)
    _retire_daemon(settings.socket_dir / "pgbouncer.pid")
    supervisor = _supervisor(settings)
    was_alive = supervisor.status("pgbouncer").state in ALIVE
    supervisor.ensure(bouncer_program(settings))
    if was_alive:
        _reload_bouncer(settings)
    _wait_for(lambda: port_answers(settings.bouncer_port, settings.bouncer_host), "PgBouncer",
              settings.log_dir / "pgbouncer.log", settings.start_seconds)


def bouncer_retarget(settings: Settings, pg_port: int) -> None:
    """PgBouncer pointed at another node (`rewards ha follow`, after a
    failover): its settings written again with the new database entry, and
    re-read, and nothing else. A failover is the moment the service waits for
    this, and each supervisorctl call of `bouncer_up` costs seconds on a loaded
    machine (12 s in all at load average 25). If PgBouncer is not running,
    the file is what it reads when its supervisor starts it again, and the
    OSError of the SIGHUP is the caller's to retry."""
    _write_ini(settings, pg_port)
    _reload_bouncer(settings)


def _write_ini(settings: Settings, pg_port: int) -> None:
    """PgBouncer listens on REWARDS_BOUNCER_HOST, and its one database entry
    points at `pg_port` on the cluster's host (REWARDS_PG_HOST, or the socket
    folder)."""
    # Whole or not at all: supervisord may start PgBouncer again while the
    # listener writes it.
    cluster.write_owned(settings, _bouncer_ini(settings), PGBOUNCER_INI.format(
        pg_host=_connstring_value(str(settings.pg_host or settings.socket_dir)), pg_port=pg_port,
        listen_addr=settings.bouncer_host, bouncer_port=settings.bouncer_port,
        userlist=_bouncer_dir(settings) / "userlist.txt"))


def bouncer_pids(settings: Settings) -> list[int]:
    """The PgBouncer processes that read this data folder's ini, found by
    their command line: the same under `make run`'s supervisord and under
    systemd (ops/systemd), and never a process that took a dead one's pid."""
    ini = _bouncer_ini(settings).resolve()
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            program, *arguments = (Path(os.fsdecode(a)) for a in cmdline.read_bytes().split(b"\0") if a)
            # The ini as its unit or supervisor wrote it (a symlinked or
            # relative REWARDS_DATA_DIR), resolved in PgBouncer's own folder.
            cwd = Path(os.readlink(cmdline.parent / "cwd"))
        except (OSError, ValueError):
            continue  # ended while we looked, or no command line
        if program.name == "pgbouncer" and any((cwd / a).resolve() == ini for a in arguments):
            pids.append(int(cmdline.parent.name))
    return pids


def _reload_bouncer(settings: Settings) -> None:
    """PgBouncer re-reads its settings without dropping a client connection (a
    server connection to a database whose host or port changed is closed as
    soon as its transaction ends: PgBouncer 1.18's RELOAD, on SIGHUP). It is
    signalled itself, not through its supervisor, so that `rewards ha follow`
    retargets it wherever it runs; ProcessLookupError when none runs."""
    pids = bouncer_pids(settings)
    if not pids:
        raise ProcessLookupError(f"no PgBouncer runs with {_bouncer_ini(settings)}")
    for pid in pids:
        os.kill(pid, signal.SIGHUP)


def _userlist_line(user: str, password: str) -> str:
    """PgBouncer's auth_file takes each field between double quotes, a double
    quote inside one written twice; nothing else is special."""
    return " ".join('"' + field.replace('"', '""') + '"' for field in (user, password)) + "\n"


def _connstring_value(value: str) -> str:
    """A value in a [databases] connection string: between single quotes, a
    single quote inside one written twice (PgBouncer's own rule, not libpq's:
    a backslash is not special to it)."""
    return "'" + value.replace("'", "''") + "'"


def bouncer_down(settings: Settings) -> None:
    _supervisor(settings).remove("pgbouncer")


# --- Redis ------------------------------------------------------------------

def redis_answers(url: str) -> bool:
    import redis  # here, not at the top: see app.operations.migrate on imports every command pays for

    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5).ping())
    except (redis.RedisError, OSError):
        return False


def _redis_port(url: str) -> int:
    return urlparse(url).port or 6379


def redis_folder(settings: Settings, url: str) -> Path:
    return settings.data_dir / f"redis-{_redis_port(url)}"


def redis_program(settings: Settings, url: str) -> Program:
    """Debian's redis-server, listening where `url` points."""
    name = f"redis-{_redis_port(url)}"
    # Buckets refill within seconds: nothing of them is worth saving to disk.
    # The address it binds decides alone who reaches it: protected mode, on
    # by default without a password, would refuse every client not on
    # loopback (the API's container, in docker-compose.yml).
    return Program(name, [
        "redis-server", "--bind", urlparse(url).hostname, "--port", str(_redis_port(url)), "--protected-mode", "no",
        "--daemonize", "no", "--dir", str(redis_folder(settings, url)), "--save", "", "--appendonly", "no",
        "--maxmemory", "256mb", "--maxmemory-policy", "volatile-ttl",
    ], settings.log_dir / f"{name}.log", user=_owner(settings), priority=200)


def redis_up(settings: Settings, url: str | None = None) -> None:
    """Run Debian's redis-server for `url` unless something else already answers there."""
    url = url or settings.redis_url
    folder = redis_folder(settings, url)
    _retire_daemon(folder / "redis.pid")
    supervisor = _supervisor(settings)
    program = redis_program(settings, url)
    if not supervisor.has(program.name) and redis_answers(url):
        return
    if urlparse(url).hostname not in ("127.0.0.1", "localhost"):
        raise SystemExit(f"nothing answers at {url}, and only a local Redis can be started here")
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        shutil.chown(folder, settings.pg_os_user, settings.pg_os_user)
    supervisor.ensure(program)
    _wait_for(lambda: redis_answers(url), "Redis", program.log_file, settings.start_seconds)


def redis_down(settings: Settings, url: str | None = None) -> None:
    _supervisor(settings).remove(redis_program(settings, url or settings.redis_url).name)


# --- The API ----------------------------------------------------------------

def api_command(settings: Settings, workers: int) -> list[str]:
    """The server command. uvicorn and granian both run the same ASGI factory;
    bench/RESULTS.md has them measured side by side."""
    if settings.api_server == "granian":
        return [
            sys.executable, "-m", "granian", "--interface", "asgi", "--factory", "app.api.app:create_app",
            "--host", settings.api_host, "--port", str(settings.api_port), "--workers", str(workers),
            "--loop", "uvloop", "--no-ws", "--log-level", "warning",
        ]
    return [
        sys.executable, "-m", "uvicorn", "--factory", "app.api.app:create_app",
        "--host", settings.api_host, "--port", str(settings.api_port), "--workers", str(workers),
        "--loop", "uvloop", "--http", "httptools", "--no-access-log", "--timeout-graceful-shutdown", "10",
        "--timeout-worker-healthcheck", str(settings.api_worker_healthcheck_seconds),
    ]


def free_port() -> int:
    """A loopback port nothing listens on now, for a server of a test or a bench."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _api_program(settings: Settings) -> str:
    # One per port, so a test's or a bench's API lives beside the service's.
    return f"api-{settings.api_port}"


def api_metrics_dir(settings: Settings) -> Path:
    """Where the API's worker processes keep their metrics: emptied before it starts."""
    return settings.socket_dir / f"prometheus-{settings.api_port}"


def api_program(settings: Settings, env: dict[str, str] | None = None, workers: int | None = None) -> Program:
    return Program(
        _api_program(settings), api_command(settings, workers or settings.api_workers),
        settings.log_dir / f"{_api_program(settings)}.log", directory=PROJECT_ROOT,
        environment={**settings.environment(), **(env or {}),
                     "PROMETHEUS_MULTIPROC_DIR": str(api_metrics_dir(settings))},
        priority=300, stopwaitsecs=15,
        # The server's worker processes go with it, so none is left holding the port.
        stopasgroup=True)


def api_up(settings: Settings, env: dict[str, str] | None = None, workers: int | None = None) -> int:
    """Run the API on settings.api_port, with `env` over the settings'
    variables; its pid once it answers."""
    program = api_program(settings, env, workers)
    _retire_daemon(settings.socket_dir / f"{program.name}.pid")
    supervisor = _supervisor(settings)
    metrics_dir = api_metrics_dir(settings)
    if supervisor.status(program.name).state not in ALIVE:
        shutil.rmtree(metrics_dir, ignore_errors=True)
    metrics_dir.mkdir(parents=True, exist_ok=True)
    supervisor.ensure(program)
    health = f"http://{settings.api_host}:{settings.api_port}/healthz"
    try:
        _wait_for(lambda: _http_ok(health), "the API", program.log_file, settings.start_seconds)
    except SystemExit:
        supervisor.remove(program.name)  # leave nothing half-started behind
        raise
    return supervisor.pid(program.name)


def api_down(settings: Settings) -> None:
    _supervisor(settings).remove(_api_program(settings))


# --- The audit stream and the notification sender ---------------------------

WORKERS = {"audit": ["audit", "run"], "notify": ["notify", "run"], "ha-follow": ["ha", "follow"]}


def worker_program(settings: Settings, name: str) -> Program:
    return Program(name, [sys.executable, "-m", "app.cli", *WORKERS[name]], settings.log_dir / f"{name}.log",
                   directory=PROJECT_ROOT, environment=settings.environment(), priority=400)


def worker_up(settings: Settings, name: str) -> None:
    _retire_daemon(settings.socket_dir / f"{name}.pid")
    _supervisor(settings).ensure(worker_program(settings, name))


def worker_down(settings: Settings, name: str) -> None:
    _supervisor(settings).remove(name)


def status(settings: Settings) -> list[Status]:
    """Every supervised program of the data folder, and its state."""
    return _supervisor(settings).status()


def port_answers(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


def _wait_for(ready, what: str, log_file: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            tail = log_file.read_text()[-2000:] if log_file.exists() else "(no log)"
            raise SystemExit(f"{what} did not come up within {timeout:.0f} s; its log ends:\n{tail}")
        time.sleep(0.2)


def setup(settings: Settings, workers: list[Settings]) -> None:
    """What `rewards up` does before it starts anything, on database nodes that
    something else runs (docker-compose.yml's): the secrets, the service database
    with its schema (the Citus `workers` registered first under REWARDS_CITUS=on),
    the API's role let in, and PgBouncer's files."""
    settings = secrets.ensure(settings)
    cluster.setup(settings, workers)
    bouncer_files(settings, settings.pg_port)


def up(settings: Settings) -> None:
    # Before anything is made, secrets included.
    if settings.ha:
        ha.check(settings)
    else:
        cluster.check(settings)
    settings = secrets.ensure(settings)
    if settings.ha:
        ha.up(settings)
    else:
        cluster.up(settings)
    bouncer_up(settings)
    if settings.ha:
        worker_up(settings, "ha-follow")
    redis_up(settings)
    api_up(settings)
    worker_up(settings, "audit")
    if settings.notify_url:
        worker_up(settings, "notify")
    else:
        worker_down(settings, "notify")


def down(settings: Settings) -> None:
    worker_down(settings, "notify")
    worker_down(settings, "audit")
    api_down(settings)
    redis_down(settings)
    worker_down(settings, "ha-follow")
    bouncer_down(settings)
    if settings.ha:
        ha.down(settings)
    else:
        cluster.down(settings)
    # Anything left (a test's API, say) goes with supervisord.
    _supervisor(settings).close()
