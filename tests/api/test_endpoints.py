"""Every endpoint's success path, over real HTTP."""

import socket
import time

from tests.api.conftest import post
from tests.ledger import age_lots


def test_credit_then_read_balance_and_entries(api, user):
    with api.client() as http:
        created = post(http, f"/v1/accounts/{user}/credits",
                       {"amount": 120, "reason": "ad view", "action": {"source": "adnet", "external_id": "imp-1"},
                        "metadata": {"campaign": "spring"}})
        assert created.status_code == 201, created.text
        body = created.json()
        assert body["amount"] == 120 and body["balance"] == {"available": 120, "reserved": 0}
        assert body["entry_id"] > 0 and body["user_id"] == user
        assert created.headers["x-request-id"]
        assert int(created.headers["ratelimit-limit"]) >= 1

        balance = http.get(f"/v1/accounts/{user}/balance")
        assert balance.status_code == 200
        assert balance.json() | {"updated_at": None} == {
            "user_id": user, "available": 120, "pending": 0, "reserved": 0, "lifetime_earned": 120,
            "next_expiry": None, "updated_at": None, "owed": 0}

        entries = http.get(f"/v1/accounts/{user}/entries").json()
        assert [e["kind"] for e in entries["items"]] == ["credit"]
        assert entries["items"][0]["action"] == {"source": "adnet", "external_id": "imp-1"}
        assert entries["items"][0]["metadata"] == {"campaign": "spring"}
        assert entries["next_cursor"] is None


def test_pending_and_expiring_points_in_the_balance_and_the_entries(api, user):
    with api.client() as http:
        post(http, f"/v1/accounts/{user}/credits", {"amount": 10, "reason": "task"})
        pending = post(http, f"/v1/accounts/{user}/credits",
                       {"amount": 70, "reason": "purchase", "pending_seconds": 3600, "expiry_seconds": 7200})
        assert (pending.status_code, pending.json()["balance"]) == (201, {"available": 10, "reserved": 0})
        expiring = post(http, f"/v1/accounts/{user}/credits", {"amount": 20, "reason": "promo", "expiry_seconds": 600})
        assert expiring.status_code == 201
        refused = post(http, f"/v1/accounts/{user}/reservations", {"amount": 31, "ttl_seconds": 60, "reason": "gift"})
        assert refused.status_code == 409, refused.text

        balance = http.get(f"/v1/accounts/{user}/balance").json()
        assert (balance["available"], balance["pending"], balance["reserved"]) == (30, 70, 0)
        assert balance["next_expiry"]["amount"] == 20
        with api.db() as db:
            age_lots(db, user, 3600)
            db.execute("CALL ledger.settle_lots()")
        balance = http.get(f"/v1/accounts/{user}/balance").json()
        assert (balance["available"], balance["pending"], balance["next_expiry"]["amount"]) == (80, 0, 70)
        kinds = [e["kind"] for e in http.get(f"/v1/accounts/{user}/entries").json()["items"]]
        assert kinds == ["lapse", "mature", "credit", "credit", "credit"]

        for terms in ({"pending_seconds": 0}, {"pending_seconds": 60, "expiry_seconds": 60}):
            refused = post(http, f"/v1/accounts/{user}/credits", {"amount": 1, "reason": "x"} | terms)
            assert refused.status_code == 400, refused.text


def test_unknown_account_reads_as_zeros(api, user):
    with api.client() as http:
        balance = http.get(f"/v1/accounts/{user}/balance")
    assert balance.status_code == 200
    assert (balance.json()["available"], balance.json()["reserved"], balance.json()["updated_at"]) == (0, 0, None)


def test_debit(api, user):
    with api.client() as http:
        post(http, f"/v1/accounts/{user}/credits", {"amount": 50, "reason": "task"})
        spent = post(http, f"/v1/accounts/{user}/debits", {"amount": 20, "reason": "gift card"})
    assert spent.status_code == 201
    assert spent.json()["balance"] == {"available": 30, "reserved": 0}


def test_reserve_commit_part_and_read_the_reservation(api, user):
    with api.client() as http:
        post(http, f"/v1/accounts/{user}/credits", {"amount": 100, "reason": "task"})
        held = post(http, f"/v1/accounts/{user}/reservations", {"amount": 40, "ttl_seconds": 60, "reason": "voucher"})
        assert held.status_code == 201, held.text
        hold = held.json()
        assert (hold["status"], hold["amount"], hold["balance"]) == ("open", 40, {"available": 60, "reserved": 40})
        rid = hold["reservation_id"]

        done = post(http, f"/v1/accounts/{user}/reservations/{rid}/commit", {"amount": 25})
        assert done.status_code == 200, done.text
        assert (done.json()["status"], done.json()["amount"]) == ("committed", 25)
        assert done.json()["balance"] == {"available": 75, "reserved": 0}

        state = http.get(f"/v1/accounts/{user}/reservations/{rid}").json()
        assert (state["status"], state["committed_amount"], state["amount"]) == ("committed", 25, 40)


def test_release_without_a_body(api, user):
    with api.client() as http:
        post(http, f"/v1/accounts/{user}/credits", {"amount": 100, "reason": "task"})
        rid = post(http, f"/v1/accounts/{user}/reservations",
                   {"amount": 40, "ttl_seconds": 60, "reason": "voucher"}).json()["reservation_id"]
        released = http.post(f"/v1/accounts/{user}/reservations/{rid}/release", headers={"Idempotency-Key": "x1"})
    assert released.status_code == 200, released.text
    assert released.json()["balance"] == {"available": 100, "reserved": 0}


def test_entries_paginate_by_cursor(api, user):
    with api.client() as http:
        for amount in range(1, 8):
            post(http, f"/v1/accounts/{user}/credits", {"amount": amount, "reason": "task"})
        pages, cursor = [], None
        while True:
            params = {"limit": 3} | ({"cursor": cursor} if cursor else {})
            page = http.get(f"/v1/accounts/{user}/entries", params=params).json()
            pages.append([item["amount"] for item in page["items"]])
            cursor = page["next_cursor"]
            if cursor is None:
                break
    assert pages == [[7, 6, 5], [4, 3, 2], [1]]


def test_health_readiness_and_metrics(api):
    with api.client(key=None) as open_http:
        assert open_http.get("/healthz").json() == {"status": "ok"}
        assert open_http.get("/readyz").json() == {"status": "ready"}
        assert open_http.get("/metrics").status_code == 401
        assert open_http.get("/schema/openapi.json").status_code == 200
    with api.client("admin") as admin:
        text = admin.get("/metrics").text
    assert "rewards_http_requests_total" in text


def _credits_counted(admin, status: str) -> float:
    line = next((line for line in admin.get("/metrics").text.splitlines()
                 if line.startswith('rewards_http_requests_total{method="POST",route="/v1/accounts/{user_id}/credits"')
                 and f'status="{status}"' in line), None)
    return float(line.rsplit(" ", 1)[1]) if line else 0.0


def test_a_client_gone_before_its_answer_is_counted_as_499_not_as_a_server_error(api, user):
    """A load generator that stops leaves requests unanswered: they are the
    client's doing (499), and an SRE's 500 alert must not fire on them."""
    host, port = api.base_url.removeprefix("http://").split(":")
    with api.client("admin") as admin:
        before = (_credits_counted(admin, "499"), _credits_counted(admin, "500"))
        with socket.create_connection((host, int(port))) as client:
            client.sendall(f"POST /v1/accounts/{user}/credits HTTP/1.1\r\nHost: {host}\r\n"
                           f"Authorization: Bearer {api.keys['all']}\r\nContent-Type: application/json\r\n"
                           "Content-Length: 400\r\n\r\n{\"amount\": 5,".encode())
            time.sleep(0.5)  # the API is waiting for the rest of the body when the client leaves
        deadline = time.monotonic() + 10
        while _credits_counted(admin, "499") == before[0] and time.monotonic() < deadline:
            time.sleep(0.1)
        after = (_credits_counted(admin, "499"), _credits_counted(admin, "500"))
    assert after == (before[0] + 1, before[1])
