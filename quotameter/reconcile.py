"""When a billing period is final, and whether an export adds up. Pure.

A period is final ``billing.finalize_after_hours`` after it ends — its end on
the billing calendar (``config.billing.calendar``), not the calendar month's —
or after ``pipeline.late_grace_s``, if that is longer: until then late events
may still land in it, so an export of it is a draft (``--draft``), marked not
final.

Reconciliation compares, per customer, three independent sums:

    ledger   the customer's totals over the month's unique events (one query)
    lines    the sum of the invoice lines (another query, grouped by model)
    redis    the period totals the pipeline wrote to Redis (what quotas used)

and, per line, the amount priced from the table against the costs the
pipeline recorded on the events. Any difference is a failure: the export
writes nothing and names each number that differs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from quotameter.billing import Invoice, exact
from quotameter.config import Config

COMPARED = ("requests", "input_tokens", "output_tokens", "cached_tokens", "reasoning_tokens", "events", "cost_usd")


@dataclass(frozen=True, slots=True)
class Finality:
    month: str
    start: datetime
    end: datetime
    final_at: datetime
    now: datetime

    @property
    def final(self) -> bool:
        return self.now >= self.final_at

    def describe(self) -> str:
        if self.final:
            return f"{self.month} is final (closed {self.end.isoformat()}, final since {self.final_at.isoformat()})"
        state = "has not ended" if self.now < self.end else "is still within its late-event grace"
        return (
            f"{self.month} is open: it {state}, and late events may still change it until "
            f"{self.final_at.isoformat()}"
        )


def finality(config: Config, month: str, now: datetime) -> Finality:
    """Raises ValueError naming the expected format for a bad ``month``."""
    billing = config.billing
    start, end = billing.calendar.bounds(month)
    grace = max(timedelta(hours=billing.finalize_after_hours), timedelta(seconds=config.pipeline.late_grace_s))
    return Finality(month, start, end, end + grace, now)


def _canonical(name: str, value: Any) -> str:
    if name == "cost_usd":
        return exact(Decimal(str(value or 0)))
    return str(int(value or 0))


def ledger_sides(invoice: Invoice) -> dict[str, dict[str, str]]:
    """customer → the invoice lines' sums, in the compared fields."""
    out: dict[str, dict[str, str]] = {}
    for customer in invoice.customers:
        sums = {name: sum(line.counts[name] for line in customer.lines) for name in COMPARED if name != "cost_usd"}
        sums["cost_usd"] = sum((line.amount for line in customer.lines), Decimal(0))
        out[customer.customer] = {name: _canonical(name, value) for name, value in sums.items()}
    return out


def reconcile(
    invoice: Invoice,
    ledger: Mapping[str, Mapping[str, Any]],
    redis: Mapping[str, Mapping[str, Any]] | None,
) -> list[str]:
    """Every difference, as one readable sentence each (empty: all agree).

    ``ledger`` and ``redis``: customer → totals with the COMPARED fields;
    ``redis`` None skips that side. Lines leave refused-only rows out, so
    ``events`` is compared between the ledger and Redis only.
    """
    problems: list[str] = []
    for line in invoice.lines():
        where = f"{line.customer} / {line.model or '(no model)'} / {line.price_version}"
        if line.unit_prices is None:
            problems.append(f"{where}: price version {line.price_version!r} is not in the config's price table")
        elif line.amount != line.ledger_cost:
            problems.append(
                f"{where}: priced from the table {exact(line.amount)} but the ledger recorded {exact(line.ledger_cost)}"
            )
    ledger_view = {c: {n: _canonical(n, t.get(n)) for n in COMPARED} for c, t in ledger.items()}
    sides: dict[str, tuple[dict[str, dict[str, str]], tuple[str, ...]]] = {
        "lines": (ledger_sides(invoice), tuple(n for n in COMPARED if n != "events"))
    }
    if redis is not None:
        sides["redis"] = ({c: {n: _canonical(n, t.get(n)) for n in COMPARED} for c, t in redis.items()}, COMPARED)
    zero = {n: _canonical(n, 0) for n in COMPARED}
    for customer in sorted(set(ledger_view).union(*(totals for totals, _ in sides.values()))):
        want = ledger_view.get(customer, zero)
        for side, (totals, names) in sides.items():
            if customer not in totals and any(want[n] != zero[n] for n in names):
                shown = ", ".join(f"{n} {want[n]}" for n in names if want[n] != zero[n])
                problems.append(f"{customer}: has no totals in {side}, but the ledger has {shown}")
                continue
            got = totals.get(customer, zero)
            for name in names:
                if got[name] != want[name]:
                    problems.append(f"{customer}: {name} is {want[name]} in the ledger but {got[name]} in {side}")
    return problems


def summary(invoice: Invoice, ledger: Mapping[str, Mapping[str, Any]], redis: Mapping[str, Mapping[str, Any]] | None) -> str:
    """One line of grand totals per side, for the operator."""
    def total(rows: Mapping[str, Mapping[str, Any]], name: str) -> str:
        if name == "cost_usd":
            return exact(sum((Decimal(str(r.get(name) or 0)) for r in rows.values()), Decimal(0)))
        return str(sum(int(r.get(name) or 0) for r in rows.values()))

    lines = ledger_sides(invoice)
    parts = [("ledger", ledger), ("lines", lines)] + ([("redis", redis)] if redis is not None else [])
    shown = ("requests", "input_tokens", "output_tokens", "cost_usd")
    return "\n".join(
        f"  {label:<7} customers={len(rows):<6} " + " ".join(f"{n}={total(rows, n)}" for n in shown)
        for label, rows in parts
    )
