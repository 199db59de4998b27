"""``quotameter usage``: one customer's period usage from the ledger beside Redis.

The ledger (ClickHouse) is the truth; Redis holds the pipeline's copy that the
shim enforces from. Showing both side by side makes any lag or drift visible.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import redis
from rich.console import Console
from rich.table import Table

from quotameter.config import Config
from quotameter.errors import QuotameterError
from quotameter.redis_keys import RedisKeys
from quotameter.redis_pool import sync_redis

_COMPARED = ("requests", "input_tokens", "output_tokens", "cached_tokens", "reasoning_tokens", "cost_usd")


def _number(value: Any) -> str:
    """A canonical text for an integer or a Decimal amount, so both sides compare exactly."""
    return format(Decimal(str(value or 0)).normalize(), "f")


def quota_state(config: Config, customer: str, period: str) -> dict[str, str]:
    names = RedisKeys(config.services.redis_prefix)
    client = sync_redis(config.services, decode_responses=True)
    try:
        state = client.hgetall(names.usage(customer, period))
        tier = client.hget(names.customer(customer), "tier")
    except redis.RedisError as exc:
        raise QuotameterError(f"cannot read quota state from Redis at {config.services.redis_url}: {exc}") from None
    finally:
        client.close()
    if tier:
        state["tier"] = tier
    return state


def gather_usage(config: Config, customer: str, period: str) -> dict[str, Any]:
    from pipeline.history.reader import ledger_usage

    ledger = ledger_usage(config, customer, period)
    redis_state = quota_state(config, customer, period)
    tier_name = redis_state.get("tier")
    tier = config.tiers.get(tier_name) if tier_name else None
    ledger_view = {field: _number(ledger.get(field)) for field in _COMPARED}
    redis_view = {field: _number(redis_state.get(field)) for field in _COMPARED}
    return {
        "customer": customer,
        "period": period,
        "currency": config.billing.currency,
        "tier": tier_name,
        "ledger": ledger_view,
        "redis": redis_view,
        "in_sync": ledger_view == redis_view,
        "limits": {
            "monthly_tokens": tier.monthly_tokens if tier else None,
            "monthly_budget_usd": str(tier.monthly_budget_usd) if tier and tier.monthly_budget_usd is not None else None,
        },
    }


def render_usage(report: dict[str, Any], console: Console) -> None:
    title = f"{report['customer']} — {report['period']}" + (f" ({report['tier']} tier)" if report["tier"] else "")
    table = Table(title=title)
    table.add_column("")
    table.add_column("ledger (ClickHouse)", justify="right")
    table.add_column("quota state (Redis)", justify="right")
    for field in _COMPARED:
        label = field.replace("_", " ") + (f" ({report['currency']})" if field == "cost_usd" else "")
        table.add_row(label, report["ledger"][field], report["redis"][field])
    console.print(table)
    limits = report["limits"]
    if limits["monthly_tokens"] is not None:
        used = int(report["ledger"]["input_tokens"]) + int(report["ledger"]["output_tokens"])
        console.print(f"tokens this period: {used:,} of {limits['monthly_tokens']:,}")
    if limits["monthly_budget_usd"] is not None:
        console.print(f"spend this period: {report['ledger']['cost_usd']} of {limits['monthly_budget_usd']} {report['currency']}")
    if not report["in_sync"]:
        console.print("[yellow]Redis differs from the ledger: the pipeline may still be catching up.[/]")

