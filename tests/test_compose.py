"""docker-compose.yml, checked without running it: these machines have no
Docker engine and no image registry (the Citus image cannot be pulled), so
nothing in it was ever started here. What is checked: the file parses, it holds
exactly the database tier (a coordinator and two workers from one image), each
node runs `postgres` with the settings `make run` gives its nodes, the files the
image copies exist, and, where a compose tool is installed, that it accepts
the file."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess

import pytest
import yaml

from app.operations import cluster
from app.settings import PROJECT_ROOT
from tests.conftest import SETTINGS

COMPOSE = PROJECT_ROOT / "docker-compose.yml"
# Settings of the local topology only: its ports, socket folders and how a node
# reaches itself; output_plugin_libraries exists from PostgreSQL 15.19 on and
# the image's server version is not known here.
LOCAL_ONLY = {"port", "unix_socket_directories", "unix_socket_permissions", "citus.local_hostname",
              "output_plugin_libraries"}


def _services() -> dict[str, dict]:
    return yaml.safe_load(COMPOSE.read_text())["services"]


def _conf(text: str) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#"))
    return {name.strip(): value.split("#", 1)[0].strip().strip("'") for name, value in pairs}


def _command_settings(command: str) -> dict[str, str]:
    words = shlex.split(command)
    assert words[0] == "postgres" and len(words) % 2 == 1 and set(words[1::2]) == {"-c"}, words
    return dict(word.split("=", 1) for word in words[2::2])


def test_the_file_is_the_database_tier_from_one_image():
    services = _services()
    assert set(services) == {"coordinator", "worker1", "worker2"}
    assert {s["image"] for s in services.values()} == {"rewards-ledger-citus:13.2-pg15"}
    build = services["coordinator"]["build"]
    dockerfile = PROJECT_ROOT / build["context"] / build["dockerfile"]
    copied = re.findall(r"^COPY\s+(\S+)\s", dockerfile.read_text(), re.MULTILINE)
    assert copied and all((PROJECT_ROOT / build["context"] / source).is_file() for source in copied)
    assert services["coordinator"]["ports"] == ["127.0.0.1:25432:5432"]


def test_every_node_runs_postgres_with_the_settings_make_run_gives_a_citus_node(monkeypatch):
    monkeypatch.setattr(cluster, "use_citus", lambda settings: True)
    machine = {name: value for name, value in _conf(cluster.machine_conf(SETTINGS)).items()
               if name not in LOCAL_ONLY}
    for name, service in _services().items():
        given = _command_settings(service["command"])
        assert given.pop("config_file") == "/etc/rewards/postgresql.conf", name
        assert given.pop("listen_addresses") == "*", name  # the project's file listens on loopback only
        assert given == machine | {"cron.database_name": service["environment"]["POSTGRES_DB"]}, name
    dockerfile = (PROJECT_ROOT / "ops" / "docker" / "Dockerfile").read_text()
    assert "COPY ops/postgresql.conf /etc/rewards/postgresql.conf" in dockerfile


def test_a_compose_tool_accepts_the_file():
    """`docker compose config` (or docker-compose 1.29's) parses and validates a
    file without a daemon."""
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        command = ["docker", "compose"]
    elif shutil.which("docker-compose"):
        command = ["docker-compose"]
    else:
        pytest.skip("no compose tool installed (neither the docker compose plugin nor docker-compose)")
    done = subprocess.run([*command, "-f", str(COMPOSE), "config", "--quiet"], capture_output=True, text=True,
                          cwd=PROJECT_ROOT)
    assert done.returncode == 0, done.stderr
