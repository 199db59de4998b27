"""Per-batch aggregation, pricing and the shapes written to tables, Redis and the ledger."""

from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import Decimal

import pytest

from pipeline.history.schema import ledger_row, read_only_select, usage_row
from pipeline.redis_writer import UsageWriter, usage_hash
from quotameter.aggregate import (
    Totals,
    format_usd,
    price_batch,
    price_event,
    totals_by_period,
    unique_by_id,
)
from quotameter.config import ModelPrice
from quotameter.events import RequestData, UsageEvent
from quotameter.periods import BillingCalendar
from quotameter.pricing import PriceTable
from quotameter.redis_keys import USAGE_FIELDS, RedisKeys

UTC_MONTHS = BillingCalendar("UTC", 1)

PRICES = PriceTable(
    [
        ModelPrice(model="small", input_per_million_usd=Decimal("0.10"), output_per_million_usd=Decimal("0.40")),
        ModelPrice(
            model="big",
            effective_from=date(2025, 2, 1),
            input_per_million_usd=Decimal("2.50"),
            output_per_million_usd=Decimal("10.00"),
            cached_input_per_million_usd=Decimal("1.25"),
        ),
    ]
)
T0 = datetime(2025, 1, 31, 23, 59, 30, tzinfo=UTC)


def event(
    id: str = "e1",
    customer: str = "acme",
    at: datetime = T0,
    model: str = "small",
    decision: str = "admitted",
    tokens: tuple[int, int, int, int] = (100, 50, 0, 0),
) -> UsageEvent:
    inp, out, cached, reasoning = tokens
    return UsageEvent(
        id=id,
        source="test",
        subject=customer,
        time=at,
        data=RequestData(
            api_key_id="k1",
            tier="free",
            route="/v1/chat/completions",
            status=200 if decision == "admitted" else 429,
            decision=decision,
            model_served=model if decision == "admitted" else None,
            model_requested=model,
            input_tokens=inp,
            output_tokens=out,
            cached_tokens=cached,
            reasoning_tokens=reasoning,
        ),
    )


def test_price_event_is_exact_and_records_the_version() -> None:
    priced = price_event(event(tokens=(1, 1, 0, 0)), PRICES)
    assert priced.cost.usd == Decimal("0.000000500000")
    assert priced.cost.price_version == "small@1970-01-01"


def test_price_follows_the_effective_date_and_cached_rate() -> None:
    before = price_event(event(model="big", at=T0), PRICES)
    assert before.cost.price_version == "unpriced" and before.cost.usd == 0
    after = price_event(event(model="big", at=datetime(2025, 2, 1, tzinfo=UTC), tokens=(1000, 100, 400, 0)), PRICES)
    # 600 × 2.50 + 400 × 1.25 + 100 × 10.00, per million
    assert after.cost.usd == Decimal("0.003000000000")


def test_refused_counts_separately_from_requests() -> None:
    batch = price_batch([event("a"), event("b", decision="refused", tokens=(0, 0, 0, 0))], PRICES)
    totals = totals_by_period(batch, UTC_MONTHS)[("acme", "2025-01")]
    assert (totals.requests, totals.refused, totals.events) == (1, 1, 2)
    assert totals.input_tokens == 100 and totals.cost_usd == Decimal("0.000030000000")


def test_duplicates_within_a_batch_count_once() -> None:
    assert [e.id for e in unique_by_id([event("a"), event("b"), event("a")])] == ["a", "b"]
    totals = totals_by_period(price_batch([event("a"), event("a")], PRICES), UTC_MONTHS)
    assert totals[("acme", "2025-01")].requests == 1


def test_totals_split_by_customer_and_billing_period() -> None:
    feb = datetime(2025, 2, 1, 0, 0, 10, tzinfo=UTC)
    batch = price_batch([event("a"), event("b", at=feb), event("c", customer="zeta")], PRICES)
    keys = set(totals_by_period(batch, UTC_MONTHS))
    assert keys == {("acme", "2025-01"), ("acme", "2025-02"), ("zeta", "2025-01")}
    # In New York, 2025-02-01 00:00:10 UTC is still January.
    assert set(totals_by_period(batch, BillingCalendar("America/New_York", 1))) == {("acme", "2025-01"), ("zeta", "2025-01")}


def test_tokens_of_every_kind_are_summed() -> None:
    batch = price_batch([event("a", tokens=(10, 20, 5, 7)), event("b", tokens=(1, 2, 3, 4))], PRICES)
    t = totals_by_period(batch, UTC_MONTHS)[("acme", "2025-01")]
    assert (t.input_tokens, t.output_tokens, t.cached_tokens, t.reasoning_tokens) == (11, 22, 8, 11)


def test_totals_round_trip_through_a_record() -> None:
    totals = Totals(requests=3, refused=1, input_tokens=9, cost_usd=Decimal("1.5"), events=4)
    record = totals.to_record()
    assert record["cost_usd"] == "1.500000000000"
    assert Totals.from_record(record) == totals
    assert Totals.from_record(None) == Totals()


def test_totals_round_trip_through_a_list_and_round_micro_usd_up() -> None:
    totals = Totals(requests=3, refused=1, input_tokens=9, cost_usd=Decimal("0.0000015"), events=4)
    assert Totals.from_list(totals.to_list()) == totals
    assert totals.cost_micro_usd == 2 and Totals().cost_micro_usd == 0


def test_usage_hash_has_every_field_as_absolute_strings() -> None:
    fields = usage_hash(Totals(requests=2, refused=1, cost_usd=Decimal("0.25"), events=3), updated_ms=1234)
    assert set(fields) == {*USAGE_FIELDS, "refused", "version", "updated_ms"}
    assert fields["cost_micro_usd"] == "250000" and fields["version"] == "3"
    assert fields["cost_usd"] == "0.250000000000" and fields["requests"] == "2" and fields["updated_ms"] == "1234"


def test_format_usd_never_uses_exponents() -> None:
    assert format_usd(Decimal("1E-12")) == "0.000000000001"
    assert format_usd(Decimal(0)) == "0.000000000000"


def test_ledger_row_carries_the_event_and_its_cost() -> None:
    row = ledger_row(price_event(event(at=datetime(2025, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)), PRICES))
    assert row["time"] == "2025-01-02 03:04:05.678"
    assert row["cost_usd"] == "0.000030000000" and row["price_version"] == "small@1970-01-01"
    assert (row["customer"], row["decision"], row["input_tokens"]) == ("acme", "admitted", 100)


def test_usage_row_normalises_the_store_answer() -> None:
    row = usage_row("acme", "2025-01", {"requests": "3", "cost_usd": "1.5", "events": 3})
    assert row["requests"] == 3 and row["refused"] == 0 and row["cost_usd"] == "1.500000000000"
    assert usage_row("acme", "2025-01", None)["events"] == 0


@pytest.mark.parametrize(
    "sql",
    ["SELECT 1", " select count() from quotameter.events ;", "WITH 1 AS x SELECT x"],
)
def test_read_only_select_accepts_one_select(sql: str) -> None:
    assert read_only_select(sql) is not None


@pytest.mark.parametrize(
    "sql",
    [
        "",
        "DROP TABLE quotameter.events",
        "INSERT INTO quotameter.events VALUES (1)",
        "SELECT 1; DROP TABLE quotameter.events",
        "SELECT 1 FORMAT CSV",
        "ALTER TABLE quotameter.events DELETE WHERE 1",
    ],
)
def test_read_only_select_rejects_anything_else(sql: str) -> None:
    assert read_only_select(sql) is None


class _FakePipeline:
    def __init__(self, client: _FakeRedis) -> None:
        self.client = client
        self.calls: list[tuple[str, dict[str, str]]] = []

    def hset(self, key: str, mapping: dict[str, str]) -> None:
        self.calls.append((key, mapping))

    async def execute(self) -> None:
        if self.client.down:
            raise ConnectionError("redis is down")
        self.client.hashes.update(self.calls)
