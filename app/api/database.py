"""The connection pool to PgBouncer, and the one way handlers call the database."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout, TooManyRequests

from app.api.problems import problem
from app.settings import Settings


def make_pool(settings: Settings) -> AsyncConnectionPool:
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
        kwargs={"autocommit": True, "prepare_threshold": None, "row_factory": dict_row},
        open=False,
        name="rewards-api",
    )


async def fetch_one(pool: AsyncConnectionPool, query: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    rows = await fetch_all(pool, query, params)
    return rows[0]


async def fetch_all(pool: AsyncConnectionPool, query: str,
                    params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    try:
        async with pool.connection() as conn:
            cursor = await conn.execute(query, params)
            return await cursor.fetchall()
    except (PoolTimeout, TooManyRequests) as exc:
        raise problem("overloaded", "no database connection came free in time",
                      headers={"Retry-After": "1"}) from exc
    except psycopg.errors.InvalidParameterValue as exc:
        # The ledger's own argument checks: SQLSTATE 22023 naming the argument.
        raise problem("validation", exc.diag.message_primary or "invalid argument",
                      extra={"field": exc.diag.column_name}) from exc
    except psycopg.DataError as exc:
        # Any other value PostgreSQL cannot take, such as \u0000 inside JSON
        # (SQLSTATE class 22): refused before the call, nothing written.
        raise problem("validation", exc.diag.message_primary or "invalid value") from exc
    except psycopg.OperationalError as exc:
        raise problem("unavailable", "the database did not answer", headers={"Retry-After": "2"}) from exc
