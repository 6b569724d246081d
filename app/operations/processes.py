"""The processes beside the database: PgBouncer in front of it, Redis for the
shared rate limits, and the API's workers. Each start is safe to repeat."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import redis

from app import secrets
from app.operations import cluster
from app.settings import PROJECT_ROOT, Settings

PGBOUNCER_INI = """\
; Written by `rewards up`.
[databases]
* = host={socket_dir} port={pg_port}

[pgbouncer]
listen_addr = 127.0.0.1
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
logfile = {log_dir}/pgbouncer.log
pidfile = {run_dir}/pgbouncer.pid
"""


def _pid_alive(pid_file: Path) -> int | None:
    try:
        pid = int(pid_file.read_text().strip())
        os.kill(pid, 0)
        return pid
    except (FileNotFoundError, ValueError, ProcessLookupError, PermissionError):
        return None


def _stop(pid_file: Path, sig: signal.Signals = signal.SIGTERM, timeout: float = 15.0) -> None:
    pid = _pid_alive(pid_file)
    if pid is None:
        return
    os.kill(pid, sig)
    deadline = time.monotonic() + timeout
    while _pid_alive(pid_file) and time.monotonic() < deadline:
        _reap(pid)
        time.sleep(0.1)
    pid_file.unlink(missing_ok=True)


def _reap(pid: int) -> None:
    """A process this one started (a test's or a benchmark's API) stays a zombie
    after it exits, and a zombie still answers kill(pid, 0), until waited for."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:  # not ours: its own parent reaps it
        pass


# --- PgBouncer --------------------------------------------------------------

def _bouncer_dir(settings: Settings) -> Path:
    return settings.data_dir / "pgbouncer"


def bouncer_up(settings: Settings) -> None:
    folder = _bouncer_dir(settings)
    folder.mkdir(parents=True, exist_ok=True)
    userlist = folder / "userlist.txt"
    userlist.write_text(_userlist_line("rewards_api", settings.required("api_password")))
    userlist.chmod(0o600)
    ini = folder / "pgbouncer.ini"
    ini.write_text(PGBOUNCER_INI.format(
        socket_dir=_connstring_value(str(settings.socket_dir)), pg_port=settings.pg_port,
        bouncer_port=settings.bouncer_port, userlist=userlist, log_dir=settings.log_dir, run_dir=settings.socket_dir))
    if os.geteuid() == 0:
        for path in (folder, userlist, ini):
            shutil.chown(path, settings.pg_os_user, settings.pg_os_user)
    pid_file = settings.socket_dir / "pgbouncer.pid"
    if _pid_alive(pid_file):
        # Re-read the settings without dropping a connection.
        os.kill(_pid_alive(pid_file), signal.SIGHUP)
        return
    # PgBouncer, like PostgreSQL, will not run as root.
    subprocess.run(cluster.as_owner(settings, "pgbouncer", "-d", ini), check=True,
                   capture_output=True, text=True)
    _wait_for(lambda: _pid_alive(pid_file) is not None, "PgBouncer", settings.log_dir / "pgbouncer.log")


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
    _stop(settings.socket_dir / "pgbouncer.pid", signal.SIGINT)


# --- Redis ------------------------------------------------------------------

def redis_answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5).ping())
    except (redis.RedisError, OSError):
        return False


def redis_up(settings: Settings, url: str | None = None) -> None:
    """Start Debian's redis-server for `url` unless something already answers there."""
    url = url or settings.redis_url
    if redis_answers(url):
        return
    parsed = urlparse(url)
    if parsed.hostname not in ("127.0.0.1", "localhost"):
        raise SystemExit(f"nothing answers at {url}, and only a local Redis can be started here")
    port = parsed.port or 6379
    folder = settings.data_dir / f"redis-{port}"
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        shutil.chown(folder, settings.pg_os_user, settings.pg_os_user)
    # Buckets refill within seconds: nothing of them is worth saving to disk.
    subprocess.run(cluster.as_owner(
        settings, "redis-server", "--bind", "127.0.0.1", "--port", str(port), "--daemonize", "yes",
        "--dir", folder, "--pidfile", folder / "redis.pid", "--logfile", settings.log_dir / f"redis-{port}.log",
        "--save", "", "--appendonly", "no", "--maxmemory", "256mb", "--maxmemory-policy", "volatile-ttl",
    ), check=True, capture_output=True, text=True)
    _wait_for(lambda: redis_answers(url), "Redis", settings.log_dir / f"redis-{port}.log")


def redis_down(settings: Settings, url: str | None = None) -> None:
    port = urlparse(url or settings.redis_url).port or 6379
    _stop(settings.data_dir / f"redis-{port}" / "redis.pid")


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
    ]


def _spawn(argv: list[str], env: dict[str, str], pid_file: Path, log_file: Path) -> subprocess.Popen:
    process = subprocess.Popen(
        argv, cwd=PROJECT_ROOT, env={**os.environ, **env}, stdin=subprocess.DEVNULL,
        stdout=log_file.open("ab"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    pid_file.write_text(str(process.pid))
    return process


def free_port() -> int:
    """A loopback port nothing listens on now, for a server of a test or a bench."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _api_pid_file(settings: Settings) -> Path:
    # One per port, so a test's or a bench's API lives beside the service's.
    return settings.socket_dir / f"api-{settings.api_port}.pid"


def api_up(settings: Settings, env: dict[str, str] | None = None, workers: int | None = None) -> int:
    """Start the API on settings.api_port (unless it runs) and return its pid."""
    pid_file = _api_pid_file(settings)
    running = _pid_alive(pid_file)
    if running:
        return running
    metrics_dir = settings.socket_dir / f"prometheus-{settings.api_port}"
    shutil.rmtree(metrics_dir, ignore_errors=True)
    metrics_dir.mkdir(parents=True)
    log_file = settings.log_dir / f"api-{settings.api_port}.log"
    process = _spawn(api_command(settings, workers or settings.api_workers),
                     {**(env or {}), "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}, pid_file, log_file)
    health = f"http://{settings.api_host}:{settings.api_port}/healthz"
    try:
        _wait_for(lambda: process.poll() is None and _http_ok(health), "the API", log_file)
    except SystemExit:
        _stop(pid_file)  # leave nothing half-started behind
        raise
    return process.pid


def api_down(settings: Settings) -> None:
    _stop(_api_pid_file(settings))


# --- The audit stream and the notification sender ---------------------------

WORKERS = {"audit": ["audit", "run"], "notify": ["notify", "run"]}


def worker_up(settings: Settings, name: str) -> None:
    pid_file = settings.socket_dir / f"{name}.pid"
    if _pid_alive(pid_file):
        return
    log_file = settings.log_dir / f"{name}.log"
    process = _spawn([sys.executable, "-m", "app.cli", *WORKERS[name]], {}, pid_file, log_file)
    time.sleep(0.5)
    if process.poll() is not None:
        raise SystemExit(f"`rewards {' '.join(WORKERS[name])}` stopped at once; see {log_file}")


def worker_down(settings: Settings, name: str) -> None:
    _stop(settings.socket_dir / f"{name}.pid")


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


def _wait_for(ready, what: str, log_file: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            tail = log_file.read_text()[-2000:] if log_file.exists() else "(no log)"
            raise SystemExit(f"{what} did not come up within {timeout:.0f} s; its log ends:\n{tail}")
        time.sleep(0.2)


def up(settings: Settings) -> None:
    settings = secrets.ensure(settings)
    cluster.up(settings)
    bouncer_up(settings)
    redis_up(settings)
    api_up(settings)
    worker_up(settings, "audit")
    if settings.notify_url:
        worker_up(settings, "notify")


def down(settings: Settings) -> None:
    worker_down(settings, "notify")
    worker_down(settings, "audit")
    api_down(settings)
    redis_down(settings)
    bouncer_down(settings)
    cluster.down(settings)
