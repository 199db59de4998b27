"""The usage agent: a thin loop that hands each batch of events (at most
``batch_max_events``, at most ``batch_max_wait_ms`` old) to the steps below.
Events are acked by hand, by the ledger sink, once their rows are written.

    0. offsets             records the consumer skipped are read directly and
                           join the batch (pipeline.offset_guard)
    1. decode + price      pure; a record carries one event or a batch
                           (quotameter.event_batch); a malformed event goes
                           to the dead-letter topic with the reason (step 4
                           waits for it)
    2. dedupe              ids already applied: the in-memory window, else
                           the ledger (exact; see pipeline.dedupe)
    3. window tables       only positions (offset, index in the record)
                           above each record's watermark are applied
                           (pipeline.window_tables)
    4. changelog flush     the tables' changelog records and DLQ records are
                           acknowledged by the broker
    5. quota state         Redis: absolute totals with a version, releasing
                           the reservations of the applied ids (one script)
    6. alerts              observe each touched (customer, period)
    7. ledger              rows buffered; inserted within ``ledger_flush_ms``,
                           then the events are acked (pipeline.ledger_sink)

Delivery is at-least-once: a crash re-delivers every event past the last
commit, and a shim may re-send an event. What a crash at each step causes is
said beside the step; in every case the totals end exact.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Sequence
from decimal import Decimal
from typing import Any, Protocol

import faust
from aiokafka.errors import KafkaError
from aiokafka.partitioner import murmur2
from faust.types import EventT

from pipeline import telemetry, tracing
from pipeline.app import FaustParts
from pipeline.dedupe import Deduplicator
from pipeline.freshness import Freshness
from pipeline.history.store import HistoryError
from pipeline.ledger_sink import LedgerSink
from pipeline.offset_guard import FilledEvent, OffsetGuard
from pipeline.redis_writer import UsageWriter
from pipeline.retry import retrying
from pipeline.window_tables import WindowTables
from quotameter.aggregate import price_event
from quotameter.errors import EventError
from quotameter.event_batch import BadEvent, decode_record, is_batch
from quotameter.events import encode_event
from quotameter.pricing import PriceTable
from quotameter.windows import Delivered

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=100_000)
def partition_of(key: bytes, count: int) -> int:
    """The partition the producers' default partitioner (Kafka's murmur2, as
    aiokafka and the Java client compute it) gives ``key`` among ``count``."""
    return (murmur2(key) & 0x7FFFFFFF) % count



class PeriodObserver(Protocol):
    """What the alert engine offers (``pipeline.alerts.AlertEngine``)."""

    async def observe(self, customer: str, period: str, tier: str | None, tokens: int, cost_usd: Decimal) -> None: ...


class UsageSink:
    def __init__(
        self,
        parts: FaustParts,
        windows: WindowTables,
        dedupe: Deduplicator,
        ledger: LedgerSink,
        writer: UsageWriter,
        prices: PriceTable,
        dlq_topic: str,
        freshness: Freshness,
        guard: OffsetGuard,
    ) -> None:
        self.parts = parts
        self.windows = windows
        self.dedupe = dedupe
        self.ledger = ledger
        self.writer = writer
        self.prices = prices
        self.dlq_topic = dlq_topic
        self.freshness = freshness
        self.guard = guard
        self.observer: PeriodObserver | None = None
        self.lock = asyncio.Lock()  # batches and rebuilds take turns
        self._unwritten_ms: int | None = None  # oldest event of a failed Redis write, retried with the next
        self.counts = {"batches": 0, "events": 0, "applied": 0, "duplicates": 0, "malformed": 0, "late": 0, "seeded": 0}

    async def process(self, events: Sequence[EventT]) -> None:
        async with self.lock:
            topic = self.parts.events_topic.get_topic_name()
            with tracing.batch_span(topic, self.parts.app.conf.id) as span:
                await self._process(events, span)

    async def _process(self, events: Sequence[EventT], span: tracing.Span) -> None:
        # 0. Read only. A crash here: nothing acked, all redelivered.
        events = await retrying("reading skipped offsets", lambda: self.guard.complete(events), (KafkaError, OSError, HistoryError))
        # 1. Pure, plus DLQ sends. A crash here: nothing acked, all redelivered.
        delivered, dead, carried = self._decode(events)
        tracing.link_requests(span, events, (d.priced.event for d in delivered))  # step 0 may have added records
        for event, reason, value in dead:
            await self._dead_letter(event, reason, value)
        # 2. Read only. A crash here: as in 1.
        known = await retrying("ledger lookup", lambda: self.dedupe.known(delivered)) if delivered else {}
        fresh = [d for d in delivered if d.priced.event.id not in known]
        # An id whose ledger row came from this very delivery (same partition
        # and offset) reached the ledger, but maybe not the tables (a changelog
        # record lost in a crash or a rebalance): the tables apply it unless
        # their watermark (or their seed) already covers it. Any other known
        # id is a re-sent duplicate: skipped. (Partition and offset name the
        # record; an id has one place in it, so its index adds nothing.)
        again = [d for d in delivered if known.get(d.priced.event.id) == (d.partition, d.offset)]
        # 3. Tables (in memory until 4). A crash here: as in 1.
        result = await retrying("ledger seed", lambda: self.windows.apply(fresh, again))
        self.dedupe.recent.add(d.priced.event.id for d in fresh)
        # 4. The changelog now holds totals and watermarks together. A crash
        #    after it: redelivered events are at or below the watermark and
        #    skip the tables; the ledger, lacking them, still gets them (7).
        await self.parts.app.producer.flush()
        await self.windows.changelog_written()
        # 5. Redis. Totals never exceed the changelog's; a crash after it:
        #    the replay writes the same totals again (or an older state,
        #    which the version refuses). A failed write is retried with the
        #    next batch.
        with tracing.stage_span("quotameter.redis_write"):
            written = await self.writer.write(result.periods, result.ids)
        oldest_ms = min(d.time_ms for d in fresh) if fresh else None  # the freshness of this batch's writes
        self._redis_freshness(oldest_ms, fresh, written)
        # 6. Alerts fire once per threshold (the engine claims each in Redis).
        if self.observer is not None:
            # ALERTS-HOOK: the one call site of the alert engine (pipeline.alerts).
            for (customer, period), totals in result.periods.items():
                await self.observer.observe(
                    customer, period, result.tiers.get(customer),
                    tokens=totals.input_tokens + totals.output_tokens, cost_usd=totals.cost_usd,
                )
        # 7. Ledger rows of the new ids; every event of the batch is acked
        #    after they are written.
        await self.ledger.add(result.rows, events, oldest_ms)
        self._count(carried, delivered, fresh, dead, result.late, result.seeded)

    def _redis_freshness(self, oldest_ms: int | None, fresh: list[Delivered], written: bool) -> None:
        if oldest_ms is not None:
            self._unwritten_ms = oldest_ms if self._unwritten_ms is None else min(self._unwritten_ms, oldest_ms)
        if not written or self._unwritten_ms is None:
            return  # kept by the writer for the next batch: fresh only once that one is written
        written_ms = self.freshness.clock_ms()
        self.freshness.observe("redis", (d.time_ms for d in fresh), written_ms)
        telemetry.freshness("redis", self._unwritten_ms, written_ms)
        self._unwritten_ms = None

    def _decode(self, events: Sequence[EventT]) -> tuple[list[Delivered], list[tuple[EventT, str, bytes | None]], int]:
        """Every event of every record (one, or a batch), priced; what goes
        to the dead-letter topic: (record, reason, the bad element of a batch
        or None); and how many events the records carried."""
        carried = 0
        partitions = self._partition_count()  # None: unknown, the producer's grouping is trusted
        delivered: list[Delivered] = []
        dead: list[tuple[EventT, str, bytes | None]] = []
        seen: set[str] = set()
        for event in events:
            message = event.message
            try:
                decoded_all = decode_record(event.value)
            except EventError as exc:
                dead.append((event, str(exc), None))
                carried += 1
                continue
            carried += len(decoded_all)
            batch = len(decoded_all) > 1 or is_batch(event.value)
            for index, decoded in enumerate(decoded_all):
                if isinstance(decoded, BadEvent):
                    dead.append((event, decoded.reason, decoded.value))
                    continue
                problem = _misplaced(message, decoded.subject, batch, partitions)
                if problem is not None:
                    # The watermark needs one partition per customer.
                    dead.append((event, problem, encode_event(decoded) if batch else None))
                    continue
                if decoded.id in seen:
                    continue  # a duplicate within the batch: the first one (lowest position) counts
                seen.add(decoded.id)
                priced = price_event(decoded, self.prices, message.partition, message.offset, index)
                delivered.append(Delivered(priced, message.partition, message.offset, index))
        return delivered, dead, carried

    def _partition_count(self) -> int | None:
        topic = self.parts.events_topic.get_topic_name()
        try:
            found = self.parts.app.consumer.topic_partitions(topic)
        except (AttributeError, KeyError):  # no consumer yet
            return None
        return found if isinstance(found, int) and found > 0 else None  # 0 or None: no metadata yet

    async def _dead_letter(self, event: EventT, reason: str, value: bytes | None = None) -> None:
        """``value``: the one bad event of a batch record, else the whole record goes."""
        message = event.message
        log.warning("malformed event at %s[%d]@%d sent to %s: %s", message.topic, message.partition, message.offset, self.dlq_topic, reason,
                    extra={"fields": {"topic": message.topic, "partition": message.partition, "offset": message.offset,
                                      "dlq_topic": self.dlq_topic, "reason": reason}})  # JSON keys (telemetry.logs)
        headers = [
            ("quotameter-dlq-reason", reason.encode()),
            ("quotameter-source", f"{message.topic}[{message.partition}]@{message.offset}".encode()),
        ]
        await self.parts.app.producer.send(
            self.dlq_topic, message.key,
            value if value is not None else event.value if isinstance(event.value, bytes) else bytes(event.value or b""),
            partition=None, timestamp=None, headers=headers,
        )

    def _count(self, carried: int, delivered: list, fresh: list, dead: list, late: int, seeded: int) -> None:
        counts = self.counts
        counts["batches"] += 1
        counts["events"] += carried
        counts["applied"] += len(fresh)
        counts["duplicates"] += carried - len(dead) - len(fresh)
        counts["malformed"] += len(dead)
        counts["late"] += late
        counts["seeded"] += seeded
        # ``late`` may count a redelivered event too (``again``): only fresh ones are late here.
        telemetry.batch(carried, len(fresh), min(late, len(fresh)), carried - len(dead) - len(fresh), len(dead))


def _misplaced(message: Any, subject: str, batch: bool, partitions: int | None) -> str | None:
    """Why an event is in the wrong partition, or None. A record of one
    event is keyed by its subject; a batch groups the customers of one
    partition under one key, so each subject must map to the record's
    partition as the producer's default partitioner maps it."""
    if not batch:
        if message.key is not None and message.key != subject.encode():
            return f"key {message.key!r} is not the event's subject {subject!r}"
        return None
    if partitions and partition_of(subject.encode(), partitions) != message.partition:
        return f"customer {subject!r} does not belong in partition {message.partition} of {partitions}"
    return None


def register_usage_agent(parts: FaustParts, sink: UsageSink, batch_max_events: int, batch_max_wait_ms: int) -> None:
    # A batch being applied when partitions are revoked finishes, and its rows reach
    # the ledger, before the revocation returns (and so before another worker takes
    # those partitions and looks their events up in the ledger). Without it, rows it
    # buffered after the flush below were inserted by both workers, and the rollups,
    # which sum every inserted row, counted them twice.
    applying = asyncio.Lock()

    @parts.app.agent(parts.events_topic, name="usage")
    async def usage(stream: faust.StreamT) -> None:
        async def ack(event: Any) -> None:
            if isinstance(event, FilledEvent):
                await sink.guard.acked(event)
            else:
                await stream.ack(event)

        sink.ledger.ack = ack
        async for events in stream.noack_take(batch_max_events, within=batch_max_wait_ms / 1000):
            async with applying:
                await sink.process(events)

    @parts.app.timer(0.05)
    async def flush_ledger() -> None:
        await sink.ledger.tick()

    async def on_rebalance(sender: Any = None, *args: Any, **kwargs: Any) -> None:
        # A rebalance re-reads the tables from their changelog, which may lack
        # a record this process wrote: from here on only the ledger (with the
        # position of each row) answers "seen before?", never the window.
        async with applying:
            sink.guard.take_over_gaps(parts.app.consumer)
            await sink.ledger.flush()
            sink.dedupe.recent.clear()
            sink.windows.distrust()
            sink.guard.reset()

    parts.app.on_partitions_revoked.connect(on_rebalance, weak=False)
    parts.app.on_partitions_assigned.connect(on_rebalance, weak=False)
