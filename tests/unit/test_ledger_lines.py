"""The ledger's insert body (``schema.ledger_lines``): the same rows as the
standard library's JSON of ``ledger_values``, whatever the text holds."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from pipeline.history import schema
from quotameter.aggregate import PricedEvent, price_event
from quotameter.config import parse_config
from quotameter.events import RequestData, UsageEvent
from quotameter.pricing import PriceTable

CONFIG = parse_config({"tiers": {"pro": {}}, "prices": [
    {"model": "m", "input_per_million_usd": "1.25", "output_per_million_usd": "3.00"}]})


def _priced(at: datetime, reason: str | None = None, tags: dict[str, str] | None = None) -> PricedEvent:
    event = UsageEvent(id=f"ev-{at.timestamp()}", source="t", subject="acme", time=at, data=RequestData(
        api_key_id="k", tier="pro", route="/v1/chat/completions", status=200, decision="admitted", reason=reason,
        model_requested="m", model_served="m", usage_source="upstream", input_tokens=1234, output_tokens=57,
        latency_ms=1e-05, ttft_ms=12345678.5, tags=tags))
    return price_event(event, PriceTable(list(CONFIG.prices)), 3, 17, 2)


def test_each_line_is_the_row_of_its_event() -> None:
    batch = [
        _priced(datetime(2025, 3, 10, 12, 30, 5, 999_999, tzinfo=UTC), reason="naïve — ☃", tags={"team": "a-b"}),
        _priced(datetime(1970, 1, 1, tzinfo=UTC)),
        _priced(datetime(2299, 12, 31, 23, 59, 59, 1_000, tzinfo=UTC)),
        _priced(datetime(2025, 3, 10, 12, 30, 5, 123_456, tzinfo=UTC)),  # the same second as the first
        _priced(datetime(2025, 3, 10, 12, 30, 6, 500_000, tzinfo=UTC)),  # the next second
    ]
    lines = schema.ledger_lines(batch).split("\n")
    assert len(lines) == len(batch)
    for line, priced in zip(lines, batch, strict=True):
        row = json.loads(line)
        assert row == json.loads(json.dumps(schema.ledger_values(priced)))
        assert row[1] == schema._clickhouse_time(priced.event.time)
    assert [json.loads(line)[1] for line in lines] == [
        "2025-03-10 12:30:05.999", "1970-01-01 00:00:00.000", "2299-12-31 23:59:59.001", "2025-03-10 12:30:05.123",
        "2025-03-10 12:30:06.500"]


def test_a_lone_surrogate_is_escaped_not_refused() -> None:
    priced = _priced(datetime(2025, 3, 10, tzinfo=UTC), reason="bad \ud800 text")
    body = schema.ledger_lines([priced])
    assert json.loads(body)[8] == "bad \ud800 text"
