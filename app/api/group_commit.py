"""Group commit of credits: while this process's calls are at the database, the
credits that arrive meanwhile wait, and go together as one call of
ledger.credit_many (one transaction, one commit) as soon as a call comes back.

A credit that arrives when fewer than `calls` calls of its group are in flight
is sent at once, alone, as a plain ledger.credit: nothing waits when the
database keeps up. A group is the credits of one Citus shard (app.ledger.shards;
every credit on a single node), so each call stays a single-shard transaction
delegated to the worker holding it. Each credit is answered with its own item,
only once the call that carried it has returned, that is committed.

Bounds: a call carries at most `max_items` credits; at most `max_queued` wait
in this process (more are refused at once as overloaded, 503 with
Retry-After); one that has waited `max_wait` seconds without being sent is
refused the same way, having written nothing. Once sent, a credit waits for its
answer, whatever it takes: it may commit.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass, field

from app.api import metrics
from app.ledger import calls
from app.ledger.client import AsyncLedger
from app.ledger.errors import Overloaded, Unavailable
from app.ledger.many import credit_together
from app.ledger.results import Outcome
from app.ledger.shards import Shards

log = logging.getLogger("rewards.group_commit")


@dataclass(eq=False)
class _Waiting:
    credit: calls.Credit
    answer: asyncio.Future[Outcome]
    expiry: asyncio.TimerHandle | None = None


@dataclass(eq=False)
class _Group:
    waiting: deque[_Waiting] = field(default_factory=deque)
    in_flight: int = 0


class GroupCommit:
    """Credits through this process's ledger, grouped while calls are in flight
    (or one call each, when `enabled` is false)."""

    def __init__(self, ledger: AsyncLedger, shards: Shards, *, enabled: bool, calls_per_group: int,
                 max_items: int, max_queued: int, max_wait: float) -> None:
        self.ledger = ledger
        self.shards = shards
        self.enabled = enabled
        self.calls_per_group = calls_per_group
        self.max_items = max_items
        self.max_queued = max_queued
        self.max_wait = max_wait
        self._groups: dict[int, _Group] = {}
        self._queued = 0
        self._senders: set[asyncio.Task] = set()

    async def credit(self, credit: calls.Credit, pending_seconds: int | None = None,
                     expiry_seconds: int | None = None) -> Outcome:
        """What ledger.credit answers for this credit (or raises), once committed.
        A credit with pending or expiry terms goes alone (calls.Credit)."""
        if not self.enabled or pending_seconds is not None or expiry_seconds is not None:
            return await self._alone(credit, pending_seconds, expiry_seconds)
        if self._queued >= self.max_queued:
            metrics.OVERLOADED.labels("group_commit_queue").inc()
            raise Overloaded("too many credits are waiting for the database in this process")
        shard = (await self.shards.current()).shard_of(credit.user_id)
        group = self._groups.setdefault(shard, _Group())
        loop = asyncio.get_running_loop()
        waiting = _Waiting(credit, loop.create_future())
        waiting.expiry = loop.call_later(self.max_wait, self._expire, waiting)
        group.waiting.append(waiting)
        self._queued += 1
        if group.in_flight < self.calls_per_group:
            group.in_flight += 1
            sender = asyncio.create_task(self._send(shard, group))
            self._senders.add(sender)
            sender.add_done_callback(self._senders.discard)
        return await waiting.answer

    def _expire(self, waiting: _Waiting) -> None:
        """Still waiting to be sent: refused, and skipped when its turn comes."""
        if not waiting.answer.done():
            metrics.OVERLOADED.labels("group_commit_wait").inc()
            waiting.answer.set_exception(Overloaded("no database call came free in time for this credit"))

    async def _send(self, shard: int, group: _Group) -> None:
        """One of the group's calls in flight: sends what waits, as long as anything does."""
        try:
            while group.waiting:
                batch = self._take(group)
                if batch:
                    await self._call(batch)
        finally:
            group.in_flight -= 1
            if not group.in_flight and not group.waiting:
                del self._groups[shard]

    def _take(self, group: _Group) -> list[_Waiting]:
        batch: list[_Waiting] = []
        while group.waiting and len(batch) < self.max_items:
            waiting = group.waiting.popleft()
            self._queued -= 1
            waiting.expiry.cancel()
            if not waiting.answer.done():  # refused after max_wait, or its request went away
                batch.append(waiting)
        return batch

    async def _call(self, batch: list[_Waiting]) -> None:
        metrics.GROUP_COMMIT_ITEMS.observe(len(batch))
        if len(batch) == 1:
            await self._answer_alone(batch[0])
            return
        try:
            answers = await credit_together(self.ledger, [waiting.credit for waiting in batch])
        except (Overloaded, Unavailable) as exc:
            # What each credit would have got alone: refused, or (unavailable)
            # perhaps committed, for the client to retry under the same key.
            for waiting in batch:
                _settle(waiting, exception=exc)
            return
        except Exception:  # noqa: BLE001 - any other failure of the call as a whole
            # Nothing was written (the call is one transaction). A value one
            # credit carried that PostgreSQL could not take (\u0000 inside JSON)
            # fails the whole call before it runs, and a database not yet
            # migrated has no ledger.credit_many: each credit alone gets its own answer.
            log.warning("a group of %s credits failed as a whole; sending each alone", len(batch), exc_info=True)
            await asyncio.gather(*(self._answer_alone(waiting) for waiting in batch))
            return
        for waiting, answer in zip(batch, answers, strict=True):
            if isinstance(answer, Outcome):
                _settle(waiting, result=answer)
            else:
                _settle(waiting, exception=answer)

    async def _answer_alone(self, waiting: _Waiting) -> None:
        try:
            _settle(waiting, result=await self._alone(waiting.credit))
        except Exception as exc:  # noqa: BLE001 - handed to the request, which raises it
            _settle(waiting, exception=exc)

    async def _alone(self, credit: calls.Credit, pending_seconds: int | None = None,
                     expiry_seconds: int | None = None) -> Outcome:
        return await self.ledger(calls.credit(credit.user_id, credit.key, credit.amount, credit.reason,
                                              credit.action_source, credit.action_external_id, credit.metadata,
                                              pending_seconds, expiry_seconds))


def _settle(waiting: _Waiting, *, result: Outcome | None = None, exception: BaseException | None = None) -> None:
    if waiting.answer.done():  # its request went away meanwhile
        return
    if exception is not None:
        waiting.answer.set_exception(exception)
    else:
        waiting.answer.set_result(result)
