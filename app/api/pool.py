"""The API's connections: a pool to PgBouncer, wrapped in the ledger client."""

from __future__ import annotations

import psycopg
from psycopg_pool import AsyncConnectionPool

from app.settings import Settings


def make_pool(settings: Settings) -> AsyncConnectionPool:
    async def check(conn: psycopg.AsyncConnection) -> None:
        """Each connection is tried (an empty query, one round trip) as it is
        handed out, so one dropped while it sat idle (PgBouncer or PostgreSQL
        restarted) is replaced rather than failing the request's call. One
        found broken means its idle neighbours are too: they are all tried at
        once, because psycopg_pool, meeting a second broken one in a row,
        would wait a second before the next, past the request's bound."""
        try:
            await AsyncConnectionPool.check_connection(conn)
        except psycopg.Error:
            await pool.check()
            raise

    pool = AsyncConnectionPool(
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
        check=check,
        open=False,
        name="rewards-api",
    )
    return pool
