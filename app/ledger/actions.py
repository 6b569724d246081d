"""A verified action, end to end: bound to its user once ever and earned by the
rules. On a single node that is one transaction, rules.act, which claims the
action beside the credit; under Citus the claim's row is on the action's own
shard, so it is bound first in a transaction of its own (rules.claim_action)
and then earned on the user's shard (rules.act, told it was claimed).
docs/ARCHITECTURE.md says why. The API's POST /v1/actions and the partners'
callbacks both come through here."""

from __future__ import annotations

from collections.abc import Generator
from datetime import datetime
from typing import Any

from app.ledger import calls
from app.ledger.client import AsyncLedger, Call, Ledger
from app.ledger.errors import BudgetSliceLow, ClaimFirst, LedgerError, Overloaded
from app.ledger.results import ActionOutcome, ActionStatus


# Refills one claim may ask for before it is refused as overloaded (each
# gives its slice at least the claim; another refill only when concurrent
# claims of the slice spent it first).
REFILLS = 8

Steps = Generator[Call[Any], Any, ActionOutcome]


def _steps(user_id: str, key: str, source: str, external_id: str, action_type: str, value: int | None,
           occurred_at: datetime | None, metadata: dict[str, Any], claim_first: bool) -> Steps:
    """The calls of one action, each sent the answer of the one before (or
    thrown its error), for a driver below to run on either kind of ledger.
    `claim_first` is a guess that the ledger is distributed; the database has
    the last word (rules.act raises ClaimFirst under Citus when it was not)."""
    claimed = False
    refills = 0
    while True:
        if claim_first and not claimed:
            claim = yield calls.claim_action(user_id, source, external_id)
            if claim["owner"] != user_id:
                return ActionOutcome(ActionStatus.ACTION_CLAIMED_BY_ANOTHER_USER, user_id, None, None, None, None,
                                     None, None, None, None, None, None, None, False)
            claimed = True
        try:
            return (yield calls.act(user_id, key, source, external_id, action_type, value, occurred_at, metadata,
                                    claimed))
        except ClaimFirst:
            if claimed:
                raise
            claim_first = True
        except BudgetSliceLow as low:
            refills += 1
            if refills > REFILLS:
                raise Overloaded("the campaign's budget was refilled for this claim and spent by others each time; "
                                 "retry") from None
            yield calls.refill_budget_slice(low.campaign_id, user_id, low.points)


async def earn(ledger: AsyncLedger, user_id: str, key: str, source: str, external_id: str, action_type: str,
               value: int | None, occurred_at: datetime | None, metadata: dict[str, Any],
               claim_first: bool) -> ActionOutcome:
    """What the action earned, or why it earned nothing. An action that belongs
    to another user is refused before the user's account is touched: nothing
    is written for it. A claim whose slice of a campaign's budget is short
    refills it and claims again. `claim_first`: the ledger is distributed
    (app.ledger.shards), so the claim is its own call."""
    steps = _steps(user_id, key, source, external_id, action_type, value, occurred_at, metadata, claim_first)
    call = next(steps)
    while True:
        try:
            answer = await ledger(call)
        except LedgerError as exc:
            call = _next(steps, exc)
        else:
            call = _next(steps, answer)
        if isinstance(call, ActionOutcome):
            return call


def earn_on(ledger: Ledger, user_id: str, key: str, source: str, external_id: str, action_type: str,
            value: int | None, occurred_at: datetime | None, metadata: dict[str, Any]) -> ActionOutcome:
    """earn, on one connection (the tests), with no guess: the database says
    when the claim must come first."""
    steps = _steps(user_id, key, source, external_id, action_type, value, occurred_at, metadata, False)
    call = next(steps)
    while True:
        try:
            answer = ledger(call)
        except LedgerError as exc:
            call = _next(steps, exc)
        else:
            call = _next(steps, answer)
        if isinstance(call, ActionOutcome):
            return call


def _next(steps: Steps, answer: Any) -> Call[Any] | ActionOutcome:
    """The next call, or the outcome once there is none; an error the steps do
    not handle comes back out of them."""
    try:
        return steps.throw(answer) if isinstance(answer, LedgerError) else steps.send(answer)
    except StopIteration as done:
        return done.value
