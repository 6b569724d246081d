"""Citus clusters of a test's own: a coordinator and local workers in a
temporary folder on free ports, brought up by the code `make run` runs
(cluster.up), and the `rewards` command pointed at them."""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg

from app.operations import cluster
from app.operations.processes import free_port
from app.settings import PROJECT_ROOT, Settings
from tests.conftest import SETTINGS


def citus_missing_reason() -> str | None:
    with psycopg.connect(SETTINGS.superuser_conninfo("postgres")) as conn:
        if not conn.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'citus'").fetchone():
            return "the citus extension is not installed in this PostgreSQL (it is in no package registry here)"
    return None


def free_ports(count: int) -> int:
    """A port with the `count - 1` after it free too: the coordinator's and its workers'."""
    for _ in range(50):
        base = free_port()
        try:
            for port in range(base, base + count):
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError(f"no {count} free consecutive ports")


def env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment that points the `rewards` command at `settings`' cluster."""
    return {**os.environ, "REWARDS_DATA_DIR": str(settings.data_dir), "REWARDS_PG_PORT": str(settings.pg_port),
            "REWARDS_PG_BIN": str(settings.pg_bin), "REWARDS_DATABASE": settings.database,
            "REWARDS_CITUS": settings.citus, "REWARDS_CITUS_WORKERS": str(settings.citus_workers),
            "REWARDS_PG_HOST": "", "REWARDS_API_DB_PASSWORD": settings.api_password, **extra}


def rewards(settings: Settings, *args: str, timeout: float = 60, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "app.cli", *args], cwd=PROJECT_ROOT, capture_output=True,
                          text=True, timeout=timeout, env=env(settings, **extra))


@contextmanager
def local_cluster(workers: int, spare_ports: int = 0, **settings_: object) -> Iterator[Settings]:
    """The coordinator's settings (the suite's, but for `settings_`), its workers
    up and registered, migrated; with `spare_ports` free ports after the
    workers' for workers added later."""
    folder = Path(tempfile.mkdtemp(prefix="rewards-cluster-"))
    settings = dataclasses.replace(SETTINGS, data_dir=folder / "data", pg_port=free_ports(1 + workers + spare_ports),
                                   pg_host=None, citus="on", citus_workers=workers, **settings_)
    try:
        started = time.monotonic()
        cluster.up(settings)
        print(f"\ncoordinator and {workers} workers up and migrated in {time.monotonic() - started:.1f} s")
        yield settings
    finally:
        cluster.down(settings)
        shutil.rmtree(folder, ignore_errors=True)
