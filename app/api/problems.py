"""RFC 9457 problem details: one stable `type` per cause."""

from __future__ import annotations

import logging
from typing import Any

import msgspec
from litestar.exceptions import HTTPException
from litestar.openapi.datastructures import ResponseSpec
from litestar.plugins.problem_details import ProblemDetailsException

from app.ledger.errors import Fault, InvalidArgument, LedgerError, Overloaded, Refused, Unavailable
from app.ledger.results import ActionOutcome, ActionStatus, Outcome, Status

log = logging.getLogger("rewards.api")

TYPE_PREFIX = "urn:rewards-ledger:problem:"

# cause -> (HTTP status, title)
CAUSES: dict[str, tuple[int, str]] = {
    "validation": (400, "The request is not valid"),
    "unauthorized": (401, "A valid API key is required"),
    "forbidden": (403, "The API key lacks the scope this needs"),
    "source-not-allowed": (403, "The API key may not report actions of this source"),
    "signature-invalid": (401, "The callback's signature does not verify"),
    "signature-stale": (401, "The callback's timestamp is outside the accepted window"),
    "not-found": (404, "No such resource"),
    "action-not-found": (404, "The user has no credit of this action"),
    "callback-source-unknown": (404, "No such callback source"),
    "unknown-user": (422, "The ledger knows no such user"),
    "method-not-allowed": (405, "Method not allowed"),
    "payload-too-large": (413, "The request body is too large"),
    "unsupported-media-type": (415, "The request body must be JSON"),
    "insufficient-points": (409, "Not enough available points"),
    "action-already-credited": (409, "This action has already earned points"),
    "action-claimed": (409, "This action was reported for another user"),
    "cap-reached": (409, "The user has earned the most this action type allows"),
    "not-eligible": (422, "No enabled rule earns points for this action"),
    "action-already-refunded": (409, "This action has already been refunded"),
    "action-points-expired": (409, "Every point this action earned has expired"),
    "reservation-not-open": (409, "The reservation has already ended"),
    "refused-for-now": (409, "The request cannot be done yet; the detail says what must happen first"),
    "amount-exceeds-reservation": (409, "The amount is more than the reservation holds"),
    "idempotency-key-reused": (422, "The idempotency key was used for a different request"),
    "rate-limited": (429, "Too many requests"),
    "overloaded": (503, "The service is busy; retry after the given delay"),
    "unavailable": (503, "The database is unavailable; retry after the given delay"),
    "internal": (500, "Internal error"),
}

_CAUSE_BY_STATUS = {status: cause for cause, (status, _) in CAUSES.items()}

# The ledger's refusals. It remembers each under its idempotency key, so a retry
# gets the same problem back.
REFUSALS: dict[Status, str] = {
    Status.INSUFFICIENT_POINTS: "insufficient-points",
    Status.ACTION_ALREADY_CREDITED: "action-already-credited",
    Status.IDEMPOTENCY_KEY_REUSED: "idempotency-key-reused",
    Status.RESERVATION_NOT_FOUND: "not-found",
    Status.RESERVATION_COMMITTED: "reservation-not-open",
    Status.RESERVATION_RELEASED: "reservation-not-open",
    Status.RESERVATION_EXPIRED: "reservation-not-open",
    Status.AMOUNT_EXCEEDS_RESERVATION: "amount-exceeds-reservation",
    Status.ACTION_NOT_FOUND: "action-not-found",
    Status.ACTION_ALREADY_REFUNDED: "action-already-refunded",
    Status.ACTION_POINTS_EXPIRED: "action-points-expired",
}


# What a verified action can be refused with (app.ledger.actions).
ACTION_REFUSALS: dict[ActionStatus, str] = {
    ActionStatus.IDEMPOTENCY_KEY_REUSED: "idempotency-key-reused",
    ActionStatus.ACTION_ALREADY_CREDITED: "action-already-credited",
    ActionStatus.ACTION_CLAIMED_BY_ANOTHER_USER: "action-claimed",
    ActionStatus.NOT_ELIGIBLE: "not-eligible",
    ActionStatus.CAP_REACHED: "cap-reached",
}


def problem(cause: str, detail: str = "", *, headers: dict[str, str] | None = None,
            extra: dict[str, Any] | None = None) -> ProblemDetailsException:
    status, title = CAUSES[cause]
    return ProblemDetailsException(
        status_code=status, type_=TYPE_PREFIX + cause, title=title, detail=detail,
        headers=headers, extra=extra,
    )


def from_http_exception(exc: HTTPException) -> ProblemDetailsException:
    """Litestar's own refusals (bad JSON, wrong types, unknown routes...) as problems."""
    cause = _CAUSE_BY_STATUS.get(exc.status_code, "validation" if exc.status_code < 500 else "internal")
    extra = {"errors": exc.extra} if isinstance(exc.extra, list) else exc.extra
    return problem(cause, detail=exc.detail, headers=exc.headers, extra=extra)


def from_refusal(outcome: Outcome, headers: dict[str, str]) -> ProblemDetailsException:
    return problem(REFUSALS[outcome.status], outcome.status.replace("_", " "), headers=headers,
                   extra={"balance": {"available": outcome.available, "reserved": outcome.reserved}})


def from_action_refusal(outcome: ActionOutcome, headers: dict[str, str],
                        extra: dict[str, Any]) -> ProblemDetailsException:
    return problem(ACTION_REFUSALS[outcome.status], outcome.status.replace("_", " "), headers=headers, extra=extra)


def from_ledger_error(exc: LedgerError) -> ProblemDetailsException:
    """The one translation of the ledger's exceptions into answers."""
    if isinstance(exc, InvalidArgument):
        return problem("validation", str(exc), extra={"field": exc.field} if exc.field else None)
    if isinstance(exc, Overloaded):
        return problem("overloaded", str(exc), headers={"Retry-After": "1"})
    if isinstance(exc, Unavailable):
        return problem("unavailable", "the database did not answer", headers={"Retry-After": "2"})
    if isinstance(exc, Refused):
        # A precondition that time settles (a refund's points held by a
        # reservation, which ends by its deadline): nothing was written, not
        # even the key, so the same request succeeds later.
        return problem("refused-for-now", str(exc), headers={"Retry-After": "30"})
    if isinstance(exc, Fault):
        # A credit of a group commit that raised in the database, as it would
        # have alone (where it reaches the API's handler of unknown errors).
        log.error("the ledger raised: %s", exc)
        return problem("internal", "the request failed; it wrote nothing")
    raise TypeError(f"no answer for {type(exc).__name__}") from exc


def body_of(exc: ProblemDetailsException) -> dict[str, Any]:
    """The problem as the body of its own answer would carry it, for an answer
    holding many (a bulk grant's items); its Retry-After as `retry_after`."""
    body = {"type": exc.type_, "title": exc.title, "status": exc.status_code, "detail": exc.detail,
            **(exc.extra or {})}
    if exc.headers and "Retry-After" in exc.headers:
        body["retry_after"] = int(exc.headers["Retry-After"])
    return body


class Problem(msgspec.Struct):
    """An RFC 9457 problem, as every refusal is answered (documentation only)."""

    type: str
    title: str
    status: int
    detail: str = ""


def documented(*causes: str) -> dict[int, ResponseSpec]:
    """OpenAPI entries for the problems a route can answer with."""
    by_status: dict[int, list[str]] = {}
    for cause in ("validation", "unauthorized", "rate-limited", "overloaded", *causes):
        by_status.setdefault(CAUSES[cause][0], []).append(TYPE_PREFIX + cause)
    return {
        status: ResponseSpec(data_container=Problem, media_type="application/problem+json",
                             generate_examples=False, description="; ".join(types))
        for status, types in sorted(by_status.items())
    }
