"""What handlers receive, declared as Litestar dependencies (Provide) rather
than fetched from app.state inside each handler."""

from __future__ import annotations

from litestar import Request
from litestar.datastructures import State
from litestar.di import Provide

from app.api.group_commit import GroupCommit
from app.api.ratelimit import Decision
from app.ledger.client import AsyncLedger
from app.ledger.shards import Shards


def _ledger(state: State) -> AsyncLedger:
    return state.ledger


def _shards(state: State) -> Shards:
    return state.shards
def _credits(state: State) -> GroupCommit:
    return state.credits


def _rate_limit(request: Request) -> Decision:
    """The token the route's guard took, for the answer's RateLimit headers."""
    return request.state.rate_limit


DEPENDENCIES = {
    "ledger": Provide(_ledger, sync_to_thread=False),
    "shards": Provide(_shards, sync_to_thread=False),
    "credits": Provide(_credits, sync_to_thread=False),
    "rate_limit": Provide(_rate_limit, sync_to_thread=False),
}
