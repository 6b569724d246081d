"""The bodies of POST /v1/actions. Unknown fields are refused."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import msgspec
from msgspec import Meta, Struct

from app.api.accounts.schemas import Balance, Metadata
from app.ledger import limits
from app.ledger.results import ActionOutcome

Name = Annotated[str, Meta(pattern=limits.NAME_PATTERN)]


# The fields of an action, shared with the partners' callbacks (app.api.callbacks).
ExternalId = Annotated[str, Meta(pattern=limits.TOKEN_PATTERN, description="the source's id for it: earns once, ever")]
ActionType = Annotated[str, Meta(pattern=limits.NAME_PATTERN, description="the action type a rule is set for")]
ActionValue = Annotated[int, Meta(ge=0, le=limits.MAX_ACTION_VALUE,
                                  description="minor currency units, for rules that earn per unit")]
OccurredAt = Annotated[datetime, Meta(tz=True, description="when it happened (default: now); "
                                      "campaign windows are judged by it")]


class ActionRequest(Struct, forbid_unknown_fields=True, frozen=True):
    """An action that happened. The points come from the rules, never from here."""

    user_id: Name
    source: Annotated[str, Meta(pattern=limits.NAME_PATTERN, description="who reports it (an ad network, a store)")]
    external_id: ExternalId
    type: ActionType
    value: ActionValue | None = None
    occurred_at: OccurredAt | None = None
    metadata: Metadata = msgspec.field(default_factory=dict)


class CampaignApplied(Struct):
    campaign_id: int
    points: int


class Earning(Struct):
    """Why the action earned what it did."""

    rule: str | None
    base_points: int | None
    campaign: CampaignApplied | None
    capped: bool
    budget_exhausted: bool

    @classmethod
    def of(cls, outcome: ActionOutcome) -> Earning:
        campaign = (CampaignApplied(campaign_id=outcome.campaign_id, points=outcome.campaign_points)
                    if outcome.campaign_id is not None else None)
        return cls(rule=outcome.rule, base_points=outcome.base_points, campaign=campaign,
                   capped=bool(outcome.capped), budget_exhausted=bool(outcome.budget_exhausted))


class ActionEarned(Struct):
    entry_id: int
    user_id: str
    points: int
    earning: Earning
    balance: Balance
    created_at: datetime

    @classmethod
    def of(cls, outcome: ActionOutcome) -> ActionEarned:
        return cls(entry_id=outcome.entry_id, user_id=outcome.user_id, points=outcome.points,
                   earning=Earning.of(outcome), balance=Balance(available=outcome.available,
                                                                reserved=outcome.reserved),
                   created_at=outcome.created_at)
