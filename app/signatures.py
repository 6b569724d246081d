"""The one signature scheme of the project, both ways: the notifications it
sends and the callbacks partners send it. The header is

    X-Rewards-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256>

where the HMAC's key is the shared secret's UTF-8 bytes and its message the
bytes of "<t>." followed by the body exactly as sent (README "Signed callbacks")."""

from __future__ import annotations

import hashlib
import hmac

HEADER = "X-Rewards-Signature"


class SignatureRefused(Exception):
    """A callback's signature header did not verify; `cause` names why for the
    problem's type ("signature-invalid" or "signature-stale")."""

    def __init__(self, cause: str, detail: str) -> None:
        super().__init__(detail)
        self.cause = cause


def digest(secret: str, timestamp: int, body: bytes) -> str:
    return hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The header's value for `body` sent at `timestamp`."""
    return f"t={timestamp},v1={digest(secret, timestamp, body)}"


def verify(header: str | None, body: bytes, secrets: list[str], now: float, tolerance: int) -> int:
    """The header's timestamp when one of its v1 signatures is that of `body`
    under one of `secrets` and the timestamp is within `tolerance` seconds of
    `now`; SignatureRefused otherwise."""
    if not header:
        raise SignatureRefused("signature-invalid", f"send {HEADER}: t=<unix seconds>,v1=<hex HMAC-SHA256>")
    timestamp, signatures = _parsed(header)
    if abs(now - timestamp) > tolerance:
        raise SignatureRefused("signature-stale", f"the timestamp {timestamp} is more than {tolerance} s from "
                               f"the server's clock ({int(now)})")
    # Every pair compared in full and in constant time: no early exit says which
    # secret or how much of a signature matched.
    matched = False
    for secret in secrets:
        expected = digest(secret, timestamp, body).encode()
        for signature in signatures:
            matched |= hmac.compare_digest(expected, signature)
    if not matched:
        raise SignatureRefused("signature-invalid", "no v1 signature is that of this body and timestamp under "
                               "the source's secrets")
    return timestamp


def _parsed(header: str) -> tuple[int, list[bytes]]:
    timestamp: int | None = None
    signatures: list[bytes] = []
    for part in header.split(","):
        name, _, value = part.strip().partition("=")
        if name == "t" and value.isascii() and value.isdigit() and len(value) <= 12 and timestamp is None:
            timestamp = int(value)
        elif name == "v1" and value.isascii():
            signatures.append(value.lower().encode())
    if timestamp is None or not signatures:
        raise SignatureRefused("signature-invalid", f"{HEADER} must be t=<unix seconds>,v1=<hex HMAC-SHA256>")
    return timestamp, signatures
