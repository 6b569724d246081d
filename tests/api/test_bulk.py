"""POST /v1/credits/bulk over real HTTP: each item answered as its own single
credit would be, in order, inside a 200; a retry of the whole request replays
every item; a malformed request as a whole is one problem and writes nothing;
rate limits count a token an item."""

from __future__ import annotations

import uuid

import pytest

from tests.api.conftest import post

BULK = "/v1/credits/bulk"


def _item(user: str, amount: int = 10, key: str | None = None, **extra) -> dict:
    return {"user_id": user, "idempotency_key": key or uuid.uuid4().hex, "amount": amount, "reason": "promo", **extra}


def _entries(api, users: list[str]) -> int:
    with api.db() as db:
        return db.execute("SELECT count(*) AS n FROM ledger.entries WHERE user_id = ANY(%s)", (users,)).fetchone()["n"]


def test_many_users_are_credited_and_a_retry_replays_each(api):
    users = [f"b-{uuid.uuid4().hex[:10]}" for _ in range(60)]
    items = [_item(user, amount=i + 1, metadata={"campaign": "spring"}) for i, user in enumerate(users)]
    items.append(_item(users[0], amount=5))  # a second credit of one user in the same request
    with api.client() as http:
        first = http.post(BULK, json={"items": items})
        assert first.status_code == 200, first.text
        answers = first.json()["items"]
        assert [(a["status"], a["user_id"], a["idempotency_key"], a["replayed"]) for a in answers] == [
            (201, item["user_id"], item["idempotency_key"], False) for item in items]
        assert [a["entry"]["amount"] for a in answers] == [item["amount"] for item in items]
        assert answers[0]["entry"]["balance"] == {"available": 1, "reserved": 0}
        assert answers[-1]["entry"]["balance"] == {"available": 6, "reserved": 0}
        assert int(first.headers["ratelimit-limit"]) >= 1

        again = http.post(BULK, json={"items": items})
        assert again.status_code == 200, again.text
        replays = again.json()["items"]
        assert all(a["replayed"] for a in replays)
        assert [a["entry"] for a in replays] == [a["entry"] for a in answers]
        assert http.get(f"/v1/accounts/{users[0]}/balance").json()["available"] == 6
    assert _entries(api, users) == len(items)


def test_refusals_are_per_item_and_the_others_go_through(api, user):
    other = f"b-{uuid.uuid4().hex[:10]}"
    with api.client() as http:
        post(http, f"/v1/accounts/{user}/credits",
             {"amount": 10, "reason": "ad", "action": {"source": "adnet", "external_id": "imp-9"}}, key="used")
        response = http.post(BULK, json={"items": [
            _item(other, 7),
            _item(user, 10, action={"source": "adnet", "external_id": "imp-9"}),  # the action earned already
            _item(user, 99, key="used"),                                          # the key, for another request
            _item(user, 10, metadata={"big": "y" * 5000}),                        # metadata over 4,096 bytes
            _item(user, 3),
        ]})
    assert response.status_code == 200, response.text
    answers = response.json()["items"]
    assert [a["status"] for a in answers] == [201, 409, 422, 400, 201]
    assert answers[1]["problem"]["type"] == "urn:rewards-ledger:problem:action-already-credited"
    assert answers[1]["problem"]["balance"] == {"available": 10, "reserved": 0}
    assert answers[2]["problem"]["type"] == "urn:rewards-ledger:problem:idempotency-key-reused"
    assert answers[3]["problem"]["type"] == "urn:rewards-ledger:problem:validation"
    assert answers[3]["problem"]["field"] == "metadata"
    assert answers[4]["entry"]["balance"] == {"available": 13, "reserved": 0}
    assert _entries(api, [user, other]) == 3


@pytest.mark.parametrize("body", [
    {"items": []},
    {"items": [_item("u", amount="10")]},
    {"items": [_item("bad user")]},
    {"items": [_item("u", key="a b")]},
    {"items": [_item("u", extra=True)]},
    {"items": [_item("u", pending_seconds=60)]},    # plain credits only: no lot terms (README)
    {"items": [_item("u", expiry_seconds=3600)]},
    {"items": [_item("u")], "extra": 1},
    {"items": [_item("u"), {"user_id": "u", "amount": 1, "reason": "x"}]},
    {"items": [_item("u", metadata={"text": "nul\u0000"})]},
    [_item("u")],
    None,
])
def test_a_malformed_request_is_one_400_and_writes_nothing(api, body):
    users = [item["user_id"] for item in (body or {}).get("items", [])] if isinstance(body, dict) else ["u"]
    before = _entries(api, users)
    with api.client() as http:
        response = http.post(BULK, json=body)
    assert response.status_code == 400, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["type"] == "urn:rewards-ledger:problem:validation"
    assert _entries(api, users) == before


def test_more_than_1000_items_are_refused_whole(api, user):
    with api.client() as http:
        response = http.post(BULK, json={"items": [_item(f"{user}-{i}", key=str(i)) for i in range(1001)]})
    assert response.status_code == 400, response.text
    assert "1000" in response.json()["detail"]


def test_a_body_past_its_limit_is_413(api, user):
    items = [_item(f"{user}-{i}", metadata={"pad": "p" * 4000}) for i in range(300)]  # about 1.2 MB
    with api.client() as http:
        response = http.post(BULK, json={"items": items})
    assert response.status_code == 413, response.text
    assert response.json()["type"] == "urn:rewards-ledger:problem:payload-too-large"


def test_each_item_takes_a_token_of_its_user(api, user):
    """The test API's user earn bucket holds 60 tokens: 61 items of one user
    are refused whole, before the database; 30 go through."""
    with api.client() as http:
        refused = http.post(BULK, json={"items": [_item(user, 1) for _ in range(61)]})
        assert refused.status_code == 429, refused.text
        assert int(refused.headers["retry-after"]) >= 1
        assert _entries(api, [user]) == 0
        taken = http.post(BULK, json={"items": [_item(user, 1) for _ in range(30)]})
        assert taken.status_code == 200, taken.text
        assert int(taken.headers["ratelimit-remaining"]) <= 30


def test_the_earn_scope_is_needed(api, user):
    with api.client("read") as http:
        response = http.post(BULK, json={"items": [_item(user)]})
    assert response.status_code == 403
    with api.client("earn") as http:
        assert http.post(BULK, json={"items": [_item(user)]}).status_code == 200
