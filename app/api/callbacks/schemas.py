"""The body of a callback: the action as POST /v1/actions takes it, without the
source (the path names it and the signature proves it). Unknown fields are refused."""

from __future__ import annotations

import msgspec
from msgspec import Struct

from app.api.accounts.schemas import Metadata
from app.api.actions.schemas import ActionType, ActionValue, ExternalId, Name, OccurredAt


class CallbackRequest(Struct, forbid_unknown_fields=True, frozen=True):
    user_id: Name
    external_id: ExternalId
    type: ActionType
    value: ActionValue | None = None
    occurred_at: OccurredAt | None = None
    metadata: Metadata = msgspec.field(default_factory=dict)

