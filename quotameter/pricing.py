"""Exact pricing: tokens × effective-dated prices → Decimal USD.

Prices are USD per million tokens, so a token costs ``price / 10**6`` USD.
Costs keep 12 decimal places (pico-USD), exact for any price with up to six
decimals; nothing is rounded until an invoice line is written.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from decimal import Decimal

from quotameter.config import ModelPrice, Rates

COST_QUANTUM = Decimal("1e-12")
_PER_TOKEN = Decimal(1_000_000)


@dataclass(frozen=True, slots=True)
class Cost:
    usd: Decimal
    price_version: str  # e.g. "gpt-4o-mini@2024-07-18"; "unpriced" when no price matched

    @property
    def priced(self) -> bool:
        return self.price_version != UNPRICED


UNPRICED = "unpriced"
DEFAULT_PRICE_VERSION = "default"


class PriceTable:
    """Looks up the price of a model (by name or alias) in force on a day."""

    def __init__(self, prices: list[ModelPrice], default: Rates | None = None) -> None:
        self._default = default
        self._by_name: dict[str, list[ModelPrice]] = {}
        for price in prices:
            for name in (price.model, *price.aliases):
                self._by_name.setdefault(name, []).append(price)
        for versions in self._by_name.values():
            versions.sort(key=lambda p: p.effective_from, reverse=True)
        self._found: dict[tuple[str | None, date], ModelPrice | None] = {}  # the table never changes: lookups are kept

    def lookup(self, model: str | None, on: date) -> ModelPrice | None:
        key = (model, on)
        try:
            return self._found[key]
        except KeyError:
            pass
        found = next((p for p in self._by_name.get(model or "", ()) if p.effective_from <= on), None)
        if len(self._found) < 100_000:  # bounded: models × days seen
            self._found[key] = found
        return found

    def cost(
        self,
        model: str | None,
        on: date,
        *,
        input_tokens: int,
        output_tokens: int,
        cached_tokens: int = 0,
        cache_write_tokens: int = 0,
        reasoning_tokens: int = 0,
    ) -> Cost:
        price = self.lookup(model, on)
        if price is not None:
            rates: Rates = price
            version = price.version
        elif self._default is not None:
            rates, version = self._default, DEFAULT_PRICE_VERSION
        else:
            return Cost(Decimal(0), UNPRICED)
        # The sub-kinds are parts of their parent count; clamp so a bad report
        # can never price a negative remainder.
        cached = min(cached_tokens, input_tokens)
        cache_write = min(cache_write_tokens, input_tokens - cached)
        reasoning = min(reasoning_tokens, output_tokens)
        input_rate, output_rate = rates.input_per_million_usd, rates.output_per_million_usd
        micro = (
            (input_tokens - cached - cache_write) * input_rate
            + cached * _or(rates.cached_input_per_million_usd, input_rate)
            + cache_write * _or(rates.cache_write_per_million_usd, input_rate)
            + (output_tokens - reasoning) * output_rate
            + reasoning * _or(rates.reasoning_per_million_usd, output_rate)
        )
        return Cost((micro / _PER_TOKEN).quantize(COST_QUANTUM), version)


def _or(rate: Decimal | None, fallback: Decimal) -> Decimal:
    return fallback if rate is None else rate
