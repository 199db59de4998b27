"""Per-batch usage aggregation: priced events → totals per customer and bucket.

Pure functions, no I/O, no clock: the pipeline's Faust agent is a thin loop
over these, so the arithmetic is tested without a broker.

Delivery is at-least-once, so a batch may repeat events of an earlier one.
Within one batch duplicates (same event id) are dropped here; across batches
``quotameter.windows`` skips what was applied (by Kafka offset) and the
pipeline drops ids the ledger already holds, so totals stay exact.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from decimal import Decimal
from typing import Any

from quotameter.events import Decision, UsageEvent
from quotameter.periods import BillingCalendar
from quotameter.pricing import COST_QUANTUM, Cost, PriceTable

Record = dict[str, Any]  # what a table or Redis holds: ints, and money as a string


@dataclass(frozen=True, slots=True)
class Totals:
    """Usage summed over some events. ``requests`` counts admitted events only;
    ``refused`` counts the rest; ``events`` counts both."""

    requests: int = 0
    refused: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    cost_usd: Decimal = Decimal(0)
    events: int = 0

    def __add__(self, other: Totals) -> Totals:
        # Written out: this runs for every bucket a batch touches.
        return Totals(
            self.requests + other.requests,
            self.refused + other.refused,
            self.input_tokens + other.input_tokens,
            self.output_tokens + other.output_tokens,
            self.cached_tokens + other.cached_tokens,
            self.reasoning_tokens + other.reasoning_tokens,
            self.cost_usd + other.cost_usd,
            self.events + other.events,
        )

    @property
    def cost_micro_usd(self) -> int:
        """The cost rounded up to whole micro-USD (what Lua compares with budgets)."""
        return math.ceil(self.cost_usd * 1_000_000)

    def to_vector(self) -> list[Any]:
        """The fields in order (money as Decimal): what sums are kept in."""
        return [
            self.requests, self.refused, self.input_tokens, self.output_tokens,
            self.cached_tokens, self.reasoning_tokens, self.cost_usd, self.events,
        ]

    @classmethod
    def from_vector(cls, values: Sequence[Any]) -> Totals:
        return cls(*values)

    def to_list(self) -> list[Any]:
        """Compact form for table values: the fields in order, money as text."""
        values = self.to_vector()
        values[6] = format_usd(self.cost_usd)
        return values

    @classmethod
    def from_list(cls, values: Sequence[Any]) -> Totals:
        requests, refused, input_tokens, output_tokens, cached, reasoning, cost, events = values
        return cls(
            int(requests), int(refused), int(input_tokens), int(output_tokens),
            int(cached), int(reasoning), Decimal(cost), int(events),
        )

    def to_record(self) -> Record:
        record: Record = {f.name: getattr(self, f.name) for f in fields(self)}
        record["cost_usd"] = format_usd(self.cost_usd)
        return record

    @classmethod
    def from_record(cls, record: Mapping[str, Any] | None) -> Totals:
        if not record:
            return cls()
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = record.get(f.name)
            if raw is None:
                continue
            values[f.name] = Decimal(str(raw)) if f.name == "cost_usd" else int(raw)
        return cls(**values)


def format_usd(amount: Decimal) -> str:
    """Money as a fixed-point string with 12 places (never exponent notation)."""
    return f"{amount.quantize(COST_QUANTUM):f}"


@dataclass(frozen=True, slots=True)
class PricedEvent:
    event: UsageEvent
    cost: Cost
    late: bool = False  # older than its customer's newest event by more than the grace
    partition: int = -1  # where Kafka delivered it (kept in the ledger row)
    offset: int = -1
    index: int = 0  # within its record, when the record carries a batch of events

    @property
    def totals(self) -> Totals:
        return Totals.from_vector(self.vector())

    def vector(self) -> list[Any]:
        """``totals.to_vector()`` without the Totals (the windows sum these for every event)."""
        data = self.event.data
        admitted = data.decision is Decision.ADMITTED
        return [
            int(admitted), int(not admitted), data.input_tokens, data.output_tokens,
            data.cached_tokens, data.reasoning_tokens, self.cost.usd, 1,
        ]


def price_event(
    event: UsageEvent, prices: PriceTable, partition: int = -1, offset: int = -1, index: int = 0
) -> PricedEvent:
    """Price by the model that served the request (else the one requested),
    at the price in force on the event's UTC day."""
    data = event.data
    cost = prices.cost(
        data.model_served or data.model_requested,
        event.time.date(),
        input_tokens=data.input_tokens,
        output_tokens=data.output_tokens,
        cached_tokens=data.cached_tokens,
        cache_write_tokens=data.cache_write_tokens,
        reasoning_tokens=data.reasoning_tokens,
    )
    return PricedEvent(event, cost, partition=partition, offset=offset, index=index)


def unique_by_id(events: Iterable[UsageEvent]) -> list[UsageEvent]:
    """The events of one batch with repeated ids dropped (first one wins)."""
    seen: set[str] = set()
    kept = []
    for event in events:
        if event.id not in seen:
            seen.add(event.id)
            kept.append(event)
    return kept


def price_batch(events: Iterable[UsageEvent], prices: PriceTable) -> list[PricedEvent]:
    return [price_event(event, prices) for event in unique_by_id(events)]


def totals_by_period(batch: Iterable[PricedEvent], calendar: BillingCalendar) -> dict[tuple[str, str], Totals]:
    """(customer, billing period ``YYYY-MM``) → the batch's totals."""
    out: dict[tuple[str, str], Totals] = {}
    for priced in batch:
        key = (priced.event.customer_id, calendar.period_of(priced.event.time))
        out[key] = out.get(key, Totals()) + priced.totals
    return out
