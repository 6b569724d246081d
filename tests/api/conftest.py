"""A real API for the HTTP tests: uvicorn running the app, through the project's
PgBouncer to a database of its own, with a Redis of its own (so a test can stop
it), started once per session."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx
import psycopg
import pytest
from psycopg.rows import dict_row

from app.ledger import keys
from app.ledger.client import Ledger
from app.operations import processes
from app.settings import Settings
from tests.conftest import SETTINGS
from tests.databases import Topology

DATABASE = "rewards_api_test"



@dataclass
class Api:
    settings: Settings
    base_url: str
    keys: dict[str, str]

    def client(self, key: str | None = "all") -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.keys[key]}"} if key else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=10)

    def db(self) -> psycopg.Connection:
        return psycopg.connect(self.settings.superuser_conninfo(), autocommit=True, row_factory=dict_row)


# Generous user buckets so storms of 50 reach the ledger: 50 credits a second
# for each user, with a burst of 60. Tests of a limit itself start an API with
# a bucket of its own, too small for the machine's speed to matter.
RATES = {"REWARDS_RATE_USER_EARN": "50/60", "REWARDS_RATE_USER_REDEEM": "200/200",
         "REWARDS_RATE_API_KEY": "100000/100000", "REWARDS_RATE_GLOBAL": "100000/100000"}


def api_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment of a test API process: the settings it must share with the
    fixture (database, port, Redis) and the test rates, plus `extra`."""
    return {"REWARDS_DATABASE": settings.database, "REWARDS_API_PORT": str(settings.api_port),
            "REWARDS_REDIS_URL": settings.redis_url, "REWARDS_REDIS_PREFIX": settings.redis_prefix,
            **RATES, **extra}


@pytest.fixture(scope="session")
def api(topology: Topology) -> Iterator[Api]:
    redis_port, api_port = processes.free_port(), processes.free_port()
    settings = dataclasses.replace(
        SETTINGS, database=DATABASE, api_port=api_port,
        redis_url=f"redis://127.0.0.1:{redis_port}/0", redis_prefix=f"test-{uuid.uuid4().hex[:8]}",
    )
    topology.drop(DATABASE)
    topology.clone(DATABASE)
    with Ledger.connect(settings.superuser_conninfo()) as ledger:
        made = {
            "all": keys.create(ledger, "all", ["points:earn", "points:redeem", "points:read"]),
            "earn": keys.create(ledger, "earner", ["points:earn"]),
            "read": keys.create(ledger, "reader", ["points:read"]),
            "admin": keys.create(ledger, "operator", ["admin"]),
        }
    processes.bouncer_up(SETTINGS)
    processes.redis_up(settings)
    processes.api_up(settings, env=api_env(settings, REWARDS_AUTH_CACHE_SECONDS="1"), workers=1)
    try:
        yield Api(settings, f"http://127.0.0.1:{api_port}", {name: secret for name, (_, secret) in made.items()})
    finally:
        processes.api_down(settings)
        processes.redis_down(settings)
        topology.drop(DATABASE)


@contextmanager
def another_api(api: Api, env: dict[str, str], **changes) -> Iterator[Api]:
    """The same database and keys behind an API process of the test's own (one
    worker, a free port), given `env` besides the test rates and the settings
    `changes` (a redis_prefix of its own starts its buckets full)."""
    settings = dataclasses.replace(api.settings, api_port=processes.free_port(), **changes)
    processes.api_up(settings, env=api_env(settings, **env), workers=1)
    try:
        yield dataclasses.replace(api, settings=settings, base_url=f"http://127.0.0.1:{settings.api_port}")
    finally:
        processes.api_down(settings)


@pytest.fixture(scope="session")
def tiny_api(api: Api) -> Iterator[Api]:
    """The same database and keys behind an API that takes one request at a time."""
    with another_api(api, {"REWARDS_MAX_IN_FLIGHT": "1", "REWARDS_POOL_MIN": "1", "REWARDS_POOL_MAX": "1"},
                     max_in_flight=1, pool_max=1) as tiny:
        yield tiny


@pytest.fixture
def user() -> str:
    """A user of this test alone."""
    return f"u-{uuid.uuid4().hex[:12]}"


def post(client: httpx.Client, path: str, body: dict | None = None, key: str | None = None) -> httpx.Response:
    headers = {"Idempotency-Key": key or uuid.uuid4().hex}
    return client.post(path, json=body, headers=headers)
