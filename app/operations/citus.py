"""Citus on this machine: the local workers beside the project's cluster (each a
cluster of its own, started by app.operations.cluster), their registration with
the coordinator, and the cluster's state as plain data for `rewards cluster status`."""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field

import psycopg

from app.ledger import queries
from app.ledger.client import Call, Ledger, Shape
from app.settings import Settings

# The calls that write (named query write_functions_distribution finds them in
# the database) must each run wholly on the worker holding their user:
# distributed by this argument, colocated with the accounts.
USER_ARGUMENT = "p_user_id"

_WORKER_FOLDER = re.compile(r"^worker-(\d+)$")


# --- The local workers ------------------------------------------------------

def worker_settings(settings: Settings, index: int) -> Settings:
    """Worker `index` (1, 2, ...): the coordinator's settings with its own data
    folder and the port after the coordinator's."""
    return dataclasses.replace(settings, data_dir=settings.data_dir / f"worker-{index}",
                               pg_port=settings.pg_port + index)


def local_workers(settings: Settings) -> list[Settings]:
    """Workers 1..REWARDS_CITUS_WORKERS, and any other one already made in the data
    folder (a worker is its folder: one added later is started again too)."""
    made = {int(match[1]) for path in settings.data_dir.glob("worker-*")
            if (match := _WORKER_FOLDER.match(path.name)) and (path / "pg" / "PG_VERSION").exists()}
    wanted = set(range(1, settings.citus_workers + 1))
    return [worker_settings(settings, index) for index in sorted(made | wanted)]


def address(node: Settings) -> dict[str, object]:
    """How the nodes reach each other: as we reach the node, by its host
    (REWARDS_PG_HOST) or else its Unix socket folder, and its port."""
    return {"host": str(node.pg_host or node.socket_dir), "port": node.pg_port}


def create_extension(node: Settings) -> None:
    """The citus extension in the node's service database (made there already)."""
    with psycopg.connect(node.superuser_conninfo(), autocommit=True) as conn:
        conn.execute(queries.CREATE_CITUS)


def prepare(coordinator: Settings, workers: list[Settings]) -> None:
    """The extension in the service database of every node, then each node
    registered (again harmlessly on a re-run). A coordinator without workers holds
    the shards itself (a single-node cluster); with workers it holds none."""
    for node in (coordinator, *workers):
        create_extension(node)
    with psycopg.connect(coordinator.superuser_conninfo(), autocommit=True) as conn:
        conn.execute(queries.CITUS_SET_COORDINATOR, address(coordinator))
        for worker in workers:
            conn.execute(queries.CITUS_ADD_NODE, address(worker))
        alone = conn.execute(queries.CITUS_WORKER_COUNT).fetchone()[0] == 0
        conn.execute(queries.CITUS_NODE_HOLDS_SHARDS, {**address(coordinator), "holds": alone})


# --- The cluster's state ----------------------------------------------------

@dataclass(frozen=True)
class Slot:
    slot: str
    plugin: str | None
    database: str | None
    active: bool
    confirmed_flush_lsn: str | None
    lag_bytes: int | None


@dataclass(frozen=True)
class Node:
    host: str
    port: int
    role: str                 # coordinator, worker, or single (no Citus)
    shouldhaveshards: bool
    active: bool
    shards: int               # of distributed tables (reference tables are everywhere)
    bytes: int
    reference_shards: int
    slots: list[Slot] = field(default_factory=list)
    error: str | None = None  # the node did not answer the slot query


@dataclass(frozen=True)
class Skew:
    """max/min over the nodes that hold or should hold shards; None when a node
    among them holds none (or there is nothing to compare)."""

    shards: float | None
    bytes: float | None
    nodes: int


@dataclass(frozen=True)
class Function:
    """A write function and how it is distributed. One call is delegated even
    inside a transaction (force_delegation); a call over many items (`many`)
    is delegated as a statement of its own, without force_delegation, which
    would let the queries inside touch the rows of p_user_id's value alone."""

    name: str
    signature: str
    distributed: bool
    distribution_argument: str | None
    force_delegation: bool
    colocated: bool           # with ledger.accounts, where the user's rows are
    many: bool

    @property
    def delegated(self) -> bool:
        return (self.distributed and self.distribution_argument == USER_ARGUMENT
                and self.force_delegation is not self.many and self.colocated)

    @property
    def how(self) -> str:
        return "as a statement of its own" if self.many else "force_delegation"

    def why_not(self) -> str:
        if not self.distributed:
            return "not distributed"
        if self.distribution_argument != USER_ARGUMENT:
            return f"distributed by {self.distribution_argument or 'no argument'}, not {USER_ARGUMENT}"
        if not self.colocated:
            return "not colocated with ledger.accounts"
        if self.many:
            return "with force_delegation, which pins the items' queries to the rows of p_user_id alone"
        return "without force_delegation"


def write_functions(ledger: Ledger) -> list[Function]:
    """Every write function of the ledger and how it is distributed (Citus only)."""
    return ledger(Call(queries.WRITE_FUNCTIONS_DISTRIBUTION, row=Function, shape=Shape.MANY))


@dataclass(frozen=True)
class Status:
    citus: str | None         # the extension's version; None: a single node
    nodes: list[Node]
    skew: Skew | None
    functions: list[Function]
    budget_anchors_missing: int = 0  # shards of ledger.accounts without one

    @property
    def problems(self) -> list[str]:
        """What makes `cluster status` fail, one line each."""
        found = [f"ledger.{f.name} is not delegated: {f.why_not()}" for f in self.functions if not f.delegated]
        if self.budget_anchors_missing:
            found.append(f"{self.budget_anchors_missing} shards of ledger.accounts have no budget anchor (split "
                         "since the anchors were placed): claims on a budgeted campaign fail for their users; "
                         "run `rewards cluster place-anchors`")
        found += [f"node {n.host}:{n.port} did not answer: {n.error}" for n in self.nodes if n.error]
        if self.citus and not self.nodes:
            found.append("no node is registered in pg_dist_node: run `rewards db up` with REWARDS_CITUS=on")
        return found

    def as_json(self) -> dict[str, object]:
        shown = dataclasses.asdict(self)
        for function, data in zip(self.functions, shown["functions"], strict=True):
            data["delegated"] = function.delegated
        shown["topology"] = "citus" if self.citus else "single-node"
        shown["problems"] = self.problems
        return shown


def status(settings: Settings) -> Status:
    """The cluster as the coordinator (or the single node) sees it."""
    with Ledger.connect(settings.superuser_conninfo()) as ledger:
        version = ledger(Call(queries.CITUS_VERSION, shape=Shape.MAYBE))
        if version is None:
            single = Node(host=str(settings.pg_host or settings.socket_dir), port=settings.pg_port, role="single",
                          shouldhaveshards=True, active=True, shards=0, bytes=0, reference_shards=0,
                          slots=_slots(ledger(Call(queries.NODE_SLOTS))["slots"]))
            return Status(citus=None, nodes=[single], skew=None, functions=[])
        slots = {row["nodeid"]: row for row in ledger(Call(queries.CLUSTER_SLOTS, {"command": queries.NODE_SLOTS},
                                                           shape=Shape.MANY))}
        nodes = [_node(row, slots.get(row["nodeid"])) for row in ledger(Call(queries.CLUSTER_NODES,
                                                                              shape=Shape.MANY))]
        functions = write_functions(ledger)
        missing = ledger(Call(queries.BUDGET_ANCHORS_MISSING))["missing"]
    return Status(citus=version["version"], nodes=nodes, skew=skew(nodes), functions=functions,
                  budget_anchors_missing=missing)


def place_budget_anchors(settings: Settings) -> int:
    """One budget anchor per shard of ledger.accounts again (after a split);
    answers how many shards still have none (0)."""
    with Ledger.connect(settings.superuser_conninfo()) as ledger:
        ledger(Call(queries.PLACE_BUDGET_ANCHORS, shape=Shape.NONE))
        return ledger(Call(queries.BUDGET_ANCHORS_MISSING))["missing"]


def _node(row: dict, slot_answer: dict | None) -> Node:
    node = {name: row[name] for name in ("host", "port", "role", "shouldhaveshards", "active", "shards", "bytes",
                                         "reference_shards")}
    if slot_answer is None:
        return Node(**node, error=None if not row["active"] else "not reached by run_command_on_all_nodes")
    if not slot_answer["success"]:
        return Node(**node, error=slot_answer["result"])
    return Node(**node, slots=_slots(json.loads(slot_answer["result"])))


def _slots(rows: list[dict]) -> list[Slot]:
    return [Slot(**row) for row in rows]


def skew(nodes: list[Node]) -> Skew:
    holders = [n for n in nodes if n.shouldhaveshards or n.shards]
    return Skew(shards=_ratio([n.shards for n in holders]), bytes=_ratio([n.bytes for n in holders]),
                nodes=len(holders))


def _ratio(values: list[int]) -> float | None:
    if not values or min(values) == 0:
        return None
    return round(max(values) / min(values), 3)
