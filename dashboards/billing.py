"""Billing: spend in the range per customer and per model, over time, the
billing period to date against budget, a forecast to the period end, top
customers.

Money stays exact in SQL: spend is ``sum(cost_usd)``, a Decimal(38, 12), and
percentages of a budget are Decimal too (never rounded in SQL: a customer at
0.0045 % of its budget must not read 0). Only the renderers round, for display.
"""

from __future__ import annotations

from dashboards import fields as f
from dashboards.filters import TAG_PAIRS
from dashboards.model import Dashboard, Field, Panel, Unit, Viz
from dashboards.sources import PERIOD_END, PERIOD_START, ledger, usage

# The range's usage (stats, tables), the same per point of a timeseries, the billing period to date.
RANGE = usage()
SERIES = usage(step="$__interval_s")
MONTH_TO_DATE = usage(PERIOD_START, "$__toTime")

# USD, exact (Decimal(38, 12)).
SPEND = "sum(cost_usd)"

# Customers drawn per chart at most (the rest are summed as OTHERS).
TOP_SERIES = 10
# In parentheses, as no customer id is likely to be.
OTHERS = "(all others)"

# A customer's budget: its own override, else its tier's (NULL: no budget).
BUDGET = """toDecimal128OrNull(if(mapContains(${customer_budget_usd}, customer),
                                  ${customer_budget_usd}[customer], ${tier_budget_usd}[current_tier]), 12)"""


def percent_of(part: str, whole: str) -> str:
    """``part`` as a percentage of ``whole``, exact to 12 decimals; NULL without a (non-zero) whole."""
    return f"100 * {part} / nullIf({whole}, 0)"


# The top customers by spend in the range, else OTHERS.
CUSTOMER_SERIES = f"""if(customer IN (SELECT customer FROM {RANGE}
                       GROUP BY customer ORDER BY {SPEND} DESC, customer LIMIT {TOP_SERIES}),
          customer, '{OTHERS}')"""
CUSTOMER_OR_OTHER = Field("customer_series", "Customer", Unit.TEXT)
FORECAST_SPEND = Field("forecast_usd", "Forecast for the period", Unit.USD)
FORECAST_BUDGET = Field("forecast_budget_pct", "Forecast against budget", Unit.PERCENT)

TOTAL_SPEND = Panel(
    id=1,
    key="total_spend",
    title="Spend in range",
    viz=Viz.STAT,
    unit="currencyUSD",
    values=("spend_usd",),
    fields=(f.SPEND,),
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
    fields=(f.REQUESTS, f.REFUSED),
    width=6,
    height=5,
    sql=f"""SELECT sum(requests) AS requests, sum(refused) AS refused
FROM {RANGE}""",
)

SPEND_PER_CUSTOMER = Panel(
    id=3,
    key="spend_per_customer",
    title="Spend per customer",
    viz=Viz.BAR,
    unit="currencyUSD",
    x="customer_series",
    values=("spend_usd",),
    fields=(CUSTOMER_OR_OTHER, f.SPEND),
    description=f"The {TOP_SERIES} customers with the highest spend in the range; the rest summed as '{OTHERS}'.",
    sql=f"""SELECT {CUSTOMER_SERIES} AS customer_series, {SPEND} AS spend_usd
FROM {RANGE}
GROUP BY customer_series
ORDER BY customer_series = '{OTHERS}', spend_usd DESC, customer_series""",
)

SPEND_PER_MODEL = Panel(
    id=4,
    key="spend_per_model",
    title="Spend per model",
    viz=Viz.BAR,
    unit="currencyUSD",
    x="model",
    values=("spend_usd",),
    fields=(f.MODEL, f.SPEND),
    sql=f"""SELECT model, {SPEND} AS spend_usd
FROM {RANGE}
WHERE model != ''
GROUP BY model
ORDER BY spend_usd DESC, model""",
)

MTD_VS_BUDGET = Panel(
    id=5,
    key="mtd_vs_budget",
    title="Period to date against budget",
    description="The billing period holding the end of the time range (billing.anchor_day, billing.timezone), up to that end.",
    viz=Viz.TABLE,
    unit="currencyUSD",
    fields=(f.CUSTOMER, f.CURRENT_TIER, f.PERIOD_SPEND, f.BUDGET, f.BUDGET_USED),
    sql=f"""SELECT customer, argMax(tier, time) AS current_tier, {SPEND} AS mtd_spend_usd,
       {BUDGET} AS budget_usd,
       {percent_of("mtd_spend_usd", "budget_usd")} AS budget_used_pct
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
    fields=(f.CUSTOMER, f.CURRENT_TIER, f.PERIOD_SPEND, FORECAST_SPEND, f.BUDGET, FORECAST_BUDGET),
    sql=f"""WITH {PERIOD_START} AS period_start,
     dateDiff('second', period_start, {PERIOD_END}) AS period_s,
     greatest(dateDiff('second', period_start, $__toTime), 1) AS elapsed_s
SELECT customer, argMax(tier, time) AS current_tier, {SPEND} AS mtd_spend_usd,
       mtd_spend_usd * period_s / elapsed_s AS forecast_usd,
       {BUDGET} AS budget_usd,
       {percent_of("forecast_usd", "budget_usd")} AS forecast_budget_pct
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
    fields=(f.CUSTOMER, f.CURRENT_TIER, f.REQUESTS, f.REFUSED, f.INPUT_TOKENS, f.OUTPUT_TOKENS, f.SPEND),
    sql=f"""SELECT customer, argMax(tier, time) AS current_tier, sum(requests) AS requests, sum(refused) AS refused,
       sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens, {SPEND} AS spend_usd
FROM {RANGE}
GROUP BY customer
ORDER BY spend_usd DESC, customer
LIMIT 10""",
)

SPEND_OVER_TIME = Panel(
    id=8,
    key="spend_over_time",
    title="Spend over time per customer",
    viz=Viz.TIMESERIES,
    unit="currencyUSD",
    series="customer_series",
    x="t",
    values=("spend_usd",),
    fields=(f.TIME, CUSTOMER_OR_OTHER, f.SPEND),
    width=24,
    description=f"Spend per interval; the {TOP_SERIES} customers with the highest spend in the range, the rest as '{OTHERS}'.",
    sql=f"""SELECT $__timeInterval(time) AS t, {CUSTOMER_SERIES} AS customer_series, {SPEND} AS spend_usd
FROM {SERIES}
GROUP BY t, customer_series
ORDER BY t, customer_series""",
)

# Spend by who it was for (the request's attribution): read from the ledger,
# deduplicated, as the rollups do not keep these columns. Answered requests only,
# as billed; "(none)" where a request named no end user or project.
ANSWERED = ledger("decision = 'admitted'", final=True)

SPEND_BY_ATTRIBUTION = Panel(
    id=9,
    key="spend_by_attribution",
    title="Spend by API key, end user and project",
    viz=Viz.TABLE,
    unit="currencyUSD",
    fields=(f.CUSTOMER, f.API_KEY, f.END_USER, f.PROJECT, f.REQUESTS, f.INPUT_TOKENS, f.OUTPUT_TOKENS, f.SPEND),
    width=16,
    description="The 20 highest-spending combinations in the range, from the ledger.",
    sql=f"""SELECT customer, api_key_id, if(end_user = '', '(none)', end_user) AS end_user,
       if(project = '', '(none)', project) AS project, count() AS requests,
       sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens, {SPEND} AS spend_usd
FROM {ANSWERED}
GROUP BY customer, api_key_id, end_user, project
ORDER BY spend_usd DESC, customer, api_key_id, end_user, project
LIMIT 20""",
)

SPEND_PER_TAG = Panel(
    id=10,
    key="spend_per_tag",
    title="Spend per tag",
    viz=Viz.BAR,
    unit="currencyUSD",
    x="tag",
    values=("spend_usd",),
    fields=(f.TAG, f.SPEND),
    width=8,
    description="A request with several tags counts under each of them: the bars may add up to more than the spend.",
    sql=f"""SELECT arrayJoin({TAG_PAIRS}) AS tag, {SPEND} AS spend_usd
FROM {ANSWERED}
GROUP BY tag
ORDER BY spend_usd DESC, tag
LIMIT 20""",
)

BILLING = Dashboard(
    uid="quotameter-billing",
    title="quotameter · Billing",
    description="Spend from the usage ledger: per customer and model, billing period to date, forecast.",
    time_from="now/M",
    panels=(TOTAL_SPEND, TOTAL_REQUESTS, SPEND_PER_CUSTOMER, SPEND_PER_MODEL, MTD_VS_BUDGET, FORECAST, TOP_CUSTOMERS,
            SPEND_OVER_TIME, SPEND_BY_ATTRIBUTION, SPEND_PER_TAG),
)
