"""The history-store interface, and the async face the worker uses.

Stores are synchronous (chDB and clickhouse-connect both block); the worker
calls them through ``AsyncHistory``, which runs every call in a thread so the
event loop never waits on the disk.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from quotameter.aggregate import PricedEvent
from quotameter.periods import BillingCalendar
from quotameter.errors import QuotameterError

UsageRow = dict[str, Any]  # customer, period, requests, refused, *_tokens, cost_usd (str), events


class HistoryError(QuotameterError):
    """The history store failed or cannot be opened. The message names the
    store and the cause; check the data directory or the server it names."""


class QueryRejected(HistoryError):
    """A query sent to the read-only endpoint is not a single SELECT. Send one
    ``SELECT`` (or ``WITH … SELECT``) statement without a trailing FORMAT."""


class HistoryStore(Protocol):
    def insert_events(self, batch: Sequence[PricedEvent]) -> None:
        """Write one row per event. Idempotent by event id: a retried batch
        never changes a total (the table is deduplicated by id)."""

    def known_ids(self, customers: Sequence[str], ids: Sequence[str]) -> dict[str, tuple[int, int]]:
        """Of ``ids`` (events of ``customers``), those the ledger holds, each
        with the Kafka (partition, offset) its row was written from."""

    def usage(self, customer: str, period: str, calendar: BillingCalendar) -> UsageRow:
        """Exact totals of the unique events of ``customer`` in billing ``period``."""

    def query(self, sql: str) -> list[dict[str, Any]]:
        """Run one read-only SELECT; rows as dicts."""

    def select(self, sql: str, params: dict[str, str]) -> list[dict[str, Any]]:
        """Run one of quotameter's own SELECTs with bound ``{name:Type}`` parameters."""

    def explain_ast(self, sql: str) -> str:
        """The engine's ``EXPLAIN AST`` of ``sql``: parsed, never run (``sql_guard``)."""

    def close(self) -> None: ...


class AsyncHistory:
    """Runs a store's blocking calls in threads: one writer thread (inserts
    stay in order) and one reader thread (queries never wait behind a sink
    that is retrying)."""

    def __init__(self, store: HistoryStore) -> None:
        self.store = store
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="history-writer")
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="history-reader")

    async def insert_events(self, batch: Sequence[PricedEvent]) -> None:
        await asyncio.get_running_loop().run_in_executor(self._writer, self.store.insert_events, batch)

    async def known_ids(self, customers: Sequence[str], ids: Sequence[str]) -> dict[str, tuple[int, int]]:
        return await asyncio.get_running_loop().run_in_executor(self._reader, self.store.known_ids, customers, ids)

    async def usage(self, customer: str, period: str, calendar: BillingCalendar) -> UsageRow:
        return await asyncio.get_running_loop().run_in_executor(self._reader, self.store.usage, customer, period, calendar)

    async def query(self, sql: str) -> list[dict[str, Any]]:
        return await asyncio.get_running_loop().run_in_executor(self._reader, self.store.query, sql)

    async def select(self, sql: str, params: dict[str, str]) -> list[dict[str, Any]]:
        return await asyncio.get_running_loop().run_in_executor(self._reader, self.store.select, sql, params)

    async def explain_ast(self, sql: str) -> str:
        return await asyncio.get_running_loop().run_in_executor(self._reader, self.store.explain_ast, sql)

    def close(self) -> None:
        # Wait for an insert already handed to the writer thread: its events
        # may be acked already, so it must reach the disk before we exit.
        self._writer.shutdown(wait=True)
        self._reader.shutdown(wait=True, cancel_futures=True)
        self.store.close()
