"""Quotas: utilisation per customer and tier, refusals by tier and reason,
fallbacks, queued requests.

Utilisation is billing-period-to-date usage from the rollups (``sources.usage``).
Refusals, fallbacks and queueing are counted from the ledger's generic
``decision`` / ``reason`` columns, so a reason the shim adds later shows up
without a change here; those counts read ``FINAL`` after filtering, so an
event id stored twice counts once.
"""

from __future__ import annotations

from dashboards import fields as f
from dashboards.billing import BUDGET, SPEND, percent_of
from dashboards.model import Dashboard, Field, Panel, Unit, Viz
from dashboards.sources import PERIOD_START, ledger, usage

TOKEN_QUOTA = """toUInt64OrNull(if(mapContains(${customer_monthly_tokens}, customer),
                                  ${customer_monthly_tokens}[customer], ${tier_monthly_tokens}[current_tier]))"""

# Month-to-date use of each customer against its quotas (input + output tokens, spend);
# percentages exact (Decimal), so a small share never reads 0.
_PER_CUSTOMER = f"""SELECT customer, argMax(tier, time) AS current_tier,
       sum(input_tokens + output_tokens) AS mtd_tokens, {TOKEN_QUOTA} AS token_quota,
       {percent_of("toDecimal128(mtd_tokens, 12)", "token_quota")} AS token_quota_pct,
       {SPEND} AS mtd_spend_usd, {BUDGET} AS budget_usd,
       {percent_of("mtd_spend_usd", "budget_usd")} AS budget_used_pct
FROM {usage(PERIOD_START, "$__toTime")}
GROUP BY customer"""
_PER_CUSTOMER_FIELDS = (f.CUSTOMER, f.CURRENT_TIER, f.PERIOD_TOKENS, f.TOKEN_QUOTA, f.TOKEN_QUOTA_USED, f.PERIOD_SPEND,
                        f.BUDGET, f.BUDGET_USED)
REASON = Field("refusal_reason", "Reason", Unit.TEXT)
OUTCOME = Field("decision", "Outcome", Unit.TEXT)

UTILISATION_PER_CUSTOMER = Panel(
    id=1,
    key="utilisation_per_customer",
    title="Quota utilisation per customer (billing period to date)",
    description="Tokens (input + output) and spend in the billing period holding the end of the range.",
    viz=Viz.TABLE,
    unit="percent",
    width=24,
    fields=_PER_CUSTOMER_FIELDS,
    sql=f"""{_PER_CUSTOMER}
ORDER BY greatest(ifNull(token_quota_pct, 0), ifNull(budget_used_pct, 0)) DESC, customer""",
)

UTILISATION_PER_TIER = Panel(
    id=2,
    key="utilisation_per_tier",
    title="Quota utilisation per tier (billing period to date)",
    description="Each tier's customers together: their use over the sum of their quotas.",
    viz=Viz.BAR,
    unit="percent",
    x="tier",
    values=("token_quota_pct", "budget_used_pct"),
    fields=(f.TIER, Field("customers", "Customers"), Field("tokens", "Tokens this period"),
            Field("token_quotas", "Token quotas"), f.TOKEN_QUOTA_USED, Field("spend_usd", "Spend this period", Unit.USD),
            Field("budgets_usd", "Budgets", Unit.USD), f.BUDGET_USED),
    sql=f"""SELECT current_tier AS tier, count() AS customers,
       sum(mtd_tokens) AS tokens, sum(token_quota) AS token_quotas,
       {percent_of("toDecimal128(tokens, 12)", "token_quotas")} AS token_quota_pct,
       sum(mtd_spend_usd) AS spend_usd, sum(budget_usd) AS budgets_usd,
       {percent_of("spend_usd", "budgets_usd")} AS budget_used_pct
FROM ({_PER_CUSTOMER})
GROUP BY tier
ORDER BY tier""",
)

REFUSALS_BY_TIER_REASON = Panel(
    id=3,
    key="refusals_by_tier_reason",
    title="Refusals by tier and reason",
    viz=Viz.BAR,
    unit="short",
    x="tier",
    series="refusal_reason",
    values=("refusals",),
    fields=(f.TIER, REASON, Field("refusals", "Refusals")),
    sql=f"""SELECT tier, ifNull(reason, 'unknown') AS refusal_reason, count() AS refusals
FROM {ledger("decision = 'refused'", final=True)}
GROUP BY tier, refusal_reason
ORDER BY tier, refusal_reason""",
)

REFUSALS_OVER_TIME = Panel(
    id=4,
    key="refusals_over_time",
    title="Refusals over time by reason",
    viz=Viz.TIMESERIES,
    unit="short",
    x="t",
    series="refusal_reason",
    values=("refusals",),
    fields=(f.TIME, REASON, Field("refusals", "Refusals")),
    sql=f"""SELECT $__timeInterval(time) AS t, ifNull(reason, 'unknown') AS refusal_reason, count() AS refusals
FROM {ledger("decision = 'refused'", final=True)}
GROUP BY t, refusal_reason
ORDER BY t, refusal_reason""",
)

FALLBACKS = Panel(
    id=5,
    key="fallbacks",
    title="Fallbacks to a cheaper model",
    description="Requests served by the tier's fallback model instead of being refused.",
    viz=Viz.TIMESERIES,
    unit="short",
    x="t",
    series="model",
    values=("fallbacks",),
    fields=(f.TIME, f.MODEL, Field("fallbacks", "Fallbacks")),
    sql=f"""SELECT $__timeInterval(time) AS t, model, count() AS fallbacks
FROM {ledger("reason = 'fallback'", final=True)}
GROUP BY t, model
ORDER BY t, model""",
)

QUEUED = Panel(
    id=6,
    key="queued",
    title="Queued requests",
    description="Batch-priority requests that waited in a queue, by how they ended.",
    viz=Viz.TIMESERIES,
    unit="short",
    x="t",
    series="decision",
    values=("queued",),
    fields=(f.TIME, OUTCOME, Field("queued", "Queued requests")),
    sql=f"""SELECT $__timeInterval(time) AS t, decision, count() AS queued
FROM {ledger("reason = 'queued'", final=True)}
GROUP BY t, decision
ORDER BY t, decision""",
)

QUOTAS = Dashboard(
    uid="quotameter-quotas",
    title="quotameter · Quotas",
    description="How close customers are to their quotas, and what enforcement did.",
    time_from="now/M",
    panels=(UTILISATION_PER_CUSTOMER, UTILISATION_PER_TIER, REFUSALS_BY_TIER_REASON, REFUSALS_OVER_TIME, FALLBACKS,
            QUEUED),
)
