"""The billing export's queries over the raw ledger (``quotameter.events``).

Every sum reads ``FINAL``: the table is a ReplacingMergeTree by
(customer, id), so a retried batch or a redelivered event counts once even
before a merge. Nothing here reads the rollups: they are for dashboards, the
invoice comes from the unique events themselves.

The billed quantities clamp each event the way ``quotameter.pricing`` does
(cached ≤ input, cache writes ≤ what is left, reasoning ≤ output), so the
lines price to exactly the costs the pipeline recorded.

Results are read a page at a time (the history store returns at most 10 000
rows per query), ordered by the grouping key so pages never overlap.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from quotameter.billing import BILLED_COLUMNS, Component
from quotameter.labels import TAG_KEY
from quotameter.periods import BillingCalendar

EVENTS = "quotameter.events"
PAGE_ROWS = 10_000

# Sums are taken over a subquery with short column names, so no output alias
# (input_tokens, …) ever shadows the column it sums.
_CACHED = "least(ca, it)"
_CACHE_WRITE = f"least(cw, it - {_CACHED})"
_REASONING = "least(rt, ot)"
_BILLED = {
    Component.INPUT: f"it - {_CACHED} - {_CACHE_WRITE}",
    Component.CACHED_INPUT: _CACHED,
    Component.CACHE_WRITE: _CACHE_WRITE,
    Component.OUTPUT: f"ot - {_REASONING}",
    Component.REASONING: _REASONING,
}
_BILLED_SUMS = ",\n    ".join(f"sum({expr}) AS {BILLED_COLUMNS[c]}" for c, expr in _BILLED.items())


def quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _time(moment: datetime) -> str:
    stamp = moment.strftime("%Y-%m-%d %H:%M:%S.") + f"{moment.microsecond // 1000:03d}"
    return f"toDateTime64({quote(stamp)}, 3, 'UTC')"


def _in_period(start: datetime, end: datetime) -> str:
    return f"time >= {_time(start)} AND time < {_time(end)}"


# --by: the ledger column of each breakdown dimension ('' where none was given).
BREAKDOWNS = {"api_key": "api_key_id", "user": "end_user", "project": "project"}


def breakdown(names: str) -> tuple[str, ...]:
    """``api_key,user,tag:team`` checked, or ValueError naming the bad one."""
    by = tuple(name.strip() for name in names.split(",") if name.strip())
    for name in by:
        if name not in BREAKDOWNS and not (name.startswith("tag:") and TAG_KEY.fullmatch(name[4:])):
            raise ValueError(f"cannot break down by {name[:80]!r}: use api_key, user, project or tag:KEY")
    if len(set(by)) != len(by):
        raise ValueError("a breakdown dimension is given twice")
    return by


def _breakdown_columns(by: Sequence[str]) -> str:
    # A tag key passed breakdown()'s check (letters, digits, _ . -) and is quoted besides.
    return "".join(
        f", {BREAKDOWNS[name] if name in BREAKDOWNS else f'tags[{quote(name[4:])}]'} AS by_{n}" for n, name in enumerate(by)
    )


def _events(start: datetime, end: datetime, where: str = "", by: Sequence[str] = ()) -> str:
    """The period's unique events (its UTC bounds, whatever the partitions),
    columns renamed for summing."""
    return f"""(SELECT customer, coalesce(model_served, model_requested, '') AS model, price_version{_breakdown_columns(by)},
        decision = 'admitted' AS ok, time AS t, input_tokens AS it, output_tokens AS ot, cached_tokens AS ca,
        cache_write_tokens AS cw, reasoning_tokens AS rt, cost_usd AS cost
    FROM {EVENTS} FINAL
    WHERE {_in_period(start, end)}{where})"""


def lines(start: datetime, end: datetime, limit: int = PAGE_ROWS, offset: int = 0, by: Sequence[str] = ()) -> str:
    """Invoice lines: one row per customer, model and price version (and ``by``'s values)."""
    keys = "customer, model, price_version" + "".join(f", by_{n}" for n in range(len(by)))
    return f"""SELECT {keys},
    countIf(ok) AS requests,
    countIf(NOT ok) AS refused,
    count() AS events,
    sum(it) AS input_tokens,
    sum(ot) AS output_tokens,
    sum(ca) AS cached_tokens,
    sum(cw) AS cache_write_tokens,
    sum(rt) AS reasoning_tokens,
    {_BILLED_SUMS},
    toString(sum(cost)) AS cost_usd
FROM {_events(start, end, by=by)}
GROUP BY {keys}
ORDER BY {keys}
LIMIT {int(limit)} OFFSET {int(offset)}"""


def customer_totals(start: datetime, end: datetime, limit: int = PAGE_ROWS, offset: int = 0) -> str:
    """Each customer's totals over the month, grouped by customer alone: the
    ledger side of the reconciliation."""
    return f"""SELECT customer,
    countIf(ok) AS requests,
    count() AS events,
    sum(it) AS input_tokens,
    sum(ot) AS output_tokens,
    sum(ca) AS cached_tokens,
    sum(rt) AS reasoning_tokens,
    toString(sum(cost)) AS cost_usd
FROM {_events(start, end)}
GROUP BY customer
ORDER BY customer
LIMIT {int(limit)} OFFSET {int(offset)}"""


def windows(start: datetime, end: datetime, customers: Sequence[str], window: str, calendar: BillingCalendar) -> str:
    """Admitted usage per customer, model and window (its start in unix
    seconds; hours and days in the billing time zone, so a day window never
    straddles a period's start at local midnight) for some customers."""
    bucket = {"hour": "toStartOfHour", "day": "toStartOfDay"}[window]
    only = f" AND customer IN ({', '.join(map(quote, customers))})"
    return f"""SELECT customer, model,
    toUnixTimestamp({bucket}(t, {quote(calendar.timezone)})) AS window_s,
    countIf(ok) AS requests,
    {_BILLED_SUMS}
FROM {_events(start, end, only)}
GROUP BY customer, model, window_s
ORDER BY customer, model, window_s"""
