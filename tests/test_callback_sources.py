"""Callback sources and their secrets: one in use, two during a rotation, the
older retired when it is finished; the database holds salts and fingerprints,
never a secret, and the API's role reads only the salts of enabled sources."""

from __future__ import annotations

import psycopg
import pytest

from app.ledger import calls, sources
from app.ledger.client import Ledger
from app.ledger.errors import AlreadyExists, InvalidArgument, NotFound, Refused

MASTER = "a-master-key-of-the-test"


@pytest.fixture
def ledger(dsn):
    with Ledger.connect(dsn) as ledger:
        yield ledger


def _salts(api_db, source: str) -> list[bytes] | None:
    return api_db.execute("SELECT api.callback_salts(%s) AS salts", [source]).fetchone()["salts"]


def test_a_rotation_keeps_two_secrets_valid_until_it_is_finished(ledger, api_db):
    rows, first = sources.create(ledger, MASTER, "adnet")
    [(salt,)] = [(s,) for s in _salts(api_db, "adnet")]
    assert sources.derive(MASTER, "adnet", salt) == first
    assert rows[0].fingerprint == sources.fingerprint(first)

    rows, second = sources.rotate(ledger, MASTER, "adnet")
    assert second != first and [r.secret_id for r in rows] == sorted(r.secret_id for r in rows)
    salts = _salts(api_db, "adnet")
    assert [sources.derive(MASTER, "adnet", s) for s in salts] == [second, first]  # newest first
    with pytest.raises(Refused, match="under way"):
        sources.rotate(ledger, MASTER, "adnet")

    [kept] = ledger(calls.finish_callback_rotation("adnet"))
    assert kept.fingerprint == sources.fingerprint(second)
    assert [sources.derive(MASTER, "adnet", s) for s in _salts(api_db, "adnet")] == [second]
    with pytest.raises(Refused, match="no rotation"):
        ledger(calls.finish_callback_rotation("adnet"))


def test_a_disabled_or_unknown_source_has_no_salts(ledger, api_db):
    sources.create(ledger, MASTER, "store")
    ledger(calls.disable_callback_source("store"))
    assert _salts(api_db, "store") is None and _salts(api_db, "nobody") is None
    with pytest.raises(NotFound):
        sources.rotate(ledger, MASTER, "store")
    with pytest.raises(AlreadyExists):
        sources.create(ledger, MASTER, "store")
    with pytest.raises(InvalidArgument) as refused:
        sources.create(ledger, MASTER, "two words")
    assert refused.value.field == "source"


def test_the_database_holds_no_secret_and_the_api_role_reads_no_table(ledger, db, api_db):
    _, secret = sources.create(ledger, MASTER, "adnet")
    dump = str(db.execute("SELECT * FROM api.callback_secrets").fetchall())
    assert secret not in dump and secret.encode().hex() not in dump
    # The salt alone signs nothing: another master key derives another secret.
    assert sources.derive("another-master-key", "adnet", _salts(api_db, "adnet")[0]) != secret
    for query in ("SELECT * FROM api.callback_secrets", "SELECT * FROM api.callback_sources",
                  "SELECT * FROM api.list_callback_sources()", "SELECT * FROM api.disable_callback_source('adnet')"):
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            api_db.execute(query)
