"""What a benchmark runs beside the project's cluster: a database of its own,
an API (its own port and Redis prefix, rate limits out of the way unless asked
for: a benchmark measures the request path, not the buckets), a key for it, and
an audit consumer with a slot of its own. Each is stopped, and the slots
dropped, when its block ends."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from psycopg import sql

from app.audit import stream
from app.ledger import keys
from app.ledger.client import Ledger
from app.operations import citus, migrate, processes
from app.settings import PROJECT_ROOT, Settings

UNLIMITED = "1000000/1000000"
SCOPES = ["points:earn", "points:redeem", "points:read"]


def database(settings: Settings, name: str) -> None:
    """A new database `name`, migrated: on every node and distributed under
    Citus, as `make run` prepares the service's."""
    nodes = [dataclasses.replace(node, database=name) for node in (
        settings, *(citus.local_workers(settings) if settings.citus == "on" else []))]
    for node in nodes:
        with psycopg.connect(node.superuser_conninfo("postgres"), autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    if settings.citus == "on":
        citus.prepare(nodes[0], nodes[1:])
    migrate.upgrade(settings.superuser_conninfo(name))


def api_key(settings: Settings, database: str, name: str = "bench") -> str:
    with Ledger.connect(settings.superuser_conninfo(database)) as ledger:
        return keys.create(ledger, name, SCOPES)[1]


@contextmanager
def api(settings: Settings, database: str, workers: int,
        rates: dict[str, str] | None = None) -> Iterator[tuple[str, int]]:
    """An API on `database` through the project's PgBouncer and Redis; yields
    its URL and pid. `rates`: REWARDS_RATE_* values (default: all unlimited)."""
    port = processes.free_port()
    own = dataclasses.replace(settings, database=database, api_port=port)
    limits = rates if rates is not None else {name: UNLIMITED for name in (
        "REWARDS_RATE_USER_EARN", "REWARDS_RATE_USER_REDEEM", "REWARDS_RATE_API_KEY", "REWARDS_RATE_GLOBAL")}
    env = {"REWARDS_DATABASE": database, "REWARDS_API_PORT": str(port), "REWARDS_REDIS_PREFIX": f"bench-{port}",
           "REWARDS_API_SERVER": own.api_server, **limits}
    processes.bouncer_up(settings)
    processes.redis_up(settings)
    pid = processes.api_up(own, env=env, workers=workers)
    try:
        yield f"http://127.0.0.1:{port}", pid
    finally:
        processes.api_down(own)


@contextmanager
def audit_consumer(settings: Settings, database: str, slot: str) -> Iterator[None]:
    """`rewards audit run` for `database` with slots named after `slot` (each
    cluster-wide, so never the service's), as `make run` starts it."""
    log = settings.log_dir / f"audit-{database}.log"
    env = {**os.environ, "REWARDS_DATABASE": database, "REWARDS_AUDIT_METRICS_PORT": "0"}
    consumer = subprocess.Popen([sys.executable, "-m", "app.cli", "audit", "run", "--slot", slot], cwd=PROJECT_ROOT,
                                env=env, stdin=subprocess.DEVNULL, stdout=log.open("ab"), stderr=subprocess.STDOUT)
    try:
        yield
    finally:
        consumer.terminate()
        consumer.wait(timeout=30)
        for node in stream.discover(settings.local_conninfo("rewards_audit_writer", database), slot):
            node.drop_slot()
            node.close()

