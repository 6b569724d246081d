"""A verified action, end to end, in two one-shard transactions: first bound to
its user once ever (rules.claim_action, on the action's own shard), then
earned by the rules (rules.act, on the user's shard). docs/ARCHITECTURE.md
says why two. The API's POST /v1/actions and the partners' callbacks both
come through here."""

from __future__ import annotations

from collections.abc import Generator
from datetime import datetime
from typing import Any

from app.ledger import calls
from app.ledger.client import AsyncLedger, Call, Ledger
from app.ledger.errors import BudgetSliceLow, Overloaded
from app.ledger.results import ActionOutcome, ActionStatus


# Refills one claim may ask for before it is refused as overloaded (each
# gives its slice at least the claim; another refill only when concurrent
# claims of the slice spent it first).
REFILLS = 8

Steps = Generator[Call[Any], Any, ActionOutcome]


def _steps(user_id: str, key: str, source: str, external_id: str, action_type: str, value: int | None,
           occurred_at: datetime | None, metadata: dict[str, Any]) -> Steps:
    """The calls of one action, each sent the answer of the one before (or
    thrown its error), for a driver below to run on either kind of ledger."""
    claim = yield calls.claim_action(user_id, source, external_id)
    if claim["owner"] != user_id:
        return ActionOutcome(ActionStatus.ACTION_CLAIMED_BY_ANOTHER_USER, user_id, None, None, None, None, None,
                             None, None, None, None, None, None, False)
    for _ in range(REFILLS):
        try:
            return (yield calls.act(user_id, key, source, external_id, action_type, value, occurred_at, metadata))
        except BudgetSliceLow as low:
            yield calls.refill_budget_slice(low.campaign_id, user_id, low.points)
    raise Overloaded("the campaign's budget was refilled for this claim and spent by others each time; retry")


async def earn(ledger: AsyncLedger, user_id: str, key: str, source: str, external_id: str, action_type: str,
               value: int | None, occurred_at: datetime | None, metadata: dict[str, Any]) -> ActionOutcome:
    """What the action earned, or why it earned nothing. An action that belongs
    to another user is refused before the user's shard is touched: nothing is
    written for it (the claim that says so is already there). A claim whose
    slice of a campaign's budget is short refills it and claims again."""
    steps = _steps(user_id, key, source, external_id, action_type, value, occurred_at, metadata)
    call = next(steps)
    while True:
        try:
            answer = await ledger(call)
        except BudgetSliceLow as exc:
            call = _next(steps, exc)
        else:
            call = _next(steps, answer)
        if isinstance(call, ActionOutcome):
            return call


def earn_on(ledger: Ledger, user_id: str, key: str, source: str, external_id: str, action_type: str,
            value: int | None, occurred_at: datetime | None, metadata: dict[str, Any]) -> ActionOutcome:
    """earn, on one connection (the CLI, the tests)."""
    steps = _steps(user_id, key, source, external_id, action_type, value, occurred_at, metadata)
    call = next(steps)
    while True:
        try:
            answer = ledger(call)
        except BudgetSliceLow as exc:
            call = _next(steps, exc)
        else:
            call = _next(steps, answer)
        if isinstance(call, ActionOutcome):
            return call


def _next(steps: Steps, answer: Any) -> Call[Any] | ActionOutcome:
    """The next call, or the outcome once there is none."""
    try:
        return steps.throw(answer) if isinstance(answer, BudgetSliceLow) else steps.send(answer)
    except StopIteration as done:
        return done.value
