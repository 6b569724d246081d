"""Small helpers the tests share: calling the ledger's functions and reading its tables."""

from __future__ import annotations

import json
from typing import Any

import psycopg

CREDIT = "SELECT * FROM ledger.credit(%s, %s, %s, %s, %s, %s, %s)"
DEBIT = "SELECT * FROM ledger.debit(%s, %s, %s, %s, %s)"
RESERVE = "SELECT * FROM ledger.reserve(%s, %s, %s, %s, %s, %s)"
COMMIT = "SELECT * FROM ledger.commit_reservation(%s, %s, %s, %s)"
RELEASE = "SELECT * FROM ledger.release_reservation(%s, %s, %s)"
BALANCE = "SELECT * FROM ledger.balance(%s)"


def credit(conn: psycopg.Connection, user: str, key: str, amount: int | None, reason: str = "ad view",
           source: str | None = None, external_id: str | None = None,
           metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    meta = json.dumps(metadata if metadata is not None else {})
    return conn.execute(CREDIT, (user, key, amount, reason, source, external_id, meta)).fetchone()


def debit(conn: psycopg.Connection, user: str, key: str, amount: int, reason: str = "gift card") -> dict[str, Any]:
    return conn.execute(DEBIT, (user, key, amount, reason, "{}")).fetchone()


def reserve(conn: psycopg.Connection, user: str, key: str, amount: int, ttl: int = 300,
            reason: str = "voucher") -> dict[str, Any]:
    return conn.execute(RESERVE, (user, key, amount, ttl, reason, "{}")).fetchone()


def commit(conn: psycopg.Connection, user: str, key: str, reservation_id: int,
           amount: int | None = None) -> dict[str, Any]:
    return conn.execute(COMMIT, (user, key, reservation_id, amount)).fetchone()


def release(conn: psycopg.Connection, user: str, key: str, reservation_id: int) -> dict[str, Any]:
    return conn.execute(RELEASE, (user, key, reservation_id)).fetchone()


def balance(conn: psycopg.Connection, user: str) -> dict[str, Any]:
    return conn.execute(BALANCE, (user,)).fetchone()


def entries(conn: psycopg.Connection, user: str) -> list[dict[str, Any]]:
    return conn.execute("SELECT * FROM ledger.entries WHERE user_id = %s ORDER BY seq", (user,)).fetchall()


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
                      coalesce(max(seq), 0) AS last_seq
               FROM ledger.entries e WHERE e.user_id = a.user_id) s ON true
           LEFT JOIN LATERAL (
               SELECT coalesce(sum(amount), 0) AS held
               FROM ledger.reservations r WHERE r.user_id = a.user_id AND r.status = 'open') h ON true
           WHERE (a.available, a.reserved, a.lifetime_earned, a.version)
                 IS DISTINCT FROM (s.available, s.reserved, s.earned, s.last_seq)
              OR a.reserved <> h.held"""
    ).fetchall()


def tamper(conn: psycopg.Connection, sql: str, params: tuple = ()) -> None:
    """Change rows as an attacker with superuser rights would: triggers off."""
    with conn.transaction():
        conn.execute("SET LOCAL session_replication_role = replica")
        conn.execute(sql, params)
