"""Invoice lines for a billing month: aggregated ledger rows × the price table.

Pure: no I/O, no clock. ``quotameter.export`` reads the rows from the ledger
and writes what the renderers here return.

One line per customer, model and price version (a price change mid-month
gives two lines). Each line carries the ledger's own counts (input tokens
include cached and cache-write tokens, output tokens include reasoning
tokens, as the events report them) and the billed quantities of each price
component, which are disjoint and priced at their own rate:

    input         input tokens that were neither cached nor cache writes
    cached_input  cached input tokens        (cached rate, else the input rate)
    cache_write   cache-write input tokens   (cache-write rate, else the input rate)
    output        output tokens that were not reasoning
    reasoning     reasoning tokens           (reasoning rate, else the output rate)

Rounding rule (stated in every export):
- a component's amount is quantity × rate per million / 10^6, exact (rates
  have at most 12 decimals; with up to 6, as every real price list, it is
  exact at 12 places and equals the sum of the events' recorded costs);
- a line's amount is the sum of its components, kept exact to 12 places, and
  shown beside it rounded to the currency's minor unit, half up;
- a customer's total is the sum of their exact line amounts, rounded once,
  half up. It can differ by a few minor units from the sum of the rounded
  lines: the total is what is invoiced.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from enum import StrEnum
from typing import Any

from quotameter.config import Config, Rates
from quotameter.pricing import COST_QUANTUM, DEFAULT_PRICE_VERSION, UNPRICED

_MILLION = Decimal(1_000_000)
# ISO 4217 currencies whose minor unit is not the cent.
_MINOR_DIGITS = {
    **dict.fromkeys(("BIF", "CLP", "DJF", "GNF", "ISK", "JPY", "KMF", "KRW", "PYG", "RWF", "UGX", "VND", "VUV", "XAF", "XOF", "XPF"), 0),
    **dict.fromkeys(("BHD", "IQD", "JOD", "KWD", "LYD", "OMR", "TND"), 3),
}
ROUNDING_RULE = (
    "line amounts are exact (12 decimal places) with a copy rounded half up to the currency's minor unit; "
    "a customer's total is the sum of their exact line amounts, rounded once, half up"
)


class Component(StrEnum):
    """A billed quantity with a rate of its own (see the module doc)."""

    INPUT = "input"
    CACHED_INPUT = "cached_input"
    CACHE_WRITE = "cache_write"
    OUTPUT = "output"
    REASONING = "reasoning"


COUNTS = ("requests", "refused", "events", "input_tokens", "output_tokens", "cached_tokens", "cache_write_tokens", "reasoning_tokens")
BILLED_COLUMNS = {c: f"billed_{c.value}_tokens" for c in Component}  # SQL aliases of the billed quantities


def minor_digits(currency: str) -> int:
    return _MINOR_DIGITS.get(currency.upper(), 2)


def round_money(amount: Decimal, currency: str) -> Decimal:
    return amount.quantize(Decimal(1).scaleb(-minor_digits(currency)), rounding=ROUND_HALF_UP)


def exact(amount: Decimal) -> str:
    return f"{amount.quantize(COST_QUANTUM):f}"


def rate_table(config: Config) -> dict[str, Rates]:
    """Price version (as the ledger records it) → the rates it names."""
    table: dict[str, Rates] = {price.version: price for price in config.prices}
    if config.default_price is not None:
        table[DEFAULT_PRICE_VERSION] = config.default_price
    return table


def unit_prices(rates: Rates) -> dict[Component, Decimal]:
    """Per-million rate of each component, falling back to its parent's rate."""
    input_rate, output_rate = rates.input_per_million_usd, rates.output_per_million_usd
    pick = lambda rate, parent: parent if rate is None else rate  # noqa: E731
    return {
        Component.INPUT: input_rate,
        Component.CACHED_INPUT: pick(rates.cached_input_per_million_usd, input_rate),
        Component.CACHE_WRITE: pick(rates.cache_write_per_million_usd, input_rate),
        Component.OUTPUT: output_rate,
        Component.REASONING: pick(rates.reasoning_per_million_usd, output_rate),
    }


_ZERO_PRICES = dict.fromkeys(Component, Decimal(0))


@dataclass(frozen=True, slots=True)
class Line:
    customer: str
    model: str
    price_version: str
    counts: dict[str, int]  # COUNTS, as the ledger sums them
    billed: dict[Component, int]  # billed quantity per component
    unit_prices: dict[Component, Decimal] | None  # per million; None: the version is not in the price table
    ledger_cost: Decimal  # the sum of the events' recorded costs
    breakdown: tuple[str, ...] = ()  # the line's value of each of the invoice's ``by`` dimensions

    @property
    def amounts(self) -> dict[Component, Decimal]:
        prices = self.unit_prices or _ZERO_PRICES
        return {c: (self.billed[c] * prices[c] / _MILLION).quantize(COST_QUANTUM) for c in Component}

    @property
    def amount(self) -> Decimal:
        return sum(self.amounts.values(), Decimal(0))


@dataclass(frozen=True, slots=True)
class CustomerInvoice:
    customer: str
    lines: list[Line]

    def count(self, name: str) -> int:
        return sum(line.counts[name] for line in self.lines)

    @property
    def amount(self) -> Decimal:
        return sum((line.amount for line in self.lines), Decimal(0))


@dataclass(frozen=True, slots=True)
class Invoice:
    month: str
    currency: str
    period_start: str  # ISO 8601 UTC
    period_end: str
    final: bool
    customers: list[CustomerInvoice] = field(default_factory=list)
    by: tuple[str, ...] = ()  # breakdown dimensions (export_sql.BREAKDOWNS): api_key, user, project, tag:KEY

    @property
    def amount(self) -> Decimal:
        return sum((c.amount for c in self.customers), Decimal(0))

    def lines(self) -> Iterable[Line]:
        for customer in self.customers:
            yield from customer.lines


def line_of(row: Mapping[str, Any], rates: Mapping[str, Rates], by: tuple[str, ...] = ()) -> Line:
    """One aggregated ledger row (``quotameter.export_sql.lines``) as a line."""
    version = str(row["price_version"])
    found = rates.get(version)
    prices = unit_prices(found) if found is not None else (dict(_ZERO_PRICES) if version == UNPRICED else None)
    return Line(
        customer=str(row["customer"]),
        model=str(row["model"]),
        price_version=version,
        counts={name: int(row[name]) for name in COUNTS},
        billed={c: int(row[BILLED_COLUMNS[c]]) for c in Component},
        unit_prices=prices,
        ledger_cost=Decimal(str(row["cost_usd"])),
        breakdown=tuple(str(row[f"by_{n}"]) for n in range(len(by))),
    )


def _billable(line: Line) -> bool:
    return bool(line.counts["requests"] or any(line.billed.values()) or line.ledger_cost)


def build_invoice(
    rows: Iterable[Mapping[str, Any]], rates: Mapping[str, Rates], *, month: str, currency: str,
    period_start: str, period_end: str, final: bool, by: tuple[str, ...] = (),
) -> Invoice:
    """Lines grouped per customer, both sorted. Lines with nothing to bill
    (only refused requests) are left out; their counts are in no total."""
    by_customer: dict[str, list[Line]] = {}
    for row in rows:
        line = line_of(row, rates, by)
        if _billable(line):
            by_customer.setdefault(line.customer, []).append(line)
    customers = [
        CustomerInvoice(name, sorted(lines, key=lambda l: (l.model, l.price_version, l.breakdown)))
        for name, lines in sorted(by_customer.items())
    ]
    return Invoice(month, currency, period_start, period_end, final, customers, by)


# -- rendering: fixed order and formatting, nothing about the run, so the same
# ledger always gives the same bytes.

CSV_COLUMNS = (
    "record", "customer", "model", "price_version", "currency", "requests",
    "input_tokens", "cached_tokens", "cache_write_tokens", "output_tokens", "reasoning_tokens",
    *(f"{kind}_{c.value}_{suffix}" for c in Component for kind, suffix in (("billed", "tokens"), ("price", "per_million"))),
    "amount_exact", "amount_rounded",
)
_TOKEN_COUNTS = ("input_tokens", "cached_tokens", "cache_write_tokens", "output_tokens", "reasoning_tokens")


def breakdown_columns(by: tuple[str, ...]) -> list[str]:
    """The CSV / JSON names of breakdown dimensions: api_key_id, user, project, tag:KEY."""
    return ["api_key_id" if name == "api_key" else name for name in by]


def csv_safe(value: str) -> str:
    """A customer-supplied cell a spreadsheet will not run as a formula (OWASP's advice:
    a leading ' before = + - @ tab and carriage return)."""
    return "'" + value if value[:1] in ("=", "+", "-", "@", "\t", "\r") else value


def _line_cells(line: Line, currency: str) -> list[str]:
    prices = line.unit_prices or {}
    cells = ["line", line.customer, line.model, line.price_version, *map(csv_safe, line.breakdown), currency,
             str(line.counts["requests"])]
    cells += [str(line.counts[name]) for name in _TOKEN_COUNTS]
    for c in Component:
        cells += [str(line.billed[c]), f"{prices[c]:f}" if c in prices else ""]
    return cells + [exact(line.amount), f"{round_money(line.amount, currency):f}"]


def render_csv(invoice: Invoice) -> str:
    """One ``line`` record per line, then a ``customer_total`` record per
    customer; a period exported before it was final starts with a ``draft``
    record, so the file says so itself."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    columns = [*CSV_COLUMNS[:4], *breakdown_columns(invoice.by), *CSV_COLUMNS[4:]]
    blanks = [""] * len(invoice.by)
    writer.writerow(columns)
    if not invoice.final:
        writer.writerow(["draft"] + [""] * (len(columns) - 1))
    for customer in invoice.customers:
        for line in customer.lines:
            writer.writerow(_line_cells(line, invoice.currency))
        total = ["customer_total", customer.customer, "", "", *blanks, invoice.currency, str(customer.count("requests"))]
        total += [str(customer.count(name)) for name in _TOKEN_COUNTS]
        total += [str(sum(l.billed[c] for l in customer.lines)) if kind == "billed" else ""
                  for c in Component for kind in ("billed", "price")]
        writer.writerow(total + [exact(customer.amount), f"{round_money(customer.amount, invoice.currency):f}"])
    return out.getvalue()


def _line_json(line: Line, currency: str, by: tuple[str, ...] = ()) -> dict[str, Any]:
    prices = line.unit_prices
    return {
        "model": line.model,
        "price_version": line.price_version,
        **dict(zip(breakdown_columns(by), line.breakdown, strict=True)),
        "requests": line.counts["requests"],
        "tokens": {name.removesuffix("_tokens"): line.counts[name] for name in _TOKEN_COUNTS},
        "charges": [
            {
                "component": c.value,
                "quantity": line.billed[c],
                "unit": "tokens",
                "unit_price_per_million": None if prices is None else f"{prices[c]:f}",
                "amount": exact(line.amounts[c]),
            }
            for c in Component
        ],
        "amount": exact(line.amount),
        "amount_rounded": f"{round_money(line.amount, currency):f}",
    }


def invoice_document(invoice: Invoice) -> dict[str, Any]:
    currency = invoice.currency
    return {
        "month": invoice.month,
        "period_start": invoice.period_start,
        "period_end": invoice.period_end,
        "final": invoice.final,
        "currency": currency,
        "rounding": ROUNDING_RULE,
        "customers": [
            {
                "customer": c.customer,
                "lines": [_line_json(line, currency, invoice.by) for line in c.lines],
                "requests": c.count("requests"),
                "tokens": {name.removesuffix("_tokens"): c.count(name) for name in _TOKEN_COUNTS},
                "amount": exact(c.amount),
                "total": f"{round_money(c.amount, currency):f}",
            }
            for c in invoice.customers
        ],
        "amount": exact(invoice.amount),
        "total": f"{sum((round_money(c.amount, currency) for c in invoice.customers), Decimal(0)):f}",
    }


def render_json(invoice: Invoice) -> str:
    return json.dumps(invoice_document(invoice), indent=2, sort_keys=True, ensure_ascii=False) + "\n"
