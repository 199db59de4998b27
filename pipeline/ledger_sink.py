"""The ledger sink: rows are buffered and written to ClickHouse in batches
(``ledger_batch_rows`` rows or ``ledger_flush_ms``), and only then are their
events acked, so Faust commits no offset before its row is in the ledger.

Each buffered row's table state was flushed to the changelog before the row
was buffered (``usage_agent``): the ledger never holds an event that the
tables could forget, which is what lets a redelivered event that the ledger
already holds be skipped.

    1. swap the buffer   a crash here or later, before 2 ends: the rows are
                         lost, their events unacked and redelivered; the
                         tables skip them (offset), the ledger gets them then
    2. insert            one INSERT; a crash after it: the events are
                         redelivered, the ledger lookup finds them, nothing
                         is counted or inserted twice
    3. confirm           every event of the batches (new rows, and the
                         duplicates the ledger had) is marked delivered for
                         the shim that spooled it (pipeline.ledger_marks);
                         a crash before: the shim sends them again later
    4. ack               Faust commits within ``broker_commit_interval``
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence

from faust.types import EventT
from opentelemetry.trace import SpanContext

from pipeline import telemetry, tracing
from pipeline.dedupe import RecentIds
from pipeline.history.store import AsyncHistory
from pipeline.ledger_marks import LedgerMarks
from pipeline.retry import retrying
from quotameter.aggregate import PricedEvent


class LedgerSink:
    def __init__(self, history: AsyncHistory, recent: RecentIds, batch_rows: int, flush_ms: int) -> None:
        self.history = history
        self.recent = recent
        self.batch_rows = batch_rows
        self.flush_s = flush_ms / 1000
        self.ack: Callable[[EventT], Awaitable[object]] | None = None
        self._rows: list[PricedEvent] = []
        self._events: list[EventT] = []
        self._since = 0.0
        self._batches: list[SpanContext] = []  # the traced batches whose rows are buffered
        self._oldest_ms: int | None = None  # the oldest buffered row's event time
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self.inserted = 0
        self.inserts = 0
        self.on_inserted: Callable[[Sequence[PricedEvent]], None] | None = None
        self.marks: LedgerMarks | None = None

    @property
    def buffered(self) -> int:
        return len(self._rows)

    async def add(self, rows: Sequence[PricedEvent], events: Sequence[EventT], oldest_ms: int | None = None) -> None:
        """Buffer a batch's new rows and every event of it (acked after the
        insert); ``oldest_ms``: the rows' oldest event time, if the caller knows it."""
        if not self._events:
            self._since = time.monotonic()
        self._rows.extend(rows)
        self._events.extend(events)
        if rows:
            oldest_ms = min(p.event.time_ms for p in rows) if oldest_ms is None else oldest_ms
            self._oldest_ms = oldest_ms if self._oldest_ms is None else min(self._oldest_ms, oldest_ms)
            if (batch := tracing.current_context()) is not None:
                self._batches.append(batch)
        if len(self._rows) >= 2 * self.batch_rows:
            await self.flush()  # back-pressure: never more than two batches behind
        elif len(self._rows) >= self.batch_rows:
            self._start_flush()

    def _start_flush(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self.flush())

    async def tick(self) -> None:
        """Called periodically: flush what is older than ``ledger_flush_ms``."""
        if self._events and time.monotonic() - self._since >= self.flush_s:
            self._start_flush()

    async def flush(self) -> None:
        async with self._lock:
            rows, events, batches, oldest_ms = self._rows, self._events, self._batches, self._oldest_ms
            self._rows, self._events, self._batches, self._oldest_ms = [], [], [], None
            if not events:
                return
            if rows:
                with tracing.insert_span(batches):
                    await self._insert(rows)
                if oldest_ms is not None:  # set whenever rows were buffered
                    telemetry.freshness("ledger", oldest_ms, time.time_ns() // 1_000_000)
            self.recent.confirm(p.event.id for p in rows)
            if self.on_inserted is not None:
                self.on_inserted(rows)
            if self.marks is not None:
                await self.marks.mark(events)
            if self.ack is not None:
                for event in events:
                    await self.ack(event)

    async def _insert(self, rows: list[PricedEvent]) -> None:
        # Acking without a ledger row would lose the events: after the retries
        # the process exits instead, nothing acked (pipeline.retry).
        await retrying("ledger insert", lambda: self._timed_insert(rows))
        self.inserted += len(rows)
        self.inserts += 1

    async def _timed_insert(self, rows: list[PricedEvent]) -> None:
        began = time.perf_counter()
        try:
            await self.history.insert_events(rows)
        except Exception:
            telemetry.ledger_insert(time.perf_counter() - began, failed=True)
            raise
        telemetry.ledger_insert(time.perf_counter() - began, failed=False)
