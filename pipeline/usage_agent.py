"""The usage agent: a thin loop that hands each batch of events to the steps
below, in this order, before Faust may commit the batch's offsets.

    1. decode + price   pure; a malformed event is logged with its reason and skipped
    2. ledger insert    ClickHouse, idempotent by event id
    3. tables           Faust month / minute tables (changelogged)
    4. quota state      Redis, absolute totals per touched (customer, period)
    5. (Faust)          acks the batch when the loop body returns; the
                        offsets are committed within ``broker_commit_interval``

Delivery is at-least-once: a crash re-delivers every event past the last
commit. What a crash at each step causes is said beside the step.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Sequence

import faust
from faust.types import EventT

from pipeline.app import FaustParts
from pipeline.history.store import AsyncHistory, HistoryError
from pipeline.redis_writer import PeriodKey, UsageWriter
from quotameter.aggregate import (
    PricedEvent,
    Totals,
    add_to_periods,
    advance_minute,
    price_batch,
    totals_by_minute,
    totals_by_period,
)
from quotameter.errors import EventError
from quotameter.events import UsageEvent, decode_event
from quotameter.pricing import PriceTable

log = logging.getLogger(__name__)

BATCH_MAX_EVENTS = 2000
BATCH_WITHIN_S = 0.25
LEDGER_RETRY_S = 30.0  # then exit without committing: a supervisor restarts us
EXIT_LEDGER_DOWN = 75  # EX_TEMPFAIL


def decode_batch(events: Sequence[EventT]) -> list[UsageEvent]:
    decoded = []
    for event in events:
        try:
            decoded.append(decode_event(event.value))
        except EventError as exc:
            msg = event.message
            log.warning("skipping malformed event at %s[%d]@%d: %s", msg.topic, msg.partition, msg.offset, exc)
    return decoded


class UsageSink:
    def __init__(self, parts: FaustParts, history: AsyncHistory, writer: UsageWriter, prices: PriceTable, tz: str):
        self.parts = parts
        self.history = history
        self.writer = writer
        self.prices = prices
        self.tz = tz
        self.batches = 0
        self.events = 0

    async def process(self, events: Sequence[EventT]) -> None:
        # 1. Pure. A crash here: nothing written; the batch is re-delivered.
        priced = price_batch(decode_batch(events), self.prices)
        if not priced:
            return
        # 2. Ledger first. A crash after it: the batch is re-delivered and
        #    re-inserted; the ledger keeps one row per id, totals stay exact.
        await self._store_in_ledger(priced)
        # 3. Tables. A crash after it: the changelog already holds these
        #    increments and the re-delivered batch adds them again, so table
        #    (and Redis) totals run high until rebuilt from the ledger.
        touched = self._apply_to_tables(priced)
        # 4. Redis, absolute values. A crash after it: as in 3. A failed write
        #    is retried with the next batch; Redis lags but never drifts.
        await self.writer.write(touched)
        self.batches += 1
        self.events += len(priced)

    async def _store_in_ledger(self, priced: list[PricedEvent]) -> None:
        deadline = time.monotonic() + LEDGER_RETRY_S
        delay_s = 0.2
        while True:
            try:
                await self.history.insert_events(priced)
                return
            except HistoryError as exc:
                if time.monotonic() >= deadline:
                    # Raising would let Faust ack (and commit) the batch
                    # without a ledger row: exit hard instead, uncommitted.
                    log.critical("ledger unavailable for %.0fs, exiting without committing: %s", LEDGER_RETRY_S, exc)
                    os._exit(EXIT_LEDGER_DOWN)
                log.error("ledger insert failed (retrying in %.1fs): %s", delay_s, exc)
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, 5.0)

    def _apply_to_tables(self, priced: list[PricedEvent]) -> dict[PeriodKey, Totals]:
        months, minutes = self.parts.months, self.parts.minutes
        touched: dict[PeriodKey, Totals] = {}
        for (customer, period), delta in totals_by_period(priced, self.tz).items():
            key = customer.encode()
            record = add_to_periods(months.get(key), period, delta)
            months[key] = record
            touched[(customer, period)] = Totals.from_record(record[period])
        for (customer, minute), delta in sorted(totals_by_minute(priced).items()):
            key = customer.encode()
            minutes[key] = advance_minute(minutes.get(key), minute, delta)
        return touched


def register_usage_agent(parts: FaustParts, sink: UsageSink) -> None:
    @parts.app.agent(parts.events_topic, name="usage")
    async def usage(stream: faust.StreamT) -> None:
        async for events in stream.take_events(BATCH_MAX_EVENTS, within=BATCH_WITHIN_S):
            await sink.process(events)
