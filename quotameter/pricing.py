"""Exact pricing: tokens × effective-dated prices → Decimal USD.

Prices are USD per million tokens, so a token costs ``price / 10**6`` USD.
Costs keep 12 decimal places (pico-USD), exact for any price with up to six
decimals; nothing is rounded until an invoice line is written.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from decimal import Decimal

from quotameter.config import ModelPrice

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


class PriceTable:
    """Looks up the price of a model (by name or alias) in force on a day."""

    def __init__(self, prices: list[ModelPrice]) -> None:
        self._by_name: dict[str, list[ModelPrice]] = {}
        for price in prices:
            for name in (price.model, *price.aliases):
                self._by_name.setdefault(name, []).append(price)
        for versions in self._by_name.values():
            versions.sort(key=lambda p: p.effective_from, reverse=True)

    def lookup(self, model: str | None, on: date) -> ModelPrice | None:
        for price in self._by_name.get(model or "", ()):
            if price.effective_from <= on:
                return price
        return None

    def cost(
        self,
        model: str | None,
        on: date,
        *,
        input_tokens: int,
        output_tokens: int,
        cached_tokens: int = 0,
    ) -> Cost:
        price = self.lookup(model, on)
        if price is None:
            return Cost(Decimal(0), UNPRICED)
        cached = min(cached_tokens, input_tokens)
        cached_rate = price.cached_input_per_million_usd
        if cached_rate is None:
            cached_rate = price.input_per_million_usd
        micro = (
            (input_tokens - cached) * price.input_per_million_usd
            + cached * cached_rate
            + output_tokens * price.output_per_million_usd
        )
        return Cost((micro / _PER_TOKEN).quantize(COST_QUANTUM), price.version)
