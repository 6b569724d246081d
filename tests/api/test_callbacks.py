"""POST /v1/callbacks/{source} through the real API: a signed callback earns
what POST /v1/actions would, once ever; every refusal (signature, timestamp,
source, user, body) is a problem that writes nothing; both secrets of a
rotation verify until it is finished."""

from __future__ import annotations

import json
import time
import uuid

import httpx
import pytest

from app import signatures
from app.ledger import calls, sources
from app.ledger.client import Ledger
from tests.api.conftest import post
from tests.conftest import SETTINGS

PROBLEM = "urn:rewards-ledger:problem:"


@pytest.fixture
def source(api) -> tuple[str, str]:
    """A source of this test alone, and its secret."""
    name = f"net-{uuid.uuid4().hex[:8]}"
    with Ledger.connect(api.settings.superuser_conninfo()) as ledger:
        _, secret = sources.create(ledger, SETTINGS.required("callback_master_key"), name)
    return name, secret


@pytest.fixture
def action_type(api) -> str:
    """A rule of this test alone, 10 points an action."""
    name = f"t_{uuid.uuid4().hex[:10]}"
    with api.client("admin") as admin:
        assert admin.put(f"/v1/admin/rules/{name}", json={"fixed_points": 10}).status_code == 200
    return name


@pytest.fixture
def known_user(api, user) -> str:
    """A user the ledger knows (the app credited them once)."""
    with api.client() as http:
        assert post(http, f"/v1/accounts/{user}/credits", {"amount": 1, "reason": "welcome"}).status_code == 201
    return user


def _call(api, source: str, secret: str, body: bytes, timestamp: int | None = None,
          header: str | None = None, path: str = "") -> httpx.Response:
    timestamp = int(time.time()) if timestamp is None else timestamp
    with api.client(None) as http:
        return http.post(f"/v1/callbacks/{source}{path}", content=body, headers={
            "Content-Type": "application/json",
            signatures.HEADER: header if header is not None else signatures.sign(secret, timestamp, body)})


def _body(user: str, action_type: str, external_id: str | None = None, **fields) -> bytes:
    return json.dumps({"user_id": user, "external_id": external_id or uuid.uuid4().hex, "type": action_type,
                       **fields}).encode()


def _written(api, user: str) -> tuple[int, int, int]:
    with api.db() as db:
        return db.execute(
            "SELECT (SELECT count(*) FROM ledger.entries WHERE user_id = %(u)s) AS entries,"
            " (SELECT count(*) FROM ledger.idempotency_keys WHERE user_id = %(u)s) AS keys,"
            " (SELECT count(*) FROM rules.action_claims WHERE user_id = %(u)s) AS claims", {"u": user}).fetchone()


def _refused(response: httpx.Response, status: int, cause: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["type"] == PROBLEM + cause


def test_a_signed_callback_earns_once_as_an_action_would(api, source, action_type, known_user):
    name, secret = source
    body = _body(known_user, action_type, "imp-1")
    first = _call(api, name, secret, body)
    assert first.status_code == 201, first.text
    assert first.json()["points"] == 10 and first.json()["earning"]["rule"] == action_type
    # The partner's retry replays the answer; the same action under another body earns nothing more.
    again = _call(api, name, secret, body)
    assert again.status_code == 201 and again.headers["Idempotent-Replayed"] == "true"
    assert again.json()["entry_id"] == first.json()["entry_id"]
    _refused(_call(api, name, secret, _body(known_user, action_type, "imp-1", value=5)), 422,
             "idempotency-key-reused")
    with api.client() as http:
        assert http.get(f"/v1/accounts/{known_user}/balance").json()["available"] == 11
    # The source the path names is the action's: the API's POST /v1/actions sees it as done.
    with api.client() as http:
        done = post(http, "/v1/actions", {"user_id": known_user, "source": name, "external_id": "imp-1",
                                          "type": action_type})
    _refused(done, 409, "action-already-credited")


def test_a_signed_refund_callback_reverses_the_action_once(api, source, action_type, known_user):
    name, secret = source
    assert _call(api, name, secret, _body(known_user, action_type, "o-1")).status_code == 201
    body = json.dumps({"user_id": known_user, "external_id": "o-1", "reason": "returned"}).encode()
    _refused(_call(api, name, "not the secret", body, path="/refunds"), 401, "signature-invalid")
    first = _call(api, name, secret, body, path="/refunds")
    assert first.status_code == 201, first.text
    assert first.json()["amount"] == 10 and first.json()["balance"] == {"available": 1, "reserved": 0}
    again = _call(api, name, secret, body, path="/refunds")
    assert again.status_code == 201 and again.headers["Idempotent-Replayed"] == "true"
    assert again.json() == first.json()
    written = _written(api, known_user)
    _refused(_call(api, name, secret, json.dumps({"user_id": known_user, "external_id": "o-2"}).encode(),
                   path="/refunds"), 404, "action-not-found")
    _refused(_call(api, name, secret, _body(known_user, action_type, "o-3"), path="/refunds"), 400, "validation")
    assert _written(api, known_user)["entries"] == written["entries"]


def test_every_refusal_is_a_problem_and_writes_nothing(api, source, action_type, known_user):
    name, secret = source
    before = _written(api, known_user)
    now = int(time.time())
    body = _body(known_user, action_type)
    signed = signatures.sign(secret, now, body)
    cases = [
        (_call(api, name, "another secret", body), 401, "signature-invalid"),
        (_call(api, name, secret, body, header=signed.replace("v1=", "v1=0")), 401, "signature-invalid"),
        (_call(api, name, secret, body + b" ", header=signed), 401, "signature-invalid"),
        (_call(api, name, secret, body, header=""), 401, "signature-invalid"),
        (_call(api, name, secret, body, now - SETTINGS.callback_tolerance_seconds - 5), 401, "signature-stale"),
        (_call(api, name, secret, body, now + SETTINGS.callback_tolerance_seconds + 5), 401, "signature-stale"),
        (_call(api, "no-such-source", secret, body), 404, "callback-source-unknown"),
        (_call(api, name, secret, _body(f"u-{uuid.uuid4().hex[:12]}", action_type)), 422, "unknown-user"),
        (_call(api, name, secret, b'{"user_id": "x"'), 400, "validation"),
        (_call(api, name, secret, _body(known_user, action_type, amount=1000)), 400, "validation"),
        (_call(api, name, secret, _body(known_user, action_type, value="10")), 400, "validation"),
    ]
    for response, status, cause in cases:
        _refused(response, status, cause)
    assert _written(api, known_user) == before


def test_both_secrets_of_a_rotation_verify_until_it_is_finished(api, source, action_type, known_user):
    name, first = source
    with Ledger.connect(api.settings.superuser_conninfo()) as ledger:
        _, second = sources.rotate(ledger, SETTINGS.required("callback_master_key"), name)
        time.sleep(api_cache_seconds := 1.2)  # the API trusts what it looked up for REWARDS_AUTH_CACHE_SECONDS
        assert _call(api, name, first, _body(known_user, action_type)).status_code == 201
        assert _call(api, name, second, _body(known_user, action_type)).status_code == 201
        ledger(calls.finish_callback_rotation(name))
        time.sleep(api_cache_seconds)
        _refused(_call(api, name, first, _body(known_user, action_type)), 401, "signature-invalid")
        assert _call(api, name, second, _body(known_user, action_type)).status_code == 201
        ledger(calls.disable_callback_source(name))
        time.sleep(api_cache_seconds)
        _refused(_call(api, name, second, _body(known_user, action_type)), 404, "callback-source-unknown")
