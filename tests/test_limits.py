"""The limits the Python side checks (app.ledger.limits) are the ones the
database holds: a change to one without the other fails here."""

from __future__ import annotations

import re

import pytest

from app.ledger import calls, keys, limits
from app.ledger.client import Ledger
from app.ledger.errors import InvalidArgument

SAMPLES = ["alice", "a", "u" * 64, "u" * 65, "", "al ice", "alicé", "a.b_c:d-e", "a/b", "tab\there", "x" * 255,
           "x" * 256, "!~", "semi;colon", "new\nline"]


def test_the_settings_row_holds_the_same_maximums(db):
    row = db.execute("SELECT max_amount, extract(epoch FROM max_reservation_ttl)::int AS ttl, max_metadata_bytes,"
                     " max_reason_length, max_batch_items, extract(epoch FROM max_lot_term)::int AS lot_term"
                     " FROM ledger.settings").fetchone()
    assert row == {"max_amount": limits.MAX_AMOUNT, "ttl": limits.MAX_RESERVATION_TTL_SECONDS,
                   "max_metadata_bytes": limits.MAX_METADATA_BYTES, "max_reason_length": limits.MAX_REASON_LENGTH,
                   "max_batch_items": limits.MAX_BULK_ITEMS, "lot_term": limits.MAX_LOT_TERM_SECONDS}


@pytest.mark.parametrize("pattern, query", [(limits.NAME_PATTERN, "SELECT ledger._is_name(%s) AS ok"),
                                            (limits.TOKEN_PATTERN, "SELECT ledger._is_token(%s) AS ok")])
def test_the_identifier_patterns_agree_with_the_database(db, pattern, query):
    for sample in SAMPLES:
        in_sql = db.execute(query, (sample,)).fetchone()["ok"]
        assert bool(re.fullmatch(pattern, sample)) is in_sql, sample


def test_every_scope_is_one_the_database_accepts_and_no_other(db):
    ledger = Ledger(db)
    for scope in limits.SCOPES:
        assert keys.create(ledger, f"key-{scope}", [scope])[0].scopes == [scope]
    with pytest.raises(InvalidArgument) as raised:
        keys.create(ledger, "other", ["points:fly"])
    assert raised.value.field == "scopes"


def test_the_key_name_and_page_bounds_agree(db):
    ledger = Ledger(db)
    keys.create(ledger, "n" * limits.MAX_KEY_NAME_LENGTH, ["points:read"])
    with pytest.raises(InvalidArgument):
        keys.create(ledger, "n" * (limits.MAX_KEY_NAME_LENGTH + 1), ["points:read"])
    assert ledger(calls.entries_page("alice", None, limits.MAX_PAGE)) == []
    with pytest.raises(InvalidArgument):
        ledger(calls.entries_page("alice", None, limits.MAX_PAGE + 1))
