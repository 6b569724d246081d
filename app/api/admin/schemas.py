"""Bodies of the administration's requests. Unknown fields are refused; the
database checks every field again (rules.check_rule, rules.check_campaign) and
its tables hold the same rules as constraints."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from msgspec import Meta, Struct

from app.api.accounts.schemas import LotSeconds
from app.ledger import limits

Name = Annotated[str, Meta(pattern=limits.NAME_PATTERN)]
Names = Annotated[list[Name], Meta(min_length=1, max_length=100)]
Points = Annotated[int, Meta(ge=1, le=limits.MAX_AMOUNT)]
Cap = Annotated[int, Meta(ge=1, le=2**63 - 1)]


class RuleRequest(Struct, forbid_unknown_fields=True, frozen=True):
    """fixed_points, or points_per_unit for every unit_value of the action's
    value (rounded down); caps on what one user earns from the type."""

    fixed_points: Points | None = None
    points_per_unit: Annotated[int, Meta(ge=1, le=1_000_000)] | None = None
    unit_value: Annotated[int, Meta(ge=1, le=1_000_000_000)] | None = None
    daily_cap: Cap | None = None
    lifetime_cap: Cap | None = None
    # each credit of the type a lot: pending this long (e.g. a purchase's
    # return window), expiring this long after the credit (more than pending)
    pending_seconds: LotSeconds | None = None
    expiry_seconds: LotSeconds | None = None
    enabled: bool = True


class CampaignRequest(Struct, forbid_unknown_fields=True, frozen=True):
    """A window, a multiplier (percent: 200 doubles) or a bonus, who is
    eligible (None: any) and an optional budget of points in all."""

    name: Annotated[str, Meta(min_length=1, max_length=100, pattern=limits.REASON_PATTERN)]
    starts_at: Annotated[datetime, Meta(tz=True)]
    ends_at: Annotated[datetime, Meta(tz=True)]
    multiplier_percent: Annotated[int, Meta(ge=101, le=10_000)] | None = None
    bonus_points: Points | None = None
    action_types: Names | None = None
    sources: Names | None = None
    budget: Cap | None = None
    enabled: bool = True
