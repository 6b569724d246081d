"""POST /v1/callbacks/{source}: a partner confirms an action, signed with its
secret; it earns exactly as POST /v1/actions would (app.ledger.actions).
POST /v1/callbacks/{source}/refunds: the partner refunds one, signed alike,
as POST /v1/refunds would."""

from __future__ import annotations

from typing import Annotated

from litestar import Request, Response, post
from litestar.params import Parameter

from app.api.accounts.controllers import answer as refund_answer
from app.api.accounts.schemas import EntryCreated
from app.api.actions.controllers import answer
from app.api.actions.schemas import ActionEarned
from app.api.body import strict
from app.api.callbacks.schemas import CallbackRequest
from app.api.callbacks.verification import verified_body
from app.api.refunds.controllers import REFUSALS as REFUND_REFUSALS
from app.api.refunds.schemas import CallbackRefundRequest
from app.api.problems import documented, problem
from app.api.ratelimit import take_callback_token
from app.ledger import actions, calls, limits
from app.ledger.client import AsyncLedger
from app.ledger.shards import Shards

SourceName = Annotated[str, Parameter(pattern=limits.NAME_PATTERN, description="the source, as `rewards sources create` named it")]


def idempotency_key(source: str, external_id: str, what: str = "callback") -> str:
    """A callback carries no Idempotency-Key: its action is its identity, so a
    partner's retry replays the first answer and the same external id with
    another body is refused (a key reused for a different request). A refund
    of the action has a key of its own (`what`)."""
    return calls.action_idempotency_key(what, source, external_id)


async def _known_user(ledger: AsyncLedger, user_id: str) -> None:
    """A partner reports on users the app made known; it does not open accounts
    on its own word (a leaked secret could otherwise make any number)."""
    if (await ledger(calls.balance(user_id))).updated_at is None:
        raise problem("unknown-user", f"the ledger knows no user {user_id!r}", extra={"field": "user_id"})


@post("/v1/callbacks/{source:str}", exclude_from_auth=True, status_code=201, tags=["callbacks"],
      summary="A partner confirms an action, signed with its secret (README \"Signed callbacks\")",
      responses=documented("callback-source-unknown", "signature-invalid", "signature-stale", "unknown-user",
                           "action-already-credited", "action-claimed", "cap-reached", "not-eligible",
                           "idempotency-key-reused", "payload-too-large"))
async def callback(request: Request, ledger: AsyncLedger, shards: Shards,
                   source: SourceName) -> Response[ActionEarned]:
    data = strict(await verified_body(request, source), CallbackRequest)
    rate_limit = await take_callback_token(request, source, data.user_id)
    await _known_user(ledger, data.user_id)
    outcome = await actions.earn(ledger, data.user_id, idempotency_key(source, data.external_id), source,
                                 data.external_id, data.type, data.value, data.occurred_at, data.metadata,
                                 (await shards.current()).distributed)
    return answer(outcome, rate_limit)


@post("/v1/callbacks/{source:str}/refunds", exclude_from_auth=True, status_code=201, tags=["callbacks"],
      summary="A partner refunds an action it confirmed, signed with its secret (README \"Refunds\")",
      responses=documented("callback-source-unknown", "signature-invalid", "signature-stale", "unknown-user",
                           *REFUND_REFUSALS))
async def refund_callback(request: Request, ledger: AsyncLedger, source: SourceName) -> Response[EntryCreated]:
    data = strict(await verified_body(request, source), CallbackRefundRequest)
    rate_limit = await take_callback_token(request, source, data.user_id)
    await _known_user(ledger, data.user_id)
    outcome = await ledger(calls.refund(data.user_id, idempotency_key(source, data.external_id, "callback-refund"),
                                        source, data.external_id, data.reason, data.metadata))
    return refund_answer(outcome, rate_limit, 201, EntryCreated.of)
