"""`make chaos` in small (bench/chaos.py): PgBouncer and the audit consumer of
the service `make run` started are killed under the bank load, each comes back
by itself, and every check of the verifier holds. The whole harness is
`make chaos`; this keeps its path exercised by `make test`."""

from __future__ import annotations

from bench import chaos, verify
from tests.conftest import SETTINGS


def test_pgbouncer_and_consumer_kills_heal_by_themselves_and_lose_nothing():
    faults = [chaos.FAULTS["pgbouncer"], chaos.FAULTS["consumer"]]
    run, outcomes = chaos.chaos(SETTINGS, faults, clients=4, accounts=100, warmup=2, settle=2,
                                heal_timeout=60, log=lambda line: None)
    verdict = verify.verify(run, SETTINGS.superuser_conninfo())
    assert chaos.problems(run, outcomes, verdict) == []
    assert [o.fault for o in outcomes if o.healed_after is not None] == ["pgbouncer", "consumer"]
    pgbouncer, consumer = outcomes
    assert pgbouncer.writes_back_after is not None
    # The stream stopping never stops a write.
    assert consumer.failed_writes == 0
    assert verdict.counts["acknowledged"] > 0 and verdict.counts["history"] == verdict.counts["entries"]
