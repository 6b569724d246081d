"""`rewards audit run`: the ledger's WAL, decoded by wal2json from a logical
replication slot, applied to the audit history.

Delivery from the slot is at least once; the history is exactly once because its
rows are keyed by the ledger's own ids (ON CONFLICT DO NOTHING). The order that
makes a crash harmless at any point: peek a batch of whole transactions, write
their rows and the progress row in one transaction, commit, and only then
confirm the LSN to the slot. Dying before the commit loses nothing (the slot
still holds the changes); dying between the commit and the confirmation only
replays rows that are already there.

Nothing is confirmed that was not understood: the slot delivers every change to
the ledger schema except the tables the history does not keep, and a change to
any table this consumer does not know (a Citus shard such as
ledger.entries_102008, which is what a server decodes without
citus.enable_change_data_capture, or a table added since) stops the stream
with `UnknownChange` before anything of its batch is written or confirmed.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from psycopg.conninfo import make_conninfo

from app.audit import metrics, reconnect
from app.ledger import queries
from app.ledger.client import Call, Ledger, Shape
from app.ledger.errors import AlreadyExists, LedgerError, NotFound, Overloaded, Unavailable

log = logging.getLogger("rewards.audit")

# The tables whose changes become history. The slot is peeked for the whole
# ledger schema but these (sql/queries.sql, peek_changes): every other table
# reaching the consumer is one it does not understand.
# `rewards audit run --slot`'s default; a Citus worker's is `<slot>_node<N>`.
DEFAULT_SLOT = "rewards_audit"

APPLIED_TABLES = frozenset({("ledger", "entries"), ("ledger", "reservations")})


class UnknownChange(LedgerError):
    """The slot holds a change to a table the consumer does not know: nothing of
    its batch was written or confirmed, and the stream stops until it is fixed."""

    def __init__(self, schema: str, table: str, commit_lsn: str) -> None:
        hint = ("a Citus shard: this server decodes shards, not their distributed tables; set "
                "citus.enable_change_data_capture = on where citus is preloaded and restart it"
                if re.fullmatch(r".+_\d+", table) else "a table the audit stream has not been taught")
        super().__init__(f"the slot holds a change to {schema}.{table} (transaction committed at {commit_lsn}), "
                         f"{hint}; nothing past it was confirmed")
        self.schema, self.table, self.commit_lsn = schema, table, commit_lsn


@dataclass
class Transaction:
    commit_lsn: str = ""
    committed_at: str = ""
    changes: list[dict[str, Any]] = field(default_factory=list)


def _row(change: dict[str, Any]) -> dict[str, Any]:
    return {column["name"]: column["value"] for column in change["columns"]}


def transactions(rows: list[dict[str, Any]]) -> Iterator[Transaction]:
    """Whole transactions from wal2json format-version 2 rows (B, I/U..., C)."""
    current = Transaction()
    for row in rows:
        message = json.loads(row["data"])
        action = message["action"]
        if action == "B":
            current = Transaction()
        elif action == "C":
            current.commit_lsn = str(row["lsn"])
            current.committed_at = message["timestamp"]
            yield current
        elif action in ("I", "U"):
            current.changes.append(message)


def _refuse_unknown(batch: list[Transaction]) -> None:
    for txn in batch:
        for change in txn.changes:
            if (change["schema"], change["table"]) not in APPLIED_TABLES:
                raise UnknownChange(change["schema"], change["table"], txn.commit_lsn)


def _slot_status(slot: str) -> Call[dict]:
    return Call(queries.SLOT_STATUS, {"slot": slot}, shape=Shape.MAYBE)


def _create_slot(slot: str) -> Call[dict]:
    return Call(queries.CREATE_SLOT, {"slot": slot})


def _drop_slot(slot: str) -> Call[dict]:
    return Call(queries.DROP_SLOT, {"slot": slot})


def _mark(text: str) -> Call[dict]:
    return Call(queries.AUDIT_MARK, {"text": text})


def _confirmed_past(slot: str, lsn: str) -> Call[dict]:
    return Call(queries.AUDIT_CONFIRMED_PAST, {"slot": slot, "lsn": lsn}, shape=Shape.MAYBE)


def _backfill() -> Call[dict]:
    return Call(queries.AUDIT_BACKFILL)


def _peek(slot: str, max_changes: int) -> Call[dict]:
    return Call(queries.PEEK_CHANGES, {"slot": slot, "max_changes": max_changes}, shape=Shape.MANY)


def _confirm(slot: str, lsn: str) -> Call[dict]:
    return Call(queries.CONFIRM_CHANGES, {"slot": slot, "lsn": lsn})


def _lag(slot: str) -> Call[dict]:
    return Call(queries.AUDIT_LAG, {"slot": slot}, shape=Shape.MAYBE)


def _progress(slot: str) -> Call[dict]:
    return Call(queries.AUDIT_PROGRESS, {"slot": slot}, shape=Shape.MAYBE)


def _save_progress(slot: str, lsn: str, committed_at: str) -> Call[dict]:
    return Call(queries.AUDIT_SAVE_PROGRESS, {"slot": slot, "lsn": lsn, "committed_at": committed_at},
                shape=Shape.NONE)


def _metadata(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


class Stream:
    """One source node's slot, applied to the history database."""

    def __init__(self, source: str, target: str, slot: str, batch_changes: int = 5000) -> None:
        self.source_conninfo = source
        self.target_conninfo = target
        self.slot = slot
        self.batch_changes = batch_changes
        self._source: Ledger | None = None
        self._target: Ledger | None = None
        # The slot is looked at again after every interruption: it may have
        # been invalidated (the reason a peek fails for good) or, after a
        # failover, be missing on the new primary.
        self._slot_checked = False

    def _connections(self) -> tuple[Ledger, Ledger]:
        if self._source is None or self._source.closed:
            self._source = Ledger.open(self.source_conninfo)
        if self._target is None or self._target.closed:
            self._target = Ledger.open(self.target_conninfo)
        return self._source, self._target

    def close(self) -> None:
        for ledger in (self._source, self._target):
            if ledger is not None:
                ledger.close()
        self._slot_checked = False

    def has_slot(self) -> bool:
        source, _ = self._connections()
        return source(_slot_status(self.slot)) is not None

    def ensure_slot(self) -> None:
        """Make the slot when it is missing, and again when max_slot_wal_keep_size
        invalidated it (the changes it held are gone from the WAL), each time
        with the backfill that copies from the ledger what the history lacks."""
        source, target = self._connections()
        status = source(_slot_status(self.slot))
        invalidated = status is not None and status["wal_status"] == "lost"
        if invalidated:
            source(_drop_slot(self.slot))
        if status is None or invalidated:
            try:
                source(_create_slot(self.slot))
            except AlreadyExists:
                # Made a moment ago by the other process that found the node
                # (`rewards cluster add-node`, or this consumer): it backfills.
                self._slot_checked = True
                return
            # The slot sees only what commits from now on: copy what came before.
            # Into the history, which is on the target (a Citus worker's slot
            # is applied on the coordinator, where audit.* lives).
            copied = target(_backfill())["entries"]
            if invalidated:
                metrics.SLOT_INVALIDATIONS.labels(self.slot).inc()
                log.warning("replication slot was invalidated (max_slot_wal_keep_size): made again, history "
                            "backfilled from the ledger", extra={"fields": {"slot": self.slot, "backfilled": copied}})
            else:
                log.info("created replication slot", extra={"fields": {"slot": self.slot, "backfilled": copied}})
        self._slot_checked = True

    def drop_slot(self) -> None:
        source, _ = self._connections()
        if source(_slot_status(self.slot)):
            source(_drop_slot(self.slot))

    def poll(self) -> int:
        """Apply one batch; how many ledger rows it held (0 when caught up)."""
        if not self._slot_checked:
            self.ensure_slot()
        source, target = self._connections()
        rows = source(_peek(self.slot, self.batch_changes))
        batch = list(transactions(rows))
        if not batch:
            return 0
        _refuse_unknown(batch)
        # A batch of transactions that touched no ledger table (this consumer's
        # own writes among them) is only confirmed: writing a progress row for
        # it would make the next poll's work.
        applied = self._apply(target, batch) if any(txn.changes for txn in batch) else 0
        self.confirm(batch[-1].commit_lsn)
        return applied

    def _apply(self, target: Ledger, batch: list[Transaction]) -> int:
        entries, events = [], []
        for txn in batch:
            for change in txn.changes:
                row = _row(change)
                stamp = {"committed_at": txn.committed_at, "lsn": txn.commit_lsn}
                if (change["schema"], change["table"]) == ("ledger", "entries"):
                    entries.append(row | stamp | {"metadata": _metadata(row["metadata"])})
                elif (change["schema"], change["table"]) == ("ledger", "reservations"):
                    event_at = row["created_at"] if row["status"] == "open" else row["ended_at"]
                    events.append({key: row[key] for key in (
                        "user_id", "reservation_id", "status", "amount", "committed_amount", "reason",
                        "expires_at")} | stamp | {"event_at": event_at})
        last = batch[-1]
        # An entry new to the history queues its notification as it lands
        # (audit._queue_notification), in this transaction.
        with target.transaction():
            for query, rows in ((queries.AUDIT_INSERT_ENTRY, entries),
                                (queries.AUDIT_INSERT_RESERVATION_EVENT, events)):
                if rows:
                    target.many(query, rows)
            target(_save_progress(self.slot, last.commit_lsn, last.committed_at))
        return len(entries) + len(events)

    def mark(self, text: str) -> str:
        """Write a transaction of no ledger change to the source's WAL (a logical
        message) and return its LSN: once the slot is confirmed past it, every
        ledger change the node committed before it is in the history."""
        source, _ = self._connections()
        return source(_mark(text))["lsn"]

    def confirmed_past(self, lsn: str) -> bool:
        """Whether the consumer has confirmed the slot past `lsn` (False when the
        slot does not exist)."""
        source, _ = self._connections()
        row = source(_confirmed_past(self.slot, lsn))
        return bool(row and row["confirmed"])

    def confirm(self, lsn: str) -> None:
        """Tell the slot these changes are safely in the history (after the commit)."""
        source, _ = self._connections()
        source(_confirm(self.slot, lsn))

    def lag(self) -> dict[str, Any] | None:
        """Bytes of WAL the slot holds, and the age of the oldest ledger commit
        not yet in the history (0 when none is pending): the slot is read on
        its node, the progress where the history is."""
        source, target = self._connections()
        row = source(_lag(self.slot))
        if row is None:
            return None
        if row["wal_status"] == "lost":
            return row | {"lag_seconds": None}  # nothing to peek; the next poll makes it again
        progress = target(_progress(self.slot)) or {"last_committed_at": None, "last_applied_at": None}
        rows = source(_peek(self.slot, 100))
        pending = next((txn for txn in transactions(rows) if txn.changes), None)
        return row | progress | {"lag_seconds": round(_age_seconds(pending.committed_at), 3) if pending else 0.0}


def _age_seconds(timestamp: str) -> float:
    """Seconds since a wal2json commit timestamp ('2026-11-28 17:08:03.04025+00')."""
    committed = datetime.fromisoformat(timestamp.replace(" ", "T", 1))
    if committed.utcoffset() is None:
        committed = committed.replace(tzinfo=timezone.utc)
    return max(0.0, (datetime.now(timezone.utc) - committed).total_seconds())


def discover(target: str, slot: str) -> list[Stream]:
    """One stream per node whose WAL carries ledger changes, each applied to
    `target` (the history's database, the coordinator under Citus, whose
    conninfo the nodes' share but for host and port). Without Citus, the target
    itself. Under Citus the coordinator keeps the slot name as given (so a
    single node that later grows keeps its slot) and node N's is `<slot>_node<N>`."""
    with Ledger.connect(target) as ledger:
        if not ledger(Call(queries.CITUS_INSTALLED))["citus"]:
            return [Stream(target, target, slot)]
        nodes = ledger(Call(queries.AUDIT_NODES, shape=Shape.MANY))
    return [Stream(node_conninfo(target, node["host"], node["port"]), target,
                   node_slot(slot, node["nodeid"], node["groupid"]))
            for node in nodes]


def node_conninfo(target: str, host: str, port: int) -> str:
    """A node's conninfo: the history's, but for host and port."""
    return make_conninfo(target, host=host, port=str(port))


def wait_applied(stream: Stream, note: str, timeout: float) -> str | None:
    """Mark the stream's source and wait (at most `timeout` s) for the consumer
    to confirm its slot past the mark: then everything the node committed
    before it is in the history. The mark's LSN, or None if it did not; no
    slot means nothing to wait for ("-"). Closes the stream."""
    try:
        if not stream.has_slot():
            return "-"
        mark = stream.mark(note)
        deadline = time.monotonic() + timeout
        while not stream.confirmed_past(mark):
            if time.monotonic() > deadline:
                return None
            time.sleep(0.2)
        return mark
    finally:
        stream.close()


def node_slot(slot: str, nodeid: int, groupid: int) -> str:
    """The slot's name on a Citus node (see `discover`)."""
    return slot if groupid == 0 else f"{slot}_node{nodeid}"


def run(streams: list[Stream], idle_sleep: float = 0.2, stop_after_idle: float | None = None,
        rediscover: Callable[[], list[Stream]] | None = None, rediscover_every: float = 10.0) -> None:
    """Poll every source in turn, forever (or until idle for `stop_after_idle` s).
    With `rediscover` (e.g. `lambda: discover(target, slot)`), the nodes are
    looked up again every `rediscover_every` s (at once when `streams` is
    empty): a new one gets its slot (and the backfill that covers whatever it
    held before) at its first poll, and one that left the cluster, or whose
    slot was dropped, is no longer read (`rewards cluster drain` removes a node
    only once its slot is confirmed to the end, then drops the slot). A
    database that cannot be reached, or that refuses a call for its time bound,
    is waited for (reconnect.Backoff), never a reason to exit: nothing is
    confirmed that was not written, so the next attempt picks up where the
    failed one stopped."""
    backoff = reconnect.Backoff("audit", log)
    idle_since = time.monotonic()
    measured_at = 0.0
    discovered_at = time.monotonic() if streams else float("-inf")
    while True:
        try:
            if rediscover is not None and time.monotonic() - discovered_at >= rediscover_every:
                known = {stream.slot for stream in streams}
                found = rediscover()
                for stream in found:
                    if stream.slot not in known:
                        streams.append(stream)
                        if known:
                            log.info("new node in the cluster", extra={"fields": {"slot": stream.slot}})
                current = {stream.slot for stream in found}
                for stream in [s for s in streams if s.slot not in current]:
                    _retire(streams, stream, "node left the cluster")
                discovered_at = time.monotonic()
            applied = 0
            for stream in list(streams):
                try:
                    applied += stream.poll()
                except NotFound:
                    # Its slot was dropped: the node was drained and removed,
                    # and everything it held was confirmed first.
                    _retire(streams, stream, "slot dropped")
            if time.monotonic() - measured_at >= 5:
                for stream in list(streams):
                    try:
                        lag = stream.lag()
                    except NotFound:
                        _retire(streams, stream, "slot dropped")
                        continue
                    if lag and lag["lag_seconds"] is not None:
                        metrics.LAG_BYTES.labels(stream.slot).set(lag["lag_bytes"])
                        metrics.LAG_SECONDS.labels(stream.slot).set(lag["lag_seconds"])
                measured_at = time.monotonic()
        except (Unavailable, Overloaded) as exc:
            for stream in streams:
                stream.close()  # its slot is looked at again at its next poll
            backoff.failed(exc)
            continue
        backoff.ok()
        if applied:
            idle_since = time.monotonic()
        elif stop_after_idle is not None and time.monotonic() - idle_since >= stop_after_idle:
            return
        else:
            time.sleep(idle_sleep)


def _retire(streams: list[Stream], stream: Stream, why: str) -> None:
    streams.remove(stream)
    stream.close()
    for gauge in (metrics.LAG_BYTES, metrics.LAG_SECONDS):
        try:
            gauge.remove(stream.slot)
        except KeyError:
            pass  # never measured
    log.info(f"no longer reading a node: {why}", extra={"fields": {"slot": stream.slot}})
