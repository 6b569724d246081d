"""`rewards reconcile`: account by account, in batches small enough not to
stall live traffic, prove that balances, entries, chains and history agree."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


def _findings(user_ids: list[str]) -> Call[dict]:
    return Call(queries.RECONCILE, {"user_ids": user_ids}, shape=Shape.MANY)


def _repair_history(user_id: str) -> Call[dict]:
    return Call(queries.REPAIR_HISTORY, {"user_id": user_id})


def reconcile(conninfo: str, batch_size: int = 500, repair: bool = False, pause: float = 0.0,
              progress=None) -> Report:
    """Each batch is its own short transaction; `pause` seconds between batches
    leaves room for live traffic on a busy database."""
    report = Report()
    after = ""
    with Ledger.connect(conninfo) as ledger:
        total = ledger(_count_accounts())["accounts"]
        while True:
            users = [r["user_id"] for r in ledger(_accounts_after(after, batch_size))]
            if not users:
                break
            findings = ledger(_findings(users))
            if repair:
                for user_id in sorted({f["user_id"] for f in findings
                                       if f["finding"] == "entries_missing_from_history"}):
                    report.repaired[user_id] = ledger(_repair_history(user_id))["copied"]
            report.findings.extend(findings)
            report.accounts_checked += len(users)
            after = users[-1]
            if progress:
                progress(report.accounts_checked, total, len(report.findings))
            if pause:
                time.sleep(pause)
    return report


def summary(report: Report) -> str:
    data = report.as_json()
    lines = [f"checked {data['accounts_checked']} accounts in {data['seconds']} s: "
             + ("all agree" if not data["discrepancies"] else f"{data['discrepancies']} discrepancies")]
    for name, count in sorted(data["by_finding"].items()):
        lines.append(f"  {name}: {count}")
    for finding in report.findings[:20]:
        lines.append(f"  - {finding['user_id']}: {finding['finding']} {json.dumps(finding['detail'])}")
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
