"""Request and response bodies: one Struct per verb. Unknown fields are refused."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

import msgspec
from msgspec import Meta, Struct

from app.ledger import limits
from app.ledger.results import Entry as LedgerEntry
from app.ledger.results import Outcome

# The ledger holds the same rules; these bounds (app.ledger.limits) refuse bad
# input before a database round trip.
Amount = Annotated[int, Meta(ge=1, le=limits.MAX_AMOUNT, description="points, a positive integer")]
Reason = Annotated[str, Meta(min_length=1, max_length=limits.MAX_REASON_LENGTH, pattern=limits.REASON_PATTERN)]
Metadata = Annotated[dict[str, Any], Meta(
    description=f"a JSON object of at most {limits.MAX_METADATA_BYTES} bytes, stored with the entry")]
TtlSeconds = Annotated[int, Meta(ge=1, le=limits.MAX_RESERVATION_TTL_SECONDS)]
LotSeconds = Annotated[int, Meta(ge=1, le=limits.MAX_LOT_TERM_SECONDS)]


class ActionRef(Struct, forbid_unknown_fields=True, frozen=True):
    """A verified action: it earns points once per user, ever."""

    source: Annotated[str, Meta(pattern=limits.NAME_PATTERN)]
    external_id: Annotated[str, Meta(pattern=limits.TOKEN_PATTERN)]


def action_arguments(action: ActionRef | None) -> dict[str, Any]:
    """A credit's verified action as app.ledger.calls.credit's arguments."""
    return {"action_source": action.source, "action_external_id": action.external_id} if action else {}


class CreditRequest(Struct, forbid_unknown_fields=True, frozen=True):
    amount: Amount
    reason: Reason
    action: ActionRef | None = None
    metadata: Metadata = msgspec.field(default_factory=dict)
    # pending that long before the points can be spent; they expire that long
    # after the credit (more than pending_seconds): both counted from the credit
    pending_seconds: LotSeconds | None = None
    expiry_seconds: LotSeconds | None = None


class DebitRequest(Struct, forbid_unknown_fields=True, frozen=True):
    amount: Amount
    reason: Reason
    metadata: Metadata = msgspec.field(default_factory=dict)


class ReservationRequest(Struct, forbid_unknown_fields=True, frozen=True):
    amount: Amount
    ttl_seconds: TtlSeconds
    reason: Reason
    metadata: Metadata = msgspec.field(default_factory=dict)


class CommitRequest(Struct, forbid_unknown_fields=True, frozen=True):
    amount: Amount | None = None
    reason: Reason = "redemption"
    metadata: Metadata = msgspec.field(default_factory=dict)


class ReleaseRequest(Struct, forbid_unknown_fields=True, frozen=True):
    reason: Reason = "released"
    metadata: Metadata = msgspec.field(default_factory=dict)


class Balance(Struct):
    available: int
    reserved: int

    @classmethod
    def of(cls, outcome: Outcome) -> Balance:
        return cls(available=outcome.available, reserved=outcome.reserved)


class EntryCreated(Struct):
    entry_id: int
    user_id: str
    amount: int
    balance: Balance
    created_at: datetime

    @classmethod
    def of(cls, outcome: Outcome) -> EntryCreated:
        return cls(entry_id=outcome.entry_id, user_id=outcome.user_id, amount=outcome.amount,
                   balance=Balance.of(outcome), created_at=outcome.created_at)


class ReservationCreated(Struct):
    reservation_id: int
    user_id: str
    amount: int
    status: str
    expires_at: datetime
    entry_id: int
    balance: Balance
    created_at: datetime

    @classmethod
    def of(cls, outcome: Outcome) -> ReservationCreated:
        return cls(reservation_id=outcome.reservation_id, user_id=outcome.user_id, amount=outcome.amount,
                   status="open", expires_at=outcome.expires_at, entry_id=outcome.entry_id,
                   balance=Balance.of(outcome), created_at=outcome.created_at)


class ReservationEnded(Struct):
    reservation_id: int
    user_id: str
    status: str
    amount: int
    entry_id: int
    balance: Balance
    created_at: datetime

    @classmethod
    def of(cls, outcome: Outcome, reservation_id: int, status: str) -> ReservationEnded:
        return cls(reservation_id=reservation_id, user_id=outcome.user_id, status=status, amount=outcome.amount,
                   entry_id=outcome.entry_id, balance=Balance.of(outcome), created_at=outcome.created_at)


class NextExpiry(Struct):
    """The soonest expiry of points the account holds (not reserved ones)."""

    at: datetime
    amount: int


class AccountBalance(Struct):
    user_id: str
    available: int
    pending: int
    reserved: int
    lifetime_earned: int
    next_expiry: NextExpiry | None
    updated_at: datetime | None
    # points refunds took back that were already spent: later credits pay them off first
    owed: int = 0


class Entry(Struct):
    entry_id: int
    seq: int
    kind: str
    amount: int
    available_delta: int
    reserved_delta: int
    available_after: int
    reserved_after: int
    reservation_id: int | None
    reason: str
    action: ActionRef | None
    metadata: dict[str, Any]
    created_at: datetime

    @classmethod
    def of(cls, entry: LedgerEntry) -> Entry:
        action = (ActionRef(source=entry.action_source, external_id=entry.action_external_id)
                  if entry.action_source else None)
        return cls(entry_id=entry.entry_id, seq=entry.seq, kind=entry.kind, amount=entry.amount,
                   available_delta=entry.available_delta, reserved_delta=entry.reserved_delta,
                   available_after=entry.available_after, reserved_after=entry.reserved_after,
                   reservation_id=entry.reservation_id, reason=entry.reason, action=action,
                   metadata=entry.metadata, created_at=entry.created_at)


class EntriesPage(Struct):
    items: list[Entry]
    next_cursor: str | None
