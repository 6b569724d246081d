"""Who may call back: a source the ledger knows, a signature of the body under
one of its secrets, a timestamp within REWARDS_CALLBACK_TOLERANCE_SECONDS.
All of it is decided in the API process: the secrets are derived here from the
master key (app.ledger.sources), which the database never sees."""

from __future__ import annotations

import time

from litestar import Request

from app import signatures
from app.api.problems import problem
from app.api.ratelimit import take_lookup_token
from app.api.security import MISS, KeyCache
from app.ledger import calls, sources


class SourceCache(KeyCache):
    """A source's secrets in use, trusted for `ttl` seconds (a rotation or a
    disabling bites that much later); unknown sources apart, as unknown keys are."""


async def verified_body(request: Request, source: str) -> bytes:
    """The request's body, exactly as signed, once the source, the timestamp and
    the signature hold; a problem otherwise. Nothing has been written either way."""
    state = request.app.state
    cache: SourceCache = state.source_cache
    name = source.encode()
    secrets = cache.get(name)
    if secrets is MISS:
        # As for API keys: made-up sources cost a lookup only within the client
        # address's bucket, a known one always refreshes.
        if not cache.was_known(name):
            await take_lookup_token(request)
        salts = (await state.ledger(calls.callback_salts(source)))["salts"]
        master_key = state.settings.required("callback_master_key")
        secrets = [sources.derive(master_key, source, salt) for salt in salts] if salts else None
        cache.put(name, secrets)
    if secrets is None:
        raise problem("callback-source-unknown", f"no enabled callback source {source!r}")
    body = await request.body()
    try:
        signatures.verify(request.headers.get(signatures.HEADER), body, secrets, time.time(),
                          state.settings.callback_tolerance_seconds)
    except signatures.SignatureRefused as exc:
        raise problem(exc.cause, str(exc)) from exc
    return body
