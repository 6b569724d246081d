"""POST /v1/actions and the administration of rules and campaigns, through the
real API: what an action earns and why, every refusal a problem that writes
nothing but its key, keys limited to sources and given their own rate tier."""

import dataclasses
import uuid
from datetime import datetime, timedelta, timezone

import httpx
import pytest

from app.ledger import calls, keys
from app.ledger.client import Ledger
from app.operations import processes
from tests.api.conftest import api_env, post

PROBLEM = "urn:rewards-ledger:problem:"


def _problem(response: httpx.Response, status: int, cause: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["type"] == PROBLEM + cause
    return body


@pytest.fixture
def action_type() -> str:
    """An action type of this test alone (the API's database is shared)."""
    return f"t_{uuid.uuid4().hex[:10]}"


def _rule(api, action_type, **fields):
    with api.client("admin") as admin:
        answer = admin.put(f"/v1/admin/rules/{action_type}", json=fields)
    assert answer.status_code == 200, answer.text
    return answer.json()


def _action(user, action_type, external_id=None, **fields):
    return {"user_id": user, "source": "adnet", "external_id": external_id or uuid.uuid4().hex,
            "type": action_type, **fields}


def _key(api, name, scopes, sources=None, tier=None) -> str:
    with Ledger.connect(api.settings.superuser_conninfo()) as ledger:
        key, secret = keys.create(ledger, name, scopes)
        ledger(calls.limit_key(key.key_id, sources, tier))
    return secret


def test_an_action_earns_what_the_rules_give_and_says_why(api, user, action_type):
    _rule(api, action_type, fixed_points=10, daily_cap=100)
    with api.client("admin") as admin:
        made = admin.post("/v1/admin/campaigns", json={
            "name": f"double {action_type}", "starts_at": "2026-01-01T00:00:00Z", "ends_at": "2100-01-01T00:00:00Z",
            "multiplier_percent": 200, "action_types": [action_type]})
    assert made.status_code == 201, made.text
    with api.client("earn") as http:
        body = _action(user, action_type, f"{action_type}-1", metadata={"placement": "home"})
        first = post(http, "/v1/actions", body, key="a1")
        again = post(http, "/v1/actions", body, key="a1")
    assert first.status_code == 201, first.text
    earned = first.json()
    assert earned["points"] == 20 and earned["balance"] == {"available": 20, "reserved": 0}
    assert earned["earning"] == {"rule": action_type, "base_points": 10, "capped": False, "budget_exhausted": False,
                                 "campaign": {"campaign_id": made.json()["campaign_id"], "points": 10}}
    assert again.status_code == 201 and again.headers["Idempotent-Replayed"] == "true"
    assert again.json() == earned


def test_a_rule_set_with_lot_terms_earns_pending_points(api, user, action_type):
    made = _rule(api, action_type, points_per_unit=1, unit_value=100, pending_seconds=3600, expiry_seconds=86400)
    assert (made["pending_seconds"], made["expiry_seconds"]) == (3600, 86400)
    with api.client("admin") as admin:
        _problem(admin.put(f"/v1/admin/rules/{action_type}", json={"fixed_points": 1, "pending_seconds": 60,
                                                                   "expiry_seconds": 60}), 400, "validation")
        history = admin.get("/v1/admin/changes", params={"limit": 1}).json()
    assert history[0]["after"]["pending_seconds"] == 3600
    with api.client("earn") as http:
        earned = post(http, "/v1/actions", _action(user, action_type, value=1000))
    assert earned.status_code == 201, earned.text
    assert earned.json()["points"] == 10 and earned.json()["balance"]["available"] == 0
    with api.client("read") as reader:
        balance = reader.get(f"/v1/accounts/{user}/balance").json()
    assert (balance["available"], balance["pending"]) == (0, 10)


def _keys_and_entries(api, user):
    with api.db() as db:
        return db.execute("SELECT (SELECT count(*) FROM ledger.idempotency_keys WHERE user_id = %(u)s) AS keys,"
                          " (SELECT count(*) FROM ledger.entries WHERE user_id = %(u)s) AS entries",
                          {"u": user}).fetchone()


def test_a_refund_reverses_an_action_and_what_was_spent_is_owed(api, user, action_type):
    _rule(api, action_type, points_per_unit=1, unit_value=100)
    refund = {"user_id": user, "source": "adnet", "external_id": f"{action_type}-1", "reason": "returned"}
    with api.client("earn") as http:
        assert post(http, "/v1/actions", _action(user, action_type, f"{action_type}-1", value=5000)).status_code == 201
    with api.client() as http:
        assert post(http, f"/v1/accounts/{user}/debits", {"amount": 30, "reason": "gift"}).status_code == 201
    with api.client("earn") as http:
        first = post(http, "/v1/refunds", refund, key="rf1")
        again = post(http, "/v1/refunds", refund, key="rf1")
        twice = _problem(post(http, "/v1/refunds", refund, key="rf2"), 409, "action-already-refunded")
        _problem(post(http, "/v1/refunds", refund | {"external_id": "never"}, key="rf3"), 404, "action-not-found")
        _problem(post(http, "/v1/refunds", refund | {"reason": "other"}, key="rf1"), 422, "idempotency-key-reused")
        _problem(post(http, "/v1/refunds", refund | {"amount": 5}, key="rf4"), 400, "validation")
    assert first.status_code == 201, first.text
    assert first.json()["amount"] == 50 and first.json()["balance"] == {"available": 0, "reserved": 0}
    assert again.headers["Idempotent-Replayed"] == "true" and again.json() == first.json()
    assert twice["balance"]["available"] == 0
    with api.client("read") as reader:
        balance = reader.get(f"/v1/accounts/{user}/balance").json()
        kinds = [e["kind"] for e in reader.get(f"/v1/accounts/{user}/entries").json()["items"]]
    assert balance["owed"] == 30 and kinds[:2] == ["owed", "reversal"]
    with api.client() as http:
        paid = post(http, f"/v1/accounts/{user}/credits", {"amount": 40, "reason": "welcome back"})
    assert paid.json()["balance"]["available"] == 10


def test_a_refund_needing_held_points_waits_for_the_hold_to_end(api, user, action_type):
    _rule(api, action_type, fixed_points=50)
    refund = {"user_id": user, "source": "adnet", "external_id": f"{action_type}-1", "reason": "returned"}
    with api.client("earn") as http:
        assert post(http, "/v1/actions", _action(user, action_type, f"{action_type}-1")).status_code == 201
    with api.client() as http:
        held = post(http, f"/v1/accounts/{user}/reservations", {"amount": 20, "ttl_seconds": 60, "reason": "checkout"})
        assert held.status_code == 201, held.text
    with api.client("earn") as http:
        refused = post(http, "/v1/refunds", refund, key="rf1")
        body = _problem(refused, 409, "refused-for-now")
        assert "20 of the points to refund are held" in body["detail"] and refused.headers["retry-after"]
    with api.client() as http:
        released = post(http, f"/v1/accounts/{user}/reservations/{held.json()['reservation_id']}/release", {})
        assert released.status_code == 200, released.text
    with api.client("earn") as http:
        done = post(http, "/v1/refunds", refund, key="rf1")  # the same key: the refusal kept nothing
    assert done.status_code == 201, done.text
    assert done.json()["amount"] == 50 and done.json()["balance"] == {"available": 0, "reserved": 0}


def test_a_key_limited_to_sources_refunds_only_their_actions(api, user, action_type):
    _rule(api, action_type, fixed_points=10)
    store_key = _key(api, "store refunds", ["points:earn"], sources=["store"])
    with api.client("earn") as http:
        assert post(http, "/v1/actions", _action(user, action_type, f"{action_type}-1")).status_code == 201
    before = _keys_and_entries(api, user)
    with httpx.Client(base_url=api.base_url, headers={"Authorization": f"Bearer {store_key}"}) as http:
        body = _problem(post(http, "/v1/refunds", {"user_id": user, "source": "adnet",
                                                   "external_id": f"{action_type}-1"}), 403, "source-not-allowed")
    assert body["field"] == "source"
    assert _keys_and_entries(api, user) == before
    with api.client("read") as reader:
        assert reader.get(f"/v1/accounts/{user}/balance").json()["available"] == 10


def test_refusals_are_problems_and_write_only_their_key(api, user, action_type):
    _rule(api, action_type, fixed_points=10, lifetime_cap=10)
    with api.client("earn") as http:
        assert post(http, "/v1/actions", _action(user, action_type, f"{action_type}-1")).status_code == 201
        _problem(post(http, "/v1/actions", _action(user, action_type, f"{action_type}-1")), 409, "action-already-credited")
        _problem(post(http, "/v1/actions", _action("someone-else", action_type, f"{action_type}-1")), 409, "action-claimed")
        capped = _problem(post(http, "/v1/actions", _action(user, action_type, f"{action_type}-2")), 409, "cap-reached")
        assert capped["earning"]["capped"] is True and capped["balance"]["available"] == 10
        _problem(post(http, "/v1/actions", _action(user, "no_such_type")), 422, "not-eligible")
        # the client never sends an amount
        _problem(post(http, "/v1/actions", _action(user, action_type, amount=1000)), 400, "validation")
    with api.db() as conn:
        assert conn.execute("SELECT count(*) AS n FROM ledger.entries WHERE user_id = %s",
                            (user,)).fetchone()["n"] == 1
        assert conn.execute("SELECT count(*) AS n FROM ledger.accounts WHERE user_id = 'someone-else'"
                            ).fetchone()["n"] == 0


def test_a_key_limited_to_sources_cannot_claim_another_partners_actions(api, user, action_type):
    _rule(api, action_type, fixed_points=5)
    store_key = _key(api, "store only", ["points:earn"], sources=["store"])
    with httpx.Client(base_url=api.base_url, headers={"Authorization": f"Bearer {store_key}"}) as http:
        body = _problem(post(http, "/v1/actions", _action(user, action_type)), 403, "source-not-allowed")
        assert body["field"] == "source"
        allowed = post(http, "/v1/actions", {**_action(user, action_type), "source": "store"})
    assert allowed.status_code == 201, allowed.text
    with api.client("read") as reader:
        _problem(post(reader, "/v1/actions", _action(user, action_type)), 403, "forbidden")


def test_a_key_with_a_rate_tier_has_its_own_bucket(api, action_type):
    _rule(api, action_type, fixed_points=1)
    port = processes.free_port()
    settings = dataclasses.replace(api.settings, api_port=port)
    processes.api_up(settings, env=api_env(settings, REWARDS_RATE_TIERS="tiny=0.1/2"), workers=1)
    small = _key(api, "small partner", ["points:earn"], tier="tiny")
    try:
        base = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {small}"}) as http:
            answers = [post(http, "/v1/actions", _action(f"u{i}-{action_type}", action_type)) for i in range(3)]
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {api.keys['earn']}"}) as http:
            other = post(http, "/v1/actions", _action(f"u9-{action_type}", action_type))
    finally:
        processes.api_down(settings)
    assert [a.status_code for a in answers] == [201, 201, 429]
    assert answers[2].headers["Retry-After"]
    assert other.status_code == 201


def test_rules_and_campaigns_are_administered_and_every_change_recorded(api, action_type):
    with api.client("admin") as admin:
        created = admin.put(f"/v1/admin/rules/{action_type}", json={"points_per_unit": 1, "unit_value": 100})
        changed = admin.put(f"/v1/admin/rules/{action_type}", json={"fixed_points": 7, "daily_cap": 70})
        disabled = admin.post(f"/v1/admin/rules/{action_type}/disable")
        listed = admin.get("/v1/admin/rules")
        _problem(admin.post("/v1/admin/rules/never_set/disable"), 404, "not-found")
        bad = _problem(admin.put(f"/v1/admin/rules/{action_type}", json={"fixed_points": 1, "points_per_unit": 1,
                                                                         "unit_value": 1}), 400, "validation")
        campaign = admin.post("/v1/admin/campaigns", json={
            "name": f"bonus {action_type}", "starts_at": "2026-01-01T00:00:00Z", "ends_at": "2026-02-01T00:00:00Z",
            "bonus_points": 5, "action_types": [action_type]}).json()
        window = admin.put(f"/v1/admin/campaigns/{campaign['campaign_id']}", json={
            "name": f"bonus {action_type}", "starts_at": "2026-01-01T00:00:00Z", "ends_at": "2026-03-01T00:00:00Z",
            "bonus_points": 6, "action_types": [action_type]})
        _problem(admin.post("/v1/admin/campaigns", json={
            "name": "backwards", "starts_at": "2026-02-01T00:00:00Z", "ends_at": "2026-01-01T00:00:00Z",
            "bonus_points": 5, "action_types": [action_type]}), 400, "validation")
        campaigns = admin.get("/v1/admin/campaigns").json()
        history = admin.get("/v1/admin/changes", params={"limit": 5}).json()
    with api.client("earn") as earner:
        _problem(earner.get("/v1/admin/rules"), 403, "forbidden")
    assert created.status_code == changed.status_code == disabled.status_code == 200
    assert changed.json()["fixed_points"] == 7 and changed.json()["points_per_unit"] is None
    assert disabled.json()["enabled"] is False
    assert any(r["action_type"] == action_type and not r["enabled"] for r in listed.json())
    assert bad["field"] == "fixed_points"
    assert window.status_code == 200 and window.json()["bonus_points"] == 6
    assert any(c["campaign_id"] == campaign["campaign_id"] and c["bonus_points"] == 6 for c in campaigns)
    mine = [(h["subject"], h["operation"]) for h in history
            if h["subject_id"] in (action_type, str(campaign["campaign_id"]))]
    assert mine == [("campaign", "change"), ("campaign", "create"), ("rule", "disable"), ("rule", "change"),
                    ("rule", "create")]
    assert all(h["actor"].startswith("api key ") and h["actor"].endswith("(operator)") for h in history)
    assert history[0]["before"]["bonus_points"] == 5 and history[0]["after"]["bonus_points"] == 6


def test_occurred_at_places_the_action_in_a_campaign_window(api, user, action_type):
    _rule(api, action_type, fixed_points=10)
    now = datetime.now(timezone.utc)
    with api.client("admin") as admin:
        admin.post("/v1/admin/campaigns", json={
            "name": f"yesterday {action_type}", "starts_at": (now - timedelta(days=2)).isoformat(),
            "ends_at": (now - timedelta(days=1)).isoformat(), "bonus_points": 90, "action_types": [action_type]})
    with api.client("earn") as http:
        late = post(http, "/v1/actions", _action(user, action_type,
                                                 occurred_at=(now - timedelta(days=1, hours=1)).isoformat()))
        today = post(http, "/v1/actions", _action(user, action_type))
        _problem(post(http, "/v1/actions", _action(user, action_type, occurred_at="2026-01-01T00:00:00")),
                 400, "validation")  # no time zone
    assert late.json()["points"] == 100 and today.json()["points"] == 10
