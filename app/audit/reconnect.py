"""How the long-running consumers (`rewards audit run`, `rewards notify run`)
live through a database that goes away: they never exit for it, they wait a
bounded, jittered while and try again, and say so in their logs and metrics."""

from __future__ import annotations

import logging
import random
import time

from prometheus_client import Counter, Gauge

RECONNECTS = Counter("rewards_database_reconnects_total",
                     "Times a consumer lost the database and waited to try again", ["process"])
CONNECTED = Gauge("rewards_database_connected", "1 while a consumer's last database call succeeded, else 0",
                  ["process"])


class Backoff:
    """Waits after each failure in a row: up to `base` * 2^failures seconds
    (at most `cap`), drawn at random so consumers that lost one database do not
    all come back at the same instant; `ok()` starts the count again."""

    def __init__(self, process: str, log: logging.Logger, base: float = 0.5, cap: float = 15.0) -> None:
        self.process, self.log, self.base, self.cap = process, log, base, cap
        self.failures = 0
        CONNECTED.labels(process).set(1)

    def failed(self, error: Exception) -> None:
        """Log the failure, count it, and wait before the next attempt."""
        delay = random.uniform(self.base / 2, min(self.cap, self.base * 2 ** self.failures))
        self.failures += 1
        CONNECTED.labels(self.process).set(0)
        RECONNECTS.labels(self.process).inc()
        self.log.warning("lost the database, trying again", extra={"fields": {
            "error": str(error), "attempt": self.failures, "retry_in_seconds": round(delay, 2)}})
        time.sleep(delay)

    def ok(self) -> None:
        if self.failures:
            self.log.info("database reachable again", extra={"fields": {"after_attempts": self.failures}})
            self.failures = 0
        CONNECTED.labels(self.process).set(1)
