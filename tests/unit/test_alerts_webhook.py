"""Webhook signing and backoff: pure, no network."""

from __future__ import annotations

import hashlib
import hmac

from pipeline.webhook import backoff_s, sign, verify_signature

SECRET = b"whsec_test"
BODY = b'{"id":"abc","data":{}}'


def test_the_signature_is_hmac_sha256_over_timestamp_dot_body() -> None:
    header = sign(SECRET, BODY, 1_700_000_000)
    expected = hmac.new(SECRET, b"1700000000." + BODY, hashlib.sha256).hexdigest()
    assert header == f"t=1700000000,v1={expected}"


def test_a_receiver_verifies_it_within_the_tolerance() -> None:
    header = sign(SECRET, BODY, 1_700_000_000)
    assert verify_signature(SECRET, BODY, header, now_s=1_700_000_100)
    assert not verify_signature(SECRET, BODY, header, now_s=1_700_000_000 + 301)  # replayed later
    assert not verify_signature(SECRET, BODY + b" ", header, now_s=1_700_000_000)  # body changed
    assert not verify_signature(b"other", BODY, header, now_s=1_700_000_000)
    forged = header.replace("t=1700000000", "t=1700000200")  # a fresh timestamp on an old signature
    assert not verify_signature(SECRET, BODY, forged, now_s=1_700_000_200)
    assert not verify_signature(SECRET, BODY, "garbage", now_s=1_700_000_000)


def test_a_receiver_accepts_any_of_several_v1_signatures() -> None:
    good = sign(SECRET, BODY, 1_700_000_000)
    header = good.replace("v1=", "v1=deadbeef,v1=")  # e.g. during secret rotation
    assert verify_signature(SECRET, BODY, header, now_s=1_700_000_000)


def test_backoff_grows_exponentially_with_bounded_jitter() -> None:
    assert [backoff_s(n, 0.5, 30.0, rand=lambda: 0.0) for n in range(1, 5)] == [0.25, 0.5, 1.0, 2.0]
    assert [backoff_s(n, 0.5, 30.0, rand=lambda: 1.0) for n in range(1, 5)] == [0.5, 1.0, 2.0, 4.0]
    assert backoff_s(20, 0.5, 30.0, rand=lambda: 1.0) == 30.0
    assert backoff_s(20, 0.5, 30.0, rand=lambda: 0.0) == 15.0
