"""The chDB ledger's columnar insert writes exactly the rows the JSON rows did."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

from pipeline.history import chdb_store, schema
from pipeline.history.chdb_store import ChdbHistory
from quotameter.aggregate import PricedEvent, price_event
from quotameter.config import parse_config
from quotameter.events import RequestData, UsageEvent
from quotameter.pricing import PriceTable

CONFIG = parse_config({"tiers": {"pro": {}}, "prices": [
    {"model": "m", "input_per_million_usd": "1.234567", "output_per_million_usd": "3.00",
     "cached_input_per_million_usd": "0.10"}]})
PRICES = PriceTable(list(CONFIG.prices))
TIMES = [
    datetime(2025, 3, 10, 12, 30, 0, 999_999, tzinfo=UTC),  # the millisecond is cut, never rounded up
    datetime(2025, 3, 31, 23, 59, 59, 999_000, tzinfo=UTC),  # the last ms of a month partition
    datetime(1970, 1, 1, 0, 0, 0, 500, tzinfo=UTC),
    datetime(2299, 12, 31, 23, 59, 59, 123_456, tzinfo=UTC),
]


def events() -> list[PricedEvent]:
    out = []
    for n in range(40):
        data = {
            "api_key_id": f"key-{n % 3}", "tier": "pro", "route": "/v1/chat/completions", "status": 200 + n % 3,
            "decision": "admitted", "model_requested": "m", "model_served": "m" if n % 4 else None,
            "upstream": "http://up" if n % 2 else None, "input_tokens": 1000 + n, "output_tokens": 7 * n,
            "cached_tokens": n, "cache_write_tokens": n % 5, "reasoning_tokens": n // 2,
            "usage_source": "upstream", "streamed": bool(n % 2), "latency_ms": 0.1 + 0.2 * n,
            "ttft_ms": None if n % 3 else 12.345, "request_bytes": 10 * n, "response_bytes": 2**40 + n,
            "upstream_cost_usd": None if n % 2 else Decimal("0.123456789012") * n,
        }
        if n % 5 == 0:
            data.update(decision="refused", reason="rate_limit_tokens", status=429, usage_source="none")
        if n % 7 == 0:
            data.update(end_user="user-7", project="proj:a/b@c", tags={"team": "a.b", "env": "prod+x"})
        event = UsageEvent(id=f"ev-{n}-'\"\\ü", source="shim-1", subject=f"cust-{n % 4}", time=TIMES[n % len(TIMES)],
                           data=RequestData(**data))
        out.append(dataclasses.replace(price_event(event, PRICES), late=n % 6 == 0, partition=n % 4, offset=2**40 + n, index=n))
    return out


def renamed(batch: list[PricedEvent], suffix: str) -> list[PricedEvent]:
    return [dataclasses.replace(p, event=p.event.model_copy(update={"id": p.event.id + suffix})) for p in batch]


def stored(store: ChdbHistory, suffix: str) -> list[dict]:
    columns = ", ".join(f"toString({name}) AS {name}" for name in schema.LEDGER_COLUMNS if name != "id")
    return store.query(
        f"SELECT replaceOne(id, '{suffix}', '') AS event, {columns} FROM {schema.EVENTS}"
        f" WHERE endsWith(id, '{suffix}') ORDER BY event"
    )


def test_the_columnar_insert_writes_the_same_rows_as_json_rows(tmp_path: Path) -> None:
    batch = events()
    assert chdb_store._arrow_rows(batch) is not None  # this batch goes as columns
    store = ChdbHistory(tmp_path / "h")
    try:
        store._run(store._rw, schema.INSERT_ROWS + schema.ledger_lines(renamed(batch, "/json")))
        store.insert_events(renamed(batch, "/columns"))
        as_json, as_columns = stored(store, "/json"), stored(store, "/columns")
        assert len(as_columns) == len(batch) and as_columns == as_json
        sums = store.query(f"SELECT toString(sum(cost_usd)) AS usd, toString(sum(upstream_cost_usd)) AS up FROM {schema.EVENTS}"
                           " WHERE endsWith(id, '/columns')")
        assert sums == [{"usd": str(sum(p.cost.usd for p in batch).normalize()),
                         "up": str(sum(p.event.data.upstream_cost_usd or 0 for p in batch).normalize())}]
    finally:
        store.close()


def test_rows_an_arrow_column_cannot_hold_go_as_json_rows(tmp_path: Path) -> None:
    base = events()[1]
    odd = [
        base.event.model_copy(update={"data": base.event.data.model_copy(update={"status": 70_000})}),
        base.event.model_copy(update={"data": base.event.data.model_copy(update={"input_tokens": 2**63})}),
    ]
    store = ChdbHistory(tmp_path / "h")
    try:
        for n, event in enumerate(odd):
            one = [dataclasses.replace(base, event=event.model_copy(update={"id": f"odd-{n}"}))]
            assert chdb_store._arrow_rows(one) is None
            store.insert_events(one)
        rows = store.query(f"SELECT id, status, input_tokens FROM {schema.EVENTS} ORDER BY id")
        assert [row["id"] for row in rows] == ["odd-0", "odd-1"] and int(rows[1]["input_tokens"]) == 2**63
        # A lone surrogate (which JSON rows, too, cannot carry to the engine) stays on the JSON path.
        lone = base.event.model_copy(update={"source": "lone \ud800 surrogate"})
        assert chdb_store._arrow_rows([dataclasses.replace(base, event=lone)]) is None
    finally:
        store.close()
