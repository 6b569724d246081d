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
