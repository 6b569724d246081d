"""`rewards cluster rebalance` (and the moves of `rewards cluster drain`):
Citus' background rebalance job (citus_rebalance_start), followed through
citus_rebalance_status until it ends, stopped with citus_rebalance_stop and
resumed by starting it again (it plans only the moves still needed).

Each move copies a group of colocated shards with logical replication while
writes go on ('auto' transfer mode), and so needs wal_level = logical on every
node and a replica identity on every distributed table: both are checked first,
and so is every node's audit slot, made now where missing, so the history
records a node's writes from before its first shard arrives. Afterwards the
post-check counts each distributed table's rows again and runs the reconciler
once the audit consumer has caught up."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from app.audit import reconcile, stream
from app.ledger import queries
from app.ledger.client import Call, Ledger, Shape
from app.ledger.errors import LedgerError, Refused
from app.settings import Settings

OVER = frozenset({"finished", "cancelled", "failed"})


@dataclass(frozen=True)
class Move:
    command: str              # the task, e.g. citus_move_shard_placement(102010, 3, 4, 'auto')
    source: str | None
    target: str | None
    phase: str | None


@dataclass(frozen=True)
class Job:
    job_id: int
    state: str                # scheduled, running, cancelling, failing, finished, cancelled, failed
    started_at: datetime | None
    finished_at: datetime | None
    done: int                 # tasks (shard-group moves, and copying reference tables to a new node)
    total: int
    running: list[Move] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def over(self) -> bool:
        return self.state in OVER

    @property
    def moves(self) -> int:
        return self.total


def _job(row: dict | None) -> Job | None:
    if row is None:
        return None
    details = row["details"] or {}
    counts = details.get("task_state_counts", {})
    tasks = details.get("tasks", [])
    return Job(job_id=row["job_id"], state=row["state"], started_at=row["started_at"],
               finished_at=row["finished_at"], done=counts.get("done", 0), total=sum(counts.values()),
               running=[Move(command=t.get("command", ""), source=t.get("hosts", {}).get("source"),
                             target=t.get("hosts", {}).get("target"), phase=t.get("phase"))
                        for t in tasks if t.get("state") == "running"],
               errors=[t["message"] for t in tasks if t.get("message")])


def latest(ledger: Ledger) -> Job | None:
    return _job(ledger(Call(queries.REBALANCE_STATUS, shape=Shape.MAYBE)))


def check(settings: Settings, ledger: Ledger, slot: str) -> None:
    """Refuse a rebalance that could not keep writes going, could not apply
    them on the target (it would wait for its catch-up for hours), or would
    move shards to a node whose audit slot is missing (made here when it is)."""
    stuck = [f"{n['host']}:{n['port']} ({n['wal_level'] if n['success'] else 'did not answer: ' + n['wal_level']})"
             for n in ledger(Call(queries.NODES_WAL_LEVEL, shape=Shape.MANY))
             if not n["success"] or n["wal_level"] != "logical"]
    if stuck:
        raise Refused(f"wal_level is not logical on {', '.join(stuck)}: shard moves copy with logical replication; "
                      "set it there and restart that server")
    tables = [row["name"] for row in ledger(Call(queries.TABLES_WITHOUT_REPLICA_IDENTITY, shape=Shape.MANY))]
    if tables:
        raise Refused(f"{', '.join(tables)} has no primary key or replica identity: a move could not keep it "
                      "writable while it copies (give it one, or move with block_writes by hand)")
    unapplied = ledger(Call(queries.CHECKS_A_MOVE_CANNOT_APPLY, shape=Shape.MANY))
    if unapplied:
        checks = "; ".join(f"{row['table_name']} {row['constraint_name']} calls {row['function']}, which only a "
                           f"superuser may execute: GRANT EXECUTE ON FUNCTION {row['function']} TO {row['owner']}"
                           for row in unapplied)
        raise Refused(f"a shard move could not apply the rows written during its copy (it writes them as a member "
                      f"of the table's owner that is no superuser, and would wait for hours): {checks}")
    for node in stream.discover(settings.local_conninfo("rewards_audit_writer"), slot):
        try:
            node.ensure_slot()
        except LedgerError as exc:
            raise Refused(f"the audit slot {node.slot} could not be made ({exc}): nothing was moved") from exc
        finally:
            node.close()


def start(ledger: Ledger, drain_only: bool = False) -> Job | None:
    """The job that runs now: one already running (followed, not started
    twice), or a new one; None when nothing needs to move."""
    current = latest(ledger)
    if current is not None and not current.over:
        return current
    if ledger(Call(queries.REBALANCE_START, {"drain_only": drain_only}))["job_id"] is None:
        return None
    return latest(ledger)


def follow(ledger: Ledger, progress: Callable[[Job], None] | None = None, every: float = 1.0) -> Job:
    """Poll the job until it is over, telling `progress` each time."""
    while True:
        job = latest(ledger)
        if progress:
            progress(job)
        if job.over:
            return job
        time.sleep(every)


def run(settings: Settings, ledger: Ledger, slot: str, drain_only: bool = False,
        progress: Callable[[Job], None] | None = None) -> Job | None:
    """Check, start (or join the running job) and follow it to its end; a job
    that fails or is stopped is raised as a refusal naming why."""
    check(settings, ledger, slot)
    job = start(ledger, drain_only)
    if job is None:
        return None
    job = follow(ledger, progress)
    if job.state != "finished":
        why = f": {'; '.join(job.errors)}" if job.errors else ""
        raise Refused(f"rebalance job {job.job_id} {job.state} after {job.done} of {job.total} moves{why}; "
                      "`rewards cluster rebalance` starts it again where it stopped")
    return job


def stop(ledger: Ledger) -> Job:
    current = latest(ledger)
    if current is None or current.over:
        raise Refused("no rebalance is running" + (f" (the latest, job {current.job_id}, is {current.state})"
                                                   if current else ""))
    ledger(Call(queries.REBALANCE_STOP, shape=Shape.NONE))
    return latest(ledger)


# --- The post-check ---------------------------------------------------------------

@dataclass(frozen=True)
class PostCheck:
    before: dict[str, int]
    after: dict[str, int]
    history_caught_up: bool   # the audit consumer confirmed every node's slot past a mark made now
    accounts_checked: int
    findings: int             # the reconciler's

    @property
    def changed(self) -> dict[str, int]:
        return {name: self.after.get(name, 0) - rows for name, rows in self.before.items()
                if self.after.get(name, 0) != rows}

    @property
    def lost(self) -> dict[str, int]:
        """Tables with fewer rows than before: the ledger's rows are never
        deleted, so only a move could have lost them."""
        return {name: delta for name, delta in self.changed.items() if delta < 0}

    @property
    def ok(self) -> bool:
        """Nothing lost (a table that grew took writes during the move, which
        the reconciler checks with the rest), the history caught up, and the
        reconciler clean."""
        return not self.lost and self.history_caught_up and self.findings == 0


def counts(ledger: Ledger) -> dict[str, int]:
    return {row["name"]: row["rows"] for row in ledger(Call(queries.DISTRIBUTED_ROW_COUNTS, shape=Shape.MANY))}


def post_check(settings: Settings, ledger: Ledger, before: dict[str, int], slot: str,
               timeout: float = 60.0) -> PostCheck:
    """Rows per distributed table against `before`, then the reconciler once
    the history has everything the nodes wrote until now."""
    after = counts(ledger)
    caught_up = all(stream.wait_applied(node, f"rebalance post-check of {node.slot}", timeout)
                    for node in stream.discover(settings.local_conninfo("rewards_audit_writer"), slot))
    report = reconcile.reconcile(settings.superuser_conninfo(), slot=slot)
    return PostCheck(before=before, after=after, history_caught_up=caught_up,
                     accounts_checked=report.accounts_checked, findings=len(report.findings))
