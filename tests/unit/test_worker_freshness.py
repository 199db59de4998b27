"""The freshness to Redis a batch reports: its oldest event, and only once Redis has it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from pipeline import telemetry
from pipeline.freshness import Freshness
from pipeline.usage_agent import UsageSink


def test_a_failed_write_reports_its_events_with_the_write_that_lands(monkeypatch: pytest.MonkeyPatch) -> None:
    recorded: list[tuple[str, int, int]] = []
    monkeypatch.setattr(telemetry, "freshness", lambda target, oldest_ms, written_ms: recorded.append((target, oldest_ms, written_ms)))
    sink = UsageSink.__new__(UsageSink)  # only the freshness bookkeeping is exercised
    sink._unwritten_ms = None
    sink.freshness = Freshness(clock_ms=lambda: 10_000)

    sink._redis_freshness(4_000, [SimpleNamespace(time_ms=4_000)], written=False)  # Redis down: kept for the next batch
    assert recorded == [] and sink.freshness.summary() == {}
    sink._redis_freshness(9_000, [SimpleNamespace(time_ms=9_000)], written=True)
    assert recorded == [("redis", 4_000, 10_000)]  # the oldest event, of the failed batch, is what this write made fresh
    sink._redis_freshness(None, [], written=True)  # a batch of duplicates: nothing new in Redis
    sink._redis_freshness(9_500, [SimpleNamespace(time_ms=9_500)], written=True)
    assert recorded[1:] == [("redis", 9_500, 10_000)]
