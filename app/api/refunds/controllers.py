"""POST /v1/refunds: a refund of a verified action reverses what it earned
(ledger.refund). A partner's signed refund callback comes through
app.api.callbacks and ends here alike."""

from __future__ import annotations

from litestar import Request, Response, post

from app.api.accounts.controllers import IdempotencyKey, answer
from app.api.accounts.schemas import EntryCreated
from app.api.body import StrictJson
from app.api.problems import documented, problem
from app.api.ratelimit import take_token
from app.api.refunds.schemas import RefundRequest
from app.api.security import scope_required
from app.ledger import calls
from app.ledger.client import AsyncLedger

REFUSALS = ("action-not-found", "action-already-refunded", "action-points-expired", "idempotency-key-reused",
            "payload-too-large")


@post("/v1/refunds", guards=[scope_required("points:earn")], dto=StrictJson[RefundRequest], return_dto=None,
      status_code=201, tags=["actions"],
      summary="Refund a verified action: its pending points cancelled, its available ones taken back, "
              "spent ones owed", responses=documented("forbidden", "source-not-allowed", *REFUSALS))
async def refund(request: Request, ledger: AsyncLedger, idempotency_key: IdempotencyKey,
                 data: RefundRequest) -> Response[EntryCreated]:
    # A key limited to some sources refunds only their actions (checked before
    # the token, as for the actions themselves).
    if not request.user.may_report(data.source):
        raise problem("source-not-allowed", f"this API key may not refund actions of source {data.source}",
                      extra={"field": "source"})
    rate_limit = await take_token(request, "earn", data.user_id)
    outcome = await ledger(calls.refund(data.user_id, idempotency_key, data.source, data.external_id, data.reason,
                                        data.metadata))
    return answer(outcome, rate_limit, 201, EntryCreated.of)
