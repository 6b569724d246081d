"""Many credits sent as few calls: one call of ledger.credit_many for each shard
group of their users (app.ledger.shards), so each is one transaction, one
commit, delegated under Citus to the worker holding the group."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from app.ledger import calls
from app.ledger.client import AsyncLedger
from app.ledger.errors import LedgerError, OtherShard
from app.ledger.results import Outcome
from app.ledger.shards import ShardMap

# The most credits in one call: a call is one statement, which must end within
# rewards_api's statement_timeout (1 s) on a busy server, and past a hundred
# items the round trip it saves is a small part of its cost.
ITEMS_PER_CALL = 100


async def credit_by_shard(ledger: AsyncLedger, shard_map: ShardMap, credits: Sequence[calls.Credit],
                          at_once: int) -> list[Outcome | LedgerError]:
    """Each credit's answer, in order: what `calls.credit` would have returned
    for it alone, or the exception it (or its group's call, which then
    committed nothing) raised. At most `at_once` calls are in flight, so one
    request leaves the pool's other connections to the others, and each holds
    about ITEMS_PER_CALL credits at most, a user's all in one call. A credit the map
    put in the wrong shard (a map older than a split) is sent again with the
    others of its user."""
    answers: list[Outcome | LedgerError | None] = [None] * len(credits)
    gate = asyncio.Semaphore(at_once)

    async def send(positions: list[int], again: bool) -> None:
        group = [credits[i] for i in positions]
        async with gate:
            try:
                rows = await ledger(calls.credit_many(group[0].user_id, group))
            except LedgerError as exc:
                for i in positions:
                    answers[i] = exc
                return
        elsewhere: dict[str, list[int]] = {}
        for row in rows:
            i = positions[row.item - 1]
            try:
                answers[i] = row.outcome()
            except OtherShard as exc:
                if again:
                    elsewhere.setdefault(row.user_id, []).append(i)
                else:
                    answers[i] = exc
            except LedgerError as exc:
                answers[i] = exc
        await asyncio.gather(*(send(same_user, False) for same_user in elsewhere.values()))

    groups = shard_map.grouped(credit.user_id for credit in credits)
    await asyncio.gather(*(send(chunk, True) for positions in groups.values()
                           for chunk in _chunks(credits, positions)))
    return answers  # type: ignore[return-value]  # every position is answered by now


def _chunks(credits: Sequence[calls.Credit], positions: list[int]) -> list[list[int]]:
    """`positions` (of one shard) cut into calls of about ITEMS_PER_CALL, each
    user's credits together and in their order."""
    by_user: dict[str, list[int]] = {}
    for i in positions:
        by_user.setdefault(credits[i].user_id, []).append(i)
    chunks, chunk = [], []
    for same_user in by_user.values():
        chunk += same_user
        if len(chunk) >= ITEMS_PER_CALL:
            chunks.append(sorted(chunk))
            chunk = []
    return [*chunks, sorted(chunk)] if chunk else chunks
