"""Which Citus shard holds a user, computed here rather than asked of the database.

Calls that carry many users (a bulk grant, a group commit) are split by shard so
that each call stays a single-shard transaction the coordinator can delegate to
the worker holding it. Citus places a row of a hash-distributed table by the
distribution column's hash function, for text PostgreSQL's `hashtext`: Bob
Jenkins' lookup3 over the value's UTF-8 bytes (`hash_bytes` in PostgreSQL's
src/common/hashfn.c), read as a signed int4, and keeps each shard's range of
hashes in pg_dist_shard. Every table of the ledger is colocated with
`ledger.accounts`, so its shards name the groups.

Nothing depends on this map for correctness, only for speed: the database
still checks that a call's users share its shard. A map made before a shard
split can group users of two shards together until it is reloaded; the items
the database then answers as being elsewhere are sent again
(app.ledger.many.credit_together). On a single node (no Citus) every user is in the
one group, `SINGLE`, and nothing is hashed.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import struct
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from app.ledger import calls
from app.ledger.client import AsyncLedger
from app.ledger.errors import LedgerError
from app.ledger.results import ShardRange

log = logging.getLogger("rewards.shards")

_M = 0xFFFFFFFF


def hash_bytes(data: bytes) -> int:
    """PostgreSQL's hash_bytes on a little-endian machine: the unsigned 32-bit hash."""
    length = len(data)
    a = b = c = (0x9E3779B9 + length + 3923095) & _M
    # Whole 12-byte blocks as little-endian words (the C code's aligned and
    # unaligned paths read the same words on such a machine), then the last
    # 0-11 bytes padded with zeros: a and b take theirs as they come, c its own
    # shifted up a byte (the C code keeps c's lowest byte "for the length").
    tail = length % 12
    words = _WORDS.get(length - tail) or _words(length - tail)
    block = words.unpack_from(data)
    for i in range(0, len(block), 3):
        a = (a + block[i]) & _M
        b = (b + block[i + 1]) & _M
        c = (c + block[i + 2]) & _M
        # mix(a, b, c)
        a = (a - c) & _M; a ^= ((c << 4) | (c >> 28)) & _M; c = (c + b) & _M  # noqa: E702
        b = (b - a) & _M; b ^= ((a << 6) | (a >> 26)) & _M; a = (a + c) & _M  # noqa: E702
        c = (c - b) & _M; c ^= ((b << 8) | (b >> 24)) & _M; b = (b + a) & _M  # noqa: E702
        a = (a - c) & _M; a ^= ((c << 16) | (c >> 16)) & _M; c = (c + b) & _M  # noqa: E702
        b = (b - a) & _M; b ^= ((a << 19) | (a >> 13)) & _M; a = (a + c) & _M  # noqa: E702
        c = (c - b) & _M; c ^= ((b << 4) | (b >> 28)) & _M; b = (b + a) & _M  # noqa: E702
    last_a, last_b, last_c = _TAIL.unpack((data[length - tail:] + _ZEROS)[:12])
    a = (a + last_a) & _M
    b = (b + last_b) & _M
    c = (c + (last_c << 8)) & _M
    # final(a, b, c)
    c ^= b; c = (c - (((b << 14) | (b >> 18)) & _M)) & _M  # noqa: E702
    a ^= c; a = (a - (((c << 11) | (c >> 21)) & _M)) & _M  # noqa: E702
    b ^= a; b = (b - (((a << 25) | (a >> 7)) & _M)) & _M  # noqa: E702
    c ^= b; c = (c - (((b << 16) | (b >> 16)) & _M)) & _M  # noqa: E702
    a ^= c; a = (a - (((c << 4) | (c >> 28)) & _M)) & _M  # noqa: E702
    b ^= a; b = (b - (((a << 14) | (a >> 18)) & _M)) & _M  # noqa: E702
    c ^= b; c = (c - (((b << 24) | (b >> 8)) & _M)) & _M  # noqa: E702
    return c


_TAIL = struct.Struct("<3I")
_ZEROS = bytes(12)
_WORDS: dict[int, struct.Struct] = {}


def _words(size: int) -> struct.Struct:
    """The little-endian words of the first `size` bytes (a multiple of 12)."""
    _WORDS[size] = struct.Struct(f"<{size // 4}I")
    return _WORDS[size]


def hashtext(value: str) -> int:
    """PostgreSQL's hashtext(value) under a deterministic collation: a signed int4."""
    unsigned = hash_bytes(value.encode())
    return unsigned - (1 << 32) if unsigned & 0x80000000 else unsigned


@dataclass(frozen=True)
class ShardMap:
    """The shards of ledger.accounts' colocation group, by the lowest hash each holds."""

    shard_ids: tuple[int, ...]
    min_hashes: tuple[int, ...]

    @classmethod
    def of(cls, ranges: Sequence[ShardRange]) -> ShardMap:
        """The map of these ranges; no ranges (no Citus) is the single group."""
        if not ranges:
            return SINGLE
        ordered = sorted(ranges, key=lambda r: r.min_hash)
        return cls(tuple(r.shard_id for r in ordered), tuple(r.min_hash for r in ordered))

    @property
    def single(self) -> bool:
        return len(self.shard_ids) == 1

    @property
    def distributed(self) -> bool:
        """Under Citus (with any number of shards): a verified action's claim is
        then on a shard of its own (app.ledger.actions)."""
        return self != SINGLE

    def shard_of(self, user_id: str) -> int:
        """The shard (of ledger.accounts) holding this user: Citus' own answer
        (get_shard_id_for_distribution_column) for a map that is current."""
        if self.single:
            return self.shard_ids[0]
        return self.shard_ids[bisect.bisect_right(self.min_hashes, hashtext(user_id)) - 1]

    def grouped(self, user_ids: Iterable[str]) -> dict[int, list[int]]:
        """The positions of these users, by their shard, in order of first appearance."""
        groups: dict[int, list[int]] = {}
        for position, user_id in enumerate(user_ids):
            groups.setdefault(self.shard_of(user_id), []).append(position)
        return groups


# Without Citus: one group, which every user is in.
SINGLE = ShardMap((0,), (-(1 << 31),))


class Shards:
    """This process's shard map, loaded through its ledger on first use and
    again once it is `max_age` seconds old, so a split is picked up within that
    long. A reload that fails keeps the map it had and is tried again on the
    next use past a pause: the map only makes calls faster."""

    RETRY_AFTER = 1.0

    def __init__(self, ledger: AsyncLedger, max_age: float) -> None:
        self.ledger = ledger
        self.max_age = max_age
        self._map = SINGLE
        self._next_load = 0.0
        self._loading: asyncio.Lock = asyncio.Lock()

    async def current(self) -> ShardMap:
        if time.monotonic() >= self._next_load:
            async with self._loading:
                if time.monotonic() >= self._next_load:  # another caller may have loaded it meanwhile
                    await self._load()
        return self._map

    async def _load(self) -> None:
        try:
            citus = (await self.ledger(calls.citus_installed()))["citus"]
            ranges = await self.ledger(calls.shard_ranges()) if citus else []
        except LedgerError as exc:
            log.warning("could not load the shard map, keeping the one we have: %s", exc)
            self._next_load = time.monotonic() + self.RETRY_AFTER
            return
        self._map = ShardMap.of(ranges)
        self._next_load = time.monotonic() + self.max_age
