"""The shard map (app.ledger.shards) gives Citus' own answer for every user id:
PostgreSQL's hashtext computed in Python, and the shard of each user the same as
get_shard_id_for_distribution_column's, before and after a shard split. On a
single node it is one group."""

from __future__ import annotations

import asyncio
import random
import string

import pytest
from psycopg_pool import AsyncConnectionPool

from app.ledger.client import AsyncLedger
from app.ledger.shards import SINGLE, ShardMap, Shards, hashtext
from tests.conftest import SETTINGS

# User ids the API accepts at their edges (one character of each kind, the
# longest), then text it never sends: what the map must still hash as
# PostgreSQL does (UTF-8 of two, three and four bytes a character, spaces).
EDGES = [".", "-", ":", "_", "0", "Z", "a", "A" * 64, "z" * 63, "u-" + "9" * 62, "..", "a:b", "-_-"]
UNUSUAL = ["", " ", "ü", "é" * 11, "日本語のユーザー", "\U0001F600" * 5, "ß\U0001F600日", "a b\tc", "\x7f"]


def _user_ids(count: int) -> list[str]:
    """Random ids of the API's alphabet of every length 1-64 (every block and
    tail length of the hash), and the edges."""
    rng = random.Random(10)
    alphabet = string.ascii_letters + string.digits + "._:-"
    made = ["".join(rng.choices(alphabet, k=1 + i % 64)) for i in range(count)]
    return [*EDGES, *UNUSUAL, *made]


def _shards(database: str, max_age: float, work):
    """Run `work(shards)` with a Shards reading through the API's own role."""
    async def run():
        conninfo = SETTINGS.api_conninfo(database)
        async with AsyncConnectionPool(conninfo, min_size=1, max_size=2, kwargs={"autocommit": True}) as pool:
            return await work(Shards(AsyncLedger(pool), max_age))
    return asyncio.run(run())


def _citus_shards(db, user_ids: list[str]) -> list[int]:
    rows = db.execute("SELECT get_shard_id_for_distribution_column('ledger.accounts', u) AS shard "
                      "FROM unnest(%s::text[]) WITH ORDINALITY AS t(u, n) ORDER BY n", (user_ids,)).fetchall()
    return [row["shard"] for row in rows]


def _needs_citus(topology) -> None:
    if not topology.citus:
        pytest.skip("needs a Citus coordinator with workers: the second pass of `make test`")


def test_hashtext_is_postgresql_s(db):
    values = [*_user_ids(300), *("x" * n for n in range(100))]
    rows = db.execute("SELECT hashtext(v) AS h FROM unnest(%s::text[]) WITH ORDINALITY AS t(v, n) ORDER BY n",
                      (values,)).fetchall()
    assert [hashtext(value) for value in values] == [row["h"] for row in rows]


def test_the_map_is_citus_own_answer(topology, database, db):
    _needs_citus(topology)
    shard_map = _shards(database, 60, lambda shards: shards.current())
    user_ids = _user_ids(2000)
    assert len(shard_map.shard_ids) == db.execute(
        "SELECT count(*) AS n FROM pg_dist_shard WHERE logicalrelid = 'ledger.accounts'::regclass").fetchone()["n"]
    assert [shard_map.shard_of(user_id) for user_id in user_ids] == _citus_shards(db, user_ids)
    # The users fall into many groups, each holding its own users only.
    groups = shard_map.grouped(user_ids)
    assert len(groups) == len(shard_map.shard_ids)
    assert all(shard_map.shard_of(user_ids[i]) == shard for shard, positions in groups.items() for i in positions)


def test_a_split_is_picked_up_on_reload(topology, database, db):
    _needs_citus(topology)
    user_ids = _user_ids(1000)

    async def split_between_loads(shards: Shards) -> tuple[ShardMap, ShardMap]:
        before = await shards.current()
        shard = before.shard_ids[0]
        # Split the first shard at its middle, both halves where it was (the
        # colocated shards of the other tables split with it).
        db.execute("""
            SELECT citus_split_shard_by_split_points(
                %(shard)s, ARRAY[((s.shardminvalue::bigint + s.shardmaxvalue::bigint) / 2)::text],
                ARRAY[p.nodeid, p.nodeid], 'block_writes')
            FROM pg_dist_shard s JOIN pg_dist_shard_placement sp USING (shardid)
            JOIN pg_dist_node p ON p.nodename = sp.nodename AND p.nodeport = sp.nodeport
            WHERE s.shardid = %(shard)s""", {"shard": shard})
        return before, await shards.current()

    before, after = _shards(database, 0, split_between_loads)
    assert len(after.shard_ids) == len(before.shard_ids) + 1
    expected = _citus_shards(db, user_ids)
    assert [after.shard_of(user_id) for user_id in user_ids] == expected
    assert [before.shard_of(user_id) for user_id in user_ids] != expected


@pytest.mark.single_node("without Citus the map is one group")
def test_one_group_on_a_single_node(database):
    shard_map = _shards(database, 60, lambda shards: shards.current())
    assert shard_map is SINGLE
    assert SINGLE.grouped(["alice", "bob", "日本", "alice"]) == {SINGLE.shard_ids[0]: [0, 1, 2, 3]}
