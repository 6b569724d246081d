"""POST /v1/actions: a verified action earns what the rules give it."""

from __future__ import annotations

import msgspec
from litestar import Request, Response, post

from app.api.actions.schemas import ActionEarned, ActionRequest, Earning
from app.api.accounts.controllers import IdempotencyKey
from app.api.body import StrictJson
from app.api.problems import documented, from_action_refusal, problem
from app.api.ratelimit import Decision, take_token
from app.api.security import scope_required
from app.ledger import actions
from app.ledger.client import AsyncLedger
from app.ledger.results import ActionOutcome
from app.ledger.shards import Shards


@post("/v1/actions", guards=[scope_required("points:earn")], dto=StrictJson[ActionRequest], return_dto=None,
      status_code=201, tags=["actions"], summary="Report a verified action; the rules say what it earns",
      responses=documented("forbidden", "source-not-allowed", "action-already-credited", "action-claimed",
                           "cap-reached", "not-eligible", "idempotency-key-reused", "payload-too-large"))
async def report_action(request: Request, ledger: AsyncLedger, shards: Shards, idempotency_key: IdempotencyKey,
                        data: ActionRequest) -> Response[ActionEarned]:
    # The source check comes before the token: a key refused a source spends
    # nothing of the user's bucket.
    if not request.user.may_report(data.source):
        raise problem("source-not-allowed", f"this API key may not report actions of source {data.source}",
                      extra={"field": "source"})
    rate_limit = await take_token(request, "earn", data.user_id)
    outcome = await actions.earn(ledger, data.user_id, idempotency_key, data.source, data.external_id, data.type,
                                 data.value, data.occurred_at, data.metadata, (await shards.current()).distributed)
    return answer(outcome, rate_limit)


def answer(outcome: ActionOutcome, rate_limit: Decision) -> Response[ActionEarned]:
    """What an action earned, or the problem it was refused with (POST
    /v1/actions and the partners' callbacks answer alike)."""
    headers = rate_limit.headers()
    if outcome.replayed:
        headers["Idempotent-Replayed"] = "true"
    if not outcome.ok:
        extra = {"earning": msgspec.to_builtins(Earning.of(outcome))}
        if outcome.available is not None:
            extra["balance"] = {"available": outcome.available, "reserved": outcome.reserved}
        raise from_action_refusal(outcome, headers, extra)
    return Response(ActionEarned.of(outcome), status_code=201, headers=headers)
