"""The three dashboards on the ledger, their template variables, and the
constants the config feeds them (budgets, token quotas, the billing
calendar); and the service-health dashboard on Prometheus (Grafana only: the
built-in page shows the same metrics live on its Operations page).

Where each panel reads from, and what it promises, is in ``dashboards.sources``:
spend, requests, tokens and the month-to-date panels from the rollups (whole
days and hours) stitched to the ledger (the partial hours at the range's
ends); refusals, fallbacks, queueing, upstream errors, latency, ttft and lag
from the ledger, filtered before it is read.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from decimal import Decimal

from dashboards.billing import BILLING
from dashboards.filters import DIMENSIONS, Dimension, ledger_options_sql
from dashboards.macros import quote_literal
from dashboards.model import Dashboard, QueryVariable
from dashboards.operations import OPERATIONS
from dashboards.quotas import QUOTAS
from dashboards.service_health import SERVICE_HEALTH
from dashboards.sources import usage
from quotameter.config import Config

# Options: what was used in the range (unfiltered: a variable's query must not name a variable),
# from the rollups where they hold the dimension.
_USED = usage(filters=False)


def _options_sql(dimension: Dimension) -> str:
    if dimension.in_rollups:
        return f"SELECT DISTINCT {dimension.name} FROM {_USED} WHERE {dimension.name} != '' ORDER BY {dimension.name}"
    return ledger_options_sql(dimension)


VARIABLES = tuple(QueryVariable(d.name, d.label, _options_sql(d)) for d in DIMENSIONS)

DASHBOARDS: tuple[Dashboard, ...] = tuple(
    replace(d, variables=VARIABLES) for d in (BILLING, QUOTAS, OPERATIONS)
)
PROMETHEUS_DASHBOARDS: tuple[Dashboard, ...] = (SERVICE_HEALTH,)
FOLDER_UID = "quotameter"
FOLDER_TITLE = "quotameter"
CONSTANT_NAMES = ("billing_tz", "billing_anchor_day", "tier_budget_usd", "customer_budget_usd", "tier_monthly_tokens",
                  "customer_monthly_tokens")


def dashboard(uid_or_slug: str) -> Dashboard:
    for candidate in DASHBOARDS:
        if uid_or_slug in (candidate.uid, candidate.uid.removeprefix("quotameter-")):
            return candidate
    raise KeyError(uid_or_slug)


def _string_map(entries: Mapping[str, object]) -> str:
    """A ``Map(String, String)`` literal (values as text: the panels convert them)."""
    pairs = ", ".join(f"{quote_literal(k)}, {quote_literal(str(v))}" for k, v in sorted(entries.items()))
    return f"CAST(map({pairs}), 'Map(String, String)')"


def _money(value: Decimal) -> str:
    return format(value.normalize(), "f")


def config_constants(config: Config) -> dict[str, str]:
    """The hidden constants every panel may use, as SQL literals built from ``config``."""
    tier_budget = {n: _money(t.monthly_budget_usd) for n, t in config.tiers.items() if t.monthly_budget_usd is not None}
    customer_budget = {
        n: _money(c.monthly_budget_usd) for n, c in config.customers.items() if c.monthly_budget_usd is not None
    }
    tier_tokens = {n: t.monthly_tokens for n, t in config.tiers.items() if t.monthly_tokens is not None}
    customer_tokens = {n: c.monthly_tokens for n, c in config.customers.items() if c.monthly_tokens is not None}
    return {
        "billing_tz": quote_literal(config.billing.timezone),
        "billing_anchor_day": str(int(config.billing.anchor_day)),
        "tier_budget_usd": _string_map(tier_budget),
        "customer_budget_usd": _string_map(customer_budget),
        "tier_monthly_tokens": _string_map(tier_tokens),
        "customer_monthly_tokens": _string_map(customer_tokens),
    }
