"""The billing calendar, and UTC minutes. Time is always passed in.

A period starts on the billing anchor day at midnight in the billing time
zone, and is named ``YYYY-MM`` for the month it starts in: with anchor 15,
``2026-11`` runs from November 15 to December 15. An anchor past a month's
last day falls on that last day (anchor 31 starts February's period on the
28th or 29th, and March's on the 31st). Where local midnight does not exist
(a daylight-saving jump at 00:00), the period starts at the jump.

One ``BillingCalendar`` is built from the config (``config.billing.calendar``)
and passed to every reader and writer of periods: the shim's Redis keys, the
pipeline's windows, the ledger's queries, the export, ``usage`` and
``/v1/usage``. Nothing has a default zone or anchor, so no caller can name
a period differently from the others.
"""

from __future__ import annotations

import calendar as _gregorian
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError


class _BillingSettings(Protocol):
    timezone: str
    anchor_day: int


def _parse(period: str) -> tuple[int, int]:
    try:
        year_text, month_text = period.split("-")
        if len(year_text) != 4 or len(month_text) != 2:
            raise ValueError
        year, month = int(year_text), int(month_text)
        if not (1 <= year <= 9998 and 1 <= month <= 12):
            raise ValueError
    except ValueError:
        raise ValueError(f"not a billing period (want YYYY-MM): {period!r}") from None
    return year, month


def _name(year: int, month: int) -> str:
    return f"{year:04d}-{month:02d}"


def _shift(year: int, month: int, months: int) -> tuple[int, int]:
    index = year * 12 + month - 1 + months
    return index // 12, index % 12 + 1


@dataclass(frozen=True, slots=True)
class BillingCalendar:
    """Billing periods in one time zone from one anchor day. Pure and hashable."""

    timezone: str
    anchor_day: int

    def __post_init__(self) -> None:
        if not 1 <= self.anchor_day <= 31:
            raise ValueError(f"anchor_day must be 1..31, not {self.anchor_day}")
        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {self.timezone!r}") from None

    @classmethod
    def from_config(cls, billing: _BillingSettings) -> BillingCalendar:
        return cls(billing.timezone, billing.anchor_day)

    def _start(self, year: int, month: int) -> datetime:
        """The UTC start of the period named (year, month)."""
        day = min(self.anchor_day, _gregorian.monthrange(year, month)[1])
        # fold=0: an ambiguous midnight is its first occurrence, a missing one
        # maps to the instant of the jump: either way the day's first instant.
        return datetime(year, month, day, tzinfo=ZoneInfo(self.timezone)).astimezone(UTC)

    def period_of(self, moment: datetime) -> str:
        """The period an aware moment falls in, as ``YYYY-MM``."""
        if moment.tzinfo is None:
            raise ValueError("a naive datetime has no place in the billing calendar; give it a time zone")
        local = moment.astimezone(ZoneInfo(self.timezone))
        year, month = local.year, local.month
        # Compared as UTC instants: same-zone comparison would ignore the fold.
        if moment.astimezone(UTC) < self._start(year, month):
            year, month = _shift(year, month, -1)
        return _name(year, month)

    def current(self, now: datetime) -> str:
        return self.period_of(now)

    def bounds(self, period: str) -> tuple[datetime, datetime]:
        """The [start, end) of a period, as UTC datetimes. ValueError names the
        expected format for anything that is not ``YYYY-MM``."""
        year, month = _parse(period)
        return self._start(year, month), self._start(*_shift(year, month, 1))

    def bounds_ms(self, period: str) -> tuple[int, int]:
        """The [start, end) of a period in epoch milliseconds (Redis, SQL)."""
        start, end = self.bounds(period)
        return _ms(start), _ms(end)

    def previous(self, period: str) -> str:
        return _name(*_shift(*_parse(period), -1))

    def next(self, period: str) -> str:
        return _name(*_shift(*_parse(period), 1))

    def validate(self, period: str) -> str:
        """``period`` itself; ValueError naming the format when it is not one."""
        _parse(period)
        return period


def _ms(moment: datetime) -> int:
    # Exact: the bounds are whole seconds.
    return int(moment.timestamp()) * 1000


def minute_of(moment: datetime) -> datetime:
    """The start of the UTC minute a moment falls in."""
    return moment.astimezone(UTC).replace(second=0, microsecond=0)
