"""Request and response bodies: one Struct per verb. Unknown fields are refused."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

import msgspec
from msgspec import Meta, Struct

# The ledger holds the same rules (and the configured maximum amount); these
# bounds refuse bad input before a database round trip.
Amount = Annotated[int, Meta(ge=1, le=100_000_000, description="points, a positive integer")]
Reason = Annotated[str, Meta(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$")]
Metadata = Annotated[dict[str, Any], Meta(description="a JSON object of at most 4 KiB, stored with the entry")]
TtlSeconds = Annotated[int, Meta(ge=1, le=7 * 24 * 3600)]


class ActionRef(Struct, forbid_unknown_fields=True):
    """A verified action: it earns points once per user, ever."""

    source: Annotated[str, Meta(pattern=r"^[A-Za-z0-9._:-]{1,64}$")]
    external_id: Annotated[str, Meta(pattern=r"^[!-~]{1,255}$")]


class CreditRequest(Struct, forbid_unknown_fields=True):
    amount: Amount
    reason: Reason
    action: ActionRef | None = None
    metadata: Metadata = msgspec.field(default_factory=dict)


class DebitRequest(Struct, forbid_unknown_fields=True):
    amount: Amount
    reason: Reason
    metadata: Metadata = msgspec.field(default_factory=dict)


class ReservationRequest(Struct, forbid_unknown_fields=True):
    amount: Amount
    ttl_seconds: TtlSeconds
    reason: Reason
    metadata: Metadata = msgspec.field(default_factory=dict)


class CommitRequest(Struct, forbid_unknown_fields=True):
    amount: Amount | None = None
    reason: Reason = "redemption"
    metadata: Metadata = msgspec.field(default_factory=dict)


class ReleaseRequest(Struct, forbid_unknown_fields=True):
    reason: Reason = "released"
    metadata: Metadata = msgspec.field(default_factory=dict)


class Balance(Struct):
    available: int
    reserved: int


class EntryCreated(Struct):
    entry_id: int
    user_id: str
    amount: int
    balance: Balance
    created_at: datetime


class ReservationCreated(Struct):
    reservation_id: int
    user_id: str
    amount: int
    status: str
    expires_at: datetime
    entry_id: int
    balance: Balance
    created_at: datetime


class ReservationEnded(Struct):
    reservation_id: int
    user_id: str
    status: str
    amount: int
    entry_id: int
    balance: Balance
    created_at: datetime


class ReservationState(Struct):
    reservation_id: int
    user_id: str
    amount: int
    status: str
    committed_amount: int | None
    reason: str
    metadata: dict[str, Any]
    created_at: datetime
    expires_at: datetime
    ended_at: datetime | None


class AccountBalance(Struct):
    user_id: str
    available: int
    reserved: int
    lifetime_earned: int
    updated_at: datetime | None


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


class EntriesPage(Struct):
    items: list[Entry]
    next_cursor: str | None
