"""Citus clusters of a test's own: a coordinator and local workers in a
temporary folder on free ports, brought up by the code `make run` runs
(cluster.up) and stopped by the code `make stop` runs (processes.down), and the
`rewards` command pointed at them."""

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
from unittest import mock

import psycopg
import pytest
from psycopg.conninfo import make_conninfo
from psycopg.rows import dict_row

from app.operations import cluster, migrate, processes
from app.operations.processes import free_port
from app.settings import PROJECT_ROOT, Settings
from tests.conftest import SETTINGS


# citus.shard_count of own_cluster (tests/conftest.py): a rebalance onto a third
# worker makes a few moves, not dozens, and each table is still spread evenly
# over two workers.
SHARDS_PER_TABLE = 6


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


def rewards(settings: Settings, *args: str, timeout: float = 180, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "app.cli", *args], cwd=PROJECT_ROOT, capture_output=True,
                          text=True, timeout=timeout, env=env(settings, **extra))


@contextmanager
def _shards_per_table(count: int | None) -> Iterator[None]:
    """citus.shard_count for the migration that `cluster.up` runs meanwhile (its
    session alone: the services started then must not get the option), which
    distributes the tables: fewer shards, fewer moves for a rebalance to make."""
    if count is None:
        yield
        return
    upgrade = migrate.upgrade

    def with_shard_count(conninfo: str, revision: str = "head") -> None:
        upgrade(make_conninfo(conninfo, options=f"-c citus.shard_count={count}"), revision)

    with mock.patch.object(migrate, "upgrade", with_shard_count):
        yield


@contextmanager
def local_cluster(workers: int, spare_ports: int = 0, shards_per_table: int | None = None,
                  **settings_: object) -> Iterator[Settings]:
    """The coordinator's settings (the suite's, but for `settings_`), its workers
    up and registered, migrated; with `spare_ports` free ports after the
    workers' for workers added later. Skips the test, saying why, without the
    citus extension. Whatever the test started in the cluster's data folder
    (PgBouncer, the audit consumer, an API) stops with it."""
    reason = citus_missing_reason()
    if reason:
        pytest.skip(reason)
    folder = Path(tempfile.mkdtemp(prefix="rewards-cluster-"))
    settings = dataclasses.replace(SETTINGS, data_dir=folder / "data", pg_port=free_ports(1 + workers + spare_ports),
                                   pg_host=None, citus="on", citus_workers=workers, **settings_)
    try:
        started = time.monotonic()
        with _shards_per_table(shards_per_table):
            cluster.up(settings)
        print(f"\ncoordinator and {workers} workers up and migrated in {time.monotonic() - started:.1f} s")
        yield settings
    finally:
        processes.down(settings)
        shutil.rmtree(folder, ignore_errors=True)


def connect(settings: Settings) -> psycopg.Connection:
    """The coordinator as its superuser, rows as dicts."""
    return psycopg.connect(settings.superuser_conninfo(), autocommit=True, row_factory=dict_row)
