"""Calendar billing periods and rate windows. Time is always passed in."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo


def period_of(moment: datetime, tz: str = "UTC") -> str:
    """The billing month a moment falls in, as ``YYYY-MM`` in the billing time zone."""
    local = moment.astimezone(ZoneInfo(tz))
    return f"{local.year:04d}-{local.month:02d}"


def period_bounds(period: str, tz: str = "UTC") -> tuple[datetime, datetime]:
    """The [start, end) of a ``YYYY-MM`` period, in UTC."""
    try:
        year, month = (int(part) for part in period.split("-"))
        zone = ZoneInfo(tz)
        start = datetime(year, month, 1, tzinfo=zone)
    except ValueError:
        raise ValueError(f"not a billing period (want YYYY-MM): {period!r}") from None
    end = datetime(year + (month == 12), month % 12 + 1, 1, tzinfo=zone)
    return start.astimezone(UTC), end.astimezone(UTC)


def minute_of(moment: datetime) -> datetime:
    """The start of the UTC minute a moment falls in."""
    return moment.astimezone(UTC).replace(second=0, microsecond=0)
