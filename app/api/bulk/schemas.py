"""The bulk grant's request and answer. Each item is a credit as
POST /v1/accounts/{user_id}/credits takes it, with its user and idempotency key
inside it; unknown fields are refused."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from msgspec import Meta, Struct

from app.api.accounts.schemas import ActionRef, Amount, EntryCreated, Metadata, Reason
from app.ledger import limits


class BulkCredit(Struct, forbid_unknown_fields=True, frozen=True):
    user_id: Annotated[str, Meta(pattern=limits.NAME_PATTERN, description="opaque user id")]
    idempotency_key: Annotated[str, Meta(
        pattern=limits.TOKEN_PATTERN,
        description="1-255 visible ASCII characters, scoped to the user, as the single credit's Idempotency-Key")]
    amount: Amount
    reason: Reason
    action: ActionRef | None = None
    metadata: Metadata = msgspec.field(default_factory=dict)


class BulkCreditRequest(Struct, forbid_unknown_fields=True, frozen=True):
    items: Annotated[list[BulkCredit], Meta(min_length=1, max_length=limits.MAX_BULK_ITEMS)]


class BulkCreditAnswer(Struct, omit_defaults=True):
    """One item's answer: the status and body the single credit would have
    answered for it, `entry` on a 201 and `problem` (RFC 9457, with the
    single credit's extra members) on a refusal."""

    status: int
    user_id: str
    idempotency_key: str
    replayed: bool
    entry: EntryCreated | None = None
    problem: dict[str, Any] | None = None


class BulkCreditsAnswer(Struct):
    """One answer for each item, in the request's order."""

    items: list[BulkCreditAnswer]
