"""The ledger's guarantees, through HTTP: one effect per key, no overspending,
rate limits that trigger and recover, and serving on while Redis is away."""

import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from app.operations import processes
from tests.api.conftest import another_api, post


def _storm(api, count, request):
    with ThreadPoolExecutor(max_workers=count) as pool, api.client() as http:
        return list(pool.map(lambda i: request(http, i), range(count)))


def test_concurrent_duplicates_give_one_entry_and_one_answer(api, user):
    answers = _storm(api, 50, lambda http, i: post(
        http, f"/v1/accounts/{user}/credits", {"amount": 7, "reason": "storm"}, key="one-key"))

    assert {a.status_code for a in answers} == {201}
    assert len({a.text for a in answers}) == 1
    assert sum(a.headers.get("idempotent-replayed") != "true" for a in answers) == 1
    with api.client() as http:
        assert http.get(f"/v1/accounts/{user}/balance").json()["available"] == 7
        assert len(http.get(f"/v1/accounts/{user}/entries").json()["items"]) == 1


def test_a_replay_returns_the_original_status_and_body(api, user):
    with api.client() as http:
        first = post(http, f"/v1/accounts/{user}/debits", {"amount": 5, "reason": "x"}, key="d1")
        post(http, f"/v1/accounts/{user}/credits", {"amount": 50, "reason": "x"})
        again = post(http, f"/v1/accounts/{user}/debits", {"amount": 5, "reason": "x"}, key="d1")
    assert first.status_code == again.status_code == 409
    assert first.json() == again.json()
    assert again.headers["idempotent-replayed"] == "true"


def test_a_redemption_storm_never_overspends(api, user):
    with api.client() as http:
        post(http, f"/v1/accounts/{user}/credits", {"amount": 100, "reason": "fund"})

    answers = _storm(api, 40, lambda http, i: post(http, f"/v1/accounts/{user}/debits", {"amount": 9, "reason": "buy"}))

    assert sorted({a.status_code for a in answers}) == [201, 409]
    assert sum(a.status_code == 201 for a in answers) == 100 // 9
    with api.client() as http:
        assert http.get(f"/v1/accounts/{user}/balance").json()["available"] == 100 - 9 * (100 // 9)


@pytest.fixture
def earn_limited_api(api):
    """The same database behind an API whose users may each earn 10 times at
    once, then once a second: 200 credits cannot all fit however slowly the
    machine sends them, short of 190 s."""
    with another_api(api, {"REWARDS_RATE_USER_EARN": "1/10"}, redis_prefix=f"earn-{uuid.uuid4().hex[:8]}") as limited:
        yield limited


def test_the_user_earn_limit_triggers_and_recovers(earn_limited_api, user):
    api = earn_limited_api
    answers = _storm(api, 20, lambda http, i: [
        post(http, f"/v1/accounts/{user}/credits", {"amount": 1, "reason": "x"}) for _ in range(10)])
    answers = [a for batch in answers for a in batch]
    assert {a.status_code for a in answers} == {201, 429}
    limited = [a for a in answers if a.status_code == 429]
    refusal = limited[0]
    assert refusal.headers["content-type"].startswith("application/problem+json")
    assert refusal.json()["type"].endswith(":rate-limited")
    assert int(refusal.headers["retry-after"]) >= 1
    assert refusal.headers["ratelimit-remaining"] == "0"
    with api.client() as http:
        # Another user is not held back by this one.
        assert post(http, f"/v1/accounts/{user}-other/credits", {"amount": 1, "reason": "x"}).status_code == 201
        time.sleep(int(refusal.headers["retry-after"]))
        assert post(http, f"/v1/accounts/{user}/credits", {"amount": 1, "reason": "x"}).status_code == 201
        earned = http.get(f"/v1/accounts/{user}/balance").json()["available"]
    assert earned == len(answers) - len(limited) + 1


def test_serving_goes_on_while_redis_is_away(api, user):
    processes.redis_down(api.settings)
    try:
        with api.client() as http:
            for i in range(5):
                assert post(http, f"/v1/accounts/{user}/credits", {"amount": 1, "reason": "x"}).status_code == 201
            assert http.get(f"/v1/accounts/{user}/balance").json()["available"] == 5
        with api.client("admin") as admin:
            assert "rewards_ratelimit_local_fallback 1.0" in admin.get("/metrics").text
    finally:
        processes.redis_up(api.settings)
    # Back on Redis by itself once it answers again (it retries every 5 s).
    deadline = time.monotonic() + 15
    with api.client("admin") as admin, api.client() as http:
        while "rewards_ratelimit_local_fallback 0.0" not in admin.get("/metrics").text:
            assert time.monotonic() < deadline, "the API never went back to Redis"
            post(http, f"/v1/accounts/{user}/credits", {"amount": 1, "reason": "x"})
            time.sleep(0.5)


def test_overload_is_refused_early_and_health_still_answers(api, tiny_api, user):
    # tiny_api: one request in flight and one database connection per process.
    def credit_or_health(http, i):
        if i % 10 == 0:
            return http.get("/healthz")
        return post(http, f"/v1/accounts/{user}-{i}/credits", {"amount": 1, "reason": "x"})

    with ThreadPoolExecutor(max_workers=40) as pool, tiny_api.client() as http:
        answers = list(pool.map(lambda i: credit_or_health(http, i), range(200)))

    health = [a for i, a in enumerate(answers) if i % 10 == 0]
    credits = [a for i, a in enumerate(answers) if i % 10 != 0]
    assert all(a.status_code == 200 for a in health)
    assert {a.status_code for a in credits} <= {201, 503}
    refused = [a for a in credits if a.status_code == 503]
    assert refused, "200 requests at once never met a cap of one in flight"
    assert all(a.json()["type"].endswith(":overloaded") and a.headers["retry-after"] for a in refused)
    # Nothing refused was written.
    with api.db() as conn:
        written = conn.execute("SELECT count(*) AS n FROM ledger.entries WHERE user_id LIKE %s",
                               (f"{user}-%",)).fetchone()["n"]
    assert written == sum(a.status_code == 201 for a in credits)
