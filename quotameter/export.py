"""``quotameter export``: the I/O edge of the billing export.

Reads the month's aggregates from the ledger (through the running worker's
read-only ``POST /query``, else the store opened read-only), the pipeline's
period totals from Redis, then builds, reconciles and renders with the pure
modules (``billing``, ``reconcile``, ``stripe_meter``). Nothing is written
unless every check passes; the CLI writes the text it returns.

Errors, and the CLI's exit codes:

    ExportError              1  the ledger or Redis cannot be read, a mapping is missing
    ├── ExportRefused        3  an open period (--draft), or Stripe would refuse timestamps (--force)
    └── ReconciliationFailed 4  the ledger, the lines and Redis disagree (never forced)

Finality is judged against the wall clock by the CLI: there is no way to
tell it another time, so nothing but the calendar's period end plus the
grace makes an export final. ``run_export`` takes ``now`` so tests can.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pipeline.history.reader import LedgerReader, open_ledger
from pipeline.history.store import HistoryError
from quotameter import billing, export_sql, reconcile, stripe_meter
from quotameter.config import Config
from quotameter.errors import QuotameterError
from quotameter.redis_keys import RedisKeys

WORKER_TIMEOUT_S = 300.0
FORMATS = ("csv", "json", "stripe")
Row = dict[str, Any]
Progress = Callable[[str, int, int], None]  # (step, done, total)


class ExportError(QuotameterError):
    """The export could not be produced; the message says which source failed."""


class ExportRefused(ExportError):
    """The period is open, or Stripe would refuse some events. The message says
    until when; ``--draft`` exports an open period marked not final, and
    ``--force`` writes Stripe events outside Stripe's range."""


class ReconciliationFailed(ExportError):
    """The ledger, the invoice lines and Redis's totals differ. Nothing was
    written. If only Redis differs after the month closed, rebuild it from the
    ledger (``quotameter rebuild-state --month M``) and export again."""

    def __init__(self, problems: list[str], summary: str) -> None:
        shown = problems[:50] + ([f"… and {len(problems) - 50} more"] if len(problems) > 50 else [])
        super().__init__("reconciliation failed:\n" + "\n".join(f"  - {p}" for p in shown) + "\ntotals:\n" + summary)
        self.problems = problems


# -- reading the ledger -------------------------------------------------------


@contextmanager
def ledger(config: Config) -> Iterator[LedgerReader]:
    """The ledger through the worker, else opened read-only; its errors as ExportError."""
    try:
        with open_ledger(config, WORKER_TIMEOUT_S) as reader:
            yield reader
    except HistoryError as exc:
        raise ExportError(str(exc)) from None


def _paged(reader: LedgerReader, query: Callable[[int, int], str], step: str, progress: Progress) -> list[Row]:
    rows: list[Row] = []
    while True:
        page = reader.rows(query(export_sql.PAGE_ROWS, len(rows)))
        rows.extend(page)
        progress(step, len(rows), len(rows) + (1 if len(page) == export_sql.PAGE_ROWS else 0))
        if len(page) < export_sql.PAGE_ROWS:
            return rows


# -- reading Redis --------------------------------------------------------------


def redis_totals(config: Config, month: str) -> dict[str, dict[str, str]]:
    """customer → the pipeline's period totals in Redis, for every customer
    that has a usage hash for ``month``."""
    import redis

    from quotameter.redis_pool import sync_redis

    names = RedisKeys(config.services.redis_prefix)
    head, tail = f"{names.prefix}:usage:{{", f"}}:{month}"
    client = sync_redis(config.services, decode_responses=True)
    try:
        keys = sorted(k for k in client.scan_iter(match=names.usage_pattern(month), count=1000) if k.startswith(head) and k.endswith(tail))
        with client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.hgetall(key)
            hashes = pipe.execute()
    except redis.RedisError as exc:
        raise ExportError(f"cannot read the period totals from Redis at {config.services.redis_url}: {exc}") from None
    finally:
        client.close()
    return {key[len(head) : -len(tail)]: values for key, values in zip(keys, hashes, strict=True) if values}


# -- the export -----------------------------------------------------------------


@dataclass
class Export:
    text: str
    finality: reconcile.Finality
    source: str
    summary: str
    warnings: list[str] = field(default_factory=list)
    lines: int = 0
    customers: int = 0


def _window_batches(invoice: billing.Invoice, slots: int) -> Iterator[list[str]]:
    """Customers in groups whose windows fit one page (lines × windows)."""
    batch: list[str] = []
    weight = 0
    for customer in invoice.customers:
        cost = len({line.model for line in customer.lines}) * slots
        if batch and weight + cost > export_sql.PAGE_ROWS:
            yield batch
            batch, weight = [], 0
        batch.append(customer.customer)
        weight += cost
    if batch:
        yield batch


def _stripe(
    config: Config, reader: LedgerReader, invoice: billing.Invoice, fin: reconcile.Finality,
    window: stripe_meter.Window, progress: Progress,
) -> tuple[list[stripe_meter.MeterEvent], list[str]]:
    hours = (fin.end - fin.start).total_seconds() / 3600
    slots = math.ceil(hours) + 1 if window is stripe_meter.Window.HOUR else math.ceil(hours / 24) + 1
    rows: list[Row] = []
    batches = list(_window_batches(invoice, slots))
    for done, customers in enumerate(batches, 1):
        page = reader.rows(export_sql.windows(fin.start, fin.end, customers, window.value, config.billing.calendar))
        if len(page) >= export_sql.PAGE_ROWS:
            raise ExportError(
                f"{customers[0]} has more {window.value}ly windows than one query returns ({export_sql.PAGE_ROWS}): "
                "use --stripe-window day"
            )
        rows.extend(page)
        progress("stripe windows", done, len(batches))
    stripe = config.billing.stripe
    try:
        events = stripe_meter.meter_events(rows, stripe.meters, stripe.customers, window)
    except stripe_meter.MissingStripeCustomer as exc:
        raise ExportError(str(exc)) from None
    sums = stripe_meter.totals(events)
    problems = []
    for customer in invoice.customers:
        for quantity in stripe.meters:
            if quantity == stripe_meter.REQUESTS:
                want = customer.count("requests")
            else:
                want = sum(line.billed[billing.Component(quantity)] for line in customer.lines)
            got = sums.get((customer.customer, quantity), 0)
            if got != want:
                problems.append(f"{customer.customer}: {quantity} is {want} in the lines but {got} in the Stripe events")
    return events, problems


def run_export(
    config: Config,
    month: str,
    fmt: str,
    now: datetime,
    *,
    draft: bool = False,
    force: bool = False,
    window: str | None = None,
    by: tuple[str, ...] = (),
    progress: Progress = lambda step, done, total: None,
) -> Export:
    """Build, reconcile and render one period's export. ``now`` decides
    finality and Stripe's accepted range. ``draft``: an open period is
    exported marked not final (never as Stripe events, which are sent once).
    ``by``: lines also broken down by these (export_sql.breakdown), each
    priced and reconciled as any line; the customers' totals do not change."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if by and fmt == "stripe":
        raise ExportError("a breakdown (--by) exports as csv or json: Stripe meter events are per customer")
    if draft and fmt == "stripe":
        raise ExportRefused(
            "a draft cannot be exported as Stripe meter events: Stripe keeps what is sent and a later final "
            "export could not correct it. Export csv or json as a draft, and Stripe once the period is final."
        )
    try:
        fin = reconcile.finality(config, month, now)
    except ValueError as exc:
        raise ExportError(str(exc)) from None
    warnings = []
    if not fin.final:
        if not draft:
            raise ExportRefused(f"{fin.describe()}. Pass --draft to export it marked not final.")
        warnings.append(f"{fin.describe()}; exported as a draft (--draft): marked not final")
    with ledger(config) as reader:
        line_rows = _paged(reader, lambda n, o: export_sql.lines(fin.start, fin.end, n, o, by), "invoice lines", progress)
        invoice = billing.build_invoice(
            line_rows, billing.rate_table(config), month=month, currency=config.billing.currency,
            period_start=fin.start.isoformat(), period_end=fin.end.isoformat(), final=fin.final, by=by,
        )
        totals = _paged(reader, lambda n, o: export_sql.customer_totals(fin.start, fin.end, n, o), "ledger totals", progress)
        ledger_totals = {str(row["customer"]): row for row in totals}
        events: list[stripe_meter.MeterEvent] = []
        stripe_problems: list[str] = []
        if fmt == "stripe":
            chosen = stripe_meter.Window(window or config.billing.stripe.window)
            events, stripe_problems = _stripe(config, reader, invoice, fin, chosen, progress)
        source = reader.source
    progress("redis totals", 0, 1)
    redis_side = redis_totals(config, month)
    progress("redis totals", 1, 1)
    problems = reconcile.reconcile(invoice, ledger_totals, redis_side) + stripe_problems
    summary = reconcile.summary(invoice, ledger_totals, redis_side)
    if problems:
        raise ReconciliationFailed(problems, summary)
    if fmt == "stripe":
        bad, oldest, newest = stripe_meter.out_of_range(events, now)
        if bad:
            first = bad[0]
            message = (
                f"{len(bad)} of {len(events)} meter events have timestamps Stripe refuses (at most 35 days back, "
                f"5 minutes ahead; allowing {stripe_meter.SEND_MARGIN_TEXT} to send the file, the oldest timestamp "
                f"accepted is {oldest.replace(microsecond=0).isoformat()}); the first is {first.customer} / {first.event_name} at "
                f"{datetime.fromtimestamp(first.timestamp, fin.start.tzinfo).isoformat()}"
            )
            if not force:
                raise ExportRefused(message + ". Export a month within 35 days of its first window, or --force to write them anyway.")
            warnings.append(message + "; written anyway (--force): Stripe will reject those lines")
        text = stripe_meter.render_jsonl(events)
    elif fmt == "json":
        text = billing.render_json(invoice)
    else:
        text = billing.render_csv(invoice)
    lines = len(events) if fmt == "stripe" else sum(len(c.lines) for c in invoice.customers)
    return Export(text, fin, source, summary, warnings, lines, len(invoice.customers))
