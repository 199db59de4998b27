"""Exact pricing: tokens × effective-dated prices → Decimal USD.

Prices are USD per million tokens, so a token costs ``price / 10**6`` USD.
Costs keep 12 decimal places (pico-USD), exact for any price with up to six
decimals; nothing is rounded until an invoice line is written.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from typing import TypeVar

from quotameter.config import ModelPrice, Rates

COST_QUANTUM = Decimal("1e-12")
Key = TypeVar("Key")
Value = TypeVar("Value")
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
        self._rates: dict[tuple[str | None, date], _InForce | None] = {}

    def lookup(self, model: str | None, on: date) -> ModelPrice | None:
        return _remembered(
            self._found, (model, on), lambda: next((p for p in self._by_name.get(model or "", ()) if p.effective_from <= on), None)
        )

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
        found = self._in_force(model, on)
        if found is None:
            return Cost(Decimal(0), UNPRICED)
        # The sub-kinds are parts of their parent count; clamp so a bad report
        # can never price a negative remainder.
        cached = min(cached_tokens, input_tokens)
        cache_write = min(cache_write_tokens, input_tokens - cached)
        reasoning = min(reasoning_tokens, output_tokens)
        plain_input, plain_output = input_tokens - cached - cache_write, output_tokens - reasoning
        if found.pico_rates is not None:
            # Whole pico-USD per token: integer arithmetic, the same value
            # (and the same exponent) as the Decimal sum below, quantized.
            p_input, p_cached, p_write, p_output, p_reasoning = found.pico_rates
            pico = (plain_input * p_input + cached * p_cached + cache_write * p_write
                    + plain_output * p_output + reasoning * p_reasoning)
            if -_MAX_PICO < pico < _MAX_PICO:
                return Cost(Decimal(pico).scaleb(-12), found.version)
        input_rate, cached_rate, write_rate, output_rate, reasoning_rate = found.rates
        micro = (
            plain_input * input_rate + cached * cached_rate + cache_write * write_rate
            + plain_output * output_rate + reasoning * reasoning_rate
        )
        return Cost((micro / _PER_TOKEN).quantize(COST_QUANTUM), found.version)

    def _in_force(self, model: str | None, on: date) -> _InForce | None:
        return _remembered(self._rates, (model, on), lambda: self._find_in_force(model, on))

    def _find_in_force(self, model: str | None, on: date) -> _InForce | None:
        price = self.lookup(model, on)
        if price is not None:
            return _InForce.of(price, price.version)
        if self._default is not None:
            return _InForce.of(self._default, DEFAULT_PRICE_VERSION)
        return None


def _remembered(cache: dict[Key, Value], key: Key, find: Callable[[], Value]) -> Value:
    """``find()``, kept in ``cache`` (bounded: models × days seen)."""
    try:
        return cache[key]
    except KeyError:
        pass
    found = find()
    if len(cache) < 100_000:
        cache[key] = found
    return found


_MAX_PICO = 10**28  # the Decimal context's precision: below it scaleb is exact


@dataclass(frozen=True, slots=True)
class _InForce:
    """A price's rates per kind (input, cached, cache write, output,
    reasoning: USD per million tokens), and per token in whole pico-USD when
    every rate has at most six decimals (else None)."""

    version: str
    rates: tuple[Decimal, ...]
    pico_rates: tuple[int, ...] | None

    @classmethod
    def of(cls, rates: Rates, version: str) -> _InForce:
        input_rate, output_rate = rates.input_per_million_usd, rates.output_per_million_usd
        per_kind = (
            input_rate,
            _or(rates.cached_input_per_million_usd, input_rate),
            _or(rates.cache_write_per_million_usd, input_rate),
            output_rate,
            _or(rates.reasoning_per_million_usd, output_rate),
        )
        pico = [rate * _PER_TOKEN for rate in per_kind]  # USD per million tokens = pico-USD per token / 10**6
        whole = all(value == value.to_integral_value() for value in pico)
        return cls(version, per_kind, tuple(int(value) for value in pico) if whole else None)


def _or(rate: Decimal | None, fallback: Decimal) -> Decimal:
    return fallback if rate is None else rate
