"""Group commit through HTTP (app.api.group_commit): credits that arrive together
go to the database in shared calls, and each request still gets exactly its own
answer, only once that answer is committed; a refusal or an error of one credit
touches no other in its call."""

from __future__ import annotations

import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from tests.api.conftest import Api, post
from tests.ledger import users_of_one_shard


def _group_calls(api: Api) -> tuple[float, float]:
    """(calls, credits) group commit has sent so far, from the API's metrics."""
    with api.client("admin") as admin:
        text = admin.get("/metrics").text
    found = {name: float(value) for name, value in re.findall(r"^rewards_group_commit_items_(count|sum) (\S+)$",
                                                               text, re.MULTILINE)}
    return found.get("count", 0.0), found.get("sum", 0.0)


def _storm(api: Api, requests: list) -> list[httpx.Response]:
    with ThreadPoolExecutor(max_workers=len(requests)) as pool, api.client() as http:
        return list(pool.map(lambda request: request(http), requests))


def test_credits_arriving_together_share_calls_and_each_gets_its_own_answer(api):
    with api.db() as conn:
        users = users_of_one_shard(conn, 10)  # one group under Citus too
    with api.client() as http:
        for u in users:  # each account made, with a first credit of 1
            assert post(http, f"/v1/accounts/{u}/credits", {"amount": 1, "reason": "first"}).status_code == 201
    calls_before, credits_before = _group_calls(api)
    # The calls first sent are held at the accounts' locks, so the credits
    # arriving meanwhile must wait for a call to come back, and go together.
    with ThreadPoolExecutor(max_workers=1) as runner:
        with api.db() as conn, conn.transaction():
            conn.execute("SELECT 1 FROM ledger.accounts WHERE user_id = ANY(%s) FOR UPDATE", (users,))
            storm = runner.submit(_storm, api, [
                lambda http, i=i: post(http, f"/v1/accounts/{users[i % 10]}/credits",
                                       {"amount": i + 1, "reason": "together"}, key=f"k{i}")
                for i in range(60)])
            time.sleep(0.3)
        answers = storm.result()

    # On a machine too busy to keep up, some are refused early (503), writing nothing.
    assert {a.status_code for a in answers} <= {201, 503}
    assert all(a.headers["retry-after"] for a in answers if a.status_code == 503)
    credited = [i for i, a in enumerate(answers) if a.status_code == 201]
    calls, credits = _group_calls(api)
    assert calls - calls_before < credits - credits_before, "no call carried more than one credit"
    # Each answer is its own: its amount, and a balance its user's credits add up to.
    assert [answers[i].json()["amount"] for i in credited] == [i + 1 for i in credited]
    with api.client() as http:
        for u, user in enumerate(users):
            entries = http.get(f"/v1/accounts/{user}/entries", params={"limit": 100}).json()["items"]
            assert sorted(e["amount"] for e in entries) == sorted([1] + [i + 1 for i in credited if i % 10 == u])
            assert http.get(f"/v1/accounts/{user}/balance").json()["available"] == 1 + sum(
                i + 1 for i in credited if i % 10 == u)


def test_a_refusal_or_an_error_of_one_credit_touches_no_other(api, user):
    with api.client() as http:
        post(http, f"/v1/accounts/{user}/credits", {"amount": 1, "reason": "first"}, key="used")
        post(http, f"/v1/accounts/{user}/credits",
             {"amount": 1, "reason": "first", "action": {"source": "adnet", "external_id": "imp-1"}})
    with api.db() as conn:
        conn.execute("ALTER TABLE ledger.entries ADD CONSTRAINT test_no_boom CHECK (reason <> 'boom') NOT VALID")
    try:
        def credit(i: int):
            body: dict = {"amount": 1, "reason": "x"}
            key = f"k{i}"
            match i % 6:
                case 1:
                    key = "used"                        # the key of another request
                case 2:
                    body["action"] = {"source": "adnet", "external_id": "imp-1"}  # credited already
                case 3:
                    body["reason"] = "boom"             # a constraint the database holds
                case 4:
                    body["metadata"] = {"k": "a\u0000b"}  # a value jsonb cannot hold
            return lambda http: post(http, f"/v1/accounts/{user}/credits", body, key=key)

        answers = _storm(api, [credit(i) for i in range(48)])
    finally:
        with api.db() as conn:
            conn.execute("ALTER TABLE ledger.entries DROP CONSTRAINT test_no_boom")

    # Each its own answer; or, on a machine too busy to keep up, refused early (503).
    expected = {0: 201, 1: 422, 2: 409, 3: 500, 4: 400, 5: 201}
    assert all(a.status_code in (expected[i % 6], 503) for i, a in enumerate(answers)), [
        (i, a.status_code) for i, a in enumerate(answers)]
    assert {answers[i].json()["type"].rsplit(":", 1)[1] for i in range(48)
            if i % 6 == 3 and answers[i].status_code != 503} <= {"internal"}
    with api.client() as http:
        assert http.get(f"/v1/accounts/{user}/balance").json()["available"] == 2 + sum(
            a.status_code == 201 for a in answers)


def test_an_answer_is_sent_only_once_its_credit_is_committed(api, user):
    # While session 1 holds one account, the calls carrying its credits wait,
    # and so must every credit that shares a call with one of them.
    held, others = f"{user}-held", [f"{user}-{i}" for i in range(12)]
    with api.client() as http:
        post(http, f"/v1/accounts/{held}/credits", {"amount": 1, "reason": "open"})
    answered: list[tuple[httpx.Response, bool]] = []
    lock = threading.Lock()

    def credit(account: str):
        def send(http: httpx.Client) -> httpx.Response:
            answer = post(http, f"/v1/accounts/{account}/credits", {"amount": 1, "reason": "x"})
            with api.db() as conn:
                committed = answer.status_code != 201 or conn.execute(
                    "SELECT 1 FROM ledger.entries WHERE user_id = %s AND entry_id = %s",
                    (account, answer.json()["entry_id"])).fetchone() is not None
            with lock:
                answered.append((answer, committed))
            return answer
        return send

    with api.db() as session1:
        session1.execute("BEGIN")
        session1.execute("SELECT 1 FROM ledger.accounts WHERE user_id = %s FOR UPDATE", (held,))
        requests = [credit(account) for pair in zip([held] * 12, others, strict=True) for account in pair]
        with ThreadPoolExecutor(max_workers=len(requests)) as pool, api.client() as http:
            futures = [pool.submit(request, http) for request in requests]
            time.sleep(0.3)  # within the API role's lock_timeout (500 ms)
            session1.execute("COMMIT")
            for future in futures:
                future.result()

    assert all(committed for _, committed in answered), "an answer came before its commit"
    assert {a.status_code for a, _ in answered} <= {201, 503}
