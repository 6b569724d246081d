"""/v1/accounts/{user_id}/...: each request is one call of one ledger function."""

from __future__ import annotations

import base64
import json
from typing import Annotated, Any, TypeVar

import msgspec

from litestar import Controller, Request, Response, get, post
from litestar.params import Parameter

from app import queries
from app.api.accounts.schemas import (
    AccountBalance,
    ActionRef,
    Balance,
    CommitRequest,
    CreditRequest,
    DebitRequest,
    EntriesPage,
    Entry,
    EntryCreated,
    ReleaseRequest,
    ReservationCreated,
    ReservationEnded,
    ReservationRequest,
    ReservationState,
)
from app.api.database import fetch_all, fetch_one
from app.api.problems import documented, problem
from app.api.security import allowed

UserId = Annotated[str, Parameter(pattern=r"^[A-Za-z0-9._:-]{1,64}$", description="opaque user id")]
ReservationId = Annotated[int, Parameter(ge=1, le=2**63 - 1)]
IdempotencyKey = Annotated[str, Parameter(
    header="Idempotency-Key", pattern=r"^[!-~]{1,255}$",
    description="1-255 visible ASCII characters; a retry with the same key and body returns the original answer",
)]

T = TypeVar("T")

# Ledger refusals -> problem causes. The ledger stores the refusal under the key,
# so a retry gets the same problem back.
_REFUSALS = {
    "insufficient_points": "insufficient-points",
    "action_already_credited": "action-already-credited",
    "idempotency_key_reused": "idempotency-key-reused",
    "reservation_not_found": "not-found",
    "reservation_committed": "reservation-not-open",
    "reservation_released": "reservation-not-open",
    "reservation_expired": "reservation-not-open",
    "amount_exceeds_reservation": "amount-exceeds-reservation",
}


def _headers(request: Request, result: dict[str, Any]) -> dict[str, str]:
    headers = request.state.rate_limit.headers()
    if result["replayed"]:
        headers["Idempotent-Replayed"] = "true"
    return headers


def _answer(request: Request, result: dict[str, Any], status_code: int, body: Any) -> Response:
    headers = _headers(request, result)
    if result["status"] != "ok":
        raise problem(
            _REFUSALS[result["status"]], result["status"].replace("_", " "), headers=headers,
            extra={"balance": {"available": result["available"], "reserved": result["reserved"]}},
        )
    return Response(body(result), status_code=status_code, headers=headers)


async def _strict(request: Request, struct: type[T]) -> T:
    """The body decoded strictly. Litestar converts bodies leniently ("10" becomes
    10); the API takes JSON types as they are, so the cached body is decoded again
    strictly, and a wrong type is refused."""
    raw = await request.body()
    try:
        return msgspec.json.decode(raw or b"{}", type=struct, strict=True)
    except msgspec.ValidationError as exc:
        raise problem("validation", str(exc)) from exc


def _balance(result: dict[str, Any]) -> Balance:
    return Balance(available=result["available"], reserved=result["reserved"])


def _metadata(metadata: dict[str, Any]) -> str:
    return json.dumps(metadata)


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

    @post("/credits", guards=[allowed("points:earn", "earn")], status_code=201, summary="Add points",
          responses=documented("forbidden", "action-already-credited", "idempotency-key-reused",
                               "payload-too-large"))
    async def credit(self, request: Request, user_id: UserId, idempotency_key: IdempotencyKey,
                     data: CreditRequest) -> Response[EntryCreated]:
        data = await _strict(request, CreditRequest)
        result = await fetch_one(request.app.state.pool, queries.CREDIT, {
            "user_id": user_id, "key": idempotency_key, "amount": data.amount, "reason": data.reason,
            "action_source": data.action.source if data.action else None,
            "action_external_id": data.action.external_id if data.action else None,
            "metadata": _metadata(data.metadata)})
        return _answer(request, result, 201, lambda r: EntryCreated(
            entry_id=r["entry_id"], user_id=user_id, amount=r["amount"], balance=_balance(r),
            created_at=r["created_at"]))

    @post("/debits", guards=[allowed("points:redeem", "redeem")], status_code=201, summary="Spend points at once",
          responses=documented("forbidden", "insufficient-points", "idempotency-key-reused", "payload-too-large"))
    async def debit(self, request: Request, user_id: UserId, idempotency_key: IdempotencyKey,
                    data: DebitRequest) -> Response[EntryCreated]:
        data = await _strict(request, DebitRequest)
        result = await fetch_one(request.app.state.pool, queries.DEBIT, {
            "user_id": user_id, "key": idempotency_key, "amount": data.amount, "reason": data.reason,
            "metadata": _metadata(data.metadata)})
        return _answer(request, result, 201, lambda r: EntryCreated(
            entry_id=r["entry_id"], user_id=user_id, amount=r["amount"], balance=_balance(r),
            created_at=r["created_at"]))

    @post("/reservations", guards=[allowed("points:redeem", "redeem")], status_code=201,
          summary="Hold points for a redemption",
          responses=documented("forbidden", "insufficient-points", "idempotency-key-reused", "payload-too-large"))
    async def reserve(self, request: Request, user_id: UserId, idempotency_key: IdempotencyKey,
                      data: ReservationRequest) -> Response[ReservationCreated]:
        data = await _strict(request, ReservationRequest)
        result = await fetch_one(request.app.state.pool, queries.RESERVE, {
            "user_id": user_id, "key": idempotency_key, "amount": data.amount,
            "ttl_seconds": data.ttl_seconds, "reason": data.reason, "metadata": _metadata(data.metadata)})
        return _answer(request, result, 201, lambda r: ReservationCreated(
            reservation_id=r["reservation_id"], user_id=user_id, amount=r["amount"], status="open",
            expires_at=r["expires_at"], entry_id=r["entry_id"], balance=_balance(r), created_at=r["created_at"]))

    @post("/reservations/{reservation_id:int}/commit", guards=[allowed("points:redeem", "redeem")],
          status_code=200, summary="Spend a reservation, all of it or part",
          responses=documented("forbidden", "not-found", "reservation-not-open", "amount-exceeds-reservation",
                               "idempotency-key-reused"))
    async def commit(self, request: Request, user_id: UserId, reservation_id: ReservationId,
                     idempotency_key: IdempotencyKey, data: CommitRequest | None = None) -> Response[ReservationEnded]:
        data = await _strict(request, CommitRequest)
        result = await fetch_one(request.app.state.pool, queries.COMMIT_RESERVATION, {
            "user_id": user_id, "key": idempotency_key, "reservation_id": reservation_id,
            "amount": data.amount, "reason": data.reason, "metadata": _metadata(data.metadata)})
        return _answer(request, result, 200, lambda r: ReservationEnded(
            reservation_id=reservation_id, user_id=user_id, status="committed", amount=r["amount"],
            entry_id=r["entry_id"], balance=_balance(r), created_at=r["created_at"]))

    @post("/reservations/{reservation_id:int}/release", guards=[allowed("points:redeem", "redeem")],
          status_code=200, summary="Return a reservation to available points",
          responses=documented("forbidden", "not-found", "reservation-not-open", "idempotency-key-reused"))
    async def release(self, request: Request, user_id: UserId, reservation_id: ReservationId,
                      idempotency_key: IdempotencyKey, data: ReleaseRequest | None = None) -> Response[ReservationEnded]:
        data = await _strict(request, ReleaseRequest)
        result = await fetch_one(request.app.state.pool, queries.RELEASE_RESERVATION, {
            "user_id": user_id, "key": idempotency_key, "reservation_id": reservation_id,
            "reason": data.reason, "metadata": _metadata(data.metadata)})
        return _answer(request, result, 200, lambda r: ReservationEnded(
            reservation_id=reservation_id, user_id=user_id, status="released", amount=r["amount"],
            entry_id=r["entry_id"], balance=_balance(r), created_at=r["created_at"]))

    @get("/reservations/{reservation_id:int}", guards=[allowed("points:read", "read")],
         summary="One reservation", responses=documented("forbidden", "not-found"))
    async def reservation(self, request: Request, user_id: UserId, reservation_id: ReservationId) -> Response[ReservationState]:
        row = await fetch_one(request.app.state.pool, queries.RESERVATION,
                              {"user_id": user_id, "reservation_id": reservation_id})
        if row["reservation_id"] is None:
            raise problem("not-found", "no such reservation for this user")
        return Response(ReservationState(**row), headers=request.state.rate_limit.headers())

    @get("/balance", guards=[allowed("points:read", "read")], summary="Available and reserved points",
         responses=documented("forbidden"))
    async def balance(self, request: Request, user_id: UserId) -> Response[AccountBalance]:
        row = await fetch_one(request.app.state.pool, queries.BALANCE, {"user_id": user_id})
        return Response(AccountBalance(
            user_id=user_id, available=row["available"], reserved=row["reserved"],
            lifetime_earned=row["lifetime_earned"], updated_at=row["updated_at"],
        ), headers=request.state.rate_limit.headers())

    @get("/entries", guards=[allowed("points:read", "read")], summary="Ledger entries, newest first",
         responses=documented("forbidden"))
    async def entries(self, request: Request, user_id: UserId,
                      limit: Annotated[int, Parameter(ge=1, le=500)] = 50,
                      cursor: Annotated[str | None, Parameter(max_length=64)] = None) -> Response[EntriesPage]:
        rows = await fetch_all(request.app.state.pool, queries.ENTRIES_PAGE,
                               {"user_id": user_id, "before_seq": _before_seq(cursor), "limit": limit})
        items = [Entry(
            entry_id=r["entry_id"], seq=r["seq"], kind=r["kind"], amount=r["amount"],
            available_delta=r["available_delta"], reserved_delta=r["reserved_delta"],
            available_after=r["available_after"], reserved_after=r["reserved_after"],
            reservation_id=r["reservation_id"], reason=r["reason"],
            action=(ActionRef(source=r["action_source"], external_id=r["action_external_id"])
                    if r["action_source"] else None),
            metadata=r["metadata"], created_at=r["created_at"],
        ) for r in rows]
        next_cursor = _cursor(rows[-1]["seq"]) if len(rows) == limit and rows[-1]["seq"] > 1 else None
        return Response(EntriesPage(items=items, next_cursor=next_cursor), headers=request.state.rate_limit.headers())
