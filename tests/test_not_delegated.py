"""A call Citus declines to delegate at the instant a shard move switches its
user's placement fails on the coordinator with "connection to the remote node
... failed" and changes nothing: the API's ledger (app.ledger.client) tries it
once more, and only once."""

from __future__ import annotations

import asyncio

import pytest
from psycopg_pool import AsyncConnectionPool

from app.ledger.client import AsyncLedger, Call
from app.ledger.errors import Unavailable

# Fails its first `p_times` calls as such a call does (the message and SQLSTATE
# Citus 13 gives), then answers.
FLAKY = """
CREATE FUNCTION public.flaky(p_times integer) RETURNS integer LANGUAGE plpgsql AS $$
BEGIN
    IF nextval('public.flaky_calls') <= p_times THEN
        RAISE EXCEPTION USING ERRCODE = '08006', MESSAGE = 'connection to the remote node '
            'rewards_owner@/x/run:1 failed with the following error: FATAL:  role "rewards_owner" '
            'is not permitted to log in';
    END IF;
    RETURN 1;
END
$$"""


def _call(dsn: str, failures: int) -> object:
    async def call():
        async with AsyncConnectionPool(dsn, min_size=1, max_size=2, kwargs={"autocommit": True}) as pool:
            return await AsyncLedger(pool)(Call("SELECT public.flaky(%(times)s) AS answer", {"times": failures}))
    return asyncio.run(call())


def test_a_call_not_delegated_is_tried_once_more(db, dsn):
    db.execute("CREATE SEQUENCE public.flaky_calls")
    db.execute(FLAKY)
    assert _call(dsn, 1) == {"answer": 1}
    db.execute("ALTER SEQUENCE public.flaky_calls RESTART")
    with pytest.raises(Unavailable, match="connection to the remote node"):
        _call(dsn, 2)
    assert db.execute("SELECT last_value FROM public.flaky_calls").fetchone()["last_value"] == 2
