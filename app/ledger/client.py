"""How a call reaches the database: one `Call` value per operation (made by
app.ledger.calls), run by a `Ledger` on one connection (the CLI, the workers,
the tests) or by an `AsyncLedger` on a pool (the API). Both translate driver
errors the same way (app.ledger.errors) and shape rows the same way."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Generic, TypeVar

import psycopg
from psycopg import errors as pg_errors
from psycopg.rows import RowFactory, class_row, dict_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout, TooManyRequests

from app.ledger.errors import translated

T = TypeVar("T")


class Shape(Enum):
    ONE = "one"        # exactly one row
    MAYBE = "maybe"    # one row, or None for no row or a row of NULLs (a function's "not found")
    MANY = "many"      # a list of rows
    NONE = "none"      # no rows (a statement run for its effect)


@dataclass(frozen=True)
class Call(Generic[T]):
    """A named query from sql/queries.sql with its parameters, and how its rows
    become values: `row` is a dataclass (columns become fields) or None for dicts."""

    query: str
    params: Mapping[str, Any] = field(default_factory=dict)
    row: type[T] | None = None
    shape: Shape = Shape.ONE

    def row_factory(self) -> RowFactory[Any]:
        return dict_row if self.row is None else class_row(self.row)

    def shaped(self, rows: list[Any]) -> Any:
        if self.shape is Shape.MANY:
            return rows
        if self.shape is Shape.NONE:
            return None
        if self.shape is Shape.MAYBE and (not rows or _all_null(rows[0])):
            return None
        return rows[0]


def _all_null(row: Any) -> bool:
    values = row.values() if isinstance(row, dict) else (getattr(row, name) for name in row.__slots__)
    return all(value is None for value in values)


class Ledger:
    """Runs calls on one connection (autocommit unless the caller opened a
    transaction on it, as the interleaving tests do)."""

    def __init__(self, conn: psycopg.Connection) -> None:
        self.conn = conn

    @classmethod
    def open(cls, conninfo: str) -> Ledger:
        with translated():
            return cls(psycopg.connect(conninfo, autocommit=True))

    @classmethod
    @contextmanager
    def connect(cls, conninfo: str) -> Iterator[Ledger]:
        ledger = cls.open(conninfo)
        try:
            yield ledger
        finally:
            ledger.close()

    @property
    def closed(self) -> bool:
        return self.conn.closed

    def close(self) -> None:
        self.conn.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Calls inside run as one transaction, committed at the end of the block."""
        with translated(), self.conn.transaction():
            yield

    def __call__(self, call: Call[T]) -> Any:
        with translated(), self.conn.cursor(row_factory=call.row_factory()) as cursor:
            cursor.execute(call.query, call.params)
            return call.shaped(cursor.fetchall() if cursor.description else [])

    def many(self, query: str, params: list[Mapping[str, Any]]) -> None:
        """One named query for each parameter set, in one pipeline."""
        with translated(), self.conn.cursor() as cursor:
            cursor.executemany(query, params)


class AsyncLedger:
    """Runs calls on a pool of autocommitted connections, one call per
    transaction: committed, and so durable, before the call returns.

    A call whose connection failed under it is run once more, on a connection
    known to work: every call the API makes may run twice with the same effect
    (a write by its idempotency key, a read by nature), so one that did commit
    before its answer was lost answers the same the second time. Call nothing
    else through it."""

    def __init__(self, pool: AsyncConnectionPool) -> None:
        self.pool = pool
        # Connections this process's calls hold now: when none came free in
        # time, whether they were all at work (overloaded) or there were none
        # to be had (the pool cannot open one: unavailable).
        self._held = 0

    async def __call__(self, call: Call[T]) -> Any:
        with translated(connections_busy=lambda: self._held > 0):
            try:
                return await self._once(call)
            except psycopg.OperationalError as exc:
                if not_delegated(exc):
                    await asyncio.sleep(NOT_DELEGATED_PAUSE)
                elif connection_lost(exc):
                    # A connection that died idle (PgBouncer or PostgreSQL
                    # restarted) died with its idle neighbours: the pool tries
                    # them all now and replaces the dead, so the second run
                    # does not meet one of them.
                    await self.pool.check()
                else:
                    raise
            return await self._once(call)

    async def _once(self, call: Call[T]) -> Any:
        async with self.pool.connection() as conn:
            self._held += 1
            try:
                cursor = conn.cursor(row_factory=call.row_factory())
                await cursor.execute(call.query, call.params)
                return call.shaped(await cursor.fetchall() if cursor.description else [])
            finally:
                self._held -= 1


# Under Citus each write function runs wholly on the worker holding its user
# (delegated). At the instant a shard move switches a user's placement, Citus
# can decline to delegate and run the call on the coordinator, where the
# function's owner (rewards_owner, which cannot log in) would have to connect
# to the worker: the statement fails at once, having changed nothing, with
# this error from a server that is up. Seen at the end of a move under the bank
# load; tried once more after a pause, by then delegated again.
NOT_DELEGATED_PAUSE = 0.05


def not_delegated(exc: psycopg.OperationalError) -> bool:
    """The server answered (the session is sound) that it could not reach a
    worker as the caller: not our connection that failed."""
    return isinstance(exc, pg_errors.ConnectionFailure) and exc.diag.severity == "ERROR" and (
        exc.diag.message_primary or "").startswith("connection to the remote node")


def connection_lost(exc: psycopg.OperationalError) -> bool:
    """The call's own connection failed: the driver's error for a connection
    gone (PgBouncer or the server went away: it carries no SQLSTATE), or
    another of class 08 but 08P01. That one is PgBouncer giving up on a server
    after its bound (query_wait_timeout, a server login failing): a verdict on
    the database, which a second run would only make the client wait for twice.
    Not a pool that gave no connection in time either (overload), nor a
    timeout or cancel from a server that is up."""
    if isinstance(exc, (PoolTimeout, TooManyRequests)):
        return False
    return exc.sqlstate is None or (exc.sqlstate.startswith("08") and exc.sqlstate != "08P01")
