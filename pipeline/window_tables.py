"""Applying a batch to the four window tables (minute, hour, day, period),
seeding from the ledger what a table cannot know.

Every table is keyed by customer id, so a customer's values live in the
changelog partition of its events partition and move with it on a
rebalance. Each value is one ``quotameter.windows.WindowRecord``: totals and
the offset watermark together, written as one changelog record.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import faust

from pipeline.history import schema
from pipeline.history.store import AsyncHistory
from quotameter.aggregate import PricedEvent, Totals
from quotameter.periods import BillingCalendar
from quotameter.windows import (
    Bucket,
    Delivered,
    Granularity,
    Seed,
    GRANULARITIES,
    WindowRecord,
    apply_all,
    buckets_of_minute,
    is_late,
    seeds_needed,
)

PeriodKey = tuple[str, str]


@dataclass
class BatchResult:
    rows: list[PricedEvent] = field(default_factory=list)  # for the ledger, with late flags
    periods: dict[PeriodKey, Totals] = field(default_factory=dict)  # touched: absolute totals
    ids: dict[PeriodKey, list[str]] = field(default_factory=dict)  # event ids per touched period
    tiers: dict[str, str] = field(default_factory=dict)  # customer -> tier of its newest event
    late: int = 0
    seeded: int = 0


def _totals_of(row: dict) -> Totals:
    return Totals(
        requests=int(row["requests"]),
        refused=int(row["refused"]),
        input_tokens=int(row["input_tokens"]),
        output_tokens=int(row["output_tokens"]),
        cached_tokens=int(row["cached_tokens"]),
        reasoning_tokens=int(row["reasoning_tokens"]),
        cost_usd=Decimal(str(row["cost_usd"])),
        events=int(row["events"]),
    )


class WindowTables:
    def __init__(
        self,
        tables: dict[Granularity, faust.Table],
        history: AsyncHistory,
        flush_ledger: Callable[[], Awaitable[None]],
        calendar: BillingCalendar,
        late_grace_ms: int,
    ) -> None:
        self.tables = tables
        self.history = history
        self._sent: list[Any] = []  # FutureMessage of every changelog record not yet confirmed
        for table in tables.values():
            self._track(table)
        self.flush_ledger = flush_ledger
        # Customers whose records this process wrote since its partitions were
        # last assigned. Any other record came from a changelog recovery, which
        # on a broker that misreports its latest offset (Tansu) can miss the
        # newest records: it is rebuilt from the ledger on first touch.
        self._trusted: set[str] = set()
        # The decoded records of trusted customers, as last written to the
        # tables: decoding a table's JSON value each batch cost more than the
        # arithmetic. Dropped with the trust.
        self._records: dict[tuple[Granularity, str], WindowRecord] = {}
        self.calendar = calendar
        self.late_grace_ms = late_grace_ms

    def _track(self, table: faust.Table) -> None:
        # Faust's producer.flush() gives up on its buffer after 0.1 s, so it
        # does not prove a changelog record reached the broker. Keep each
        # record's future (set when the broker acknowledged it) instead.
        send = table.send_changelog

        def send_and_track(*args: Any, **kwargs: Any) -> Any:
            future = send(*args, **kwargs)
            self._sent.append(future)
            return future

        table.send_changelog = send_and_track  # type: ignore[method-assign]

    async def changelog_written(self) -> None:
        """Return once the broker acknowledged every changelog record written so far."""
        sent, self._sent = self._sent, []
        for future in sent:
            await future

    def distrust(self) -> None:
        """After a rebalance: rebuild each customer's records from the ledger on first touch."""
        self._trusted.clear()
        self._records.clear()

    def record(self, granularity: Granularity, customer: str) -> WindowRecord | None:
        raw = self.tables[granularity].get(customer.encode())
        return None if raw is None else WindowRecord.from_json(raw)

    async def apply(self, fresh: Sequence[Delivered], again: Sequence[Delivered] = ()) -> BatchResult:
        """``fresh``: the batch's events the ledger does not hold; ``again``:
        those whose ledger row came from this same delivery (applied unless a
        record's watermark or seed covers them; no new ledger row)."""
        result = BatchResult()
        by_customer: dict[str, list[Delivered]] = {}
        repeat = {id(d) for d in again}
        for delivered in sorted([*fresh, *again], key=lambda d: (d.partition, d.position)):
            by_customer.setdefault(delivered.priced.event.customer_id, []).append(delivered)
        if not by_customer:
            return result

        records: dict[tuple[Granularity, str], WindowRecord] = {}
        missing: set[str] = set()
        for granularity in Granularity:
            for customer in by_customer:
                found = self._records.get((granularity, customer)) if customer in self._trusted else None
                if found is None:
                    missing.add(customer)
                else:
                    records[(granularity, customer)] = found
        if missing:
            # A customer this process has not written since its partitions were
            # assigned (never seen, recovered from a changelog that may lack its
            # newest records, or lost with the broker): whatever the ledger
            # holds of it is seeded, below.
            rows = await self.history.query(schema.newest_event_ms(sorted(missing)))
            newest = {row["customer"]: int(row["newest_ms"]) for row in rows}
            for granularity in Granularity:
                for customer in missing:
                    records.setdefault((granularity, customer), WindowRecord(seed=newest.get(customer, -1)))

        # Late flags, in offset order against the customer's stream time.
        for customer, events in by_customer.items():
            stream_ms = records[(Granularity.PERIOD, customer)].t
            flagged = []
            for delivered in events:
                repeated = id(delivered) in repeat
                event_ms = delivered.time_ms
                late = is_late(event_ms, stream_ms, self.late_grace_ms)
                stream_ms = max(stream_ms, event_ms)
                if late:
                    result.late += 1
                    delivered = Delivered(dataclasses.replace(delivered.priced, late=True), delivered.partition, delivered.offset, delivered.index)
                priced = delivered.priced
                flagged.append(delivered)
                if not repeated:
                    result.rows.append(priced)
                elif delivered.time_ms <= records[(Granularity.PERIOD, customer)].seed:
                    flagged.pop()  # its ledger row is in the record's seed already
            by_customer[customer] = flagged

        seeds = await self._seeds(records, by_customer)
        result.seeded = sum(len(buckets) for buckets in seeds.values())
        for customer, events in by_customer.items():
            mine = {g: records[(g, customer)] for g in Granularity}
            apply_all(mine, events, {g: seeds.get((g, customer), {}) for g in Granularity}, self.calendar)
            self._trusted.add(customer)
            key = customer.encode()
            for granularity, record in mine.items():
                self._records[(granularity, customer)] = record
                # The changelog record of this value carries totals and
                # watermark together: a crash keeps both or neither.
                self.tables[granularity][key] = record.to_json()
            self._touched_periods(result, customer, mine[Granularity.PERIOD], events)
        return result

    def _touched_periods(self, result: BatchResult, customer: str, record: WindowRecord, events: list[Delivered]) -> None:
        period_index = GRANULARITIES.index(Granularity.PERIOD)
        period_of: dict[int, str] = {}  # minute -> its period: a batch's events share a few minutes
        for delivered in events:
            minute = delivered.minute
            period = period_of.get(minute)
            if period is None:
                period = period_of[minute] = buckets_of_minute(minute, self.calendar)[period_index].name
            result.ids.setdefault((customer, period), []).append(delivered.priced.event.id)
        for period in dict.fromkeys(period_of.values()):
            if period in record.buckets:  # else pruned: too old to enforce on
                result.periods[(customer, period)] = record.totals(period)
        if events:
            result.tiers[customer] = events[-1].priced.event.data.tier  # the last one in offset order

    async def _seeds(
        self, records: dict[tuple[Granularity, str], WindowRecord], by_customer: dict[str, list[Delivered]]
    ) -> dict[tuple[Granularity, str], dict[str, Seed]]:
        wanted: list[tuple[Granularity, str, Bucket]] = []
        for (granularity, customer), record in records.items():
            for bucket in seeds_needed(record, granularity, by_customer[customer], self.calendar).values():
                wanted.append((granularity, customer, bucket))
        if not wanted:
            return {}
        # Rows still buffered for the ledger belong in the seed too: write them first.
        await self.flush_ledger()
        seeds: dict[tuple[Granularity, str], dict[str, Seed]] = {}
        for granularity, customer, bucket in wanted:
            rows = await self.history.query(schema.bucket_totals(customer, bucket.start_ms, bucket.end_ms))
            seeds.setdefault((granularity, customer), {})[bucket.name] = {row["model"]: _totals_of(row) for row in rows}
        return seeds

