"""The tables panels read, and what each promises.

Usage panels (spend, requests, tokens) read ``usage(start, end)``: rows with
the columns time, customer, tier, model, requests, refused, input_tokens,
output_tokens, cached_tokens, reasoning_tokens, cost_usd, events, for the
events with ``start <= time <= end``, already filtered by the template
variables. The range is stitched together from three sources, so its totals
are those of the ledger rows in the range to the millisecond, whatever the
range's ends:

- whole UTC days inside the range from the ``usage_daily`` rollup;
- the whole hours left from the ``usage_hourly`` rollup;
- the partial hours at the ends (at most two) from the ledger.

A timeseries passes ``step="$__interval_s"``: a rollup is then used only
when the interval is a whole number of its buckets (an hour bucket never
straddles two points), so a short range with minute points reads the ledger.
Rows are partial sums: panels always ``sum()``.

Exactness: the rollups are materialized views summing every row inserted
into the ledger, and the ledger part of ``usage()`` reads without ``FINAL``
to count the same way (``FINAL`` there would cost ~100 ms at 10 million
events a month, for nothing the pipeline writes). Both are exact because the
pipeline inserts an event id only when the ledger does not hold it yet (and
``rollup_rebuild`` repairs a rollup a killed worker left short). A row
inserted twice anyway would be counted twice: in the rollups until
``rollup_rebuild`` recomputes its month from the deduplicated ledger, in a
partial hour until a merge collapses the copies.

Panels that need the ledger's other columns (``reason``, ``status``,
latency, ``ingested_at``) read ``ledger(condition, final=…)``, which filters
in ``PREWHERE`` — time range, the panel's condition and the template
variables — so only the matching rows are read (and, with ``final``,
deduplicated). Filtering before ``FINAL`` is exact here because every copy
of an event id carries the same event (time, customer, reason, …): a copy
passes a filter exactly when the original does. ``final=True`` is for
counts (refusals, fallbacks, queueing, upstream errors: a batch stored twice
never doubles them); percentiles (latency, ttft, lag) read without it: a
copy adds one equal value, which moves a quantile by at most a rank per copy
among an interval's thousands of rows, and deduplicating every admitted
request of a month would cost more than the whole panel does.
"""

from __future__ import annotations

from dashboards.filters import MODEL, ledger_filters, ledger_only_selected, rollup_filters
from pipeline.history.schema import DATABASE, EVENTS

# The template-variable filters every panel applies ("All" drops a condition).
FILTERS = rollup_filters()
LEDGER_FILTERS = ledger_filters()
# A filter the rollups cannot apply (an API key…) is selected: usage() reads the ledger alone.
LEDGER_ONLY = ledger_only_selected()


# The billing period holding the end of the time range, as
# ``quotameter.periods.BillingCalendar`` has it (the tests compare the two): it
# starts on ${billing_anchor_day} (a short month's last day if that is
# earlier) at midnight in ${billing_tz}, and ends where the next one starts.
def _anchor_day_of(month: str) -> str:
    """The period's first local day (a Date) of the month beginning on ``month`` (a Date)."""
    last_day = f"toDayOfMonth(subtractDays(addMonths({month}, 1), 1))"
    return f"addDays({month}, least(${{billing_anchor_day}}, {last_day}) - 1)"


_LOCAL_MONTH = "toStartOfMonth($__toTime, ${billing_tz})"
_PERIOD_FIRST_DAY = (
    f"if(toDate($__toTime, ${{billing_tz}}) >= {_anchor_day_of(_LOCAL_MONTH)}, "
    f"{_anchor_day_of(_LOCAL_MONTH)}, {_anchor_day_of(f'addMonths({_LOCAL_MONTH}, -1)')})"
)
# As DateTimes at local midnight: a period's UTC bounds need not be whole UTC
# days or even hours (Asia/Kolkata +5:30); usage() reads what the rollups
# cannot cover from the ledger, so totals over [PERIOD_START, …] stay exact.
PERIOD_START = f"toDateTime({_PERIOD_FIRST_DAY}, ${{billing_tz}})"
PERIOD_END = f"toDateTime({_anchor_day_of(f'addMonths(toStartOfMonth({_PERIOD_FIRST_DAY}), 1)')}, ${{billing_tz}})"

_USAGE_COLUMNS = ("customer, tier, model, requests, refused, input_tokens, output_tokens, cached_tokens, "
                  "reasoning_tokens, cost_usd, events")


def usage(start: str = "$__fromTime", end: str = "$__toTime", *, step: str | None = None,
          filters: bool = True) -> str:
    """Usage rows of the events with ``start <= time <= end`` (whole-second DateTime
    expressions): daily and hourly rollups for the whole buckets, the ledger for
    the rest. ``step``: the points' interval in seconds (a timeseries);
    ``filters=False`` leaves the template variables out (a variable's own query).
    While a filter the rollups lack is selected, the rollups and the partial
    hours read nothing, and the whole range is read from the ledger, ``FINAL``
    (a retried batch must not count twice there: no rebuilt rollup stands in)."""
    where = f" AND {FILTERS}" if filters else ""
    ledger_where = f" AND {LEDGER_FILTERS}" if filters else ""
    hourly_ok = f" AND {step} % 3600 = 0" if step else ""
    daily_ok = f" AND {step} % 86400 = 0" if step else ""
    # Whole hours [hour_from, hour_to) and whole days [day_from, day_to) inside [start, end].
    hour_from, hour_to = f"toStartOfHour({start} + 3599, 'UTC')", f"toStartOfHour({end}, 'UTC')"
    day_from, day_to = f"toStartOfDay({start} + 86399, 'UTC')", f"toStartOfDay({end}, 'UTC')"
    in_hours = f"time >= {hour_from} AND time < {hour_to}{hourly_ok}"
    ledger_rows = f"""SELECT time, customer, tier, {MODEL} AS model,
           toUInt64(decision = 'admitted') AS requests, toUInt64(decision != 'admitted') AS refused,
           input_tokens, output_tokens, cached_tokens, reasoning_tokens, cost_usd, toUInt64(1) AS events"""
    # Constant-false when no such filter is selected: the engine reads no part for it.
    whole_range = f"""
    UNION ALL
    {ledger_rows}
    FROM {EVENTS} FINAL
    PREWHERE time >= {start} AND time <= {end} AND ({LEDGER_ONLY}){ledger_where}""" if filters else ""
    partial_hours = f"NOT ({in_hours}) AND NOT ({LEDGER_ONLY})" if filters else f"NOT ({in_hours})"
    return f"""(
    SELECT toDateTime64(day, 3, 'UTC') AS time, {_USAGE_COLUMNS}
    FROM {DATABASE}.usage_daily_store
    WHERE day >= toDate({day_from}, 'UTC') AND day < toDate({day_to}, 'UTC'){daily_ok}{where}
    UNION ALL
    SELECT toDateTime64(hour, 3, 'UTC') AS time, {_USAGE_COLUMNS}
    FROM {DATABASE}.usage_hourly_store
    WHERE hour >= {hour_from} AND hour < {hour_to}{hourly_ok}
      AND NOT (hour >= {day_from} AND hour < {day_to}{daily_ok}){where}
    UNION ALL
    {ledger_rows}
    FROM {EVENTS}
    PREWHERE time >= {start} AND time <= {end} AND {partial_hours}{ledger_where}{whole_range}
)"""


def ledger(condition: str = "1", *, final: bool) -> str:
    """The ledger's rows in the time range matching ``condition`` (on the ledger's
    columns) and the template variables, with ``model``; ``final``: deduplicated
    by event id."""
    return f"""(
    SELECT *, {MODEL} AS model
    FROM {EVENTS}{" FINAL" if final else ""}
    PREWHERE $__timeFilter(time) AND ({condition})
      AND {LEDGER_FILTERS}
)"""


# The usage of every event in the range straight from the deduplicated ledger:
# what usage() must equal (the tests and the benchmark compare against it).
USAGE_LEDGER = f"""(
    SELECT time, customer, tier, {MODEL} AS model, api_key_id,
           toUInt64(decision = 'admitted') AS requests, toUInt64(decision != 'admitted') AS refused,
           input_tokens, output_tokens, cached_tokens, reasoning_tokens, cost_usd, toUInt64(1) AS events
    FROM {EVENTS} FINAL
)"""
