"""docker-compose.yml, the whole service for users with Docker, held to what the
code runs under `make run`: every program `rewards up` supervises is a service
running the command and stop signal the code gives it, with the settings the
code reads in its container; the Citus nodes run `postgres` with the settings
`rewards db up` writes; migration runs once, before anything that needs it.

These machines have no Docker engine and no image registry (the Citus image
cannot be pulled), so no container of the file was ever started here: most
checks below read it; one runs what can run outside containers (the setup
service's command against a server of its own, PgBouncer and Redis listening on
a name); `docker compose config` validates it where a compose tool is
installed; and the last test, which starts it all and follows a credit into
the history, runs only where an engine answers."""

from __future__ import annotations

import configparser
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import fields, replace
from pathlib import Path
from urllib.parse import urlparse

import httpx
import psycopg
import pytest
import yaml

from app import cli, settings as settings_module
from app.operations import cluster, processes
from app.operations.supervisor import Program, Supervisor
from app.settings import PROJECT_ROOT, Settings, load
from tests.conftest import SETTINGS

COMPOSE = PROJECT_ROOT / "docker-compose.yml"
# Settings of the local topology only: its ports, socket folders and how a node
# reaches itself; output_plugin_libraries exists from PostgreSQL 15.19 on and
# the image's server version is not known here.
LOCAL_ONLY = {"port", "unix_socket_directories", "unix_socket_permissions", "citus.local_hostname",
              "output_plugin_libraries"}
# Compose's ${NAME:-default}, read as it is with NAME unset.
DEFAULTED = re.compile(r"\$\{(\w+):-([^}]*)\}")


def _interpolated(value):
    if isinstance(value, dict):
        return {key: _interpolated(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_interpolated(item) for item in value]
    return DEFAULTED.sub(lambda found: found[2], value) if isinstance(value, str) else value


def _raw() -> dict[str, dict]:
    return yaml.safe_load(COMPOSE.read_text())["services"]


def _services() -> dict[str, dict]:
    return _interpolated(_raw())


def _settings(service: dict) -> Settings:
    """The settings the code reads in the service's container."""
    return load({name: str(value) for name, value in service["environment"].items()})


def _dockerfile(service: dict) -> str:
    return (PROJECT_ROOT / service["build"]["context"] / service["build"]["dockerfile"]).read_text()


def _workdir(service: dict) -> str:
    return re.findall(r"^WORKDIR\s+(\S+)$", _dockerfile(service), re.MULTILINE)[-1]


def _in_image(program: Program, service: dict) -> list[str]:
    """The program's command in the project's image: its Python is the
    virtual environment `uv sync` makes in the image's working directory."""
    python = f"{_workdir(service)}/.venv/bin/python"
    return [python if word == sys.executable else word for word in program.command]


def _programs(settings: Settings) -> dict[str, Program]:
    """What `rewards up` supervises beside PostgreSQL, as the code makes each
    program for `settings`, by the service of the file that runs it. Not
    `ha-follow`: REWARDS_HA=on is pg_auto_failover on one host."""
    return {
        settings.bouncer_host: processes.bouncer_program(settings),
        urlparse(settings.redis_url).hostname: processes.redis_program(settings, settings.redis_url),
        "api": processes.api_program(settings),
        **{name: processes.worker_program(settings, name) for name in processes.WORKERS if name != "ha-follow"},
    }


def _node_services(services: dict[str, dict]) -> dict[str, dict]:
    return {name: s for name, s in services.items() if s["build"]["dockerfile"] == "ops/docker/citus.Dockerfile"}


def _project_services(services: dict[str, dict]) -> dict[str, dict]:
    return {name: s for name, s in services.items() if name not in _node_services(services)}


def _installed_by_make_run() -> set[str]:
    text = (PROJECT_ROOT / "ops" / "install.sh").read_text()
    return set(re.search(r"^packages=\((.*?)\)", text, re.MULTILINE | re.DOTALL)[1].split())


def _seconds(duration: str) -> int:
    assert re.fullmatch(r"\d+s", duration), duration
    return int(duration[:-1])


def test_the_file_holds_the_nodes_and_every_program_rewards_up_supervises():
    services = _services()
    nodes = _node_services(services)
    settings = _settings(services["setup"])
    # A coordinator and two workers, as REWARDS_CITUS_WORKERS=2 make run starts.
    assert settings.pg_host in nodes and len(nodes) == 3
    assert set(_project_services(services)) == {"setup", *_programs(settings)}
    assert len({s["image"] for s in nodes.values()}) == 1
    assert len({s["image"] for s in _project_services(services).values()}) == 1
    for service in services.values():
        copied = re.findall(r"^COPY\s+(.+)\s+\S+$", _dockerfile(service), re.MULTILINE)
        assert copied and all((PROJECT_ROOT / source).exists() for line in copied for source in line.split())


def test_every_program_runs_the_command_and_stop_rewards_up_gives_it():
    services = _services()
    for name in _programs(_settings(services["setup"])):
        service = services[name]
        program = _programs(_settings(service))[name]
        assert service["command"] == _in_image(program, service), name
        assert service.get("stop_signal", "SIGTERM") == f"SIG{program.stopsignal}", name
        assert _seconds(service.get("stop_grace_period", "10s")) == program.stopwaitsecs, name
        # autorestart: started again however it exits.
        assert service["restart"] == "unless-stopped", name
        if program.directory:
            assert program.directory == PROJECT_ROOT and "working_dir" not in service, name
        # The variables it is given besides the settings, PROMETHEUS_MULTIPROC_DIR.
        extra = {key: value for key, value in program.environment.items() if not key.startswith("REWARDS_")}
        assert {key: service["environment"].get(key) for key in extra} == extra, name
        # A process that runs several (the API's workers) needs a reaper as PID 1.
        assert service.get("init", False) is program.stopasgroup, name
        assert "healthcheck" in service, name


def test_every_container_reads_the_same_settings_set_for_it():
    services = _project_services(_services())
    settings = {name: {key: value for key, value in s["environment"].items() if key.startswith("REWARDS_")}
                for name, s in services.items()}
    assert len({tuple(sorted(each.items())) for each in settings.values()}) == 1, settings
    given = next(iter(settings.values()))
    # Defaults computed on the machine that reads them (the data folder, the
    # API's workers) would differ between a container and this test.
    assert set(settings_module._COMPUTED) <= set(given)
    known = {spec.metadata["env"] for spec in fields(Settings)}
    assert set(given) <= known, set(given) - known


def test_the_data_folder_is_shared_and_what_must_start_empty_is_memory():
    services = _services()
    settings = _settings(services["setup"])
    volume = f"rewards-data:{settings.data_dir}"
    readers = {name for name, s in _project_services(services).items() if volume in s.get("volumes", [])}
    # The secrets and PgBouncer's files, which setup writes.
    assert readers == {"setup", settings.bouncer_host, "api", *processes.WORKERS} - {"ha-follow"}
    redis = urlparse(settings.redis_url).hostname
    assert services[redis]["tmpfs"] == [str(processes.redis_folder(settings, settings.redis_url))]
    assert services["api"]["tmpfs"] == [str(processes.api_metrics_dir(settings))]


def test_migration_runs_once_before_anything_that_needs_it():
    services = _services()
    setup = services["setup"]
    settings = _settings(setup)
    workers = sorted(set(_node_services(services)) - {settings.pg_host})
    expected = [f"{_workdir(setup)}/.venv/bin/python", "-m", "app.cli", "setup"]
    for worker in workers:
        expected += ["--worker", f"{worker}:{settings.pg_port}"]
    assert setup["command"] == expected
    assert cli._parser().parse_args(setup["command"][3:]).func is cli._setup
    assert setup["restart"] == "no"
    assert setup["depends_on"] == {name: {"condition": "service_healthy"} for name in _node_services(services)}
    for name, service in _project_services(services).items():
        if name != "setup" and f"rewards-data:{settings.data_dir}" in service.get("volumes", []):
            assert service["depends_on"]["setup"] == {"condition": "service_completed_successfully"}, name
    redis = urlparse(settings.redis_url).hostname
    assert {name: c["condition"] for name, c in services["api"]["depends_on"].items() if name != "setup"} == {
        settings.bouncer_host: "service_healthy", redis: "service_healthy"}


def test_the_sender_runs_only_when_asked_as_rewards_up_runs_it_only_with_a_url():
    services = _services()
    assert _settings(services["notify"]).notify_url is None
    assert services["notify"]["profiles"] == ["notify"]
    assert all("profiles" not in s for name, s in services.items() if name != "notify")


def test_the_host_reaches_the_api_and_pgbouncer_on_loopback_at_make_runs_ports_and_no_node():
    """The nodes trust the compose network: a node's published port would let
    any user of the host in as the superuser."""
    raw, services = _raw(), _services()
    settings = _settings(services["setup"])
    defaults = {spec.metadata["env"]: spec.metadata["default"] for spec in fields(Settings)}
    for name, variable, port in (("api", "REWARDS_API_PORT", settings.api_port),
                                 (settings.bouncer_host, "REWARDS_BOUNCER_PORT", settings.bouncer_port)):
        assert raw[name]["ports"] == [f"127.0.0.1:${{{variable}:-{defaults[variable]}}}:{port}"], name
    assert {name for name, s in services.items() if "ports" in s} == {"api", settings.bouncer_host}


def test_the_images_hold_what_make_run_installs():
    services = _services()
    packages = _installed_by_make_run()
    node = _dockerfile(next(iter(_node_services(services).values())))
    project = _dockerfile(services["setup"])
    extensions = {p for p in packages if p.startswith("postgresql-15-") and p != "postgresql-15-auto-failover"}
    assert extensions and all(package in node.split() for package in extensions)
    assert all(package in project.split() for package in ("pgbouncer", "redis-server"))
    assert {"pgbouncer", "redis-server"} <= packages


def _command_settings(command: str) -> dict[str, str]:
    words = shlex.split(command)
    assert words[0] == "postgres" and len(words) % 2 == 1 and set(words[1::2]) == {"-c"}, words
    return dict(word.split("=", 1) for word in words[2::2])


def _conf(text: str) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#"))
    return {name.strip(): value.split("#", 1)[0].strip().strip("'") for name, value in pairs}


def test_every_node_runs_postgres_with_the_settings_make_run_gives_a_citus_node(monkeypatch):
    monkeypatch.setattr(cluster, "use_citus", lambda settings: True)
    machine = {name: value for name, value in _conf(cluster.machine_conf(SETTINGS)).items()
               if name not in LOCAL_ONLY}
    program = cluster.postgres_program(SETTINGS, SETTINGS)
    for name, service in _node_services(_services()).items():
        given = _command_settings(service["command"])
        assert given.pop("config_file") == "/etc/rewards/postgresql.conf", name
        assert given.pop("listen_addresses") == "*", name  # the project's file listens on loopback only
        assert given == machine | {"cron.database_name": service["environment"]["POSTGRES_DB"]}, name
        assert service["stop_signal"] == f"SIG{program.stopsignal}", name
        assert _seconds(service["stop_grace_period"]) == program.stopwaitsecs, name
        assert "COPY ops/postgresql.conf /etc/rewards/postgresql.conf" in _dockerfile(service), name


@pytest.mark.single_node("a server of the test's own, the same on either topology")
def test_setup_readies_a_server_it_does_not_run_and_pgbouncer_and_redis_listen_on_a_name():
    """The compose file's parts that run here, outside containers: the setup
    service's command against a running PostgreSQL it did not start (reached
    through REWARDS_PG_HOST), then PgBouncer from the files it wrote and Redis,
    each listening on a name, as `pgbouncer` and `redis` do in the file."""
    # Short: the socket's path must fit in 107 bytes.
    folder = Path(tempfile.mkdtemp(prefix="rewards-setup-"))
    node = replace(SETTINGS, data_dir=folder / "data", pg_port=processes.free_port(), pg_host=None, citus="off",
                   citus_workers=0)
    env = {"PATH": os.environ["PATH"], "REWARDS_PG_BIN": str(node.pg_bin), "REWARDS_PG_OS_USER": node.pg_os_user,
           "REWARDS_PG_SUPERUSER": node.pg_superuser, "REWARDS_DATA_DIR": str(node.data_dir),
           "REWARDS_PG_HOST": str(node.socket_dir), "REWARDS_PG_PORT": str(node.pg_port), "REWARDS_CITUS": "off",
           "REWARDS_BOUNCER_HOST": "localhost", "REWARDS_BOUNCER_PORT": str(processes.free_port()),
           "REWARDS_REDIS_URL": f"redis://localhost:{processes.free_port()}/0"}
    service = load(env)
    supervisor = Supervisor.of(service)
    try:
        cluster.start_node(node)
        done = subprocess.run([sys.executable, "-m", "app.cli", "setup"], env=env, capture_output=True, text=True,
                              cwd=PROJECT_ROOT, timeout=600)
        assert done.returncode == 0, done.stderr
        service = load(env)  # with the secrets setup made
        ini = configparser.ConfigParser()
        ini.read(processes.bouncer_program(service).command[1])
        assert ini["pgbouncer"]["listen_addr"] == "localhost"
        assert ini["databases"]["*"] == f"host='{node.socket_dir}' port={node.pg_port}"
        supervisor.ensure(processes.bouncer_program(service))
        with psycopg.connect(service.superuser_conninfo(), autocommit=True) as conn:
            assert conn.execute("SELECT count(*) FROM alembic_version").fetchone()[0] == 1
        deadline = time.monotonic() + 60
        while not processes.port_answers(service.bouncer_port, service.bouncer_host):
            assert time.monotonic() < deadline, "PgBouncer listening on localhost within 60 s"
            time.sleep(0.2)
        with psycopg.connect(service.bouncer_conninfo(), connect_timeout=10) as conn:
            assert conn.execute("SELECT current_user").fetchone()[0] == "rewards_api"
        processes.redis_folder(service, service.redis_url).mkdir(parents=True)
        supervisor.ensure(processes.redis_program(service, service.redis_url))
        deadline = time.monotonic() + 60
        while not processes.redis_answers(service.redis_url):
            assert time.monotonic() < deadline, "Redis answering on localhost within 60 s"
            time.sleep(0.2)
        # Again, as every `docker compose up` runs it: nothing changes, nothing fails.
        again = subprocess.run([sys.executable, "-m", "app.cli", "setup"], env=env, capture_output=True, text=True,
                               cwd=PROJECT_ROOT, timeout=600)
        assert again.returncode == 0, again.stderr
        assert load(env).api_password == service.api_password
    finally:
        cluster.down(node)
        supervisor.close()
        shutil.rmtree(folder, ignore_errors=True)


def _compose_tool() -> list[str] | None:
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def test_a_compose_tool_accepts_the_file():
    """`docker compose config` (or docker-compose 1.29's) parses and validates a
    file without a daemon."""
    command = _compose_tool()
    if command is None:
        pytest.skip("no compose tool installed (neither the docker compose plugin nor docker-compose)")
    done = subprocess.run([*command, "-f", str(COMPOSE), "--profile", "notify", "config", "--quiet"],
                          capture_output=True, text=True, cwd=PROJECT_ROOT)
    assert done.returncode == 0, done.stderr


def test_docker_compose_up_serves_a_credit_into_the_history():
    """The whole file started (images built, which takes minutes), a key made as
    the README says, a credit through the API and PgBouncer, then in the
    history from the audit stream, and every write function delegated."""
    if _compose_tool() != ["docker", "compose"]:
        pytest.skip("no `docker compose` (the plugin: `up --wait` needs it) installed")
    if subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        pytest.skip("no Docker engine answers (`docker info` fails)")
    ports = {variable: str(processes.free_port()) for variable in ("REWARDS_API_PORT", "REWARDS_BOUNCER_PORT")}
    env = {**os.environ, **ports, "REWARDS_NOTIFY_URL": ""}
    project = ["docker", "compose", "-f", str(COMPOSE), "-p", f"rewards-test-{uuid.uuid4().hex[:8]}"]

    def compose(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*project, *args], env=env, cwd=PROJECT_ROOT, capture_output=True, text=True,
                              timeout=timeout)

    try:
        up = compose("up", "-d", "--build", "--wait", timeout=1800)
        assert up.returncode == 0, up.stderr[-4000:]
        made = compose("exec", "-T", "api", "rewards", "keys", "create", "--name", "compose",
                       "--scopes", "points:earn,points:read")
        assert made.returncode == 0, made.stderr
        user = f"u-{uuid.uuid4().hex[:12]}"
        answer = httpx.post(f"http://127.0.0.1:{ports['REWARDS_API_PORT']}/v1/accounts/{user}/credits",
                            json={"amount": 5, "reason": "compose"}, timeout=30,
                            headers={"Authorization": f"Bearer {made.stdout.strip()}",
                                     "Idempotency-Key": uuid.uuid4().hex})
        assert answer.status_code == 201, answer.text
        entry_id = answer.json()["entry_id"]
        in_history = (f"SELECT count(*) FROM audit.entries WHERE user_id = '{user}' AND entry_id = {entry_id}")
        deadline = time.monotonic() + 60
        while compose("exec", "-T", "coordinator", "psql", "-U", "postgres", "-d", "rewards", "-Atc",
                      in_history).stdout.strip() != "1":
            assert time.monotonic() < deadline, "the credit in the history within 60 s"
            time.sleep(0.5)
        status = compose("exec", "-T", "api", "rewards", "cluster", "status")
        assert status.returncode == 0, status.stdout + status.stderr
        assert "a coordinator and 2 workers" in status.stdout
    finally:
        compose("down", "-v", "--remove-orphans", timeout=600)
