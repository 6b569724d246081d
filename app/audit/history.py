"""The audit history's partitions: how long pg_partman keeps them."""

from __future__ import annotations

from app.ledger import queries
from app.ledger.client import Call, Shape


def retention() -> Call[dict]:
    """Each history table with its retention (None: kept forever)."""
    return Call(queries.AUDIT_RETENTION, shape=Shape.MANY)


def set_retention(keep: str | None) -> Call[dict]:
    """Drop monthly partitions older than `keep` (an interval), or keep every one (None)."""
    return Call(queries.AUDIT_SET_RETENTION, {"retention": keep}, shape=Shape.NONE)
