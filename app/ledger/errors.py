"""The ledger's own exceptions. Driver errors are translated here, once, by
SQLSTATE; the outer layers (the API's exception hook, the CLI) translate these
into their own answers and never see psycopg's."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import psycopg
from psycopg import errors as pg_errors
from psycopg_pool import PoolTimeout, TooManyRequests


class LedgerError(Exception):
    """Anything the ledger refused or could not do; `str()` is one clear line."""


class InvalidArgument(LedgerError):
    """The ledger refused an argument (SQLSTATE 22023 naming it, or another class
    22 error for a value PostgreSQL cannot take). Nothing was written."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class Unavailable(LedgerError):
    """The database could not be reached or lost the connection. A write that
    raised this may or may not have committed: retry it with the same key."""


class Overloaded(LedgerError):
    """Refused rather than queued: every database connection was busy, or the
    database, up, did not finish the call within its bound (the role's
    statement_timeout or lock_timeout, sql/roles.sql). Nothing was written."""


class Refused(LedgerError):
    """An operation whose precondition does not hold, refused before it changed
    anything (or after undoing what it had done); `str()` says which one and
    what to do about it."""


class AlreadyExists(LedgerError):
    """The object a call creates is there already (SQLSTATE 42710), such as a
    replication slot another process made a moment before."""


class NotFound(LedgerError):
    """The object a call names does not exist (SQLSTATE 42704), such as a
    replication slot dropped meanwhile."""


class InUse(LedgerError):
    """The object a call needs is held by another session (SQLSTATE 55006), such
    as a replication slot being read."""


@contextmanager
def translated(connections_busy: Callable[[], bool] = lambda: True) -> Iterator[None]:
    """Run a database call with its driver errors as the ledger's own.
    `connections_busy` says whether a pool that gave no connection in time had
    them all at work (overloaded) rather than none it could open (unavailable)."""
    try:
        yield
    except (PoolTimeout, TooManyRequests) as exc:
        if not connections_busy():
            raise Unavailable("no connection to the database could be opened") from exc
        raise Overloaded("no database connection came free in time") from exc
    except pg_errors.LockNotAvailable as exc:
        raise Overloaded("a lock the call needed was held by another transaction past lock_timeout") from exc
    except pg_errors.QueryCanceled as exc:
        # statement_timeout; also a cancel by an operator. Either way the
        # statement, and so its transaction, was rolled back.
        raise Overloaded("the database did not finish the call within statement_timeout") from exc
    except pg_errors.InvalidParameterValue as exc:
        message = exc.diag.message_primary or "invalid argument"
        raise InvalidArgument(message, exc.diag.column_name or _argument_named_in(message)) from exc
    except pg_errors.DuplicateObject as exc:
        raise AlreadyExists(_first_line(exc)) from exc
    except pg_errors.UndefinedObject as exc:
        raise NotFound(_first_line(exc)) from exc
    except pg_errors.ObjectInUse as exc:
        raise InUse(_first_line(exc)) from exc
    except pg_errors.ObjectNotInPrerequisiteState as exc:
        # Such as a second rotation of a callback source's secret before the
        # first is finished: the call says what to do first.
        raise Refused(_first_line(exc)) from exc
    except psycopg.DataError as exc:
        # Any other value PostgreSQL cannot take, such as \u0000 inside JSON:
        # refused before the call wrote anything.
        raise InvalidArgument(exc.diag.message_primary or "invalid value") from exc
    except psycopg.OperationalError as exc:
        raise Unavailable(f"the database did not answer: {_first_line(exc)}") from exc
    except pg_errors.ReadOnlySqlTransaction as exc:
        # A standby answered (with REWARDS_HA=on, for the moments of a
        # switchover before PgBouncer points at the new primary): nothing was
        # written, and the same call succeeds again on the primary.
        raise Unavailable(f"the database is read-only for now: {_first_line(exc)}") from exc


def _argument_named_in(message: str) -> str | None:
    """The argument a ledger refusal names. ledger._invalid puts it in COLUMN and
    at the start of the message ("invalid amount: ..."); Citus, relaying an error
    from the worker that ran the call, keeps only the message."""
    found = re.match(r"invalid (\w+): ", message)
    return found.group(1) if found else None


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0].strip() if text else type(exc).__name__
