"""`rewards notify run`: deliver the outbox (audit.notifications) to the app's
notification service. At least once: a notification is marked delivered only
after a 2xx, and each carries an id (payload "id", header
X-Rewards-Notification-Id) for the receiver to drop repeats. Signed with
HMAC-SHA256 over "<timestamp>.<body>" in X-Rewards-Signature (app.signatures).
Failures retry with exponential backoff and full jitter, and after
`max_attempts` the notification is parked as 'dead' until `rewards notify resend`.

The outbox is filled by the audit stream, never by a ledger write, so a slow or
failing receiver cannot delay a credit."""

from __future__ import annotations

import json
import logging
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx

from app import signatures
from app.audit import reconnect
from app.ledger import queries
from app.ledger.client import Call, Ledger, Shape
from app.ledger.errors import Overloaded, Unavailable

log = logging.getLogger("rewards.notify")


def claim(limit: int, lease_seconds: float) -> Call[dict]:
    """Due notifications, leased for `lease_seconds` so no two senders take one."""
    return Call(queries.NOTIFICATIONS_CLAIM, {"limit": limit, "lease_seconds": lease_seconds}, shape=Shape.MANY)


def delivered(notification_id: int) -> Call[dict]:
    return Call(queries.NOTIFICATION_DELIVERED, {"notification_id": notification_id}, shape=Shape.NONE)


def failed(notification_id: int, error: str, max_attempts: int, retry_in_seconds: float) -> Call[dict]:
    """Record a failed delivery; the row answers its new status ('pending' or 'dead')."""
    return Call(queries.NOTIFICATION_FAILED, {
        "notification_id": notification_id, "error": error, "max_attempts": max_attempts,
        "retry_in_seconds": retry_in_seconds})


def dead() -> Call[dict]:
    return Call(queries.NOTIFICATIONS_DEAD, shape=Shape.MANY)


def resend(notification_id: int) -> Call[dict]:
    """Queue a dead notification again; None when it is not a dead one."""
    return Call(queries.NOTIFICATION_RESEND, {"notification_id": notification_id}, shape=Shape.MAYBE)


def retention() -> Call[dict]:
    """How long a delivered notification is kept (audit.settings)."""
    return Call(queries.NOTIFICATION_RETENTION)


def check_retention(keep: str) -> Call[dict]:
    """Raises InvalidArgument unless `keep` is a positive interval."""
    return Call(queries.CHECK_NOTIFICATION_RETENTION, {"retention": keep}, shape=Shape.NONE)


def set_retention(keep: str) -> Call[dict]:
    """Keep delivered notifications for `keep` (check_retention first)."""
    return Call(queries.SET_NOTIFICATION_RETENTION, {"retention": keep}, shape=Shape.NONE)


@dataclass
class Sender:
    conninfo: str
    url: str
    secret: str
    max_attempts: int = 8
    base_delay: float = 1.0
    max_delay: float = 600.0
    timeout: float = 5.0
    batch: int = 32

    def backoff(self, attempts: int) -> float:
        """Full jitter: uniform up to base * 2^attempts, capped."""
        return random.uniform(0, min(self.max_delay, self.base_delay * 2 ** attempts))

    def _deliver(self, http: httpx.Client, notification: dict[str, Any]) -> str | None:
        """None when delivered, else what went wrong."""
        body = json.dumps(notification["payload"], separators=(",", ":")).encode()
        headers = {
            "Content-Type": "application/json",
            "X-Rewards-Notification-Id": notification["payload"]["id"],
            signatures.HEADER: signatures.sign(self.secret, int(time.time()), body),
        }
        try:
            response = http.post(self.url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}"[:500]
        return None if 200 <= response.status_code < 300 else f"HTTP {response.status_code}"

    def run_once(self, ledger: Ledger, http: httpx.Client) -> int:
        """Claim a batch (a lease, so a slow receiver holds no row lock), send it
        in parallel, record each outcome. How many were claimed."""
        due = ledger(claim(self.batch, lease_seconds=self.timeout * 2 + 5))
        if not due:
            return 0
        with ThreadPoolExecutor(max_workers=min(len(due), 16)) as pool:
            outcomes = list(pool.map(lambda n: self._deliver(http, n), due))
        for notification, error in zip(due, outcomes, strict=True):
            if error is None:
                ledger(delivered(notification["notification_id"]))
                continue
            status = ledger(failed(notification["notification_id"], error, self.max_attempts,
                                   self.backoff(notification["attempts"] + 1)))["status"]
            if status == "dead":
                log.warning("notification parked after repeated failures", extra={"fields": {
                    "notification_id": notification["notification_id"], "error": error}})
        return len(due)

    def run(self, idle_sleep: float = 0.5, stop_after_idle: float | None = None) -> None:
        """Deliver forever (or until idle for `stop_after_idle` s). A database
        that cannot be reached is waited for, never a reason to exit: a claim
        lost with the connection is only a lease, which expires, and a delivery
        whose outcome was not recorded is sent again (the receiver drops the
        repeat by its id)."""
        backoff = reconnect.Backoff("notify", log)
        idle_since = time.monotonic()
        ledger: Ledger | None = None
        with httpx.Client(timeout=self.timeout) as http:
            while True:
                try:
                    if ledger is None or ledger.closed:
                        ledger = Ledger.open(self.conninfo)
                    claimed = self.run_once(ledger, http)
                except (Unavailable, Overloaded) as exc:
                    if ledger is not None:
                        ledger.close()
                    backoff.failed(exc)
                    continue
                backoff.ok()
                if claimed:
                    idle_since = time.monotonic()
                elif stop_after_idle is not None and time.monotonic() - idle_since >= stop_after_idle:
                    ledger.close()
                    return
                else:
                    time.sleep(idle_sleep)
