"""API keys: made here, stored in the database only as their SHA-256."""

from __future__ import annotations

import hashlib
import secrets
from typing import Any

import psycopg

from app import queries

SCOPES = ("points:earn", "points:redeem", "points:read", "admin")
PREFIX = "rlk_"


def secret_hash(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def create(conn: psycopg.Connection, name: str, scopes: list[str]) -> tuple[dict[str, Any], str]:
    """Register a new key; the secret is returned once and never stored."""
    secret = PREFIX + secrets.token_urlsafe(32)
    info = conn.execute(queries.CREATE_KEY, {"name": name, "secret_hash": secret_hash(secret),
                                             "scopes": scopes}).fetchone()
    return info, secret


def list_all(conn: psycopg.Connection) -> list[dict[str, Any]]:
    return conn.execute(queries.LIST_KEYS).fetchall()


def revoke(conn: psycopg.Connection, key_id: int) -> dict[str, Any] | None:
    info = conn.execute(queries.REVOKE_KEY, {"key_id": key_id}).fetchone()
    return info if info["key_id"] is not None else None
