"""The bank-style HTTP load (bench/bank.py) and its verifier (bench/verify.py)
on whichever topology the suite runs: clients against an API and an audit
consumer of the test's own, and every check holds; then the verifier sees a
lost history row and an answer the database does not match. What counts as a
client's failure, a 503 retried and answered or not, is told from a record
alone."""

from __future__ import annotations

import time

import psycopg

from app.api.problems import TYPE_PREFIX
from bench import serve
from bench.bank import OVERLOADED, Attempt, Load, Request, Run
from bench.verify import verify
from tests.conftest import SETTINGS


def _enough(requests: list[Request]) -> bool:
    acknowledged = [r for r in requests if r.acknowledged]
    return (len(acknowledged) > 50 and any(r.replay_of is not None for r in requests)
            and {r.op for r in acknowledged} == {"credit", "debit", "reserve", "commit"})


def test_a_bank_s_clients_get_answers_the_database_holds(database):
    conninfo = SETTINGS.superuser_conninfo(database)
    key = serve.api_key(SETTINGS, database)
    with serve.audit_consumer(SETTINGS, database, f"bank_{database}"), \
            serve.api(SETTINGS, database, workers=1, rates={}) as (url, _):
        load = Load(url, key, clients=6, accounts=40, seed=8, replays=0.1)
        load.start()
        # Until enough is acknowledged to check, however slow the machine.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not _enough(list(load.requests)):
            time.sleep(0.2)
        run = load.finish()
        verdict = verify(run, conninfo)
    assert run.problems() == []
    assert verdict.problems == []
    assert verdict.counts["acknowledged"] > 50 and verdict.counts["replayed"] > 0
    assert {r.op for r in run.requests if r.acknowledged} == {"credit", "debit", "reserve", "commit"}

    with psycopg.connect(conninfo, autocommit=True) as conn:
        gone = conn.execute("DELETE FROM audit.entries WHERE entry_id = (SELECT min(entry_id) FROM audit.entries)"
                            " RETURNING entry_id").fetchone()[0]
    told = next(r for r in run.requests if r.op == "credit" and r.acknowledged)
    told.body["amount"] += 1
    failed = {check: problems for check, problems in verify(run, conninfo, audit_wait=0).checks.items() if problems}
    assert failed.keys() == {"every acknowledged request has its entry, once",
                             "every balance equals its entries and the answers",
                             "the audit history holds every entry once", "the reconciler finds nothing"}
    assert failed["the audit history holds every entry once"] == [f"entry {gone}: 0 times in the history"]


def _commit(*attempts: tuple[int, str | None], answered: bool = True) -> Run:
    """A run of one commit, sent once per (status, why) and answered by the last
    unless it was lost."""
    request = Request("commit", "u-1", "k-1", "/v1/accounts/u-1/reservations/7/commit", {"amount": 5},
                      attempts=[Attempt(float(i), 0.1, status, why) for i, (status, why) in enumerate(attempts)])
    if answered:
        request.status, request.answer = attempts[-1][0], {"entry_id": 1}
    return Run(started_at=0.0, seconds=len(attempts), clients=1, users=["u-1"], requests=[request], marks={})


TIMEOUT = f"{OVERLOADED} the database did not finish the call within statement_timeout"


def test_a_request_refused_as_overloaded_and_answered_on_its_retry_did_not_fail():
    run = _commit((503, TIMEOUT), (503, TIMEOUT), (200, None))
    assert run.problems() == []
    assert run.overloaded_then_answered() == [
        "2 commit attempts answered 503 (the database did not finish the call within statement_timeout), "
        "then retried and answered"]
    assert run.summary()["overloaded_then_answered"] == 2


def test_a_503_is_still_a_failure_when_no_retry_was_answered_or_the_database_was_unavailable():
    lost = _commit((503, TIMEOUT), (503, TIMEOUT), answered=False)
    assert lost.problems() == [f"2 commit attempts answered 503 (first: {TIMEOUT})",
                               "1 requests never answered, e.g. commit u-1 k-1"]
    assert lost.overloaded_then_answered() == []
    down = f"{TYPE_PREFIX}unavailable the database did not answer"
    assert _commit((503, down), (200, None)).problems() == [f"1 commit attempts answered 503 (first: {down})"]
    assert _commit((502, "- <html>"), (200, None)).problems() == ["1 commit attempts answered 502 (first: - <html>)"]
    assert _commit((500, None)).problems() == ["1 commit attempts answered 500", "1 commit requests ended in 500"]
