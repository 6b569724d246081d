"""Every refusal is RFC 9457 problem+json with a stable type, never a 500, never a write."""

import asyncio
import time
import uuid

import httpx
import pytest

from app.ledger import calls, keys
from app.ledger.client import Ledger
from tests.api.conftest import another_api, post

PROBLEM = "urn:rewards-ledger:problem:"


def _problem(response: httpx.Response, status: int, cause: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["type"] == PROBLEM + cause and body["status"] == status and body["title"]
    return body


def _entry_count(api, user) -> int:
    with api.db() as conn:
        return conn.execute("SELECT count(*) AS n FROM ledger.entries WHERE user_id = %s", (user,)).fetchone()["n"]


def test_insufficient_points(api, user):
    with api.client() as http:
        post(http, f"/v1/accounts/{user}/credits", {"amount": 10, "reason": "task"})
        body = _problem(post(http, f"/v1/accounts/{user}/debits", {"amount": 11, "reason": "gift"}),
                        409, "insufficient-points")
        assert body["balance"] == {"available": 10, "reserved": 0}
        _problem(post(http, f"/v1/accounts/{user}/reservations", {"amount": 11, "ttl_seconds": 60, "reason": "v"}),
                 409, "insufficient-points")
    assert _entry_count(api, user) == 1


def test_key_reused_with_a_different_body(api, user):
    with api.client() as http:
        post(http, f"/v1/accounts/{user}/credits", {"amount": 10, "reason": "task"}, key="same")
        _problem(post(http, f"/v1/accounts/{user}/credits", {"amount": 11, "reason": "task"}, key="same"),
                 422, "idempotency-key-reused")
    assert _entry_count(api, user) == 1


def test_action_credited_once(api, user):
    action = {"source": "store", "external_id": "order-9"}
    with api.client() as http:
        assert post(http, f"/v1/accounts/{user}/credits", {"amount": 5, "reason": "buy", "action": action}).status_code == 201
        _problem(post(http, f"/v1/accounts/{user}/credits", {"amount": 5, "reason": "buy", "action": action}),
                 409, "action-already-credited")


def test_reservation_refusals(api, user):
    with api.client() as http:
        post(http, f"/v1/accounts/{user}/credits", {"amount": 100, "reason": "task"})
        rid = post(http, f"/v1/accounts/{user}/reservations",
                   {"amount": 40, "ttl_seconds": 60, "reason": "v"}).json()["reservation_id"]
        _problem(post(http, f"/v1/accounts/{user}/reservations/{rid}/commit", {"amount": 41}),
                 409, "amount-exceeds-reservation")
        assert post(http, f"/v1/accounts/{user}/reservations/{rid}/commit").status_code == 200
        body = _problem(post(http, f"/v1/accounts/{user}/reservations/{rid}/release"), 409, "reservation-not-open")
        assert "committed" in body["detail"]
        _problem(post(http, f"/v1/accounts/{user}/reservations/999999999/commit"), 404, "not-found")
        _problem(http.get(f"/v1/accounts/{user}/reservations/999999999"), 404, "not-found")


@pytest.mark.parametrize("body", [
    {"amount": 0, "reason": "x"},
    {"amount": -5, "reason": "x"},
    {"amount": 100_000_001, "reason": "x"},
    {"amount": 1.5, "reason": "x"},
    {"amount": "10", "reason": "x"},
    {"amount": 10},
    {"amount": 10, "reason": ""},
    {"amount": 10, "reason": "x" * 201},
    {"amount": 10, "reason": "x", "extra": True},
    {"amount": 10, "reason": "x", "metadata": [1]},
    {"amount": 10, "reason": "x", "metadata": {"big": "y" * 5000}},
    {"amount": 10, "reason": "x", "action": {"source": "a b", "external_id": "e"}},
    {"amount": 10, "reason": "x", "action": {"source": "adnet"}},
    [1, 2],
    None,
])
def test_malformed_bodies_are_400_and_write_nothing(api, user, body):
    with api.client() as http:
        response = post(http, f"/v1/accounts/{user}/credits", body)
    _problem(response, 400, "validation")
    assert _entry_count(api, user) == 0


@pytest.mark.parametrize("raw, content_type", [
    (b'{"amount": 10, "reason": "x"', "application/json"),
    (b"\xff\xfe", "application/json"),
    (b"amount=10", "application/x-www-form-urlencoded"),
])
def test_unparseable_bodies_are_4xx(api, user, raw, content_type):
    with api.client() as http:
        response = http.post(f"/v1/accounts/{user}/credits", content=raw,
                             headers={"Idempotency-Key": "k", "Content-Type": content_type})
    assert 400 <= response.status_code < 500, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert _entry_count(api, user) == 0


def test_oversize_body_is_413(api, user):
    with api.client() as http:
        response = http.post(f"/v1/accounts/{user}/credits", content=b'{"amount": 1, "reason": "' + b"a" * 20000 + b'"}',
                             headers={"Idempotency-Key": "k", "Content-Type": "application/json"})
    _problem(response, 413, "payload-too-large")


@pytest.mark.parametrize("headers", [{}, {"Idempotency-Key": ""}, {"Idempotency-Key": "a b"},
                                     {"Idempotency-Key": "k" * 256}, {"Idempotency-Key": "é".encode()}])
def test_a_missing_or_bad_idempotency_key_is_400(api, user, headers):
    with api.client() as http:
        response = http.post(f"/v1/accounts/{user}/credits", json={"amount": 1, "reason": "x"}, headers=headers)
    _problem(response, 400, "validation")
    assert _entry_count(api, user) == 0


@pytest.mark.parametrize("path", ["/v1/accounts/bad%20user/balance", "/v1/accounts/" + "u" * 65 + "/balance",
                                  "/v1/accounts/u/reservations/0", "/v1/accounts/u/entries?limit=0",
                                  "/v1/accounts/u/entries?limit=501", "/v1/accounts/u/entries?cursor=nonsense!"])
def test_bad_path_and_query_values_are_400(api, path):
    with api.client() as http:
        _problem(http.get(path), 400, "validation")


def test_no_key_unknown_key_and_missing_scope(api, user):
    with api.client(key=None) as anonymous:
        _problem(anonymous.get(f"/v1/accounts/{user}/balance"), 401, "unauthorized")
        _problem(anonymous.get(f"/v1/accounts/{user}/balance", headers={"Authorization": "Bearer rlk_nope"}),
                 401, "unauthorized")
        _problem(anonymous.get(f"/v1/accounts/{user}/balance", headers={"Authorization": "Basic abc"}),
                 401, "unauthorized")
    with api.client("earn") as earner:
        assert post(earner, f"/v1/accounts/{user}/credits", {"amount": 1, "reason": "x"}).status_code == 201
        _problem(post(earner, f"/v1/accounts/{user}/debits", {"amount": 1, "reason": "x"}), 403, "forbidden")
        _problem(earner.get(f"/v1/accounts/{user}/balance"), 403, "forbidden")
    with api.client("read") as reader:
        _problem(post(reader, f"/v1/accounts/{user}/credits", {"amount": 1, "reason": "x"}), 403, "forbidden")
        assert reader.get(f"/v1/accounts/{user}/balance").json()["available"] == 1


def test_a_revoked_key_is_refused(api, user):
    with Ledger.connect(api.settings.superuser_conninfo()) as ledger:
        key, secret = keys.create(ledger, f"short-lived-{uuid.uuid4().hex[:6]}", ["points:read"])
    with httpx.Client(base_url=api.base_url, headers={"Authorization": f"Bearer {secret}"}) as http:
        assert http.get(f"/v1/accounts/{user}/balance").status_code == 200
        with Ledger.connect(api.settings.superuser_conninfo()) as ledger:
            ledger(calls.revoke_key(key.key_id))
        # The API trusts a looked-up key for REWARDS_AUTH_CACHE_SECONDS (1 s here).
        time.sleep(1.2)
        _problem(http.get(f"/v1/accounts/{user}/balance"), 401, "unauthorized")


def test_a_non_ascii_cursor_is_400_not_500(api, user):
    # Found by the schema fuzzer.
    with api.client() as http:
        _problem(http.get(f"/v1/accounts/{user}/entries", params={"cursor": "¯¢M®"}), 400, "validation")


def test_a_nul_character_in_metadata_is_400_not_500(api, user):
    # Found by the schema fuzzer: jsonb cannot hold \u0000.
    with api.client() as http:
        _problem(post(http, f"/v1/accounts/{user}/credits", {"amount": 1, "reason": "x", "metadata": {"k": "a\u0000b"}}),
                 400, "validation")
    assert _entry_count(api, user) == 0


@pytest.mark.parametrize("depth", [200, 1000, 5000])
def test_deeply_nested_metadata_is_an_answer_never_a_500(api, user, depth):
    # 1,000 levels in 2.4 KB used to be a 500. Shallow enough to decode and
    # store, it is a credit; deeper than the decoder goes, a 400; nothing between.
    raw = b'{"amount": 1, "reason": "x", "metadata": {"k": ' + b"[" * depth + b"]" * depth + b"}}"
    with api.client() as http:
        response = http.post(f"/v1/accounts/{user}/credits", content=raw,
                             headers={"Idempotency-Key": f"deep-{depth}", "Content-Type": "application/json"})
    if response.status_code == 201:
        assert _entry_count(api, user) == 1
    else:
        _problem(response, 400, "validation")
        assert _entry_count(api, user) == 0


@pytest.fixture
def lookup_limited_api(api):
    """The same database behind an API with a key-lookup bucket of its own: 10
    lookups, then one more each 100 s, so that however slowly the machine sends
    the test's requests, no lookup comes back within it."""
    with another_api(api, {"REWARDS_RATE_KEY_LOOKUP": "0.01/10"}, redis_prefix=f"lookup-{uuid.uuid4().hex[:8]}") as limited:
        yield limited


def test_a_burst_of_requests_on_a_key_new_to_the_process_spends_one_lookup(lookup_limited_api, user):
    """As a load generator's 64 connections open at once: they share the one
    lookup, so none of them is refused for lack of lookup tokens (10 here)."""
    api = lookup_limited_api

    async def burst() -> list[int]:
        async with httpx.AsyncClient(base_url=api.base_url, timeout=30,
                                     headers={"Authorization": f"Bearer {api.keys['read']}"}) as reader:
            answers = await asyncio.gather(*(reader.get(f"/v1/accounts/{user}/balance") for _ in range(40)))
        return [answer.status_code for answer in answers]

    assert asyncio.run(burst()) == [200] * 40


def test_made_up_keys_are_refused_before_the_database_and_good_keys_still_work(lookup_limited_api, user):
    api = lookup_limited_api
    with api.client("read") as reader:
        assert reader.get(f"/v1/accounts/{user}/balance").status_code == 200  # now known to this process
        with httpx.Client(base_url=api.base_url) as attacker:
            answers = [attacker.get(f"/v1/accounts/{user}/balance",
                                    headers={"Authorization": f"Bearer rlk_made_up_{i}"}) for i in range(40)]
        # The reader's first lookup took one of the ten.
        statuses = [a.status_code for a in answers]
        assert statuses == [401] * 9 + [429] * 31, statuses
        limited = answers[-1]
        _problem(limited, 429, "rate-limited")
        assert int(limited.headers["retry-after"]) >= 1
        # The known key is not starved, even from the same address, even once its cache entry is stale.
        time.sleep(1.2)
        assert reader.get(f"/v1/accounts/{user}/balance").status_code == 200
