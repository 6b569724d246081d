"""/v1/accounts/{user_id}/...: each request is one call of one ledger function."""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Annotated, TypeVar

from litestar import Controller, Response, get, post
from litestar.params import Parameter

from app.api.accounts.schemas import (
    AccountBalance,
    CommitRequest,
    CreditRequest,
    DebitRequest,
    EntriesPage,
    Entry,
    EntryCreated,
    NextExpiry,
    ReleaseRequest,
    ReservationCreated,
    ReservationEnded,
    ReservationRequest,
    action_arguments,
)
from app.api.body import StrictJson
from app.api.group_commit import GroupCommit
from app.api.problems import documented, from_refusal, problem
from app.api.ratelimit import Decision
from app.api.security import scope_and_token
from app.ledger import calls, limits
from app.ledger.client import AsyncLedger
from app.ledger.results import Outcome, Reservation

UserId = Annotated[str, Parameter(pattern=limits.NAME_PATTERN, description="opaque user id")]
ReservationId = Annotated[int, Parameter(ge=1, le=2**63 - 1)]
IdempotencyKey = Annotated[str, Parameter(
    header="Idempotency-Key", pattern=limits.TOKEN_PATTERN,
    description="1-255 visible ASCII characters; a retry with the same key and body returns the original answer",
)]

B = TypeVar("B")

# Commit and release need no body: without one, every field takes its default.
NO_BODY_COMMIT = CommitRequest()
NO_BODY_RELEASE = ReleaseRequest()


def answer(outcome: Outcome, rate_limit: Decision, status_code: int, body: Callable[[Outcome], B]) -> Response[B]:
    headers = rate_limit.headers()
    if outcome.replayed:
        headers["Idempotent-Replayed"] = "true"
    if not outcome.ok:
        raise from_refusal(outcome, headers)
    return Response(body(outcome), status_code=status_code, headers=headers)


def _cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(f"seq:{seq}".encode()).decode().rstrip("=")


def _before_seq(cursor: str | None) -> int | None:
    if cursor is None:
        return None
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        kind, _, value = text.partition(":")
        if kind == "seq" and value.isdigit() and 0 < int(value) < 2**63:
            return int(value)
    except ValueError:  # binascii.Error, non-ASCII text and bad UTF-8 are all ValueErrors
        pass
    raise problem("validation", "cursor is not one this API returned", extra={"field": "cursor"})


class AccountsController(Controller):
    path = "/v1/accounts/{user_id:str}"
    tags = ["accounts"]

    @post("/credits", guards=[scope_and_token("points:earn", "earn")], dto=StrictJson[CreditRequest],
          return_dto=None, status_code=201, summary="Add points",
          responses=documented("forbidden", "action-already-credited", "idempotency-key-reused",
                               "payload-too-large"))
    async def credit(self, credits: GroupCommit, rate_limit: Decision, user_id: UserId,
                     idempotency_key: IdempotencyKey, data: CreditRequest) -> Response[EntryCreated]:
        outcome = await credits.credit(calls.Credit(user_id, idempotency_key, data.amount, data.reason,
                                                    metadata=data.metadata, **action_arguments(data.action)),
                                       pending_seconds=data.pending_seconds, expiry_seconds=data.expiry_seconds)
        return answer(outcome, rate_limit, 201, EntryCreated.of)

    @post("/debits", guards=[scope_and_token("points:redeem", "redeem")], dto=StrictJson[DebitRequest],
          return_dto=None, status_code=201, summary="Spend points at once",
          responses=documented("forbidden", "insufficient-points", "idempotency-key-reused", "payload-too-large"))
    async def debit(self, ledger: AsyncLedger, rate_limit: Decision, user_id: UserId,
                    idempotency_key: IdempotencyKey, data: DebitRequest) -> Response[EntryCreated]:
        outcome = await ledger(calls.debit(user_id, idempotency_key, data.amount, data.reason, data.metadata))
        return answer(outcome, rate_limit, 201, EntryCreated.of)

    @post("/reservations", guards=[scope_and_token("points:redeem", "redeem")], dto=StrictJson[ReservationRequest],
          return_dto=None, status_code=201, summary="Hold points for a redemption",
          responses=documented("forbidden", "insufficient-points", "idempotency-key-reused", "payload-too-large"))
    async def reserve(self, ledger: AsyncLedger, rate_limit: Decision, user_id: UserId,
                      idempotency_key: IdempotencyKey, data: ReservationRequest) -> Response[ReservationCreated]:
        outcome = await ledger(calls.reserve(user_id, idempotency_key, data.amount, data.ttl_seconds,
                                             data.reason, data.metadata))
        return answer(outcome, rate_limit, 201, ReservationCreated.of)

    @post("/reservations/{reservation_id:int}/commit", guards=[scope_and_token("points:redeem", "redeem")],
          dto=StrictJson[CommitRequest], return_dto=None, status_code=200,
          summary="Spend a reservation, all of it or part",
          responses=documented("forbidden", "not-found", "reservation-not-open", "amount-exceeds-reservation",
                               "idempotency-key-reused"))
    async def commit(self, ledger: AsyncLedger, rate_limit: Decision, user_id: UserId, reservation_id: ReservationId,
                     idempotency_key: IdempotencyKey, data: CommitRequest = NO_BODY_COMMIT) -> Response[ReservationEnded]:
        outcome = await ledger(calls.commit_reservation(user_id, idempotency_key, reservation_id, data.amount,
                                                        data.reason, data.metadata))
        return answer(outcome, rate_limit, 200, lambda o: ReservationEnded.of(o, reservation_id, "committed"))

    @post("/reservations/{reservation_id:int}/release", guards=[scope_and_token("points:redeem", "redeem")],
          dto=StrictJson[ReleaseRequest], return_dto=None, status_code=200,
          summary="Return a reservation to available points",
          responses=documented("forbidden", "not-found", "reservation-not-open", "idempotency-key-reused"))
    async def release(self, ledger: AsyncLedger, rate_limit: Decision, user_id: UserId,
                      reservation_id: ReservationId, idempotency_key: IdempotencyKey,
                      data: ReleaseRequest = NO_BODY_RELEASE) -> Response[ReservationEnded]:
        outcome = await ledger(calls.release_reservation(user_id, idempotency_key, reservation_id, data.reason,
                                                         data.metadata))
        return answer(outcome, rate_limit, 200, lambda o: ReservationEnded.of(o, reservation_id, "released"))

    @get("/reservations/{reservation_id:int}", guards=[scope_and_token("points:read", "read")],
         summary="One reservation", responses=documented("forbidden", "not-found"))
    async def reservation(self, ledger: AsyncLedger, rate_limit: Decision, user_id: UserId,
                          reservation_id: ReservationId) -> Response[Reservation]:
        found = await ledger(calls.reservation(user_id, reservation_id))
        if found is None:
            raise problem("not-found", "no such reservation for this user")
        # The ledger's own record is the answer: the HTTP view adds nothing to it.
        return Response(found, headers=rate_limit.headers())

    @get("/balance", guards=[scope_and_token("points:read", "read")],
         summary="Available, pending and reserved points, and the next expiry", responses=documented("forbidden"))
    async def balance(self, ledger: AsyncLedger, rate_limit: Decision, user_id: UserId) -> Response[AccountBalance]:
        found = await ledger(calls.balance(user_id))
        next_expiry = (NextExpiry(at=found.next_expiry_at, amount=found.next_expiry_amount)
                       if found.next_expiry_at else None)
        return Response(AccountBalance(
            user_id=user_id, available=found.available, pending=found.pending, reserved=found.reserved,
            lifetime_earned=found.lifetime_earned, next_expiry=next_expiry, updated_at=found.updated_at,
            owed=found.owed,
        ), headers=rate_limit.headers())

    @get("/entries", guards=[scope_and_token("points:read", "read")], summary="Ledger entries, newest first",
         responses=documented("forbidden"))
    async def entries(self, ledger: AsyncLedger, rate_limit: Decision, user_id: UserId,
                      limit: Annotated[int, Parameter(ge=1, le=limits.MAX_PAGE)] = 50,
                      cursor: Annotated[str | None, Parameter(max_length=64)] = None) -> Response[EntriesPage]:
        rows = await ledger(calls.entries_page(user_id, _before_seq(cursor), limit))
        next_cursor = _cursor(rows[-1].seq) if len(rows) == limit and rows[-1].seq > 1 else None
        return Response(EntriesPage(items=[Entry.of(row) for row in rows], next_cursor=next_cursor),
                        headers=rate_limit.headers())
