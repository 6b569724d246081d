"""Bearer API keys: who is calling, and what they may do."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from litestar.connection import ASGIConnection
from litestar.handlers import BaseRouteHandler
from litestar.middleware import AbstractAuthenticationMiddleware, AuthenticationResult

from app.api.problems import problem
from app.api.ratelimit import take_lookup_token, take_token
from app.ledger import calls, keys
from app.ledger.results import ApiKey


class Miss:
    """Not in the cache: ask the database."""


MISS = Miss()


class KeyCache:
    """Looked-up keys, trusted for `ttl` seconds so most requests skip the lookup
    (a revoked key therefore works for at most `ttl` more seconds). Keys that
    exist and keys that do not are kept apart, each bounded: a flood of made-up
    keys can only push out other made-up keys, never a key in use."""

    MAX_ENTRIES = 10_000

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._known: dict[bytes, tuple[float, ApiKey]] = {}
        self._unknown: dict[bytes, float] = {}
        self._looking_up: dict[bytes, asyncio.Future[ApiKey | None]] = {}

    async def look_up(self, digest: bytes, fetch: Callable[[], Awaitable[ApiKey | None]]) -> ApiKey | None:
        """`fetch`'s answer, cached; requests for a key arriving while its lookup
        runs share it. A burst on a key this process has not seen yet (64
        connections opening at once) is one lookup and one lookup token, not one
        each: with a token each, 24 of bench/load.py's first 64 credits were 429s."""
        running = self._looking_up.get(digest)
        if running is None:
            running = asyncio.ensure_future(self._fetch_and_put(digest, fetch))
            self._looking_up[digest] = running
            running.add_done_callback(lambda done: self._settled(digest, done))
        # Shielded: a waiter that is cancelled leaves the lookup to the others.
        return await asyncio.shield(running)

    def _settled(self, digest: bytes, done: asyncio.Future[ApiKey | None]) -> None:
        self._looking_up.pop(digest, None)
        if not done.cancelled():
            done.exception()  # retrieved, should every waiter have gone: no "never retrieved" warning

    async def _fetch_and_put(self, digest: bytes, fetch: Callable[[], Awaitable[ApiKey | None]]) -> ApiKey | None:
        key = await fetch()
        self.put(digest, key)
        return key

    def get(self, digest: bytes) -> ApiKey | None | Miss:
        """The key, None for one known not to exist, or MISS when it must be looked up."""
        now = time.monotonic()
        if (known := self._known.get(digest)) and known[0] > now:
            return known[1]
        if self._unknown.get(digest, 0.0) > now:
            return None
        return MISS

    def was_known(self, digest: bytes) -> bool:
        """Whether this key existed when last looked up (its entry may be stale)."""
        return digest in self._known

    def put(self, digest: bytes, key: ApiKey | None) -> None:
        expires = time.monotonic() + self.ttl
        if key is None:
            self._known.pop(digest, None)  # revoked: it no longer refreshes without a token
            _bounded(self._unknown)[digest] = expires
        else:
            _bounded(self._known)[digest] = (expires, key)


def _bounded(entries: dict) -> dict:
    if len(entries) >= KeyCache.MAX_ENTRIES:
        entries.clear()
    return entries


def _authorization(connection: ASGIConnection) -> str:
    """The Authorization header, read from the raw ASGI headers (names come
    lowercased): building Litestar's Headers object for it took about a tenth
    of the API's CPU, in a typing isinstance check (py-spy, bench/RESULTS.md)."""
    for name, value in connection.scope["headers"]:
        if name == b"authorization":
            return value.decode("latin-1")
    return ""


class ApiKeyMiddleware(AbstractAuthenticationMiddleware):
    async def authenticate_request(self, connection: ASGIConnection) -> AuthenticationResult:
        scheme, _, secret = _authorization(connection).partition(" ")
        if scheme.lower() != "bearer" or not secret.startswith(keys.PREFIX):
            raise problem("unauthorized", "send Authorization: Bearer <API key>",
                          headers={"WWW-Authenticate": "Bearer"})
        state = connection.app.state
        digest = keys.secret_hash(secret.strip())
        key = state.key_cache.get(digest)
        if key is MISS:
            async def fetch() -> ApiKey | None:
                # A lookup costs a pool slot and a round trip: each client address
                # gets a bucket of them for keys never seen valid, so made-up keys
                # are refused before the database while a known key always refreshes.
                if not state.key_cache.was_known(digest):
                    await take_lookup_token(connection)
                return await state.ledger(calls.authenticate_v2(digest))

            key = await state.key_cache.look_up(digest, fetch)
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
