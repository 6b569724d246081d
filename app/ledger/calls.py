"""The ledger's operations, one function each, named after the SQL function it
calls. Each returns a `Call` for a `Ledger` or `AsyncLedger` to run; every
argument is passed, so the server never expands a default.

    outcome = ledger(calls.credit("alice", "ad-42", 100, "ad view"))
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg.types.json import Jsonb

from app.ledger import queries
from app.ledger.client import Call, Shape
from app.ledger.errors import InvalidArgument
from app.ledger.results import (
    ActionOutcome,
    ApiKey,
    Balance,
    BudgetReport,
    CallbackSecret,
    Campaign,
    Change,
    ChainCheck,
    Entry,
    Expired,
    ItemResult,
    Outcome,
    Reservation,
    Settled,
    ShardRange,
    Rule,
)


def _user(user_id: str | None) -> str:
    """The ledger refuses a NULL user (22023) on a single node, but under Citus
    13.2 a NULL distribution argument crashes the coordinator's call delegation
    before the function runs (a segfault, seen here): refused here, before sending."""
    if user_id is None:
        raise InvalidArgument("invalid user_id: must be 1-64 characters of A-Z a-z 0-9 . _ : -", "user_id")
    return user_id


def _json(metadata: dict[str, Any] | None) -> str:
    return json.dumps(metadata if metadata is not None else {})


def credit(user_id: str, key: str, amount: int, reason: str, action_source: str | None = None,
           action_external_id: str | None = None, metadata: dict[str, Any] | None = None,
           pending_seconds: int | None = None, expiry_seconds: int | None = None) -> Call[Outcome]:
    """Add points; an action (source and external id) earns once per user, ever.
    The points may be pending for `pending_seconds` and expire `expiry_seconds`
    after the credit (a lot); without either they are available at once, for good."""
    return Call(queries.CREDIT, {
        "user_id": _user(user_id), "key": key, "amount": amount, "reason": reason, "action_source": action_source,
        "action_external_id": action_external_id, "metadata": _json(metadata),
        "pending_seconds": pending_seconds, "expiry_seconds": expiry_seconds}, Outcome)


@dataclass(frozen=True, slots=True)
class Credit:
    """One credit as ledger.credit takes it, as an item of `credit_many`: a plain
    credit. ledger.credit_many makes no lots, so a credit with pending or expiry
    terms is a single `credit` (group commit sends it alone; a bulk grant's
    items take no terms): the limit, stated here once for the code."""

    user_id: str
    key: str
    amount: int
    reason: str
    action_source: str | None = None
    action_external_id: str | None = None
    metadata: dict[str, Any] | None = None


def credit_many(shard_user: str, credits: Sequence[Credit]) -> Call[ItemResult]:
    """Many credits in one transaction, one answer per credit in order (each what
    `credit` would answer for it alone). Under Citus every credit's user must be
    in `shard_user`'s shard, the shard the call is delegated to; one that is not
    is answered with `OtherShard`."""
    return Call(queries.CREDIT_MANY, {
        "user_id": _user(shard_user),
        "user_ids": [c.user_id for c in credits],
        "keys": [c.key for c in credits],
        "amounts": [c.amount for c in credits],
        "reasons": [c.reason for c in credits],
        "action_sources": [c.action_source for c in credits],
        "action_external_ids": [c.action_external_id for c in credits],
        "metadata": [Jsonb(c.metadata if c.metadata is not None else {}) for c in credits],
    }, ItemResult, Shape.MANY)


def debit(user_id: str, key: str, amount: int, reason: str,
          metadata: dict[str, Any] | None = None) -> Call[Outcome]:
    """Spend points at once."""
    return Call(queries.DEBIT, {"user_id": _user(user_id), "key": key, "amount": amount, "reason": reason,
                                "metadata": _json(metadata)}, Outcome)


def reserve(user_id: str, key: str, amount: int, ttl_seconds: int, reason: str,
            metadata: dict[str, Any] | None = None) -> Call[Outcome]:
    """Hold points until committed, released or expired."""
    return Call(queries.RESERVE, {"user_id": _user(user_id), "key": key, "amount": amount, "ttl_seconds": ttl_seconds,
                                  "reason": reason, "metadata": _json(metadata)}, Outcome)


def commit_reservation(user_id: str, key: str, reservation_id: int, amount: int | None = None,
                       reason: str = "redemption", metadata: dict[str, Any] | None = None) -> Call[Outcome]:
    """Spend a reservation, all of it or `amount` (the rest returns)."""
    return Call(queries.COMMIT_RESERVATION, {
        "user_id": _user(user_id), "key": key, "reservation_id": reservation_id, "amount": amount, "reason": reason,
        "metadata": _json(metadata)}, Outcome)


def release_reservation(user_id: str, key: str, reservation_id: int, reason: str = "released",
                        metadata: dict[str, Any] | None = None) -> Call[Outcome]:
    """Return a reservation to available points."""
    return Call(queries.RELEASE_RESERVATION, {
        "user_id": _user(user_id), "key": key, "reservation_id": reservation_id, "reason": reason,
        "metadata": _json(metadata)}, Outcome)


def refund(user_id: str, key: str, action_source: str, action_external_id: str, reason: str = "refund",
           metadata: dict[str, Any] | None = None) -> Call[Outcome]:
    """Reverse what the action (source, external id) earned this user: pending
    points cancelled, available ones taken back, spent ones owed (or written
    off, by ledger.settings.refund_shortfall). `amount` is what was reversed."""
    return Call(queries.REFUND, {
        "user_id": _user(user_id), "key": key, "action_source": action_source,
        "action_external_id": action_external_id, "reason": reason, "metadata": _json(metadata)}, Outcome)


def refund_shortfall() -> Call[dict]:
    """{"refund_shortfall": 'owe' or 'write_off'}: what a refund does with the
    points it cannot take back (ledger.settings)."""
    return Call(queries.REFUND_SHORTFALL)


def set_refund_shortfall(shortfall: str) -> Call[dict]:
    """Make refunds owe ('owe') or write off ('write_off') what the user already spent."""
    return Call(queries.SET_REFUND_SHORTFALL, {"shortfall": shortfall}, shape=Shape.NONE)


def action_idempotency_key(what: str, source: str, external_id: str) -> str:
    """The idempotency key of a write that names its action and carries no key
    of its own (a partner's callback, a refund from the command line): the
    action is its identity, so the same write again replays the first answer,
    and `what` keeps the writes of one action apart."""
    return f"{what}:" + hashlib.sha256(f"{source} {external_id}".encode()).hexdigest()


def action_key(source: str, external_id: str) -> str:
    """What rules.action_claims is keyed (and, under Citus, distributed) by:
    neither part may hold a space, so the pair reads back unambiguously."""
    return f"{source} {external_id}"


def claim_action(user_id: str, source: str, external_id: str) -> Call[dict]:
    """Bind the action to this user the first time; answers {"owner": user}.
    Under Citus the step before `act`, which cannot reach the claim's shard."""
    return Call(queries.CLAIM_ACTION, {"action_key": action_key(source, external_id), "user_id": _user(user_id)})


def act(user_id: str, key: str, source: str, external_id: str, action_type: str, value: int | None = None,
        occurred_at: datetime | None = None, metadata: dict[str, Any] | None = None,
        claimed: bool = False) -> Call[ActionOutcome]:
    """Earn what the rules give a verified action. On a single node the call
    claims the action itself; under Citus `claimed` says claim_action bound it
    to this user first, and without it the call raises ClaimFirst."""
    return Call(queries.ACT, {
        "user_id": _user(user_id), "key": key, "source": source, "external_id": external_id, "type": action_type,
        "value": value, "occurred_at": occurred_at, "metadata": _json(metadata), "claimed": claimed}, ActionOutcome)


def refill_budget_slice(campaign_id: int, user_id: str, points: int) -> Call[dict]:
    """Give the user's slice of the campaign's budget at least `points` more (rules.act answered BudgetSliceLow)."""
    return Call(queries.REFILL_BUDGET_SLICE, {"campaign_id": campaign_id, "user_id": _user(user_id), "points": points},
                shape=Shape.NONE)


def budget_report(campaign_id: int) -> Call[BudgetReport]:
    """A budgeted campaign's budget, awarded and left points; None for a campaign without a budget."""
    return Call(queries.BUDGET_REPORT, {"campaign_id": campaign_id}, BudgetReport, Shape.MAYBE)


def put_rule(actor: str, action_type: str, *, fixed_points: int | None = None, points_per_unit: int | None = None,
             unit_value: int | None = None, daily_cap: int | None = None, lifetime_cap: int | None = None,
             enabled: bool = True, pending_seconds: int | None = None,
             expiry_seconds: int | None = None) -> Call[Rule]:
    """Create or change the rule of an action type (recorded in the history). With
    `pending_seconds` or `expiry_seconds` each credit of the type is a lot, as
    `credit` makes one."""
    return Call(queries.PUT_RULE, {
        "actor": actor, "action_type": action_type, "fixed_points": fixed_points,
        "points_per_unit": points_per_unit, "unit_value": unit_value, "daily_cap": daily_cap,
        "lifetime_cap": lifetime_cap, "enabled": enabled, "pending_seconds": pending_seconds,
        "expiry_seconds": expiry_seconds}, Rule)


def enable_rule(actor: str, action_type: str, enabled: bool) -> Call[Rule]:
    """Disable or enable a rule; None for an unknown one."""
    return Call(queries.ENABLE_RULE, {"actor": actor, "action_type": action_type, "enabled": enabled},
                Rule, Shape.MAYBE)


def list_rules() -> Call[Rule]:
    return Call(queries.LIST_RULES, {}, Rule, Shape.MANY)


def put_campaign(actor: str, campaign_id: int | None, name: str, starts_at: datetime, ends_at: datetime, *,
                 multiplier_percent: int | None = None, bonus_points: int | None = None,
                 action_types: list[str] | None = None, sources: list[str] | None = None,
                 budget: int | None = None, enabled: bool = True) -> Call[Campaign]:
    """Create a campaign (campaign_id None) or change one (None back for an unknown id)."""
    return Call(queries.PUT_CAMPAIGN, {
        "actor": actor, "campaign_id": campaign_id, "name": name, "starts_at": starts_at, "ends_at": ends_at,
        "multiplier_percent": multiplier_percent, "bonus_points": bonus_points, "action_types": action_types,
        "sources": sources, "budget": budget, "enabled": enabled}, Campaign, Shape.MAYBE)


def enable_campaign(actor: str, campaign_id: int, enabled: bool) -> Call[Campaign]:
    """Disable or enable a campaign; None for an unknown one."""
    return Call(queries.ENABLE_CAMPAIGN, {"actor": actor, "campaign_id": campaign_id, "enabled": enabled},
                Campaign, Shape.MAYBE)


def list_campaigns() -> Call[Campaign]:
    return Call(queries.LIST_CAMPAIGNS, {}, Campaign, Shape.MANY)


def list_changes(before_id: int | None, limit: int) -> Call[Change]:
    """The history of rule and campaign changes, newest first."""
    return Call(queries.LIST_CHANGES, {"before_id": before_id, "limit": limit}, Change, Shape.MANY)


def balance(user_id: str) -> Call[Balance]:
    return Call(queries.BALANCE, {"user_id": _user(user_id)}, Balance)


def entries_page(user_id: str, before_seq: int | None, limit: int) -> Call[Entry]:
    """Up to `limit` entries, newest first, older than `before_seq` when given."""
    return Call(queries.ENTRIES_PAGE, {"user_id": _user(user_id), "before_seq": before_seq, "limit": limit},
                Entry, Shape.MANY)


def reservation(user_id: str, reservation_id: int) -> Call[Reservation]:
    """One reservation of this user, or None."""
    return Call(queries.RESERVATION, {"user_id": _user(user_id), "reservation_id": reservation_id},
                Reservation, Shape.MAYBE)


def verify_chain(user_id: str) -> Call[ChainCheck]:
    return Call(queries.VERIFY_CHAIN, {"user_id": _user(user_id)}, ChainCheck)


def expire_reservations(batch_size: int) -> Call[Expired]:
    """Expire overdue reservations now, committing every `batch_size`."""
    return Call(queries.EXPIRE_RESERVATIONS, {"batch_size": batch_size}, Expired)


def idempotency_retention() -> Call[dict]:
    """How long an idempotency record is kept (ledger.settings)."""
    return Call(queries.IDEMPOTENCY_RETENTION)


def check_idempotency_retention(keep: str) -> Call[dict]:
    """Raises InvalidArgument unless `keep` is at least a day and longer than the longest hold."""
    return Call(queries.CHECK_IDEMPOTENCY_RETENTION, {"retention": keep}, shape=Shape.NONE)


def set_idempotency_retention(keep: str) -> Call[dict]:
    """Keep idempotency records for `keep` (check_idempotency_retention first)."""
    return Call(queries.SET_IDEMPOTENCY_RETENTION, {"retention": keep}, shape=Shape.NONE)


def settle_lots(batch_size: int) -> Call[Settled]:
    """Mature due pending lots and lapse expired ones now, committing every `batch_size`."""
    return Call(queries.SETTLE_LOTS, {"batch_size": batch_size}, Settled)


def authenticate_v2(secret_hash: bytes) -> Call[ApiKey]:
    """The active key with this hash, with its limits, or None."""
    return Call(queries.AUTHENTICATE_V2, {"secret_hash": secret_hash}, ApiKey, Shape.MAYBE)


def create_key(name: str, secret_hash: bytes, scopes: list[str]) -> Call[ApiKey]:
    return Call(queries.CREATE_KEY, {"name": name, "secret_hash": secret_hash, "scopes": scopes}, ApiKey)


def limit_key(key_id: int, sources: list[str] | None, rate_tier: str | None) -> Call[ApiKey]:
    """Limit a key to the sources it may report and give it a rate tier; None for an unknown key."""
    return Call(queries.LIMIT_KEY, {"key_id": key_id, "sources": sources, "rate_tier": rate_tier},
                ApiKey, Shape.MAYBE)


def list_keys() -> Call[ApiKey]:
    return Call(queries.LIST_KEYS, {}, ApiKey, Shape.MANY)


def revoke_key(key_id: int) -> Call[ApiKey]:
    """Revoke once (again changes nothing); None for an unknown key."""
    return Call(queries.REVOKE_KEY, {"key_id": key_id}, ApiKey, Shape.MAYBE)


def citus_installed() -> Call[dict]:
    """{"citus": whether the database has the citus extension}."""
    return Call(queries.CITUS_INSTALLED)


def shard_ranges() -> Call[ShardRange]:
    """The shards of ledger.accounts' colocation group (Citus only)."""
    return Call(queries.SHARD_RANGES, {}, ShardRange, Shape.MANY)


def callback_salts(source: str) -> Call[dict]:
    """{"salts": [...]} of an enabled source's secrets in use, newest first; salts None when none."""
    return Call(queries.CALLBACK_SALTS, {"source": source})


def create_callback_source(source: str, salt: bytes, fingerprint: bytes) -> Call[CallbackSecret]:
    return Call(queries.CREATE_CALLBACK_SOURCE, {"source": source, "salt": salt, "fingerprint": fingerprint},
                CallbackSecret, Shape.MANY)


def rotate_callback_secret(source: str, salt: bytes, fingerprint: bytes) -> Call[CallbackSecret]:
    """Both secrets verify until the rotation is finished."""
    return Call(queries.ROTATE_CALLBACK_SECRET, {"source": source, "salt": salt, "fingerprint": fingerprint},
                CallbackSecret, Shape.MANY)


def finish_callback_rotation(source: str) -> Call[CallbackSecret]:
    return Call(queries.FINISH_CALLBACK_ROTATION, {"source": source}, CallbackSecret, Shape.MANY)


def disable_callback_source(source: str) -> Call[CallbackSecret]:
    return Call(queries.DISABLE_CALLBACK_SOURCE, {"source": source}, CallbackSecret, Shape.MANY)


def list_callback_sources() -> Call[CallbackSecret]:
    return Call(queries.LIST_CALLBACK_SOURCES, {}, CallbackSecret, Shape.MANY)


def ping() -> Call[dict]:
    return Call(queries.PING)
