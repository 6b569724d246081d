"""`rewards reconcile`: account by account, in batches small enough not to
stall live traffic, prove that balances, entries, chains and history agree.

The history trails the ledger by whatever the stream has not applied yet, so
an entry missing from it is only a finding once the stream is shown to have
passed it: for the accounts a batch finds short, the reconciler reads their
last seqs, marks every node's WAL after that read (audit.stream_barrier),
waits until each of the audit consumer's slots (`slot`, named per node as
`rewards audit run` names them, the nodes looked up after each mark so that
one added during the run is waited on too) has confirmed past its node's mark,
and checks them again requiring only the entries up to those seqs. A stream
that does not get there in `stream_wait` seconds is itself the finding
(`stream_behind`), and from then on the run does not wait again.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.audit import stream
from app.ledger import queries
from app.ledger.client import Call, Ledger, Shape


@dataclass
class Report:
    accounts_checked: int = 0
    findings: list[dict[str, Any]] = field(default_factory=list)
    repaired: dict[str, int] = field(default_factory=dict)
    started_at: float = field(default_factory=time.time)

    def as_json(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for finding in self.findings:
            counts[finding["finding"]] = counts.get(finding["finding"], 0) + 1
        return {"accounts_checked": self.accounts_checked, "discrepancies": len(self.findings),
                "by_finding": counts, "findings": self.findings, "repaired_history_rows": self.repaired,
                "seconds": round(time.time() - self.started_at, 3)}


def _count_accounts() -> Call[dict]:
    return Call(queries.COUNT_ACCOUNTS)


def _accounts_after(after: str, limit: int) -> Call[dict]:
    return Call(queries.RECONCILE_ACCOUNTS_AFTER, {"after": after, "limit": limit}, shape=Shape.MANY)


def _findings(user_ids: list[str], confirmed_seqs: list[int] | None = None) -> Call[dict]:
    return Call(queries.RECONCILE, {"user_ids": user_ids, "confirmed_seqs": confirmed_seqs}, shape=Shape.MANY)


def _last_seqs(user_ids: list[str]) -> Call[dict]:
    return Call(queries.RECONCILE_LAST_SEQS, {"user_ids": user_ids}, shape=Shape.MANY)


def _barrier() -> Call[dict]:
    return Call(queries.STREAM_BARRIER)


def _behind(marks: dict[str, str], slots: list[str]) -> Call[dict]:
    return Call(queries.STREAM_BEHIND, {"marks": json.dumps(marks), "slots": slots}, shape=Shape.MANY)


MISSING = "entries_missing_from_history"


class _Confirmation:
    """Waits for the stream to deliver what a batch found missing; once it
    has failed to, says so once and stops waiting."""

    def __init__(self, ledger: Ledger, conninfo: str, slot: str, wait: float) -> None:
        self.ledger, self.conninfo, self.slot, self.wait = ledger, conninfo, slot, wait
        self.stalled: list[dict[str, Any]] | None = None

    def confirmed_seqs(self, user_ids: list[str]) -> list[int] | None:
        """Each account's seq up to which the history must hold its entries now,
        or None when the stream could not be shown to have got there."""
        if self.stalled is not None:
            return None
        seqs = {row["user_id"]: row["last_seq"] for row in self.ledger(_last_seqs(user_ids))}
        marks = self.ledger(_barrier())["marks"]
        # After the mark: every node it marked is in the cluster by now, so a
        # node that joined since the run began has its slot in the list.
        slots = [node.slot for node in stream.discover(self.conninfo, self.slot)]
        deadline = time.monotonic() + self.wait
        while behind := self.ledger(_behind(marks, slots)):
            if time.monotonic() >= deadline:
                self.stalled = behind
                return None
            time.sleep(0.05)
        return [seqs.get(user_id, 0) for user_id in user_ids]


def _repair_history(user_id: str) -> Call[dict]:
    return Call(queries.REPAIR_HISTORY, {"user_id": user_id})


def reconcile(conninfo: str, batch_size: int = 500, repair: bool = False, pause: float = 0.0,
              progress=None, stream_wait: float = 30.0, slot: str = stream.DEFAULT_SLOT) -> Report:
    """Each batch is its own short transaction; `pause` seconds between batches
    leaves room for live traffic on a busy database."""
    report = Report()
    after = ""
    with Ledger.connect(conninfo) as ledger:
        confirmation = _Confirmation(ledger, conninfo, slot, stream_wait)
        total = ledger(_count_accounts())["accounts"]
        while True:
            users = [r["user_id"] for r in ledger(_accounts_after(after, batch_size))]
            if not users:
                break
            findings = ledger(_findings(users))
            short = sorted({f["user_id"] for f in findings if f["finding"] == MISSING})
            if short:
                seqs = confirmation.confirmed_seqs(short)
                # Again, for those accounts, with only what the stream has confirmed
                # required (nothing, when it could not be shown to have got anywhere).
                again = ledger(_findings(short, seqs if seqs is not None else [0] * len(short)))
                position = {user_id: i for i, user_id in enumerate(users)}
                findings = sorted([f for f in findings if f["user_id"] not in short] + again,
                                  key=lambda f: position[f["user_id"]])
            if repair:
                for user_id in sorted({f["user_id"] for f in findings if f["finding"] == MISSING}):
                    report.repaired[user_id] = ledger(_repair_history(user_id))["copied"]
            report.findings.extend(findings)
            report.accounts_checked += len(users)
            after = users[-1]
            if progress:
                progress(report.accounts_checked, total, len(report.findings))
            if pause:
                time.sleep(pause)
    for slot in confirmation.stalled or []:
        report.findings.append({"user_id": None, "finding": "stream_behind", "detail": slot})
    return report


def summary(report: Report) -> str:
    data = report.as_json()
    lines = [f"checked {data['accounts_checked']} accounts in {data['seconds']} s: "
             + ("all agree" if not data["discrepancies"] else f"{data['discrepancies']} discrepancies")]
    for name, count in sorted(data["by_finding"].items()):
        lines.append(f"  {name}: {count}")
    for finding in report.findings[:20]:
        lines.append(f"  - {finding['user_id'] or 'the stream'}: {finding['finding']} "
                     f"{json.dumps(finding['detail'])}")
    if len(report.findings) > 20:
        lines.append(f"  ... and {len(report.findings) - 20} more in the JSON report")
    if report.repaired:
        lines.append(f"repaired: copied {sum(report.repaired.values())} history rows for "
                     f"{len(report.repaired)} accounts from the ledger (run again to confirm)")
    return "\n".join(lines)


def write_report(report: Report, path: Path) -> None:
    path.write_text(json.dumps(report.as_json(), indent=2, default=str) + "\n")


def print_progress(done: int, total: int, found: int) -> None:
    print(f"\r{done}/{total} accounts, {found} discrepancies", end="", file=sys.stderr, flush=True)
