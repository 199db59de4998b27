from datetime import UTC, datetime

import pytest

from quotameter.errors import KeyFormatError
from quotameter.keys import generate_key, split_key, verify_secret
from quotameter.periods import BillingCalendar, minute_of


def test_period_follows_the_billing_time_zone():
    moment = datetime(2026, 11, 30, 23, 30, tzinfo=UTC)
    assert BillingCalendar("UTC", 1).period_of(moment) == "2026-11"
    assert BillingCalendar("Asia/Tokyo", 1).period_of(moment) == "2026-12"


def test_period_bounds_cover_the_calendar_month():
    assert BillingCalendar("UTC", 1).bounds("2026-12") == (datetime(2026, 12, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC))
    start, end = BillingCalendar("America/New_York", 1).bounds("2026-03")
    assert start == datetime(2026, 3, 1, 5, tzinfo=UTC) and end == datetime(2026, 4, 1, 4, tzinfo=UTC)
    with pytest.raises(ValueError, match="YYYY-MM"):
        BillingCalendar("UTC", 1).bounds("2026-13")


def test_minute_of():
    assert minute_of(datetime(2026, 1, 1, 10, 5, 59, 999, tzinfo=UTC)) == datetime(2026, 1, 1, 10, 5, tzinfo=UTC)


def test_keys_verify_and_never_contain_their_hash():
    new = generate_key()
    key_id, secret = split_key(new.plaintext)
    assert key_id == new.key_id
    assert verify_secret(secret, new.salt_hex, new.hash_hex)
    assert not verify_secret(secret + "x", new.salt_hex, new.hash_hex)
    assert secret not in new.hash_hex and new.hash_hex not in new.plaintext


def test_two_keys_never_share_a_salt():
    a, b = generate_key(), generate_key()
    assert a.salt_hex != b.salt_hex and a.key_id != b.key_id


@pytest.mark.parametrize("presented", ["", "sk-abc", "qm_short_secret", "qm_a1b2c3d4e5f6_", "xx_a1b2c3d4e5f6_s"])
def test_foreign_keys_are_rejected(presented):
    with pytest.raises(KeyFormatError):
        split_key(presented)
