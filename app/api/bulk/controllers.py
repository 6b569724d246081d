"""POST /v1/credits/bulk: up to 1,000 credits, of any users, in one request,
each answered as its own single credit would have been."""

from __future__ import annotations

import logging
from collections import Counter

from litestar import Controller, Request, Response, post
from litestar.plugins.problem_details import ProblemDetailsException

from app.api.accounts.schemas import EntryCreated, action_arguments
from app.api.body import StrictJson
from app.api.bulk.schemas import BulkCredit, BulkCreditAnswer, BulkCreditRequest, BulkCreditsAnswer
from app.api.problems import body_of, documented, from_ledger_error, from_refusal, problem
from app.api.ratelimit import take_tokens
from app.api.security import scope_required
from app.ledger import calls
from app.ledger.client import AsyncLedger
from app.ledger.errors import InvalidArgument, LedgerError, Overloaded, Unavailable
from app.ledger.many import credit_by_shard
from app.ledger.results import Outcome
from app.ledger.shards import Shards

log = logging.getLogger("rewards.api")

# Calls of one request in flight at once (one per shard group): enough to keep
# several workers busy, few enough to leave the pool to other requests.
CALLS_AT_ONCE = 4


def _holds_nul(value: object) -> bool:
    """Whether a decoded JSON value holds \\u0000 anywhere, which jsonb cannot."""
    pending = [value]
    while pending:
        value = pending.pop()
        if isinstance(value, str):
            if "\x00" in value:
                return True
        elif isinstance(value, dict):
            pending += value.keys()
            pending += value.values()
        elif isinstance(value, list):
            pending += value
    return False


def _refused(item: BulkCredit, exc: ProblemDetailsException, replayed: bool) -> BulkCreditAnswer:
    return BulkCreditAnswer(status=exc.status_code, user_id=item.user_id, idempotency_key=item.idempotency_key,
                            replayed=replayed, problem=body_of(exc))


def _answer(item: BulkCredit, answer: Outcome | LedgerError) -> BulkCreditAnswer:
    if isinstance(answer, Outcome):
        if not answer.ok:
            return _refused(item, from_refusal(answer, {}), answer.replayed)
        return BulkCreditAnswer(status=201, user_id=item.user_id, idempotency_key=item.idempotency_key,
                                replayed=answer.replayed, entry=EntryCreated.of(answer))
    if isinstance(answer, (InvalidArgument, Overloaded, Unavailable)):
        return _refused(item, from_ledger_error(answer), False)
    # A genuine fault of this item alone, as a single credit would have met it.
    log.error("a bulk credit failed", extra={"fields": {"user_id": item.user_id, "error": str(answer)}})
    return _refused(item, problem("internal", "this credit failed; it wrote nothing"), False)


class BulkCreditsController(Controller):
    path = "/v1/credits"
    tags = ["credits"]

    @post("/bulk", guards=[scope_required("points:earn")], dto=StrictJson[BulkCreditRequest], return_dto=None,
          status_code=200, summary="Add points to many users at once",
          description="Up to 1,000 credits, each with its own user and idempotency key, answered one by one in "
                      "order (`items[i].status` is what the single credit would have answered). A retry of the "
                      "whole request replays every item that took effect.",
          responses=documented("forbidden", "payload-too-large"))
    async def bulk(self, request: Request, ledger: AsyncLedger, shards: Shards,
                   data: BulkCreditRequest) -> Response[BulkCreditsAnswer]:
        for position, item in enumerate(data.items):
            # The one value PostgreSQL refuses after decoding: sent with the
            # others it would fail their whole call, so it is refused here.
            if _holds_nul(item.metadata):
                raise problem("validation", f"items[{position}].metadata holds \\u0000, which cannot be stored",
                              extra={"field": f"items[{position}].metadata"})
        await take_tokens(request, "earn", Counter(item.user_id for item in data.items), len(data.items))
        credits = [calls.Credit(item.user_id, item.idempotency_key, item.amount, item.reason,
                                metadata=item.metadata, **action_arguments(item.action)) for item in data.items]
        answers = await credit_by_shard(ledger, await shards.current(), credits, CALLS_AT_ONCE)
        if all(isinstance(answer, (Overloaded, Unavailable)) for answer in answers):
            # No call was answered (the database is away or saturated): the
            # request as a whole gets the single credit's 503.
            raise answers[0]
        return Response(BulkCreditsAnswer(items=[_answer(item, answer) for item, answer in zip(data.items, answers)]),
                        headers=request.state.rate_limit.headers())
