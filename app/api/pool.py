"""The API's connections: a pool to PgBouncer, wrapped in the ledger client."""

from __future__ import annotations

from psycopg_pool import AsyncConnectionPool

from app.settings import Settings


def make_pool(settings: Settings) -> AsyncConnectionPool:
    # Connections are not tried as they are handed out (that is a round trip
    # per request): one found dead by its call is replaced and the call run
    # again once by the ledger client (app.ledger.client.AsyncLedger).
    return AsyncConnectionPool(
        settings.bouncer_conninfo(),
        min_size=settings.pool_min,
        max_size=settings.pool_max,
        # A request waits at most this long for a connection, and only so many
        # wait at once: past either bound it is refused with 503, not queued.
        timeout=settings.pool_wait_seconds,
        max_waiting=settings.pool_max * 4,
        # PgBouncer 1.18 in transaction mode cannot keep protocol-level prepared
        # statements, so psycopg must never prepare one. Each call is its own
        # transaction: committed, and so durable, before the response is sent.
        # A connection attempt to PgBouncer that hangs is given up (libpq's
        # smallest bound), so the pool goes on trying rather than waiting.
        kwargs={"autocommit": True, "prepare_threshold": None, "connect_timeout": 2},
        open=False,
        name="rewards-api",
    )
