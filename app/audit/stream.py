"""`rewards audit run`: the ledger's WAL, decoded by wal2json from a logical
replication slot, applied to the audit history.

Delivery from the slot is at least once; the history is exactly once because its
rows are keyed by the ledger's own ids (ON CONFLICT DO NOTHING). The order that
makes a crash harmless at any point: peek a batch of whole transactions, write
their rows and the progress row in one transaction, commit, and only then
confirm the LSN to the slot. Dying before the commit loses nothing (the slot
still holds the changes); dying between the commit and the confirmation only
replays rows that are already there.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime, timezone
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg.rows import dict_row

from app import queries
from app.audit import metrics

log = logging.getLogger("rewards.audit")

# Entry kinds the app's notification service hears about.
NOTIFIED_KINDS = frozenset({"credit", "debit", "commit", "expire"})


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


def _metadata(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


class Stream:
    """One source node's slot, applied to the history database."""

    def __init__(self, source: str, target: str, slot: str, batch_changes: int = 5000) -> None:
        self.source_conninfo = source
        self.target_conninfo = target
        self.slot = slot
        self.batch_changes = batch_changes
        self._source: psycopg.Connection | None = None
        self._target: psycopg.Connection | None = None

    def _connections(self) -> tuple[psycopg.Connection, psycopg.Connection]:
        if self._source is None or self._source.closed:
            self._source = psycopg.connect(self.source_conninfo, autocommit=True, row_factory=dict_row)
        if self._target is None or self._target.closed:
            self._target = psycopg.connect(self.target_conninfo, row_factory=dict_row)
        return self._source, self._target

    def close(self) -> None:
        for conn in (self._source, self._target):
            if conn is not None:
                conn.close()

    def ensure_slot(self) -> None:
        source, _ = self._connections()
        if not source.execute(queries.SLOT_EXISTS, {"slot": self.slot}).fetchone():
            source.execute(queries.CREATE_SLOT, {"slot": self.slot})
            # The slot sees only what commits from now on: copy what came before.
            copied = source.execute(queries.AUDIT_BACKFILL).fetchone()["entries"]
            log.info("created replication slot", extra={"fields": {"slot": self.slot, "backfilled": copied}})

    def drop_slot(self) -> None:
        source, _ = self._connections()
        if source.execute(queries.SLOT_EXISTS, {"slot": self.slot}).fetchone():
            source.execute(queries.DROP_SLOT, {"slot": self.slot})

    def poll(self) -> int:
        """Apply one batch; how many ledger rows it held (0 when caught up)."""
        source, target = self._connections()
        rows = source.execute(queries.PEEK_CHANGES, {"slot": self.slot, "max_changes": self.batch_changes}).fetchall()
        batch = list(transactions(rows))
        if not batch:
            return 0
        # A batch of transactions that touched no ledger table (this consumer's
        # own writes among them) is only confirmed: writing a progress row for
        # it would make the next poll's work.
        applied = self._apply(target, batch) if any(txn.changes for txn in batch) else 0
        self.confirm(batch[-1].commit_lsn)
        return applied

    def _apply(self, target: psycopg.Connection, batch: list[Transaction]) -> int:
        entries, events, notifications = [], [], []
        for txn in batch:
            for change in txn.changes:
                row = _row(change)
                stamp = {"committed_at": txn.committed_at, "lsn": txn.commit_lsn}
                if change["table"] == "entries":
                    entries.append(row | stamp | {"metadata": _metadata(row["metadata"])})
                    if row["kind"] in NOTIFIED_KINDS:
                        notifications.append(_notification(row))
                elif change["table"] == "reservations":
                    event_at = row["created_at"] if row["status"] == "open" else row["ended_at"]
                    events.append({key: row[key] for key in (
                        "user_id", "reservation_id", "status", "amount", "committed_amount", "reason",
                        "expires_at")} | stamp | {"event_at": event_at})
        last = batch[-1]
        with target.transaction():
            with target.cursor() as cursor:
                if entries:
                    cursor.executemany(queries.AUDIT_INSERT_ENTRY, entries)
                if events:
                    cursor.executemany(queries.AUDIT_INSERT_RESERVATION_EVENT, events)
                if notifications:
                    cursor.executemany(queries.AUDIT_INSERT_NOTIFICATION, notifications)
                cursor.execute(queries.AUDIT_SAVE_PROGRESS, {
                    "slot": self.slot, "lsn": last.commit_lsn, "committed_at": last.committed_at})
        return len(entries) + len(events)

    def confirm(self, lsn: str) -> None:
        """Tell the slot these changes are safely in the history (after the commit)."""
        source, _ = self._connections()
        source.execute(queries.CONFIRM_CHANGES, {"slot": self.slot, "lsn": lsn})

    def lag(self) -> dict[str, Any] | None:
        """Bytes of WAL the slot holds, and the age of the oldest ledger commit
        not yet in the history (0 when none is pending)."""
        source, _ = self._connections()
        row = source.execute(queries.AUDIT_LAG, {"slot": self.slot}).fetchone()
        if row is None:
            return None
        rows = source.execute(queries.PEEK_CHANGES, {"slot": self.slot, "max_changes": 100}).fetchall()
        pending = next((txn for txn in transactions(rows) if txn.changes), None)
        return row | {"lag_seconds": round(_age_seconds(pending.committed_at), 3) if pending else 0.0}


def _age_seconds(timestamp: str) -> float:
    """Seconds since a wal2json commit timestamp ('2026-11-28 17:08:03.04025+00')."""
    committed = datetime.fromisoformat(timestamp.replace(" ", "T", 1))
    if committed.utcoffset() is None:
        committed = committed.replace(tzinfo=timezone.utc)
    return max(0.0, (datetime.now(timezone.utc) - committed).total_seconds())


def _notification(entry: dict[str, Any]) -> dict[str, Any]:
    payload = {
        "id": f"{entry['user_id']}:{entry['entry_id']}",  # the receiver dedupes on this
        "type": f"points.{entry['kind']}",
        "user_id": entry["user_id"],
        "entry_id": entry["entry_id"],
        "amount": entry["amount"],
        "balance": {"available": entry["available_after"], "reserved": entry["reserved_after"]},
        "reservation_id": entry["reservation_id"],
        "created_at": entry["created_at"],
    }
    return {"user_id": entry["user_id"], "entry_id": entry["entry_id"], "kind": entry["kind"],
            "payload": json.dumps(payload)}


def run(streams: list[Stream], idle_sleep: float = 0.2, stop_after_idle: float | None = None) -> None:
    """Poll every source in turn, forever (or until idle for `stop_after_idle` s)."""
    for stream in streams:
        stream.ensure_slot()
    idle_since = time.monotonic()
    measured_at = 0.0
    while True:
        if time.monotonic() - measured_at >= 5:
            for stream in streams:
                lag = stream.lag()
                if lag:
                    metrics.LAG_BYTES.labels(stream.slot).set(lag["lag_bytes"])
                    metrics.LAG_SECONDS.labels(stream.slot).set(lag["lag_seconds"])
            measured_at = time.monotonic()
        applied = 0
        for stream in streams:
            try:
                applied += stream.poll()
            except psycopg.OperationalError as exc:
                log.warning("stream interrupted, retrying", extra={"fields": {"slot": stream.slot, "error": str(exc)}})
                stream.close()
                time.sleep(1)
        if applied:
            idle_since = time.monotonic()
        elif stop_after_idle is not None and time.monotonic() - idle_since >= stop_after_idle:
            return
        else:
            time.sleep(idle_sleep)
