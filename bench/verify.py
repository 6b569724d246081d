"""After a load run (bench/bank.py), what the database holds against what the
clients were told, account by account for the run's accounts:

- every acknowledged request has exactly one entry, under its key, with the id
  and the amount it was answered with; no entry exists that no acknowledged
  request made (a refusal, a lost request or a retry that took effect twice);
- every retried or replayed request came to one effect, the replay to the
  first answer (Run.problems() holds the answers, this the effects): a request
  refused as overloaded (503) and answered on a retry is no failure of the
  client's, but its effect is checked here as every retry's is;
- every balance equals the sum of its entries and what the acknowledged
  answers add up to, and none is below zero;
- the audit history holds every entry exactly once (waiting for the consumer);
- the reconciler (app/audit/reconcile.py) finds nothing in the whole database.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from app.audit import reconcile
from app.ledger.client import Call, Ledger, Shape
from app.ledger.queries import named
from bench.bank import Run

_QUERIES = named(Path(__file__).with_name("queries.sql"))
ENTRIES, ACCOUNTS, HISTORY = (_QUERIES[name] for name in ("bank_entries", "bank_accounts", "bank_history"))

# The entry kind each acknowledged operation writes.
KIND = {"credit": "credit", "debit": "debit", "reserve": "reserve", "commit": "commit"}


@dataclass
class Verdict:
    checks: dict[str, list[str]] = field(default_factory=dict)  # check -> its problems (none: it held)
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def problems(self) -> list[str]:
        return [f"{check}: {problem}" for check, problems in self.checks.items() for problem in problems]

    def lines(self) -> list[str]:
        return [f"{'ok  ' if not problems else 'FAIL'} {check}" + (f" ({len(problems)}: {problems[0]})"
                                                                  if problems else "")
                for check, problems in self.checks.items()]


def _first(problems: list[str], limit: int = 20) -> list[str]:
    return problems[:limit] + ([f"... and {len(problems) - limit} more"] if len(problems) > limit else [])


def verify(run: Run, conninfo: str, audit_wait: float = 60.0) -> Verdict:
    """`conninfo`: the superuser on the database the API wrote to (under Citus,
    the coordinator); the audit consumer must be running for it."""
    verdict = Verdict()
    with Ledger.connect(conninfo) as ledger:
        rows = ledger(Call(ENTRIES, {"users": run.users}, shape=Shape.MANY))
        accounts = {a["user_id"]: a for a in ledger(Call(ACCOUNTS, {"users": run.users}, shape=Shape.MANY))}
        history = _history(ledger, run.users, len(rows), audit_wait)
    originals = [r for r in run.requests if r.replay_of is None]
    acknowledged = [r for r in originals if r.acknowledged]
    by_key: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for row in rows:
        by_key[(row["user_id"], row["idempotency_key"])].append(row)
    verdict.counts = {"entries": len(rows), "acknowledged": len(acknowledged), "accounts": len(accounts),
                      "retried": sum(len(r.attempts) > 1 for r in run.requests),
                      "replayed": len(run.requests) - len(originals), "history": len(history),
                      "overloaded_then_answered": run.summary()["overloaded_then_answered"]}

    once = []
    for request in acknowledged:
        found = by_key.get((request.user, request.key), [])
        amount = request.body["amount"]
        if len(found) != 1:
            once.append(f"{request.op} {request.user} {request.key}: {len(found)} entries")
        elif (found[0]["entry_id"], found[0]["kind"], found[0]["amount"]) != (
                request.answer["entry_id"], KIND[request.op], amount):
            once.append(f"{request.op} {request.user} {request.key}: entry {found[0]} for answer {request.answer}")
    verdict.checks["every acknowledged request has its entry, once"] = _first(once)

    made = {(r.user, r.key) for r in acknowledged}
    stray = [f"{row['kind']} {row['user_id']} key {row['idempotency_key']} entry {row['entry_id']}"
             for row in rows if (row["user_id"], row["idempotency_key"]) not in made]
    verdict.checks["no entry without an acknowledgement"] = _first(stray)

    retried = [r for r in originals if len(r.attempts) > 1] + [run.requests[r.replay_of] for r in run.requests
                                                               if r.replay_of is not None]
    twice = [f"{r.op} {r.user} {r.key}: {len(by_key.get((r.user, r.key), []))} entries" for r in retried
             if len(by_key.get((r.user, r.key), [])) != (1 if r.acknowledged else 0)]
    verdict.checks["every retried or replayed request took effect once"] = _first(twice)

    verdict.checks["every balance equals its entries and the answers"] = _first(_balances(run, rows, accounts))
    verdict.checks["no balance below zero"] = _first(
        [f"{a['user_id']}: {a['available']} available, {a['reserved']} reserved" for a in accounts.values()
         if a["available"] < 0 or a["reserved"] < 0])

    ledger_ids, history_ids = Counter(row["entry_id"] for row in rows), Counter(history)
    verdict.checks["the audit history holds every entry once"] = _first(
        [f"entry {i}: {history_ids[i]} times in the history" for i in sorted(ledger_ids | history_ids)
         if history_ids[i] != 1 or i not in ledger_ids])

    report = reconcile.reconcile(conninfo)
    verdict.counts["reconciled_accounts"] = report.accounts_checked
    verdict.checks["the reconciler finds nothing"] = _first(
        [f"{f['user_id']}: {f['finding']} {f.get('detail')}" for f in report.findings])
    return verdict


def _history(ledger: Ledger, users: list[str], expected: int, wait: float) -> list[int]:
    """The history's entry ids for `users`, once the consumer has caught up (as
    many rows as the ledger has) or `wait` seconds have passed."""
    deadline = time.monotonic() + wait
    while True:
        ids = [row["entry_id"] for row in ledger(Call(HISTORY, {"users": users}, shape=Shape.MANY))]
        if len(ids) >= expected or time.monotonic() > deadline:
            return ids
        time.sleep(0.5)


def _balances(run: Run, rows: list[dict], accounts: dict[str, dict]) -> list[str]:
    """Each account against the sum of its entries, and against what the
    acknowledged answers add up to (order does not matter for a sum)."""
    summed: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for row in rows:
        sums = summed[row["user_id"]]
        sums[0] += row["available_delta"]
        sums[1] += row["reserved_delta"]
        sums[2] += 1
    told: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    holds = {r.answer["reservation_id"]: r.answer["amount"] for r in run.requests
             if r.op == "reserve" and r.acknowledged and r.replay_of is None}
    for r in run.requests:
        if r.replay_of is not None or not r.acknowledged:
            continue
        balance, amount = told[r.user], r.body["amount"]
        if r.op == "credit":
            balance[0] += amount
        elif r.op == "debit":
            balance[0] -= amount
        elif r.op == "reserve":
            balance[0] -= amount
            balance[1] += amount
        else:  # commit: the hold leaves reserved, what was not spent returns
            hold = holds[r.answer["reservation_id"]]
            balance[0] += hold - amount
            balance[1] -= hold
    found = []
    for user in sorted(set(accounts) | set(summed) | set(told)):
        account = accounts.get(user, {"available": 0, "reserved": 0, "last_seq": 0})
        held = (account["available"], account["reserved"])
        available, reserved, count = summed.get(user, [0, 0, 0])
        if held != (available, reserved) or account["last_seq"] != count:
            found.append(f"{user}: balance {held}, seq {account['last_seq']}; entries sum to "
                         f"{(available, reserved)} over {count}")
        if held != tuple(told.get(user, [0, 0])):
            found.append(f"{user}: balance {held}, the answers add up to {tuple(told.get(user, [0, 0]))}")
    return found
