"""Stripe meter events from windowed ledger sums. Pure: ``now`` is passed in.

One event per customer, meter (a ``billing.stripe.meters`` entry, maybe per
model) and window (an hour or a day in the billing time zone), as a JSON
line shaped like the body of ``POST /v1/billing/meter_events``:

    {"event_name": …, "identifier": …, "payload": {"stripe_customer_id": …,
     "value": "<whole number>", "model": …}, "timestamp": <unix s>}

What Stripe accepts, and what this does about it:
- ``value`` must be a whole number: only token and request counts are
  exported (never money, which would need rounding per window).
- ``identifier`` (at most 100 characters) is derived from the customer, the
  meter, the model and the window, so a re-export of the same ledger gives
  the same identifiers, and Stripe refuses the repeats it still remembers
  (it enforces uniqueness over a rolling period of at least 24 hours).
  Re-sending a file after that window, or exporting one month with both
  window sizes, would bill twice: send each final month once.
- ``timestamp`` (the window's start) must lie within the past 35 days and
  at most 5 minutes ahead. Events outside that are refused before anything is
  written, naming the oldest window still accepted; ``--force`` writes them
  anyway (Stripe will reject those lines).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from quotameter.billing import BILLED_COLUMNS, Component

MAX_AGE = timedelta(days=35)
MAX_AHEAD = timedelta(minutes=5)
# Room to send the file after it is written before its oldest line ages out.
SEND_MARGIN = timedelta(hours=1)
SEND_MARGIN_TEXT = "1 hour"
MAX_IDENTIFIER = 100
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


class Window(StrEnum):
    HOUR = "hour"
    DAY = "day"


REQUESTS = "requests"
QUANTITIES = (REQUESTS, *(c.value for c in Component))  # what a meter may count


@dataclass(frozen=True, slots=True)
class MeterEvent:
    customer: str  # quotameter's id
    event_name: str
    identifier: str
    stripe_customer_id: str
    model: str
    quantity: str
    value: int
    timestamp: int

    def to_json(self) -> str:
        body = {
            "event_name": self.event_name,
            "identifier": self.identifier,
            "payload": {"model": self.model, "stripe_customer_id": self.stripe_customer_id, "value": str(self.value)},
            "timestamp": self.timestamp,
        }
        return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def event_name(template: str, model: str) -> str:
    """A meter's event name; ``{model}`` is replaced by the model, made safe."""
    return template.replace("{model}", _UNSAFE.sub("_", model) or "none")


def identifier(customer: str, name: str, model: str, window: Window, start_s: int) -> str:
    digest = hashlib.sha256("\x1f".join(("qm1", customer, name, model, window.value, str(start_s))).encode()).hexdigest()
    stamp = datetime.fromtimestamp(start_s, UTC).strftime("%Y%m%dT%H%M")
    return f"qm-{stamp}-{digest[:40]}"


class MissingStripeCustomer(ValueError):
    pass


def meter_events(
    rows: Iterable[Mapping[str, Any]],
    meters: Mapping[str, str],
    stripe_customers: Mapping[str, str],
    window: Window,
) -> list[MeterEvent]:
    """Rows of ``export_sql.windows`` (customer, model, window_s, requests and
    the billed columns) → events with a value > 0, sorted.

    Raises MissingStripeCustomer listing every customer without a mapping.
    """
    events: list[MeterEvent] = []
    missing: set[str] = set()
    for row in rows:
        customer, model, start_s = str(row["customer"]), str(row["model"]), int(row["window_s"])
        for quantity, template in meters.items():
            column = REQUESTS if quantity == REQUESTS else BILLED_COLUMNS[Component(quantity)]
            value = int(row[column])
            if value <= 0:
                continue
            stripe_id = stripe_customers.get(customer)
            if stripe_id is None:
                missing.add(customer)
                continue
            name = event_name(template, model)
            events.append(
                MeterEvent(customer, name, identifier(customer, name, model, window, start_s), stripe_id, model, quantity, value, start_s)
            )
    if missing:
        raise MissingStripeCustomer(
            f"no Stripe customer for {', '.join(sorted(missing))}: map each under billing.stripe.customers "
            "(quotameter customer id: Stripe customer id, e.g. cus_…)"
        )
    events.sort(key=lambda e: (e.customer, e.timestamp, e.event_name, e.model))
    return events


def out_of_range(events: Iterable[MeterEvent], now: datetime) -> tuple[list[MeterEvent], datetime, datetime]:
    """The events Stripe would refuse if sent within SEND_MARGIN of ``now``,
    with the oldest and newest timestamps it accepts."""
    oldest = now - MAX_AGE + SEND_MARGIN
    newest = now + MAX_AHEAD
    bad = [e for e in events if not oldest.timestamp() <= e.timestamp <= newest.timestamp()]
    return bad, oldest, newest


def render_jsonl(events: Iterable[MeterEvent]) -> str:
    return "".join(event.to_json() + "\n" for event in events)


def totals(events: Iterable[MeterEvent]) -> dict[tuple[str, str], int]:
    """(customer, quantity) → the sum of the values (to reconcile with the lines)."""
    out: dict[tuple[str, str], int] = {}
    for event in events:
        key = (event.customer, event.quantity)
        out[key] = out.get(key, 0) + event.value
    return out
