"""Window records without a broker: buckets by event time, offsets applied
once, seeds where the ledger may know more, pruning and late events."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from quotameter.aggregate import PricedEvent, Totals
from quotameter.event_batch import position
from quotameter.events import RequestData, UsageEvent
from quotameter.periods import BillingCalendar
from quotameter.pricing import Cost
from quotameter.windows import (
    ALL_MODELS,
    Delivered,
    Granularity,
    WindowRecord,
    apply,
    bucket_of,
    is_late,
    seeds_needed,
)
from decimal import Decimal

T0 = datetime(2025, 1, 31, 23, 59, 30, tzinfo=UTC)
UTC_MONTHS = BillingCalendar("UTC", 1)


def delivered(offset: int, at: datetime = T0, model: str = "m1", tokens: int = 10) -> Delivered:
    event = UsageEvent(
        id=f"e{offset}", source="s", subject="acme", time=at,
        data=RequestData(api_key_id="k", tier="pro", route="/v1/chat/completions", status=200, decision="admitted",
                         model_served=model, input_tokens=tokens),
    )
    return Delivered(PricedEvent(event, Cost(Decimal("0.001"), "p@1")), partition=2, offset=offset)


def test_buckets_follow_event_time_and_the_billing_zone() -> None:
    assert bucket_of(T0, Granularity.MINUTE, UTC_MONTHS).name == "2025-01-31T23:59"
    assert bucket_of(T0, Granularity.HOUR, UTC_MONTHS).name == "2025-01-31T23"
    assert bucket_of(T0, Granularity.DAY, UTC_MONTHS).name == "2025-01-31"
    assert bucket_of(T0, Granularity.PERIOD, UTC_MONTHS).name == "2025-01"
    assert bucket_of(T0, Granularity.PERIOD, BillingCalendar("Asia/Tokyo", 1)).name == "2025-02"


def test_a_redelivered_offset_is_applied_once_per_model_and_in_total() -> None:
    record = WindowRecord()
    apply(record, Granularity.PERIOD, [delivered(1), delivered(2, model="m2")], {}, UTC_MONTHS)
    apply(record, Granularity.PERIOD, [delivered(1), delivered(2, model="m2"), delivered(3)], {}, UTC_MONTHS)
    assert record.totals("2025-01").events == 3 and record.totals("2025-01").input_tokens == 30
    assert record.totals("2025-01", "m1").events == 2 and record.totals("2025-01", "m2").events == 1
    assert record.wm == {"2": position(3, 0)}
    back = WindowRecord.from_json(record.to_json())
    assert back.totals("2025-01") == record.totals("2025-01") and back.wm == record.wm


def test_a_bucket_the_ledger_may_know_starts_from_its_seed() -> None:
    record = WindowRecord(seed=int(T0.timestamp() * 1000))  # the ledger holds events up to T0
    events = [delivered(1)]
    assert set(seeds_needed(record, Granularity.HOUR, events, UTC_MONTHS)) == {"2025-01-31T23"}
    seed = {"m1": Totals(requests=5, input_tokens=50, events=5)}
    apply(record, Granularity.HOUR, events, {"2025-01-31T23": seed}, UTC_MONTHS)
    assert record.totals("2025-01-31T23").events == 6 and record.totals("2025-01-31T23", ALL_MODELS).input_tokens == 60
    later = [delivered(2, at=T0 + timedelta(hours=2))]
    assert seeds_needed(record, Granularity.HOUR, later, UTC_MONTHS) == {}  # after the ledger's newest event


def test_old_buckets_are_pruned_by_event_time_and_come_back_seeded() -> None:
    record = WindowRecord()
    apply(record, Granularity.MINUTE, [delivered(1), delivered(2, at=T0 + timedelta(hours=1))], {}, UTC_MONTHS)
    assert list(record.buckets) == ["2025-02-01T00:59"]
    late = [delivered(3)]
    assert set(seeds_needed(record, Granularity.MINUTE, late, UTC_MONTHS)) == {"2025-01-31T23:59"}


def test_late_means_older_than_the_newest_event_by_more_than_the_grace() -> None:
    newest = int(T0.timestamp() * 1000)
    assert not is_late(newest - 60_000, newest, 3_600_000)
    assert is_late(newest - 3_600_001, newest, 3_600_000)
    assert not is_late(0, -1, 0)  # nothing seen yet
