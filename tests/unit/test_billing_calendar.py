"""The billing calendar's laws, over many moments, zones and anchor days: pure."""

from __future__ import annotations

import calendar as gregorian
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quotameter.config import DEFAULT_CONFIG, parse_config
from quotameter.periods import BillingCalendar

# DST both ways (New York, London), far east of UTC (+13 Tonga, +14 Kiritimati),
# and offsets that are not whole hours (+5:30 Kolkata, +12:45/+13:45 Chatham).
ZONES = ("UTC", "America/New_York", "Europe/London", "Pacific/Tongatapu", "Pacific/Kiritimati", "Asia/Kolkata",
         "Pacific/Chatham")
ANCHORS = (1, 15, 28, 29, 30, 31)

calendars = st.builds(BillingCalendar, st.sampled_from(ZONES), st.sampled_from(ANCHORS) | st.integers(1, 31))
moments = st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2040, 12, 31), timezones=st.just(UTC))


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(calendars, moments)
def test_a_moment_lies_within_the_bounds_of_its_period(calendar: BillingCalendar, moment: datetime) -> None:
    period = calendar.period_of(moment)
    start, end = calendar.bounds(period)
    assert start <= moment < end
    assert start.tzinfo is UTC and end.tzinfo is UTC
    assert calendar.period_of(start) == period and calendar.period_of(end) == calendar.next(period)
    # The period is named for the month it starts in, in the billing zone.
    local_start = start.astimezone(ZoneInfo(calendar.timezone))
    assert f"{local_start.year:04d}-{local_start.month:02d}" == period
    # The same moment seen from another zone is in the same period.
    assert calendar.period_of(moment.astimezone(ZoneInfo("Asia/Tokyo"))) == period


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(calendars, moments)
def test_periods_are_contiguous_and_never_overlap(calendar: BillingCalendar, moment: datetime) -> None:
    period = calendar.period_of(moment)
    before, after = calendar.previous(period), calendar.next(period)
    assert calendar.bounds(before)[1] == calendar.bounds(period)[0]
    assert calendar.bounds(period)[1] == calendar.bounds(after)[0]
    assert calendar.previous(after) == period == calendar.next(before)
    assert before < period < after  # the names sort as the periods do
    start, _ = calendar.bounds(period)
    assert calendar.period_of(start - timedelta(microseconds=1)) == before
    assert calendar.current(moment) == period


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(calendars, moments, st.timedeltas(min_value=timedelta(0), max_value=timedelta(days=400)))
def test_later_moments_are_never_in_earlier_periods(calendar: BillingCalendar, moment: datetime, gap: timedelta) -> None:
    assert calendar.period_of(moment) <= calendar.period_of(moment + gap)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(calendars, st.integers(2000, 2040), st.integers(1, 12))
def test_a_period_starts_at_local_midnight_on_the_anchor_or_the_months_last_day(
    calendar: BillingCalendar, year: int, month: int
) -> None:
    period = f"{year:04d}-{month:02d}"
    start, end = calendar.bounds(period)
    local = start.astimezone(ZoneInfo(calendar.timezone))
    assert (local.year, local.month) == (year, month)
    assert local.day == min(calendar.anchor_day, gregorian.monthrange(year, month)[1])
    assert (local.hour, local.minute, local.second) == (0, 0, 0)
    # 28 to 31 local days, give or take a daylight-saving hour.
    assert timedelta(days=28, hours=-1) <= end - start <= timedelta(days=31, hours=1)


@pytest.mark.parametrize(
    ("zone", "anchor", "period", "start", "end"),
    [
        # Anchor 31 clamps in short months and comes back in long ones.
        ("UTC", 31, "2025-02", datetime(2025, 2, 28, tzinfo=UTC), datetime(2025, 3, 31, tzinfo=UTC)),
        ("UTC", 31, "2024-02", datetime(2024, 2, 29, tzinfo=UTC), datetime(2024, 3, 31, tzinfo=UTC)),
        ("UTC", 31, "2025-04", datetime(2025, 4, 30, tzinfo=UTC), datetime(2025, 5, 31, tzinfo=UTC)),
        ("UTC", 30, "2025-01", datetime(2025, 1, 30, tzinfo=UTC), datetime(2025, 2, 28, tzinfo=UTC)),
        # New York: EST at the start, EDT at the end (the period is an hour short).
        ("America/New_York", 1, "2025-03", datetime(2025, 3, 1, 5, tzinfo=UTC), datetime(2025, 4, 1, 4, tzinfo=UTC)),
        ("America/New_York", 15, "2026-10", datetime(2026, 10, 15, 4, tzinfo=UTC), datetime(2026, 11, 15, 5, tzinfo=UTC)),
        # London: GMT then BST.
        ("Europe/London", 28, "2025-03", datetime(2025, 3, 28, tzinfo=UTC), datetime(2025, 4, 27, 23, tzinfo=UTC)),
        # Ahead of UTC: the period starts the UTC day before.
        ("Pacific/Kiritimati", 1, "2026-12", datetime(2026, 11, 30, 10, tzinfo=UTC), datetime(2026, 12, 31, 10, tzinfo=UTC)),
        ("Pacific/Tongatapu", 15, "2026-11", datetime(2026, 11, 14, 11, tzinfo=UTC), datetime(2026, 12, 14, 11, tzinfo=UTC)),
        ("Asia/Kolkata", 15, "2026-11", datetime(2026, 11, 14, 18, 30, tzinfo=UTC), datetime(2026, 12, 14, 18, 30, tzinfo=UTC)),
        ("Pacific/Chatham", 1, "2026-07", datetime(2026, 6, 30, 11, 15, tzinfo=UTC), datetime(2026, 7, 31, 11, 15, tzinfo=UTC)),
        # No midnight on 2024-09-08 in Santiago (00:00 -04 jumps to 01:00 -03): the period starts at the jump.
        ("America/Santiago", 8, "2024-09", datetime(2024, 9, 8, 4, tzinfo=UTC), datetime(2024, 10, 8, 3, tzinfo=UTC)),
    ],
)
def test_known_bounds(zone: str, anchor: int, period: str, start: datetime, end: datetime) -> None:
    calendar = BillingCalendar(zone, anchor)
    assert calendar.bounds(period) == (start, end)
    assert calendar.bounds_ms(period) == (int(start.timestamp()) * 1000, int(end.timestamp()) * 1000)


def test_the_reported_case_anchor_15() -> None:
    # December 1 is in the period that started on November 15, named 2026-11.
    calendar = BillingCalendar("UTC", 15)
    assert calendar.period_of(datetime(2026, 12, 1, 12, tzinfo=UTC)) == "2026-11"
    assert calendar.current(datetime(2026, 12, 15, tzinfo=UTC)) == "2026-12"
    assert calendar.previous("2026-01") == "2025-12" and calendar.next("2026-12") == "2027-01"


@pytest.mark.parametrize("bad", ["2026-13", "2026-00", "2026-1", "26-01", "2026/01", "", "2026-01-01", "abcd-ef"])
def test_a_bad_period_names_the_format(bad: str) -> None:
    calendar = BillingCalendar("UTC", 1)
    with pytest.raises(ValueError, match="YYYY-MM"):
        calendar.bounds(bad)
    with pytest.raises(ValueError, match="YYYY-MM"):
        calendar.validate(bad)


def test_a_calendar_needs_a_zone_an_anchor_and_aware_moments() -> None:
    with pytest.raises(ValueError, match="anchor_day"):
        BillingCalendar("UTC", 32)
    with pytest.raises(ValueError, match="time zone"):
        BillingCalendar("Mars/Olympus", 1)
    with pytest.raises(ValueError, match="naive"):
        BillingCalendar("UTC", 1).period_of(datetime(2026, 1, 1))
    with pytest.raises(TypeError):
        BillingCalendar("UTC")  # type: ignore[call-arg]  # no default anchor


def test_the_config_builds_one_calendar() -> None:
    import yaml

    document = yaml.safe_load(DEFAULT_CONFIG.read_text())
    document["billing"] = {**document.get("billing", {}), "timezone": "Asia/Kolkata", "anchor_day": 15}
    config = parse_config(document)
    assert config.billing.calendar == BillingCalendar("Asia/Kolkata", 15)
    assert config.billing.calendar is config.billing.calendar
