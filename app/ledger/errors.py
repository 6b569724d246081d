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


class BudgetSliceLow(LedgerError):
    """rules.act found the user's slice of a campaign's budget too short for
    the claim (SQLSTATE RLB01) and wrote nothing: refill it
    (calls.refill_budget_slice) and call again. app.ledger.actions does."""

    def __init__(self, message: str, campaign_id: int, points: int) -> None:
        super().__init__(message)
        self.campaign_id = campaign_id
        self.points = points


class ClaimFirst(LedgerError):
    """rules.act under Citus, called without saying the action was claimed
    (SQLSTATE RLB03): the claim lives on the action's own shard, out of the
    call's reach, and nothing was written. Claim it (calls.claim_action) and
    call again with claimed=True. app.ledger.actions does."""


class AlreadyExists(LedgerError):
    """The object a call creates is there already (SQLSTATE 42710), such as a
    replication slot another process made a moment before."""


class NotFound(LedgerError):
    """The object a call names does not exist (SQLSTATE 42704), such as a
    replication slot dropped meanwhile."""


class InUse(LedgerError):
    """The object a call needs is held by another session (SQLSTATE 55006), such
    as a replication slot being read."""


class OtherShard(LedgerError):
    """An item of a call over many whose user is not in the shard the call was
    delegated to (under Citus): nothing was written for it; send it on its own."""


class Fault(LedgerError):
    """An item of a call over many raised a genuine error of the database (a
    constraint, an overflow), as it would have alone: nothing was written for it."""


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
    except psycopg.Error as exc:
        error = _ledger_error(type(exc), exc.sqlstate, exc.diag.message_primary or _first_line(exc),
                              exc.diag.column_name)
        if error is None:
            raise
        raise error from exc


@contextmanager
def refused_by_the_server(what: str, warned: list[str]) -> Iterator[None]:
    """Around a server function that checks its own preconditions and whose
    transaction undoes what it did when it raises (citus_add_node): whatever the
    server raised there, of any class, is a refusal that begins with `what` and
    ends with the last of the warnings it sent meanwhile (`warned`, filled by
    the caller's notice handler: Citus relays a node's own error as one). A
    connection lost on the way (no SQLSTATE) stays what translated() made it."""
    try:
        yield
    except (psycopg.Error, LedgerError) as exc:
        raised = exc if isinstance(exc, psycopg.Error) else exc.__cause__
        if not isinstance(raised, psycopg.Error) or raised.sqlstate is None:
            raise
        message = _line(raised.diag.message_primary or _first_line(raised))
        said = f"; before it: {_line(warned[-1])}" if warned else ""
        raise Refused(f"{what}: {message} (SQLSTATE {raised.sqlstate}){said}") from exc


def item_error(sqlstate: str, message: str, column: str | None) -> LedgerError:
    """The exception an item of a call over many answered with (ledger.item_result):
    the one the same error raises from a single call."""
    if sqlstate == pg_errors.FeatureNotSupported.sqlstate and column == "user_id":
        return OtherShard(message)
    try:
        kind = pg_errors.lookup(sqlstate)
    except KeyError:
        kind = psycopg.Error
    return _ledger_error(kind, sqlstate, message, column) or Fault(f"{message} (SQLSTATE {sqlstate})")


def _ledger_error(kind: type[psycopg.Error], sqlstate: str | None, message: str,
                  column: str | None) -> LedgerError | None:
    """The ledger's exception for a database error of this class (psycopg's, by
    SQLSTATE), or None for one that is not the ledger's to translate."""
    if sqlstate == REFUSED_SQLSTATE:
        # Such as a second rotation of a callback source's secret before the
        # first is finished: the call says what to do first. Its own SQLSTATE,
        # not 55000, which the server raises for a lost replication slot too.
        return Refused(_line(message))
    if issubclass(kind, pg_errors.LockNotAvailable):
        return Overloaded("a lock the call needed was held by another transaction past lock_timeout")
    if issubclass(kind, pg_errors.QueryCanceled):
        # statement_timeout; also a cancel by an operator. Either way the
        # statement, and so its transaction, was rolled back.
        return Overloaded("the database did not finish the call within statement_timeout")
    if issubclass(kind, pg_errors.InvalidParameterValue):
        return InvalidArgument(message or "invalid argument", column or _argument_named_in(message))
    if issubclass(kind, pg_errors.DuplicateObject):
        return AlreadyExists(_line(message))
    if issubclass(kind, pg_errors.UndefinedObject):
        return NotFound(_line(message))
    if issubclass(kind, pg_errors.ObjectInUse):
        return InUse(_line(message))
    if issubclass(kind, psycopg.DataError):
        # Any other value PostgreSQL cannot take, such as \u0000 inside JSON:
        # refused before the call wrote anything.
        return InvalidArgument(message or "invalid value")
    if issubclass(kind, psycopg.OperationalError):
        return Unavailable(f"the database did not answer: {_line(message)}")
    if issubclass(kind, pg_errors.ReadOnlySqlTransaction):
        # A standby answered (with REWARDS_HA=on, for the moments of a
        # switchover before PgBouncer points at the new primary): nothing was
        # written, and the same call succeeds again on the primary.
        return Unavailable(f"the database is read-only for now: {_line(message)}")
    # rules._claim_budget's RLB01, a class psycopg does not know: read from the
    # message, which Citus relays from a worker without the error's other fields.
    if low := _BUDGET_SLICE_LOW.match(message or ""):
        return BudgetSliceLow(_line(message), int(low.group(1)), int(low.group(2)))
    # rules.act's RLB03, read alike.
    if _NOT_CLAIMED.match(message or ""):
        return ClaimFirst(_line(message))
    return None


# A precondition of one of the ledger's own functions does not hold (sql/api.sql).
REFUSED_SQLSTATE = "RLB02"
_BUDGET_SLICE_LOW = re.compile(r"^budget slice low: campaign (\d+) needs (\d+)$")
_NOT_CLAIMED = re.compile(r"^action not claimed: ")


def _argument_named_in(message: str) -> str | None:
    """The argument a ledger refusal names. ledger._invalid puts it in COLUMN and
    at the start of the message ("invalid amount: ..."); Citus, relaying an error
    from the worker that ran the call, keeps only the message."""
    found = re.match(r"invalid (\w+): ", message)
    return found.group(1) if found else None


def _first_line(exc: Exception) -> str:
    return _line(str(exc)) or type(exc).__name__


def _line(text: str) -> str:
    text = text.strip()
    return text.splitlines()[0].strip() if text else ""
