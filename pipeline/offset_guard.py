"""Making sure no offset of the events topic goes unprocessed.

Faust's consumer can skip records: a ``getmany`` cut short by a rebalance
or a paused flow leaves the client's position past records that never reached
the agent, and on Tansu a restarted worker at times resumed at the log's end
instead of its committed offset (the group's offsets were gone and the reset
landed on the latest offset), about 1,600 events on in the crash test. Faust
takes a jump in offsets for a compacted-away range and commits past it. The
events topic is never compacted and carries no transaction markers, so here
every offset holds an event, and a jump means events were skipped.

So the usage agent asks this guard for each batch:

    expected   per partition, the next offset owed to the agent. When the
               partition is (re)assigned: the higher of the group's committed
               offset and one past the ledger's highest offset of it (both
               only pass offsets that were processed; Tansu sometimes answers
               no committed offset at all), else the log start. Then one
               past the highest offset processed.
    holes      a batch whose first offset of a partition lies past
               ``expected``, or that skips offsets within, has holes: they are
               read with a separate, group-less consumer and processed in
               the same batch, in offset order
    commits    Faust's own gap bookkeeping is turned off for the topic; a
               filled hole is declared to Faust only once the ledger holds
               its rows (``acked``), so no commit passes an event before its
               row is written

Offsets below ``expected`` are redeliveries; they pass through (the tables'
watermarks and the ledger lookup make them harmless).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from faust.types import TP

log = logging.getLogger(__name__)

FILL_TIMEOUT_S = 15.0


@dataclass(frozen=True, slots=True)
class Hole:
    partition: int
    start: int  # first missing offset
    end: int  # first offset after the hole (exclusive)


@dataclass(frozen=True, slots=True)
class FilledEvent:
    """A record read to fill a hole, shaped like a Faust event where the agent reads one."""

    message: Any  # aiokafka ConsumerRecord: topic, partition, offset, key, value
    value: bytes


def find_holes(expected: dict[int, int], offsets: Sequence[tuple[int, int]]) -> list[Hole]:
    """The holes in ``offsets`` ((partition, offset) in delivery order) given
    the next offset owed per partition; ``expected`` is advanced in place."""
    holes: list[Hole] = []
    for partition, offset in offsets:
        owed = expected.get(partition)
        if owed is not None and offset > owed:
            holes.append(Hole(partition, owed, offset))
        if owed is None or offset >= owed:
            expected[partition] = offset + 1
    return holes


class OffsetGuard:
    def __init__(
        self, bootstrap: str, topic: str, group_id: str, ledger_offsets: Callable[[list[int]], Awaitable[dict[int, int]]],
        kafka_options: dict[str, Any] | None = None,
    ) -> None:
        self.bootstrap = bootstrap
        # Connection options of its own clients (quotameter.kafka_client.client_options).
        self.kafka_options = kafka_options or {"bootstrap_servers": bootstrap}
        self.ledger_offsets = ledger_offsets
        self.topic = topic
        self.group_id = group_id
        self.expected: dict[int, int] = {}
        self.filled = 0  # records read to fill holes, since start
        self.holes = 0
        self._declare_gap: Callable[[Any, int, int], Awaitable[None]] | None = None

    def take_over_gaps(self, consumer: Any) -> None:
        """Stop Faust from committing past the offsets it skipped on the events
        topic; ``acked`` declares each filled hole instead. Idempotent."""
        if self._declare_gap is not None:
            return
        original = consumer._add_gap
        topic = self.topic

        async def add_gap(tp: Any, offset_from: int, offset_to: int) -> None:
            if tp.topic != topic:
                await original(tp, offset_from, offset_to)

        consumer._add_gap = add_gap
        self._declare_gap = original

    def reset(self) -> None:
        """After a rebalance: every partition starts again from its committed offset."""
        self.expected.clear()

    async def complete(self, events: Sequence[Any]) -> list[Any]:
        """``events`` with the records of every hole added, in offset order per partition."""
        unknown = {e.message.partition for e in events} - self.expected.keys()
        if unknown:
            self.expected.update(await self._committed(sorted(unknown)))
        # Advanced on a copy: if reading a hole fails, the retried batch finds it again.
        expected = dict(self.expected)
        holes = find_holes(expected, [(e.message.partition, e.message.offset) for e in events])
        if not holes:
            self.expected = expected
            return list(events)
        filled = await self._read(holes)
        self.expected = expected
        self.holes += len(holes)
        self.filled += len(filled)
        log.warning(
            "the consumer skipped %d offsets of %s (%s); read them directly",
            sum(h.end - h.start for h in holes), self.topic,
            ", ".join(f"[{h.partition}] {h.start}..{h.end - 1}" for h in holes),
        )
        merged = [*events, *filled]
        merged.sort(key=lambda e: (e.message.partition, e.message.offset))
        return merged

    async def acked(self, event: FilledEvent) -> None:
        """The ledger holds this filled record's row: Faust may commit past it."""
        await self._declare(event.message.partition, event.message.offset, event.message.offset)

    async def _declare(self, partition: int, first: int, last: int) -> None:
        if self._declare_gap is not None:
            await self._declare_gap(TP(self.topic, partition), first, last)

    async def _committed(self, partitions: list[int]) -> dict[int, int]:
        """Where each partition resumes (see ``expected`` above)."""
        tps = [TopicPartition(self.topic, p) for p in partitions]
        admin = AIOKafkaAdminClient(**self.kafka_options, request_timeout_ms=10_000)
        await admin.start()
        try:
            committed = await admin.list_consumer_group_offsets(self.group_id, partitions=tps)
        finally:
            await admin.close()
        out = {tp.partition: meta.offset for tp, meta in committed.items() if meta is not None and meta.offset >= 0}
        for partition, offset in (await self.ledger_offsets(partitions)).items():
            out[partition] = max(out.get(partition, -1), offset + 1)
        missing = [tp for tp in tps if tp.partition not in out]
        if missing:
            consumer = AIOKafkaConsumer(**self.kafka_options, group_id=None, enable_auto_commit=False)
            await consumer.start()
            try:
                starts = await consumer.beginning_offsets(missing)
            finally:
                await consumer.stop()
            out.update({tp.partition: offset for tp, offset in starts.items()})
        return out

    async def _read(self, holes: list[Hole]) -> list[FilledEvent]:
        """Read every hole's records with a group-less consumer (a partition's
        holes in one pass from its first hole to its last)."""
        spans: dict[int, Hole] = {}
        for h in holes:
            span = spans.get(h.partition)
            spans[h.partition] = Hole(h.partition, min(h.start, span.start), max(h.end, span.end)) if span else h
        missing = {(h.partition, o) for h in holes for o in range(h.start, h.end)}
        tps = {p: TopicPartition(self.topic, p) for p in spans}
        consumer = AIOKafkaConsumer(
            **self.kafka_options, group_id=None, enable_auto_commit=False, auto_offset_reset="none"
        )
        await consumer.start()
        out: list[FilledEvent] = []
        lost: list[Hole] = []
        try:
            # Offsets already deleted (retention) cannot be read: start each
            # span at its partition's log start.
            starts = await consumer.beginning_offsets(list(tps.values()))
            for partition, span in list(spans.items()):
                first = starts.get(tps[partition], 0)
                if first > span.start:
                    lost.append(Hole(partition, span.start, min(first, span.end)))
                if first >= span.end:
                    del spans[partition], tps[partition]
                elif first > span.start:
                    spans[partition] = Hole(partition, first, span.end)
            consumer.assign(list(tps.values()))
            for span in spans.values():
                consumer.seek(tps[span.partition], span.start)
            deadline = time.monotonic() + FILL_TIMEOUT_S
            while spans and time.monotonic() < deadline:
                batches = await consumer.getmany(*[tps[p] for p in spans], timeout_ms=500)
                for tp, records in batches.items():
                    span = spans.get(tp.partition)
                    if span is None:
                        continue
                    out.extend(FilledEvent(r, r.value or b"") for r in records if (r.partition, r.offset) in missing)
                    if records and records[-1].offset >= span.end - 1:
                        del spans[tp.partition]
        finally:
            await consumer.stop()
        for hole in [*lost, *spans.values()]:
            # Gone from the broker: nothing is left to process, and Faust may
            # commit past them (else its commits would stop here for good).
            log.error("offsets %d..%d of %s[%d] are no longer on the broker; they were never processed",
                      hole.start, hole.end - 1, self.topic, hole.partition)
            await self._declare(hole.partition, hole.start, hole.end - 1)
        return out
