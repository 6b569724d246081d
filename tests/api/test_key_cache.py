"""The key cache: made-up keys never push out a key in use, and a key seen
valid refreshes without spending its address's lookup tokens."""

import asyncio
from datetime import datetime, timezone

from app.api.security import MISS, KeyCache
from app.ledger.keys import secret_hash
from app.ledger.results import ApiKey

KEY = ApiKey(key_id=1, name="app", scopes=["points:read"], created_at=datetime.now(timezone.utc), revoked_at=None)


def test_a_flood_of_unknown_keys_never_evicts_a_known_one():
    cache = KeyCache(ttl=60)
    good = secret_hash("rlk_good")
    cache.put(good, KEY)
    for i in range(3 * KeyCache.MAX_ENTRIES):
        digest = secret_hash(f"rlk_made_up_{i}")
        assert cache.get(digest) is MISS
        cache.put(digest, None)
    assert cache.get(good) == KEY


def test_unknown_keys_are_remembered_as_unknown():
    cache = KeyCache(ttl=60)
    bad = secret_hash("rlk_bad")
    cache.put(bad, None)
    assert cache.get(bad) is None and not cache.was_known(bad)


def test_a_stale_known_key_is_looked_up_again_but_stays_known():
    cache = KeyCache(ttl=0)
    good = secret_hash("rlk_good")
    cache.put(good, KEY)
    assert cache.get(good) is MISS and cache.was_known(good)
    cache.put(good, None)  # revoked since
    assert not cache.was_known(good)


def test_requests_arriving_during_a_lookup_share_it():
    cache = KeyCache(ttl=60)
    good = secret_hash("rlk_good")
    lookups = 0

    async def fetch():
        nonlocal lookups
        lookups += 1
        await asyncio.sleep(0.05)
        return KEY

    async def burst():
        return await asyncio.gather(*(cache.look_up(good, fetch) for _ in range(64)))

    assert asyncio.run(burst()) == [KEY] * 64
    assert lookups == 1 and cache.get(good) == KEY


def test_a_refused_lookup_refuses_the_requests_that_shared_it_and_the_next_one_looks_up_again():
    cache = KeyCache(ttl=60)
    good = secret_hash("rlk_good")
    answers = iter([RuntimeError("refused"), KEY])

    async def fetch():
        await asyncio.sleep(0.01)
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def burst():
        return await asyncio.gather(*(cache.look_up(good, fetch) for _ in range(3)), return_exceptions=True)

    assert [str(answer) for answer in asyncio.run(burst())] == ["refused"] * 3
    assert cache.get(good) is MISS
    assert asyncio.run(cache.look_up(good, fetch)) == KEY
