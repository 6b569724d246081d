"""Bearer API keys: who is calling, and what they may do."""

from __future__ import annotations

import time
from dataclasses import dataclass

from litestar.connection import ASGIConnection
from litestar.handlers import BaseRouteHandler
from litestar.middleware import AbstractAuthenticationMiddleware, AuthenticationResult
from psycopg_pool import AsyncConnectionPool

from app import keys, queries
from app.api.database import fetch_one
from app.api.problems import problem
from app.api.ratelimit import take_token


@dataclass(frozen=True)
class Principal:
    key_id: int
    name: str
    scopes: frozenset[str]

    def may(self, scope: str) -> bool:
        return scope in self.scopes or "admin" in self.scopes


class KeyCache:
    """Looked-up keys, trusted for `ttl` seconds so most requests skip the lookup.
    A revoked key therefore works for at most `ttl` more seconds."""

    _MAX_ENTRIES = 10_000

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._entries: dict[bytes, tuple[float, Principal | None]] = {}

    async def principal(self, pool: AsyncConnectionPool, secret: str) -> Principal | None:
        digest = keys.secret_hash(secret)
        now = time.monotonic()
        cached = self._entries.get(digest)
        if cached and cached[0] > now:
            return cached[1]
        row = await fetch_one(pool, queries.AUTHENTICATE, {"secret_hash": digest})
        found = (Principal(row["key_id"], row["name"], frozenset(row["scopes"]))
                 if row["key_id"] is not None else None)
        if self.ttl > 0:
            if len(self._entries) >= self._MAX_ENTRIES:
                self._entries.clear()
            self._entries[digest] = (now + self.ttl, found)
        return found


class ApiKeyMiddleware(AbstractAuthenticationMiddleware):
    async def authenticate_request(self, connection: ASGIConnection) -> AuthenticationResult:
        scheme, _, secret = connection.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secret.startswith(keys.PREFIX):
            raise problem("unauthorized", "send Authorization: Bearer <API key>",
                          headers={"WWW-Authenticate": "Bearer"})
        state = connection.app.state
        principal = await state.key_cache.principal(state.pool, secret.strip())
        if principal is None:
            raise problem("unauthorized", "unknown or revoked API key", headers={"WWW-Authenticate": "Bearer"})
        return AuthenticationResult(user=principal, auth=principal.key_id)


def _require_scope(connection: ASGIConnection, scope: str) -> None:
    if not connection.user.may(scope):
        raise problem("forbidden", f"this needs the {scope} scope")


# Guards are async although the scope check awaits nothing: Litestar runs a plain
# function guard in a worker thread. And each route has one guard, not a scope
# guard and a rate guard, because Litestar copies the handler for every guard.

def requires(scope: str):
    """A guard: the caller's key must carry `scope` (or admin)."""

    async def guard(connection: ASGIConnection, _: BaseRouteHandler) -> None:
        _require_scope(connection, scope)

    return guard


def allowed(scope: str, bucket: str):
    """A guard: the key must carry `scope`, then the request takes a token from its
    `bucket` kind ("earn", "redeem" or "read")."""

    async def guard(connection: ASGIConnection, _: BaseRouteHandler) -> None:
        _require_scope(connection, scope)
        await take_token(connection, bucket)

    return guard
