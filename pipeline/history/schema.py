"""The ledger's SQL: one row per event, deduplicated by event id.

``ReplacingMergeTree … ORDER BY (customer, id)`` keeps one row per id after
merges; until then every summing query reads ``FINAL``, so a retried batch
never doubles a total. A duplicate has the same time as its original, hence
the same monthly partition, which is what FINAL deduplicates within.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime
from decimal import Decimal
from typing import Any

from quotameter.aggregate import PricedEvent, format_usd
from quotameter.periods import period_bounds

DATABASE = "quotameter"
EVENTS = f"{DATABASE}.events"

DDL = (
    f"CREATE DATABASE IF NOT EXISTS {DATABASE}",
    f"""
    CREATE TABLE IF NOT EXISTS {EVENTS} (
        id String,
        time DateTime64(3, 'UTC'),
        customer String,
        api_key_id String,
        tier LowCardinality(String),
        route LowCardinality(String),
        status UInt16,
        decision LowCardinality(String),
        reason Nullable(String),
        model_requested Nullable(String),
        model_served Nullable(String),
        upstream Nullable(String),
        input_tokens UInt64,
        output_tokens UInt64,
        cached_tokens UInt64,
        reasoning_tokens UInt64,
        cost_usd Decimal(38, 12),
        price_version LowCardinality(String),
        upstream_cost_usd Nullable(Decimal(38, 12)),
        usage_source LowCardinality(String),
        streamed Bool,
        latency_ms Float64,
        ttft_ms Nullable(Float64),
        request_bytes UInt64,
        response_bytes UInt64,
        source String,
        ingested_at DateTime64(3, 'UTC') DEFAULT now64(3)
    )
    ENGINE = ReplacingMergeTree
    PARTITION BY toYYYYMM(time)
    ORDER BY (customer, id)
    """,
)

INSERT_EVENTS = f"INSERT INTO {EVENTS} FORMAT JSONEachRow\n"

USAGE = f"""
SELECT
    countIf(decision = 'admitted') AS requests,
    countIf(decision != 'admitted') AS refused,
    sum(input_tokens) AS input_tokens,
    sum(output_tokens) AS output_tokens,
    sum(cached_tokens) AS cached_tokens,
    sum(reasoning_tokens) AS reasoning_tokens,
    toString(sum(cost_usd)) AS cost_usd,
    count() AS events
FROM {EVENTS} FINAL
WHERE customer = {{customer:String}}
  AND time >= {{start:DateTime64(3, 'UTC')}} AND time < {{end:DateTime64(3, 'UTC')}}
"""

USAGE_INT_FIELDS = ("requests", "refused", "input_tokens", "output_tokens", "cached_tokens", "reasoning_tokens", "events")


def _clickhouse_time(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S.") + f"{moment.microsecond // 1000:03d}"


def ledger_row(priced: PricedEvent) -> dict[str, Any]:
    event, data = priced.event, priced.event.data
    upstream_cost = data.upstream_cost_usd
    return {
        "id": event.id,
        "time": _clickhouse_time(event.time),
        "customer": event.customer_id,
        "api_key_id": data.api_key_id,
        "tier": data.tier,
        "route": data.route,
        "status": data.status,
        "decision": data.decision.value,
        "reason": data.reason,
        "model_requested": data.model_requested,
        "model_served": data.model_served,
        "upstream": data.upstream,
        "input_tokens": data.input_tokens,
        "output_tokens": data.output_tokens,
        "cached_tokens": data.cached_tokens,
        "reasoning_tokens": data.reasoning_tokens,
        "cost_usd": format_usd(priced.cost.usd),
        "price_version": priced.cost.price_version,
        "upstream_cost_usd": None if upstream_cost is None else format_usd(upstream_cost),
        "usage_source": data.usage_source.value,
        "streamed": data.streamed,
        "latency_ms": data.latency_ms,
        "ttft_ms": data.ttft_ms,
        "request_bytes": data.request_bytes,
        "response_bytes": data.response_bytes,
        "source": event.source,
    }


def usage_params(customer: str, period: str, tz: str) -> dict[str, str]:
    start, end = period_bounds(period, tz)
    return {"customer": customer, "start": _clickhouse_time(start), "end": _clickhouse_time(end)}


def usage_row(customer: str, period: str, raw: Mapping[str, Any] | None) -> dict[str, Any]:
    """The usage dict every reader returns (the worker's /usage, ledger_usage)."""
    raw = raw or {}
    row: dict[str, Any] = {"customer": customer, "period": period}
    for name in USAGE_INT_FIELDS:
        row[name] = int(raw.get(name) or 0)
    row["cost_usd"] = format_usd(Decimal(str(raw.get("cost_usd") or 0)))
    return row


_READ_ONLY_START = re.compile(r"^\s*(SELECT|WITH)\b", re.IGNORECASE)
_FORMAT_CLAUSE = re.compile(r"\bFORMAT\s+\w+\s*$", re.IGNORECASE)


def read_only_select(sql: str) -> str | None:
    """``sql`` cleaned of one trailing ``;``, or None when it is not one SELECT.

    This is the first fence; the store also runs the query on a read-only
    session, so a write that slipped past it still fails.
    """
    text = sql.strip().removesuffix(";").rstrip()
    if not text or ";" in text or not _READ_ONLY_START.match(text) or _FORMAT_CLAUSE.search(text):
        return None
    return text
