"""The tables panels read, one constant per source, all with the same columns.

Usage panels read ``USAGE_*``: time, customer, tier, model, requests,
refused, input_tokens, output_tokens, cached_tokens, reasoning_tokens,
cost_usd, events. Moving a panel from the ledger to a rollup is the one line
``FROM {USAGE_LEDGER}`` → ``FROM {USAGE_HOURLY}`` (or ``USAGE_DAILY``) in
its definition.

The ledger is a ReplacingMergeTree keyed by (customer, id): until merges
have run a retried batch leaves duplicate rows, so every read is ``FINAL``.
"""

from __future__ import annotations

from pipeline.history.schema import EVENTS

# Every event, deduplicated, with ``model`` = the model served (else the one requested).
LEDGER = f"""(
    SELECT *, coalesce(model_served, model_requested, '') AS model
    FROM {EVENTS} FINAL
)"""

USAGE_LEDGER = f"""(
    SELECT time, customer, tier, coalesce(model_served, model_requested, '') AS model,
           toUInt64(decision = 'admitted') AS requests, toUInt64(decision != 'admitted') AS refused,
           input_tokens, output_tokens, cached_tokens, reasoning_tokens, cost_usd, toUInt64(1) AS events
    FROM {EVENTS} FINAL
)"""

# The pipeline's materialized-view rollups (not created yet: see the TODO in
# dashboards/catalog.py). Their rows are partial sums, so panels always sum().
USAGE_HOURLY = """(
    SELECT hour AS time, customer, tier, model, requests, refused, input_tokens, output_tokens,
           cached_tokens, reasoning_tokens, cost_usd, events
    FROM quotameter.usage_hourly
)"""

USAGE_DAILY = """(
    SELECT toDateTime(day, 'UTC') AS time, customer, tier, model, requests, refused, input_tokens, output_tokens,
           cached_tokens, reasoning_tokens, cost_usd, events
    FROM quotameter.usage_daily
)"""

# The template-variable filter every panel applies ("All" drops the condition).
FILTERS = """$__conditionalAll(customer IN (${customer}), $customer)
  AND $__conditionalAll(tier IN (${tier}), $tier)
  AND $__conditionalAll(model IN (${model}), $model)"""

# The billing month holding the end of the time range, in the billing time zone.
MONTH_START = "toDateTime(toStartOfMonth($__toTime, ${billing_tz}), ${billing_tz})"
