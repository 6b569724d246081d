"""The databases the tests run in, on either topology the suite runs on.

Single node: the project's cluster. Citus: the same cluster as coordinator with
the workers registered in its service database (`make test` runs the suite a
second time on such a cluster: see ops/test-citus.sh). Either way a migrated
template is built once per session and each test gets its own copy, cloned on
every node under the same name: Citus reaches a database on the workers by
the coordinator's database name, and the shards, their metadata and the
sequences come along in the copy, so each test sees a cluster of its own.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass

import psycopg
from psycopg import sql
from pytest_postgresql.janitor import DatabaseJanitor

from app.operations import citus, migrate
from app.settings import Settings

TEMPLATE = "rewards_test_template"

# Citus tracks the database itself as a distributed object: a row of
# pg_dist_object naming it by OID. CREATE DATABASE ... TEMPLATE copies that row
# as it is, so in a clone it still names the template, and citus_add_node, which
# sends every distributed object to the new node by name, sends the template's
# ("database rewards_test_template does not exist" there). Pointed at the clone,
# the clone takes a new node as a database made from nothing does.
_OWN_DATABASE_OBJECT = """
UPDATE pg_catalog.pg_dist_object
SET objid = (SELECT oid FROM pg_catalog.pg_database WHERE datname = current_database())
WHERE classid = 'pg_catalog.pg_database'::regclass
  AND objid = (SELECT oid FROM pg_catalog.pg_database WHERE datname = %s)"""


@dataclass(frozen=True)
class Topology:
    settings: Settings
    workers: tuple[Settings, ...]

    @property
    def citus(self) -> bool:
        return bool(self.workers)

    @property
    def nodes(self) -> tuple[Settings, ...]:
        return (self.settings, *self.workers)

    @property
    def name(self) -> str:
        return f"citus, coordinator + {len(self.workers)} workers" if self.citus else "single node"

    @classmethod
    def of(cls, settings: Settings) -> Topology:
        """The local workers `make run` started, if the service database has Citus."""
        with psycopg.connect(settings.superuser_conninfo()) as conn:
            has_citus = conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'citus'").fetchone()
        return cls(settings, tuple(citus.local_workers(settings)) if has_citus else ())

    def _janitors(self, name: str, template: str | None = None) -> list[DatabaseJanitor]:
        return [DatabaseJanitor(user=node.pg_superuser, host=str(node.pg_host or node.socket_dir), port=node.pg_port,
                                dbname=name, template_dbname=template) for node in self.nodes]

    def build_template(self) -> None:
        """A migrated database (distributed, under Citus) to clone tests from,
        prepared as `make run` prepares the service database."""
        self.drop(TEMPLATE)
        for janitor in self._janitors(TEMPLATE):
            janitor.init()
        if self.citus:
            coordinator, *workers = (dataclasses.replace(node, database=TEMPLATE) for node in self.nodes)
            citus.prepare(coordinator, workers)
        migrate.upgrade(self.settings.superuser_conninfo(TEMPLATE))

    def clone(self, name: str) -> None:
        """A copy of the template under `name` on every node, its own database
        object in Citus' metadata (see _OWN_DATABASE_OBJECT). (The janitor first
        ends every session in the template, Citus' maintenance daemon among them,
        which starts again only when someone uses Citus there.)"""
        for janitor in self._janitors(name, template=TEMPLATE):
            _retried_while_in_use(janitor.init)
        if self.citus:
            for node in self.nodes:
                with psycopg.connect(node.superuser_conninfo(name), autocommit=True) as conn:
                    conn.execute(_OWN_DATABASE_OBJECT, (TEMPLATE,))

    def drop(self, name: str) -> None:
        # Citus' maintenance daemon reconnects to its database (over libpq, to
        # the coordinator itself too) as soon as its sessions end: shut the door
        # first, then end them and drop in one step, and try again if one slipped in.
        for node in self.nodes:
            with psycopg.connect(node.superuser_conninfo("postgres"), autocommit=True) as conn:
                if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
                    continue
                conn.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(sql.Identifier(name)))
                _retried_while_in_use(lambda: conn.execute(
                    sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name))))

def _retried_while_in_use(statement: Callable[[], object], attempts: int = 20) -> None:
    """A daemon that reconnects between a terminate and the CREATE or DROP that
    needs the database to itself makes it busy for a moment: try again, briefly."""
    for attempt in range(attempts):
        try:
            statement()
            return
        except psycopg.errors.ObjectInUse:
            if attempt == attempts - 1:
                raise
            time.sleep(0.1)
