"""Restoring Redis's period totals from the ledger (``quotameter rebuild-state``,
and the worker on start).

The ledger's totals are written through the same script as the worker's
batches: a (customer, period) missing from Redis, or behind the ledger, gets
the ledger's totals; one ahead of it (the worker wrote a batch the ledger
has not received yet) is left alone unless ``force`` is given. Nothing is
added to anything, so running it twice, or while events flow, never double
counts.
"""

from __future__ import annotations

from datetime import UTC, datetime

from pipeline.history import schema
from pipeline.history.store import AsyncHistory
from pipeline.redis_writer import UsageWriter
from pipeline.window_tables import _totals_of
from quotameter.aggregate import Totals
from quotameter.periods import BillingCalendar

PAGE = 5000


async def rebuild_state(
    history: AsyncHistory,
    writer: UsageWriter,
    calendar: BillingCalendar,
    customer: str | None = None,
    period: str | None = None,
    force: bool = False,
) -> dict[str, int]:
    """Write the ledger's totals of ``period`` (default: the current one) for
    ``customer`` (default: every customer in it). Returns counts."""
    period = period or calendar.current(datetime.now(UTC))
    start, end = calendar.bounds(period)
    written = 0
    offset = 0
    while True:
        rows = await history.query(schema.period_totals(start, end, customer, PAGE, offset))
        totals: dict[tuple[str, str], Totals] = {(row["customer"], period): _totals_of(row) for row in rows}
        if totals:
            if not await writer.write(totals, force=force):
                raise ConnectionError(f"Redis did not take the rebuilt totals ({writer.pending} keys pending)")
            written += len(totals)
        if len(rows) < PAGE:
            break
        offset += PAGE
    return {"customers": written}
