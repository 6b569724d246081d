"""Small helpers the tests share: the ledger's operations through the project's
own client (app.ledger), and reads of its tables.

Answers come back as dicts (dataclasses.asdict of the client's typed results),
so a test can compare a whole answer with another in one assertion.
"""

from __future__ import annotations

import re
import uuid
from datetime import timedelta
from dataclasses import asdict
from typing import Any

import psycopg

from app.ledger import calls
from app.ledger.client import Ledger


def credit(conn: psycopg.Connection, user: str, key: str, amount: int | None, reason: str = "ad view",
           source: str | None = None, external_id: str | None = None,
           metadata: dict[str, Any] | None = None, pending: int | None = None,
           expiry: int | None = None) -> dict[str, Any]:
    return asdict(Ledger(conn)(calls.credit(user, key, amount, reason, source, external_id, metadata,
                                            pending, expiry)))


def credit_many(conn: psycopg.Connection, items: list[calls.Credit],
                shard_user: str | None = None) -> list[dict[str, Any]]:
    """One call over many credits; `shard_user` defaults to the first item's user."""
    return [asdict(row) for row in Ledger(conn)(calls.credit_many(shard_user or items[0].user_id, items))]


def debit(conn: psycopg.Connection, user: str, key: str, amount: int, reason: str = "gift card") -> dict[str, Any]:
    return asdict(Ledger(conn)(calls.debit(user, key, amount, reason)))


def reserve(conn: psycopg.Connection, user: str, key: str, amount: int, ttl: int = 300,
            reason: str = "voucher") -> dict[str, Any]:
    return asdict(Ledger(conn)(calls.reserve(user, key, amount, ttl, reason)))


def commit(conn: psycopg.Connection, user: str, key: str, reservation_id: int,
           amount: int | None = None) -> dict[str, Any]:
    return asdict(Ledger(conn)(calls.commit_reservation(user, key, reservation_id, amount)))


def release(conn: psycopg.Connection, user: str, key: str, reservation_id: int) -> dict[str, Any]:
    return asdict(Ledger(conn)(calls.release_reservation(user, key, reservation_id)))


def balance(conn: psycopg.Connection, user: str) -> dict[str, Any]:
    return asdict(Ledger(conn)(calls.balance(user)))


def entries(conn: psycopg.Connection, user: str) -> list[dict[str, Any]]:
    return conn.execute("SELECT * FROM ledger.entries WHERE user_id = %s ORDER BY seq", (user,)).fetchall()


def age_lots(conn: psycopg.Connection, user: str, seconds: int) -> None:
    """Move a user's lots `seconds` into the past, as if that much time went by.
    The new times are computed here and sent as values: Citus refuses a
    distributed UPDATE computing timestamps from columns (a STABLE operator)."""
    shift = timedelta(seconds=seconds)
    for lot in conn.execute("SELECT lot_id, created_at, available_at, expires_at FROM ledger.lots"
                            " WHERE user_id = %s", (user,)).fetchall():
        conn.execute("UPDATE ledger.lots SET created_at = %s, available_at = %s, expires_at = %s"
                     " WHERE user_id = %s AND lot_id = %s",
                     (lot["created_at"] - shift, lot["available_at"] - shift,
                      lot["expires_at"] and lot["expires_at"] - shift, user, lot["lot_id"]))


def row_counts(conn: psycopg.Connection) -> dict[str, int]:
    """How many rows each ledger table holds: a refusal must change none of them."""
    return conn.execute(
        """SELECT (SELECT count(*) FROM ledger.accounts) AS accounts,
                  (SELECT count(*) FROM ledger.entries) AS entries,
                  (SELECT count(*) FROM ledger.reservations) AS reservations,
                  (SELECT count(*) FROM ledger.idempotency_keys) AS idempotency_keys"""
    ).fetchone()


def unreconciled_accounts(conn: psycopg.Connection) -> list[dict[str, Any]]:
    """Accounts whose balance differs from the sum of their entries and open holds."""
    return conn.execute(
        """SELECT a.user_id, a.available, a.reserved, s.available AS ledger_available,
                  s.reserved AS ledger_reserved, h.held
           FROM ledger.accounts a
           LEFT JOIN LATERAL (
               SELECT coalesce(sum(available_delta), 0) AS available,
                      coalesce(sum(reserved_delta), 0) AS reserved,
                      coalesce(sum(amount) FILTER (WHERE kind = 'credit'), 0) AS earned,
                      coalesce(sum(amount - available_delta) FILTER (WHERE kind = 'credit'), 0)
                      - coalesce(sum(amount) FILTER (WHERE kind IN ('mature', 'cancel')), 0) AS pending,
                      coalesce(sum(amount) FILTER (WHERE kind = 'owed'), 0)
                      - coalesce(sum(amount) FILTER (WHERE kind = 'repay'), 0) AS owed,
                      coalesce(max(seq), 0) AS last_seq
               FROM ledger.entries e WHERE e.user_id = a.user_id) s ON true
           LEFT JOIN LATERAL (
               SELECT coalesce(sum(amount), 0) AS held
               FROM ledger.reservations r WHERE r.user_id = a.user_id AND r.status = 'open') h ON true
           WHERE (a.available, a.reserved, a.lifetime_earned, a.last_seq, a.pending, a.owed)
                 IS DISTINCT FROM (s.available, s.reserved, s.earned, s.last_seq, s.pending, s.owed)
              OR a.reserved <> h.held"""
    ).fetchall()


def tamper(conn: psycopg.Connection, sql: str, params: tuple = ()) -> None:
    """Change rows as an attacker with superuser rights would: triggers off (on
    every node: Citus carries SET LOCAL to the workers when told to)."""
    with conn.transaction():
        conn.execute("SET LOCAL citus.propagate_set_commands = 'local'")
        conn.execute("SET LOCAL session_replication_role = replica")
        conn.execute(sql, params)


def violated_constraint(error: psycopg.errors.CheckViolation) -> str | None:
    """The constraint a check violation names. Citus, relaying a worker's error,
    keeps its message but not its fields, so the message is the fallback."""
    found = re.search(r'constraint "([^"]+)"', error.diag.message_primary or "")
    return error.diag.constraint_name or (found.group(1) if found else None)


def users_of_one_shard(conn: psycopg.Connection, count: int) -> list[str]:
    """`count` fresh users Citus keeps in one shard (any fresh users on a single node)."""
    prefix = uuid.uuid4().hex[:8]
    if not conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'citus'").fetchone():
        return [f"{prefix}-{i}" for i in range(count)]
    candidates = [f"{prefix}-{i}" for i in range(count * 200)]
    rows = conn.execute(
        "SELECT u, get_shard_id_for_distribution_column('ledger.accounts', u) AS shard FROM unnest(%s::text[]) u",
        (candidates,)).fetchall()
    found = [r["u"] for r in rows if r["shard"] == rows[0]["shard"]][:count]
    assert len(found) == count
    return found
