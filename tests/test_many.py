"""Credits sent by shard group (app.ledger.many) get each what the single credit
would have answered, whatever the shard map: under Citus a map that puts every
user in one group (as one older than a split would put some) costs a second
call for the items of other shards, never an answer."""

from __future__ import annotations

import asyncio
import uuid

from psycopg_pool import AsyncConnectionPool

from app.ledger import calls
from app.ledger.client import AsyncLedger
from app.ledger.errors import InvalidArgument
from app.ledger.many import credit_by_shard
from app.ledger.results import Outcome
from app.ledger.shards import SINGLE, Shards
from tests.conftest import SETTINGS


def _send(database: str, credits: list[calls.Credit], current_map: bool) -> list:
    async def run():
        conninfo = SETTINGS.api_conninfo(database)
        async with AsyncConnectionPool(conninfo, min_size=1, max_size=4, kwargs={"autocommit": True}) as pool:
            ledger = AsyncLedger(pool)
            shard_map = await Shards(ledger, 60).current() if current_map else SINGLE
            return await credit_by_shard(ledger, shard_map, credits, 2)
    return asyncio.run(run())


def test_every_credit_is_answered_whatever_the_map(database, db):
    users = [f"m-{uuid.uuid4().hex[:8]}" for _ in range(40)]
    credits = [calls.Credit(user, f"k-{i}", i + 1, "promo") for i, user in enumerate(users)]
    credits.append(calls.Credit(users[0], "k-0", 1, "promo"))            # a retry inside the call
    credits.append(calls.Credit(users[1], "k-x", 5, "promo", metadata={"big": "b" * 5000}))
    for current_map in (False, True):
        answers = _send(database, credits, current_map)
        assert all(isinstance(answer, Outcome) and answer.ok for answer in answers[:-1]), answers
        assert [answer.amount for answer in answers[:-1]] == [c.amount for c in credits[:-2]] + [1]
        assert answers[-2].entry_id == answers[0].entry_id
        assert isinstance(answers[-1], InvalidArgument) and answers[-1].field == "metadata"
        # The second round replays the first.
        assert all(answer.replayed for answer in answers[:-1]) is current_map
    assert db.execute("SELECT count(*) AS n FROM ledger.entries WHERE user_id = ANY(%s)",
                      (users,)).fetchone()["n"] == len(users)
