"""The signature scheme (app.signatures): the README's worked example, and every
way a header can fail to verify."""

from __future__ import annotations

import pytest

from app.signatures import SignatureRefused, sign, verify

# The worked example of README "Signed callbacks", byte for byte.
SECRET = "rcs_3q2Zb1vYcXw9tKfM8pLr0sDnH4jG7aEiU6oBxCyTzQk"
TIMESTAMP = 1796126400
BODY = b'{"user_id":"alice","external_id":"imp-7781","type":"ad_view"}'
SIGNATURE = "8c42e00d0d0db0f1c4234ab724925631d68fcdee49b40f196e832adc0125de3b"


def test_the_readme_example():
    assert sign(SECRET, TIMESTAMP, BODY) == f"t={TIMESTAMP},v1={SIGNATURE}"
    assert verify(f"t={TIMESTAMP},v1={SIGNATURE}", BODY, [SECRET], TIMESTAMP + 299, 300) == TIMESTAMP


def test_either_secret_of_a_rotation_verifies_and_any_of_several_signatures():
    header = sign("older", TIMESTAMP, BODY)
    assert verify(header, BODY, ["newer", "older"], TIMESTAMP, 300) == TIMESTAMP
    both = f"t={TIMESTAMP},v1={'0' * 64},v1={SIGNATURE.upper()}"
    assert verify(both, BODY, [SECRET], TIMESTAMP, 300) == TIMESTAMP


@pytest.mark.parametrize("header, body, now, cause", [
    (f"t={TIMESTAMP},v1={SIGNATURE}", BODY + b" ", TIMESTAMP, "signature-invalid"),  # one byte more
    (f"t={TIMESTAMP + 1},v1={SIGNATURE}", BODY, TIMESTAMP, "signature-invalid"),  # another timestamp
    (f"t={TIMESTAMP},v1={SIGNATURE}", BODY, TIMESTAMP + 301, "signature-stale"),  # too old
    (f"t={TIMESTAMP},v1={SIGNATURE}", BODY, TIMESTAMP - 301, "signature-stale"),  # too far ahead
    (f"v1={SIGNATURE}", BODY, TIMESTAMP, "signature-invalid"),
    (f"t={TIMESTAMP}", BODY, TIMESTAMP, "signature-invalid"),
    (f"t=-{TIMESTAMP},v1={SIGNATURE}", BODY, TIMESTAMP, "signature-invalid"),
    (f"t=１２,v1={SIGNATURE}", BODY, TIMESTAMP, "signature-invalid"),
    ("", BODY, TIMESTAMP, "signature-invalid"),
    (None, BODY, TIMESTAMP, "signature-invalid"),
], ids=["body", "timestamp", "old", "future", "no-t", "no-v1", "negative", "non-ascii", "empty", "absent"])
def test_a_header_that_does_not_verify_says_why(header, body, now, cause):
    with pytest.raises(SignatureRefused) as refused:
        verify(header, body, [SECRET], now, 300)
    assert refused.value.cause == cause


def test_no_secret_verifies_nothing():
    with pytest.raises(SignatureRefused):
        verify(f"t={TIMESTAMP},v1={SIGNATURE}", BODY, [], TIMESTAMP, 300)
