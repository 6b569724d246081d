"""The body of POST /v1/refunds (and, without the source, of a partner's
refund callback). Unknown fields are refused."""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta, Struct

from app.api.accounts.schemas import Metadata, Reason
from app.api.actions.schemas import ExternalId, Name
from app.ledger import limits


class RefundRequest(Struct, forbid_unknown_fields=True, frozen=True):
    """The action to reverse, as it was reported: its user, source and external id."""

    user_id: Name
    source: Annotated[str, Meta(pattern=limits.NAME_PATTERN, description="who reported the action")]
    external_id: ExternalId
    reason: Reason = "refund"
    metadata: Metadata = msgspec.field(default_factory=dict)


class CallbackRefundRequest(Struct, forbid_unknown_fields=True, frozen=True):
    user_id: Name
    external_id: ExternalId
    reason: Reason = "refund"
    metadata: Metadata = msgspec.field(default_factory=dict)
