"""The ledger sink's insert metrics: every attempt timed, every failed one counted."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from pipeline import telemetry
from pipeline.dedupe import RecentIds
from pipeline.history.store import HistoryError
from pipeline.ledger_sink import LedgerSink


class FlakyLedger:
    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.rows: list[Any] = []

    async def insert_events(self, rows: list[Any]) -> None:
        if self.failures:
            self.failures -= 1
            raise HistoryError("chDB: the disk is full")
        self.rows.extend(rows)


async def test_a_failed_insert_is_counted_and_the_retry_timed(monkeypatch: pytest.MonkeyPatch) -> None:
    attempts: list[bool] = []
    fresh: list[tuple[str, int]] = []
    monkeypatch.setattr(telemetry, "ledger_insert", lambda duration_s, failed: attempts.append(failed))
    monkeypatch.setattr(telemetry, "freshness", lambda target, oldest_ms, written_ms: fresh.append((target, oldest_ms)))
    ledger = FlakyLedger(failures=1)
    sink = LedgerSink(ledger, RecentIds(60, 1000), batch_rows=100, flush_ms=1000)  # type: ignore[arg-type]
    rows = [SimpleNamespace(event=SimpleNamespace(id=f"ev-{n}", time_ms=1_000 + n)) for n in range(3)]

    await sink.add(rows, [object()] * 3, oldest_ms=1_000)  # type: ignore[arg-type]
    await sink.add([], [object()])  # a batch of duplicates: no row
    await sink.flush()  # one retry after 0.2 s (pipeline.retry)

    assert attempts == [True, False] and sink.inserts == 1 and ledger.rows == rows
    assert fresh == [("ledger", 1_000)]  # one observation per insert, its oldest row
