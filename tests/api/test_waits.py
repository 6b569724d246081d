"""Bounded waits seen from HTTP (README "Bounded waits"): a request blocked on a
lock, or on a pool whose connections are all at work, answers 503 `overloaded`
with Retry-After within its bound; with PostgreSQL stopped behind a running
PgBouncer, or PgBouncer stopped, 503 `unavailable`; never a 500, never a write."""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest

from app.ledger import keys
from app.ledger.client import Ledger
from app.operations import cluster, processes
from tests.api.conftest import Api, another_api, api_env, post
from tests.conftest import SETTINGS

PROBLEM = "urn:rewards-ledger:problem:"


def _refused(response, cause: str) -> dict:
    assert response.status_code == 503, response.text
    assert response.headers["retry-after"]
    body = response.json()
    assert body["type"] == PROBLEM + cause, body
    return body


@pytest.fixture
def locked(api: Api, user: str) -> Iterator[str]:
    """The user's account row, held by another transaction for the test's length."""
    with api.client() as http:
        assert post(http, f"/v1/accounts/{user}/credits", {"amount": 10, "reason": "task"}).status_code == 201
    ready, release = threading.Event(), threading.Event()

    def hold() -> None:
        with psycopg.connect(api.settings.superuser_conninfo()) as conn:
            conn.execute("SELECT 1 FROM ledger.accounts WHERE user_id = %s FOR UPDATE", (user,))
            ready.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    assert ready.wait(10)
    yield user
    release.set()
    holder.join()


def _balance(api: Api, user: str) -> int:
    with api.db() as conn:
        return conn.execute("SELECT available FROM ledger.accounts WHERE user_id = %s", (user,)).fetchone()["available"]


def test_a_request_blocked_on_a_lock_answers_within_the_lock_timeout(api, locked):
    started = time.monotonic()
    with api.client() as http:
        body = _refused(post(http, f"/v1/accounts/{locked}/debits", {"amount": 5, "reason": "gift"}), "overloaded")
    # Refused by lock_timeout (500 ms), which the detail names, not after the
    # holder lets go (30 s); the bound leaves a loaded machine its slack.
    assert "lock_timeout" in body["detail"]
    assert time.monotonic() - started < 10
    assert _balance(api, locked) == 10


@pytest.fixture(scope="module")
def narrow_api(api: Api) -> Iterator[Api]:
    """One pool connection per process, waited for 0.1 s: a request blocked on a
    lock (0.5 s) leaves none for the next."""
    with another_api(api, {"REWARDS_POOL_MIN": "1", "REWARDS_POOL_MAX": "1", "REWARDS_POOL_WAIT_SECONDS": "0.1"}) as narrow:
        yield narrow


def test_a_request_finding_every_connection_at_work_is_refused_as_overloaded(narrow_api, locked, user):
    with ThreadPoolExecutor(2) as pool, narrow_api.client() as http:
        blocked = pool.submit(post, http, f"/v1/accounts/{locked}/debits", {"amount": 5, "reason": "gift"})
        time.sleep(0.2)  # the blocked request has the one connection now
        waiting = pool.submit(post, http, f"/v1/accounts/{user}-other/credits", {"amount": 5, "reason": "task"})
        assert "lock_timeout" in _refused(blocked.result(), "overloaded")["detail"]
        assert "came free" in _refused(waiting.result(), "overloaded")["detail"]
    with narrow_api.db() as conn:
        assert conn.execute("SELECT count(*) AS n FROM ledger.entries WHERE user_id = %s",
                            (f"{user}-other",)).fetchone()["n"] == 0


# --- Outages, on a stack of this module's own ----------------------------------


@pytest.fixture(scope="module")
def own_stack(api: Api) -> Iterator[Api]:
    """A single-node PostgreSQL, PgBouncer and API of their own, so that each can
    be stopped without touching the suite's."""
    folder = Path(tempfile.mkdtemp(prefix="waits-", dir=SETTINGS.data_dir))
    settings = dataclasses.replace(
        SETTINGS, data_dir=folder, pg_port=processes.free_port(), pg_host=None, citus="off", citus_workers=0,
        bouncer_port=processes.free_port(), api_port=processes.free_port(), database="rewards",
        redis_url=api.settings.redis_url, redis_prefix=api.settings.redis_prefix)
    try:
        cluster.up(settings)
        with Ledger.connect(settings.superuser_conninfo()) as ledger:
            _, secret = keys.create(ledger, "all", ["points:earn", "points:redeem", "points:read"])
        processes.bouncer_up(settings)
        processes.api_up(settings, env={
            **api_env(settings), "REWARDS_BOUNCER_PORT": str(settings.bouncer_port),
            "REWARDS_DATA_DIR": str(folder), "REWARDS_PG_PORT": str(settings.pg_port)}, workers=1)
        yield Api(settings, f"http://127.0.0.1:{settings.api_port}", {"all": secret})
    finally:
        processes.api_down(settings)
        processes.bouncer_down(settings)
        cluster.down(settings)
        shutil.rmtree(folder, ignore_errors=True)


def _answers_while_down(stack: Api, user: str, count: int = 5) -> list:
    answers = []
    with stack.client() as http:
        for i in range(count):
            started = time.monotonic()
            answers.append((post(http, f"/v1/accounts/{user}/credits", {"amount": 1, "reason": "task"},
                                 key=f"down-{i}"), time.monotonic() - started))
    return answers


def _serves_again(stack: Api, user: str) -> None:
    deadline = time.monotonic() + 20
    with stack.client() as http:
        while post(http, f"/v1/accounts/{user}/credits", {"amount": 1, "reason": "task"},
                   key="after").status_code != 201:
            assert time.monotonic() < deadline, "the service did not come back by itself"
            time.sleep(0.2)


OWN_STACK = "runs on a single-node stack of its own, whatever the suite's topology"


# Each outage with the longest a refusal may take in it.
OUTAGES = {
    # PgBouncer's query_wait_timeout (1 s), not its default 120 s.
    "postgresql stopped behind pgbouncer": (cluster.down, cluster.up, 2.0),
    # The pool's 0.5 s wait at most.
    "pgbouncer stopped": (processes.bouncer_down, processes.bouncer_up, 1.0),
}


@pytest.mark.single_node(OWN_STACK)
@pytest.mark.parametrize("outage", OUTAGES)
def test_an_outage_answers_unavailable_within_its_bound(own_stack, user, outage):
    stop, start, bound = OUTAGES[outage]
    _serves_again(own_stack, f"{user}-warm")
    stop(own_stack.settings)
    try:
        answers = _answers_while_down(own_stack, user)
    finally:
        start(own_stack.settings)
    for response, took in answers:
        _refused(response, "unavailable")
        assert took < bound
    _serves_again(own_stack, user)
