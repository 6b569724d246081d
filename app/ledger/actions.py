"""A verified action, end to end, in two one-shard transactions: first bound to
its user once ever (rules.claim_action, on the action's own shard), then
earned by the rules (rules.act, on the user's shard). docs/ARCHITECTURE.md
says why two. The API's POST /v1/actions and the partners' callbacks both
come through here."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from app.ledger import calls
from app.ledger.client import AsyncLedger
from app.ledger.results import ActionOutcome, ActionStatus


async def earn(ledger: AsyncLedger, user_id: str, key: str, source: str, external_id: str, action_type: str,
               value: int | None, occurred_at: datetime | None, metadata: dict[str, Any]) -> ActionOutcome:
    """What the action earned, or why it earned nothing. An action that belongs
    to another user is refused before the user's shard is touched: nothing is
    written for it (the claim that says so is already there)."""
    claim = await ledger(calls.claim_action(user_id, source, external_id))
    if claim["owner"] != user_id:
        return ActionOutcome(ActionStatus.ACTION_CLAIMED_BY_ANOTHER_USER, user_id, None, None, None, None, None,
                             None, None, None, None, None, None, False)
    return await ledger(calls.act(user_id, key, source, external_id, action_type, value, occurred_at, metadata))
