"""The named queries of sql/queries.sql. Python never builds SQL text: it runs
these, by name, with parameters."""

from __future__ import annotations

import re

from app.settings import PROJECT_ROOT

_NAME = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


def _load() -> dict[str, str]:
    text = (PROJECT_ROOT / "sql" / "queries.sql").read_text()
    parts = _NAME.split(text)  # [preamble, name1, body1, name2, body2, ...]
    return {name: body.strip() for name, body in zip(parts[1::2], parts[2::2], strict=True)}


_QUERIES = _load()

VERIFY_CHAIN = _QUERIES["verify_chain"]
EXPIRE_RESERVATIONS = _QUERIES["expire_reservations"]
CREDIT = _QUERIES["credit"]
DEBIT = _QUERIES["debit"]
RESERVE = _QUERIES["reserve"]
COMMIT_RESERVATION = _QUERIES["commit_reservation"]
RELEASE_RESERVATION = _QUERIES["release_reservation"]
BALANCE = _QUERIES["balance"]
ENTRIES_PAGE = _QUERIES["entries_page"]
RESERVATION = _QUERIES["reservation"]
AUTHENTICATE = _QUERIES["authenticate"]
CREATE_KEY = _QUERIES["create_key"]
LIST_KEYS = _QUERIES["list_keys"]
REVOKE_KEY = _QUERIES["revoke_key"]
PING = _QUERIES["ping"]
