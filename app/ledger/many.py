"""Many credits sent as few calls: one call of ledger.credit_many for each shard
group of their users (app.ledger.shards), so each is one transaction, one
commit, delegated under Citus to the worker holding the group. A bulk grant
sends its credits by shard (`credit_by_shard`); group commit (app.api.group_commit)
sends each group it gathered through the same `credit_together`."""

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


async def credit_together(ledger: AsyncLedger, credits: Sequence[calls.Credit]) -> list[Outcome | LedgerError]:
    """Each credit's answer, in order, from one call of ledger.credit_many for
    them all: what `calls.credit` would have returned for it alone, or the
    exception it raised. The credits should share a shard (grouped by a
    ShardMap); those the database answers as being on another one (a map older
    than a split) are sent again, together, in a call of the shard of the first
    of them, until each is answered: a call always answers its first credit,
    whose shard it is. The first call failing as a whole (it wrote nothing) is
    raised; a later one's failure is the answer of the credits it carried."""
    answers: list[Outcome | LedgerError | None] = [None] * len(credits)
    positions = list(range(len(credits)))
    while positions:
        group = [credits[i] for i in positions]
        try:
            rows = await ledger(calls.credit_many(group[0].user_id, group))
        except LedgerError as exc:
            if len(positions) == len(credits):  # the first call: nothing of theirs was written
                raise
            for i in positions:
                answers[i] = exc
            break
        elsewhere = []
        for i, row in zip(positions, rows, strict=True):
            try:
                answers[i] = row.outcome()
            except OtherShard:
                elsewhere.append(i)
            except LedgerError as exc:
                answers[i] = exc
        positions = elsewhere
    return answers  # type: ignore[return-value]  # every position is answered by now


async def credit_by_shard(ledger: AsyncLedger, shard_map: ShardMap, credits: Sequence[calls.Credit],
                          at_once: int) -> list[Outcome | LedgerError]:
    """Each credit's answer, in order: what `calls.credit` would have returned
    for it alone, or the exception it (or its group's call, which then
    committed nothing) raised. At most `at_once` calls are in flight, so one
    request leaves the pool's other connections to the others, and each holds
    about ITEMS_PER_CALL credits at most, a user's all in one call
    (`credit_together`, which sends again what the map put in the wrong shard)."""
    answers: list[Outcome | LedgerError | None] = [None] * len(credits)
    gate = asyncio.Semaphore(at_once)

    async def send(positions: list[int]) -> None:
        async with gate:
            try:
                answered = await credit_together(ledger, [credits[i] for i in positions])
            except LedgerError as exc:
                answered = [exc] * len(positions)
        for i, answer in zip(positions, answered, strict=True):
            answers[i] = answer

    groups = shard_map.grouped(credit.user_id for credit in credits)
    await asyncio.gather(*(send(chunk) for positions in groups.values() for chunk in _chunks(credits, positions)))
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
