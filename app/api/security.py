"""Bearer API keys: who is calling, and what they may do."""

from __future__ import annotations

import time

from litestar.connection import ASGIConnection
from litestar.handlers import BaseRouteHandler
from litestar.middleware import AbstractAuthenticationMiddleware, AuthenticationResult

from app.api.problems import problem
from app.api.ratelimit import take_token
from app.ledger import calls, keys
from app.ledger.client import AsyncLedger
from app.ledger.results import ApiKey


class KeyCache:
    """Looked-up keys, trusted for `ttl` seconds so most requests skip the lookup.
    A revoked key therefore works for at most `ttl` more seconds."""

    _MAX_ENTRIES = 10_000

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._entries: dict[bytes, tuple[float, ApiKey | None]] = {}

    async def lookup(self, ledger: AsyncLedger, secret: str) -> ApiKey | None:
        digest = keys.secret_hash(secret)
        now = time.monotonic()
        cached = self._entries.get(digest)
        if cached and cached[0] > now:
            return cached[1]
        found = await ledger(calls.authenticate(digest))
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
        key = await state.key_cache.lookup(state.ledger, secret.strip())
        if key is None:
            raise problem("unauthorized", "unknown or revoked API key", headers={"WWW-Authenticate": "Bearer"})
        return AuthenticationResult(user=key, auth=key.key_id)


def _require_scope(connection: ASGIConnection, scope: str) -> None:
    if not connection.user.may(scope):
        raise problem("forbidden", f"this needs the {scope} scope")


# Guards are async although the scope check awaits nothing: Litestar runs a plain
# function guard in a worker thread. And each route has one guard, not a scope
# guard and a rate guard, because Litestar copies the handler for every guard.

def scope_required(scope: str):
    """A guard: the caller's key must carry `scope` (or admin)."""

    async def guard(connection: ASGIConnection, _: BaseRouteHandler) -> None:
        _require_scope(connection, scope)

    return guard


def scope_and_token(scope: str, bucket: str):
    """A guard: the key must carry `scope`, then the request takes a token from its
    `bucket` kind ("earn", "redeem" or "read"): one guard, for the reason above."""

    async def guard(connection: ASGIConnection, _: BaseRouteHandler) -> None:
        _require_scope(connection, scope)
        await take_token(connection, bucket)

    return guard
