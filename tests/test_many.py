"""Credits sent by shard group (app.ledger.many) get each what the single credit
would have answered, whatever the shard map: under Citus a map that puts every
user in one group (as one older than a split would put some) costs a call more
for each other shard among them, never an answer. Bulk grants and group commit
both send their groups through `credit_together`."""

from __future__ import annotations

import asyncio
import uuid

from psycopg_pool import AsyncConnectionPool

from app.ledger import calls
from app.ledger.client import AsyncLedger
from app.ledger.errors import InvalidArgument
from app.ledger.many import credit_by_shard, credit_together
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


class _CountingLedger(AsyncLedger):
    calls = 0

    async def __call__(self, call):
        self.calls += 1
        return await super().__call__(call)


def test_credits_of_many_shards_sent_together_take_a_call_per_shard(database, db):
    users = [f"t-{uuid.uuid4().hex[:8]}" for _ in range(12)]
    credits = [calls.Credit(user, "k", i + 1, "promo") for i, user in enumerate(users)]
    credits.append(calls.Credit(users[-1], "k", len(users), "promo"))    # a retry, after the rest of its shard
    citus = db.execute("SELECT 1 FROM pg_extension WHERE extname = 'citus'").fetchone()
    shards = {db.execute("SELECT get_shard_id_for_distribution_column('ledger.accounts', %s::text) AS s",
                         (user,)).fetchone()["s"] for user in users} if citus else {0}

    async def run():
        conninfo = SETTINGS.api_conninfo(database)
        async with AsyncConnectionPool(conninfo, min_size=1, max_size=2, kwargs={"autocommit": True}) as pool:
            ledger = _CountingLedger(pool)
            return await credit_together(ledger, credits), ledger.calls
    answers, sent = asyncio.run(run())

    assert [(a.status.value, a.user_id, a.amount, a.replayed) for a in answers] == [
        ("ok", c.user_id, c.amount, False) for c in credits[:-1]] + [("ok", users[-1], len(users), True)]
    assert answers[-1].entry_id == answers[-2].entry_id
    # each call answers every credit of its first credit's shard
    assert sent == len(shards)
