"""Growing and shrinking the Citus cluster: `rewards cluster add-node` and
`rewards cluster drain`.

A server joins only once the coordinator has checked, through the connection
Citus itself will use, what it needs (app.operations.requirements). It is
registered holding nothing, gets its audit slot, and only then may hold shards:
no rebalance can move anything there before the slot records it. A node
leaves only once every shard is off it and the audit consumer has confirmed
everything it wrote; then its slot goes, and a local worker's folder with it."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from app.audit import stream
from app.ledger import queries
from app.ledger.client import Call, Ledger, Shape
from app.ledger.errors import InUse, InvalidArgument, LedgerError, Refused, refused_by_the_server
from app.operations import citus, cluster, rebalance, requirements
from app.settings import Settings


@dataclass(frozen=True)
class Address:
    host: str   # a host name, an address, or a Unix socket folder
    port: int

    @classmethod
    def parse(cls, text: str) -> Address:
        host, colon, port = text.rpartition(":")
        if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise InvalidArgument(f"a node is HOST:PORT (a host, an address or a socket folder, then a port), "
                                  f"not {text!r}", "node")
        return cls(host, int(port))

    @classmethod
    def of(cls, node: Settings) -> Address:
        return cls(**citus.address(node))

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def params(self) -> dict[str, object]:
        return {"host": self.host, "port": self.port}


@dataclass(frozen=True)
class Added:
    host: str
    port: int
    nodeid: int
    slot: str
    postgresql: str
    citus: str
    folder: str | None        # a local worker's, which `rewards up` starts again
    checked: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Drained:
    host: str
    port: int
    nodeid: int
    moves: int
    slot: str
    confirmed_lsn: str        # the audit slot was confirmed past this before it was dropped
    folder_deleted: str | None


@contextmanager
def coordinator(settings: Settings) -> Iterator[Ledger]:
    """The coordinator, as its superuser; refused on a single node."""
    with Ledger.connect(settings.superuser_conninfo()) as ledger:
        if ledger(Call(queries.CITUS_VERSION, shape=Shape.MAYBE)) is None:
            raise Refused(citus_off(settings))
        yield ledger


def citus_off(settings: Settings) -> str:
    return (f"Citus is off: database {settings.database} on port {settings.pg_port} has no citus extension, so it "
            "is a single node with nothing to distribute (start a cluster with REWARDS_CITUS=on, see the README's "
            "\"For DBAs\")")


# --- Adding a node ------------------------------------------------------------

def add(settings: Settings, node: Address, slot: str) -> Added:
    """Check `node` (a prepared server), register it with its audit slot, and
    let it hold shards; refused, with nothing registered, when it cannot."""
    with coordinator(settings) as ledger:
        return _add(settings, ledger, node, slot, folder=None)


def add_local(settings: Settings, slot: str) -> Added:
    """One more local worker (`worker-<i>` in the data folder, on port pg+i),
    made as `rewards up` makes the others, then added as any node is. Refused
    with its folder deleted again when it cannot join."""
    with coordinator(settings) as ledger:
        index = max((int(w.data_dir.name.removeprefix("worker-")) for w in citus.local_workers(settings)),
                    default=0) + 1
        worker = citus.worker_settings(settings, index)
        if cluster.port_taken(worker.pg_port):
            raise Refused(f"port {worker.pg_port} (worker {index}'s, REWARDS_PG_PORT + {index}) is taken by another "
                          "program: nothing was made")
        cluster.start_worker(worker, settings)
        try:
            return _add(settings, ledger, Address.of(worker), slot, folder=str(worker.data_dir))
        except BaseException:
            cluster.delete_worker(worker, settings)
            raise


def _add(settings: Settings, ledger: Ledger, node: Address, slot: str, folder: str | None) -> Added:
    if ledger(Call(queries.CITUS_NODE, node.params, shape=Shape.MAYBE)):
        raise Refused(f"{node} is in the cluster already (pg_dist_node; see `rewards cluster status`)")
    there = _checked(settings, ledger, node)
    # Registered holding nothing, in one transaction: no rebalance can choose it
    # before its slot exists. citus_add_node also creates every distributed
    # object there, which the checks above cannot foresee failing (a schema of
    # the same name left there by another owner): then nothing stays registered.
    with _warnings(ledger) as warned, \
            refused_by_the_server(f"Citus could not add {node}, so nothing was registered", warned), \
            ledger.transaction():
        nodeid = ledger(Call(queries.CITUS_ADD_NODE, node.params))["nodeid"]
        ledger(Call(queries.CITUS_NODE_HOLDS_SHARDS, {**node.params, "holds": False}))
    try:
        # Citus has made the project's roles there now: each must log in.
        _reachable_as_every_role(settings, ledger, node, there["roles"], now=True)
        # and the functions, each executable by PUBLIC there until this.
        ledger(Call(queries.CLOSE_ROUTINES_TO_PUBLIC, shape=Shape.NONE))
        node_slot = _make_slot(settings, node, nodeid, slot)
    except LedgerError as exc:
        ledger(Call(queries.CITUS_REMOVE_NODE, node.params, shape=Shape.NONE))
        raise Refused(f"{exc}; {node} was removed from the cluster again, nothing had moved to it") from exc
    ledger(Call(queries.CITUS_NODE_HOLDS_SHARDS, {**node.params, "holds": True}))
    return Added(host=node.host, port=node.port, nodeid=nodeid, slot=node_slot, postgresql=there["server_version"],
                 citus=there["citus"], folder=folder, checked=list(requirements.CHECKED))


def _checked(settings: Settings, ledger: Ledger, node: Address) -> dict:
    """The server's facts once it passed every check made before it joins."""
    why = _unreached(ledger, node, role=None)
    if why:
        raise Refused(_unreachable(settings, ledger, node, settings.pg_superuser, why))
    ran = ledger(Call(queries.NODE_RUN, {**node.params, "command": queries.NODE_FACTS}))
    if not ran["success"]:
        raise Refused(f"{node}: the checks could not run there: {ran['result']}")
    there = json.loads(ran["result"])
    here = json.loads(ledger(Call(queries.NODE_FACTS))["facts"])
    extensions = ledger(Call(queries.DISTRIBUTED_EXTENSIONS, shape=Shape.MANY))
    missing = requirements.missing(here, there, extensions, settings.database)
    if missing:
        raise Refused(f"{node} cannot join the cluster: " + "; ".join(missing))
    _reachable_as_every_role(settings, ledger, node, there["roles"], now=False)
    return there


def _reachable_as_every_role(settings: Settings, ledger: Ledger, node: Address, present: list[str],
                             now: bool) -> None:
    """Citus connects to a node as the session's user: the superuser, and each
    service role whose queries reach the workers. Before the node joins, only
    the roles already there can be tried; once it has joined, all of them."""
    for row in ledger(Call(queries.LOGIN_ROLES, shape=Shape.MANY)):
        role = row["role"]
        if role == settings.pg_superuser or not (now or role in present):
            continue
        why = _unreached(ledger, node, role)
        if why:
            raise Refused(_unreachable(settings, ledger, node, role, why))


@contextmanager
def _warnings(ledger: Ledger) -> Iterator[list[str]]:
    """The messages of the warnings the server sends in the block: how Citus
    reports what went wrong on another node."""
    warnings: list[str] = []

    def heard(diagnostic) -> None:
        warnings.append(diagnostic.message_primary or "")

    ledger.conn.add_notice_handler(heard)
    try:
        yield warnings
    finally:
        ledger.conn.remove_notice_handler(heard)


def _unreached(ledger: Ledger, node: Address, role: str | None) -> str | None:
    """Why Citus cannot connect to the node as `role` (the session's user when
    None); None when it can. Citus says why in a WARNING."""
    with _warnings(ledger) as warnings, ledger.transaction():
        if role:
            ledger(Call(queries.ACT_AS, {"role": role}))
        reached = ledger(Call(queries.NODE_REACHABLE, node.params))["reached"]
    return None if reached else (warnings[-1] if warnings else "the connection failed")


def _unreachable(settings: Settings, ledger: Ledger, node: Address, role: str, why: str) -> str:
    here = json.loads(ledger(Call(queries.NODE_FACTS))["facts"])
    return (f"Citus on the coordinator cannot connect to {node} as {role} ({why}). It connects with "
            f"citus.node_conninfo '{here['node_conninfo']}' (sslmode=require needs ssl on the server: creating "
            "the citus extension there turns it on) to the database "
            f"{settings.database}, which must exist there; over TCP the password comes from pg_dist_authinfo "
            f"(on the coordinator: INSERT INTO pg_dist_authinfo VALUES (0, '{role}', 'password=...'), 0 meaning "
            f"every node) or from the .pgpass of the OS user running the nodes' PostgreSQL ({settings.pg_os_user})")


def _make_slot(settings: Settings, node: Address, nodeid: int, slot: str) -> str:
    """The audit slot of the new node, made as `rewards audit run` would make
    it (as the consumer's role, from where it runs), which also proves that
    role logs in there."""
    name = stream.node_slot(slot, nodeid, groupid=1)  # a worker's: its group is never the coordinator's 0
    target = settings.local_conninfo("rewards_audit_writer")
    found = next((s for s in stream.discover(target, slot) if s.slot == name), None)
    if found is None:
        raise Refused(f"the audit consumer does not see node {nodeid} ({node}) in pg_dist_node")
    try:
        found.ensure_slot()
    except LedgerError as exc:
        raise Refused(f"the audit consumer (rewards_audit_writer, as `rewards audit run` connects) could not make "
                      f"its slot {name} on {node}: {exc}; over TCP its password must be in the .pgpass (or "
                      "PGPASSFILE) of the user running `rewards audit run`") from exc
    finally:
        found.close()
    return name


# --- Draining a node ------------------------------------------------------------

def drain(settings: Settings, node: Address, slot: str, timeout: float,
          progress: Callable[[rebalance.Job], None] | None = None) -> Drained:
    """Every shard off `node` (the rebalancer's drain: a background job, so it
    shows progress and can be stopped and resumed), then, once the audit
    consumer has confirmed all the node wrote, the node removed and its slot
    dropped; a local worker's folder is deleted so `rewards up` does not start it."""
    with coordinator(settings) as ledger:
        row = ledger(Call(queries.CITUS_NODE, node.params, shape=Shape.MAYBE))
        if row is None:
            known = ", ".join(f"{n.host}:{n.port}" for n in citus.status(settings).nodes if n.role == "worker")
            raise Refused(f"no node {node} in the cluster (pg_dist_node); the workers are: {known or 'none'}")
        if row["groupid"] == 0:
            raise Refused(f"{node} is the coordinator: it cannot be drained and removed")
        others = [n for n in citus.status(settings).nodes
                  if (n.host, n.port) != (node.host, node.port) and n.shouldhaveshards and n.active]
        if not others:
            raise Refused(f"{node} is the only node that may hold shards: add one first (`rewards cluster add-node`)")
        if row["shouldhaveshards"]:
            ledger(Call(queries.CITUS_NODE_HOLDS_SHARDS, {**node.params, "holds": False}))
        job = rebalance.run(settings, ledger, slot, drain_only=True, progress=progress)
        left = ledger(Call(queries.NODE_SHARDS, node.params))["shards"]
        if left:
            raise Refused(f"{left} shards are still on {node} after the drain job ({job.state if job else 'none'}): "
                          "run `rewards cluster drain` again")
        ledger(Call(queries.CLEANUP_ORPHANED_RESOURCES, shape=Shape.NONE))
        leftovers = ledger(Call(queries.NODE_LEFTOVERS, node.params))["leftovers"]
        if leftovers:
            raise Refused(f"{leftovers} old shard placements on {node} could not be dropped yet (pg_dist_cleanup): "
                          "removing the node now would leave them blocking later moves; run `rewards cluster drain` "
                          "again")
        name = stream.node_slot(slot, row["nodeid"], row["groupid"])
        confirmed = _consumer_confirmed(settings, node, name, timeout)
        ledger(Call(queries.CITUS_REMOVE_NODE, node.params, shape=Shape.NONE))
    _drop_slot(settings, node, name)
    worker = next((w for w in citus.local_workers(settings) if Address.of(w) == node), None)
    if worker is not None:
        cluster.delete_worker(worker, settings)
    return Drained(host=node.host, port=node.port, nodeid=row["nodeid"], moves=job.moves if job else 0, slot=name,
                   confirmed_lsn=confirmed, folder_deleted=str(worker.data_dir) if worker else None)


def _stream(settings: Settings, node: Address, name: str) -> stream.Stream:
    """The node's audit slot, reached as the consumer reaches it."""
    target = settings.local_conninfo("rewards_audit_writer")
    return stream.Stream(stream.node_conninfo(target, node.host, node.port), target, name)


def _consumer_confirmed(settings: Settings, node: Address, name: str, timeout: float) -> str:
    """The LSN of a mark written after the node's last shard left, once the
    audit consumer has confirmed the node's slot past it."""
    mark = stream.wait_applied(_stream(settings, node, name), f"{node} drained", timeout)
    if mark is None:
        raise Refused(f"every shard is off {node}, but the audit consumer has not confirmed its slot {name} to the "
                      f"end within {timeout:.0f} s: is `rewards audit run` running? The node stays in the cluster "
                      "holding nothing; run `rewards cluster drain` again to finish")
    return mark


def _drop_slot(settings: Settings, node: Address, name: str, attempts: int = 40) -> None:
    """The consumer may be reading the slot at that moment (it stops on its next
    look at the nodes): try again for a while."""
    source = _stream(settings, node, name)
    try:
        for attempt in range(attempts):
            try:
                source.drop_slot()
                return
            except InUse:
                if attempt == attempts - 1:
                    raise
                time.sleep(0.5)
    finally:
        source.close()
