"""Billing: spend per customer and per model over time, billing period to date
against budget, a forecast to the period end, top customers."""

from __future__ import annotations

from dashboards.model import Dashboard, Panel, Viz
from dashboards.sources import PERIOD_END, PERIOD_START, usage

# The range's usage (stats, tables), the same per point of a timeseries, the billing period to date.
RANGE = usage()
SERIES = usage(step="$__interval_s")
MONTH_TO_DATE = usage(PERIOD_START, "$__toTime")

# USD to six places (a micro-dollar) for charts; the billing export keeps exact decimals.
SPEND = "round(toFloat64(sum(cost_usd)), 6)"

# Series drawn per chart at most (the rest are summed as "other").
TOP_SERIES = 10

# A customer's budget: its own override, else its tier's (NULL: no budget).
BUDGET = """toFloat64OrNull(if(mapContains(${customer_budget_usd}, customer),
                               ${customer_budget_usd}[customer], ${tier_budget_usd}[current_tier]))"""

TOTAL_SPEND = Panel(
    id=1,
    key="total_spend",
    title="Spend in range",
    viz=Viz.STAT,
    unit="currencyUSD",
    values=("spend_usd",),
    width=6,
    height=5,
    sql=f"""SELECT {SPEND} AS spend_usd
FROM {RANGE}""",
)

TOTAL_REQUESTS = Panel(
    id=2,
    key="total_requests",
    title="Requests in range",
    viz=Viz.STAT,
    unit="short",
    values=("requests", "refused"),
    width=6,
    height=5,
    sql=f"""SELECT sum(requests) AS requests, sum(refused) AS refused
FROM {RANGE}""",
)

SPEND_PER_CUSTOMER = Panel(
    id=3,
    key="spend_per_customer",
    title="Spend per customer",
    viz=Viz.TIMESERIES,
    unit="currencyUSD",
    series="customer_series",
    x="t",
    values=("spend_usd",),
    description=f"The {TOP_SERIES} customers with the highest spend in the range; the rest summed as 'other'.",
    sql=f"""SELECT $__timeInterval(time) AS t,
       if(customer IN (SELECT customer FROM {RANGE}
                       GROUP BY customer ORDER BY sum(cost_usd) DESC, customer LIMIT {TOP_SERIES}),
          customer, 'other') AS customer_series,
       {SPEND} AS spend_usd
FROM {SERIES}
GROUP BY t, customer_series
ORDER BY t, customer_series""",
)

SPEND_PER_MODEL = Panel(
    id=4,
    key="spend_per_model",
    title="Spend per model",
    viz=Viz.TIMESERIES,
    unit="currencyUSD",
    series="model",
    x="t",
    values=("spend_usd",),
    sql=f"""SELECT $__timeInterval(time) AS t, model, {SPEND} AS spend_usd
FROM {SERIES}
GROUP BY t, model
ORDER BY t, model""",
)

MTD_VS_BUDGET = Panel(
    id=5,
    key="mtd_vs_budget",
    title="Period to date against budget",
    description="The billing period holding the end of the time range (billing.anchor_day, billing.timezone), up to that end.",
    viz=Viz.TABLE,
    unit="currencyUSD",
    sql=f"""SELECT customer, argMax(tier, time) AS current_tier, {SPEND} AS mtd_spend_usd,
       {BUDGET} AS budget_usd,
       round(100 * mtd_spend_usd / budget_usd, 2) AS budget_used_pct
FROM {MONTH_TO_DATE}
GROUP BY customer
ORDER BY mtd_spend_usd DESC, customer""",
)

FORECAST = Panel(
    id=6,
    key="forecast",
    title="Forecast to period end",
    description="Period-to-date spend extrapolated linearly over the whole billing period.",
    viz=Viz.TABLE,
    unit="currencyUSD",
    sql=f"""WITH {PERIOD_START} AS period_start,
     dateDiff('second', period_start, {PERIOD_END}) AS period_s,
     greatest(dateDiff('second', period_start, $__toTime), 1) AS elapsed_s
SELECT customer, argMax(tier, time) AS current_tier, {SPEND} AS mtd_spend_usd,
       round(mtd_spend_usd * period_s / elapsed_s, 6) AS forecast_usd,
       {BUDGET} AS budget_usd,
       round(100 * forecast_usd / budget_usd, 2) AS forecast_budget_pct
FROM {MONTH_TO_DATE}
GROUP BY customer
ORDER BY forecast_usd DESC, customer""",
)

TOP_CUSTOMERS = Panel(
    id=7,
    key="top_customers",
    title="Top customers by spend",
    viz=Viz.TABLE,
    unit="currencyUSD",
    sql=f"""SELECT customer, argMax(tier, time) AS current_tier, sum(requests) AS requests, sum(refused) AS refused,
       sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens, {SPEND} AS spend_usd
FROM {RANGE}
GROUP BY customer
ORDER BY spend_usd DESC, customer
LIMIT 10""",
)

BILLING = Dashboard(
    uid="quotameter-billing",
    title="quotameter · Billing",
    description="Spend from the usage ledger: per customer and model, billing period to date, forecast.",
    time_from="now/M",
    panels=(TOTAL_SPEND, TOTAL_REQUESTS, SPEND_PER_CUSTOMER, SPEND_PER_MODEL, MTD_VS_BUDGET, FORECAST, TOP_CUSTOMERS),
)
