"""Calendar billing periods and rate windows. Time is always passed in.

A period starts on the billing anchor day (1 by default) at midnight in the
billing time zone, and is named ``YYYY-MM`` for the month it starts in. An
anchor past a month's last day falls on that last day (anchor 31 starts
February's period on the 28th or 29th).
"""

from __future__ import annotations

import calendar
from datetime import UTC, datetime
from zoneinfo import ZoneInfo


def _start(year: int, month: int, zone: ZoneInfo, anchor_day: int) -> datetime:
    day = min(anchor_day, calendar.monthrange(year, month)[1])
    return datetime(year, month, day, tzinfo=zone)


def period_of(moment: datetime, tz: str = "UTC", anchor_day: int = 1) -> str:
    """The billing period a moment falls in, as ``YYYY-MM`` (the month it starts in)."""
    zone = ZoneInfo(tz)
    local = moment.astimezone(zone)
    year, month = local.year, local.month
    if local < _start(year, month, zone, anchor_day):
        year, month = (year - 1, 12) if month == 1 else (year, month - 1)
    return f"{year:04d}-{month:02d}"


def period_bounds(period: str, tz: str = "UTC", anchor_day: int = 1) -> tuple[datetime, datetime]:
    """The [start, end) of a ``YYYY-MM`` period, in UTC."""
    try:
        year, month = (int(part) for part in period.split("-"))
        zone = ZoneInfo(tz)
        start = _start(year, month, zone, anchor_day)
    except ValueError:
        raise ValueError(f"not a billing period (want YYYY-MM): {period!r}") from None
    end = _start(year + (month == 12), month % 12 + 1, zone, anchor_day)
    return start.astimezone(UTC), end.astimezone(UTC)


def minute_of(moment: datetime) -> datetime:
    """The start of the UTC minute a moment falls in."""
    return moment.astimezone(UTC).replace(second=0, microsecond=0)
