"""The audit history's monthly partitions: how long they are kept
(audit.apply_history_retention drops the older ones, pg_cron hourly)."""

from __future__ import annotations

from app.ledger import queries
from app.ledger.client import Call, Shape


def retention() -> Call[dict]:
    """The history's retention (None: kept forever) and its horizon (since
    when it holds every entry)."""
    return Call(queries.AUDIT_RETENTION)


def set_retention(keep: str | None) -> Call[dict]:
    """Drop monthly partitions older than `keep` (an interval), or keep every one (None)."""
    return Call(queries.AUDIT_SET_RETENTION, {"retention": keep}, shape=Shape.NONE)
