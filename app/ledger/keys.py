"""API keys: made here, stored in the database only as their SHA-256."""

from __future__ import annotations

import hashlib
import secrets

from app.ledger import calls
from app.ledger.client import Ledger
from app.ledger.errors import InvalidArgument
from app.ledger.limits import SCOPES
from app.ledger.results import ApiKey

PREFIX = "rlk_"


def secret_hash(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def parse_scopes(text: str) -> list[str]:
    """'points:earn,points:read' as a list, refusing scopes that do not exist."""
    scopes = [scope.strip() for scope in text.split(",") if scope.strip()]
    unknown = sorted(set(scopes) - set(SCOPES))
    if unknown or not scopes:
        raise InvalidArgument(f"unknown scopes {unknown}; choose from {', '.join(SCOPES)}", "scopes")
    return scopes


def create(ledger: Ledger, name: str, scopes: list[str]) -> tuple[ApiKey, str]:
    """Register a new key; the secret is returned once and never stored."""
    secret = PREFIX + secrets.token_urlsafe(32)
    return ledger(calls.create_key(name, secret_hash(secret), scopes)), secret
