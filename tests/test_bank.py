"""The bank-style HTTP load (bench/bank.py) and its verifier (bench/verify.py)
on whichever topology the suite runs: clients against an API and an audit
consumer of the test's own, and every check holds; then the verifier sees a
lost history row and an answer the database does not match."""

from __future__ import annotations

import psycopg

from bench import serve
from bench.bank import Load
from bench.verify import verify
from tests.conftest import SETTINGS


def test_a_bank_s_clients_get_answers_the_database_holds(database):
    conninfo = SETTINGS.superuser_conninfo(database)
    key = serve.api_key(SETTINGS, database)
    with serve.audit_consumer(SETTINGS, database, f"bank_{database}"), \
            serve.api(SETTINGS, database, workers=1, rates={}) as (url, _):
        run = Load(url, key, clients=6, accounts=40, seed=8, replays=0.1).run(4)
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
