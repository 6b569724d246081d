"""What the ledger's functions answer, as typed values. Field names are the
columns of the SQL types they mirror (sql/ledger.sql, sql/api.sql), so rows map
onto them one to one."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from app.ledger.errors import item_error


class Status(StrEnum):
    """ledger.result.status: 'ok' or a business refusal the caller branches on.
    A refusal is remembered under its idempotency key like a success."""

    OK = "ok"
    INSUFFICIENT_POINTS = "insufficient_points"
    ACTION_ALREADY_CREDITED = "action_already_credited"
    IDEMPOTENCY_KEY_REUSED = "idempotency_key_reused"
    RESERVATION_NOT_FOUND = "reservation_not_found"
    RESERVATION_COMMITTED = "reservation_committed"
    RESERVATION_RELEASED = "reservation_released"
    RESERVATION_EXPIRED = "reservation_expired"
    AMOUNT_EXCEEDS_RESERVATION = "amount_exceeds_reservation"
    # ledger.refund: no credit of this action for the user; refunded already;
    # every point it earned has expired
    ACTION_NOT_FOUND = "action_not_found"
    ACTION_ALREADY_REFUNDED = "action_already_refunded"
    ACTION_POINTS_EXPIRED = "action_points_expired"


@dataclass(frozen=True, slots=True)
class Outcome:
    """ledger.result: what every write function returns."""

    status: Status
    user_id: str
    entry_id: int | None
    reservation_id: int | None
    amount: int | None
    available: int
    reserved: int
    expires_at: datetime | None
    created_at: datetime | None
    replayed: bool

    def __post_init__(self) -> None:
        object.__setattr__(self, "status", Status(self.status))

    @property
    def ok(self) -> bool:
        return self.status is Status.OK


@dataclass(frozen=True, slots=True)
class ItemResult:
    """ledger.item_result: one item's answer from a call over many, either the
    single call's answer (status set) or the error that item alone raised."""

    item: int
    status: str | None
    user_id: str
    entry_id: int | None
    reservation_id: int | None
    amount: int | None
    available: int | None
    reserved: int | None
    expires_at: datetime | None
    created_at: datetime | None
    replayed: bool | None
    error_sqlstate: str | None
    error_column: str | None
    error_message: str | None

    def outcome(self) -> Outcome:
        """What the single call would have returned, or raised: the same
        `Outcome`, or the same exception of app.ledger.errors."""
        if self.error_sqlstate is not None:
            raise item_error(self.error_sqlstate, self.error_message or "", self.error_column)
        return Outcome(Status(self.status), self.user_id, self.entry_id, self.reservation_id, self.amount,
                       self.available, self.reserved, self.expires_at, self.created_at, self.replayed)


@dataclass(frozen=True, slots=True)
class Balance:
    """ledger.balances: zeros for a user who never had points."""

    user_id: str
    available: int
    reserved: int
    lifetime_earned: int
    last_seq: int
    updated_at: datetime | None
    # credited but not yet available; the soonest expiry of points held, and how many
    pending: int
    next_expiry_at: datetime | None
    next_expiry_amount: int | None
    # what refunds took back that the user had already spent (later credits pay it off)
    owed: int = 0


@dataclass(frozen=True, slots=True)
class Entry:
    """ledger.account_entries: one movement of an account."""

    user_id: str
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
    action_source: str | None
    action_external_id: str | None
    metadata: dict[str, Any]
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Reservation:
    """ledger.reservation_states."""

    user_id: str
    reservation_id: int
    amount: int
    status: str
    committed_amount: int | None
    reason: str
    metadata: dict[str, Any]
    created_at: datetime
    expires_at: datetime
    ended_at: datetime | None


@dataclass(frozen=True, slots=True)
class ChainCheck:
    """ledger.verify_chain: ok, or the first entry whose hash does not follow."""

    ok: bool
    entries_checked: int
    first_broken_entry_id: int | None
    first_broken_seq: int | None


@dataclass(frozen=True, slots=True)
class Expired:
    """ledger.expire_reservations: how many reservations it expired."""

    expired: int


@dataclass(frozen=True, slots=True)
class ShardRange:
    """A shard of ledger.accounts and the hashes of the users it holds (pg_dist_shard)."""

    shard_id: int
    min_hash: int
    max_hash: int


@dataclass(frozen=True, slots=True)
class Settled:
    """ledger.settle_lots: how many lots it matured or lapsed."""

    settled: int


@dataclass(frozen=True, slots=True)
class ApiKey:
    """api.key_info: a key as the ledger keeps it (never its secret)."""

    key_id: int
    name: str
    scopes: list[str]
    created_at: datetime
    revoked_at: datetime | None
    # api.key_access: the action sources it may report (None: any), its rate tier
    sources: list[str] | None = None
    rate_tier: str | None = None

    def may(self, scope: str) -> bool:
        return scope in self.scopes or "admin" in self.scopes

    def may_report(self, source: str) -> bool:
        return self.sources is None or source in self.sources


@dataclass(frozen=True, slots=True)
class CallbackSecret:
    """api.callback_secret_info: one secret of a callback source (never the
    secret, nor the salt it is derived from)."""

    source: str
    disabled_at: datetime | None
    secret_id: int
    fingerprint: bytes
    created_at: datetime
    retired_at: datetime | None

    @property
    def fingerprint_hex(self) -> str:
        """What a partner compares with the SHA-256 of the secret it holds (its start)."""
        return self.fingerprint.hex()[:16]


class ActionStatus(StrEnum):
    """rules.action_result.status."""

    OK = "ok"
    IDEMPOTENCY_KEY_REUSED = "idempotency_key_reused"
    ACTION_ALREADY_CREDITED = "action_already_credited"
    NOT_ELIGIBLE = "not_eligible"
    CAP_REACHED = "cap_reached"
    # the action belongs to another user (rules.act on a single node,
    # rules.claim_action's answer under Citus): nothing written
    ACTION_CLAIMED_BY_ANOTHER_USER = "action_claimed_by_another_user"


@dataclass(frozen=True, slots=True)
class ActionOutcome:
    """rules.action_result: what a verified action earned, and why."""

    status: ActionStatus
    user_id: str
    entry_id: int | None
    points: int | None
    rule: str | None
    base_points: int | None
    campaign_id: int | None
    campaign_points: int | None
    capped: bool | None
    budget_exhausted: bool | None
    available: int | None
    reserved: int | None
    created_at: datetime | None
    replayed: bool

    def __post_init__(self) -> None:
        object.__setattr__(self, "status", ActionStatus(self.status))

    @property
    def ok(self) -> bool:
        return self.status is ActionStatus.OK


@dataclass(frozen=True, slots=True)
class Rule:
    """rules.rules: what an action of a type earns."""

    action_type: str
    fixed_points: int | None
    points_per_unit: int | None
    unit_value: int | None
    daily_cap: int | None
    lifetime_cap: int | None
    enabled: bool
    created_at: datetime
    updated_at: datetime
    # each credit of the type is a lot pending this long, expiring this long after it (None: not)
    pending_seconds: int | None = None
    expiry_seconds: int | None = None


@dataclass(frozen=True, slots=True)
class Campaign:
    """rules.list_campaigns (spent is None without a budget)."""

    campaign_id: int
    name: str
    starts_at: datetime
    ends_at: datetime
    multiplier_percent: int | None
    bonus_points: int | None
    action_types: list[str] | None
    sources: list[str] | None
    budget: int | None
    enabled: bool
    created_at: datetime
    updated_at: datetime
    spent: int | None = None


@dataclass(frozen=True, slots=True)
class Change:
    """rules.change_history: one change of a rule or campaign."""

    change_id: int
    changed_at: datetime
    actor: str
    subject: str
    subject_id: str
    operation: str
    before: dict[str, Any] | None
    after: dict[str, Any]


@dataclass(frozen=True, slots=True)
class BudgetReport:
    """rules.budget_report: what a budgeted campaign awarded and what is left
    (unallocated, and held by its slices), and whether it has ended."""

    campaign_id: int
    name: str
    ends_at: datetime
    ended: bool
    budget: int
    awarded: int
    left_points: int
    in_slices: int
    unallocated: int
