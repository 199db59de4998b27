"""A small, known ledger for the dashboard tests: three customers in March 2025.

Expected figures (range 2025-03-01T00:00Z .. 2025-03-11T00:00Z, config with
beta's budget overridden to 1.90 USD) are spelled out beside the tests.

March is what the pipeline writes: each event id inserted once, so the
rollups (materialized views fed by every insert) agree with the ledger.
January holds the case the ledger's ``FINAL`` reads guard against: a batch
the sink wrote twice, still unmerged, with its month's rollups recomputed
from the deduplicated ledger as ``schema.rollup_rebuild`` leaves them.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pipeline.history import migrations, schema

RANGE_FROM = datetime(2025, 3, 1, tzinfo=UTC)
RANGE_TO = datetime(2025, 3, 11, tzinfo=UTC)
JANUARY_FROM = datetime(2025, 1, 1, tzinfo=UTC)
JANUARY_TO = datetime(2025, 2, 1, tzinfo=UTC)
APRIL_FROM = datetime(2025, 4, 1, tzinfo=UTC)
APRIL_TO = datetime(2025, 4, 11, tzinfo=UTC)
CONFIG_OVERRIDES = {"customers": {"beta": {"monthly_budget_usd": "1.90"}, "delta": {"monthly_budget_usd": "0.10"}}}


def _row(n: int, customer: str, tier: str, when: str, *, decision: str = "admitted", reason: str | None = None,
         requested: str | None = None, served: str | None = None, tokens: tuple[int, int] = (0, 0),
         cost: str = "0", latency_ms: float = 0.0, ttft_ms: float | None = None, status: int = 200,
         lag_s: float = 1.0, upstream: str | None = "mock", end_user: str = "", project: str = "",
         tags: dict[str, str] | None = None) -> dict[str, Any]:
    time = datetime.fromisoformat(when).replace(tzinfo=UTC)
    return {
        "id": f"evt-{n:03d}", "time": time.strftime("%Y-%m-%d %H:%M:%S.000"), "customer": customer,
        "api_key_id": f"key-{customer}", "tier": tier, "route": "/v1/chat/completions", "status": status,
        "decision": decision, "reason": reason, "model_requested": requested or served, "model_served": served,
        "upstream": upstream if decision == "admitted" else None, "input_tokens": tokens[0],
        "output_tokens": tokens[1], "cached_tokens": 0, "reasoning_tokens": 0, "cost_usd": cost,
        "price_version": f"{served}@1970-01-01" if served else "", "upstream_cost_usd": None,
        "usage_source": "upstream" if served else "none", "streamed": ttft_ms is not None, "latency_ms": latency_ms,
        "ttft_ms": ttft_ms, "request_bytes": 100, "response_bytes": 200, "source": "shim-test",
        "ingested_at": (time + timedelta(seconds=lag_s)).strftime("%Y-%m-%d %H:%M:%S.000"),
        "end_user": end_user, "project": project, "tags": tags or {},
    }


ROWS = [
    _row(1, "acme", "pro", "2025-03-02 10:00:00", served="gpt-4o", tokens=(1000, 500), cost="0.0075",
         latency_ms=100, ttft_ms=40, lag_s=2),
    _row(2, "acme", "pro", "2025-03-05 12:00:00", served="gpt-4o", tokens=(2000, 1000), cost="0.015",
         latency_ms=200, ttft_ms=60, lag_s=4),
    _row(3, "acme", "pro", "2025-03-05 12:00:01", decision="refused", reason="rate_limit_requests",
         requested="gpt-4o", status=429, latency_ms=1),
    _row(4, "beta", "free", "2025-03-03 09:00:00", served="mock-small", tokens=(50000, 10000), cost="0.009",
         latency_ms=300, end_user="ana", project="search-app", tags={"team": "search"}),
    _row(5, "beta", "free", "2025-03-04 09:00:00", decision="refused", reason="quota_tokens",
         requested="mock-small", status=429, latency_ms=1),
    _row(6, "beta", "free", "2025-03-06 08:00:00", reason="fallback", requested="gpt-4o-mini", served="mock-small",
         tokens=(1000, 1000), cost="0.0005", latency_ms=300),
    _row(7, "cito", "enterprise", "2025-03-07 15:00:00", reason="queued", served="gpt-4o-mini",
         tokens=(4000, 2000), cost="0.0018", latency_ms=400, ttft_ms=80, tags={"team": "ops", "env": "prod"}),
    _row(8, "cito", "enterprise", "2025-03-08 16:00:00", reason="upstream_error", served="gpt-4o-mini",
         status=502, latency_ms=50),
    _row(9, "cito", "enterprise", "2025-03-09 10:00:00", decision="refused", reason="queued",
         requested="gpt-4o-mini", status=429, latency_ms=30000),
    # Last month: outside the range and the month to date.
    _row(10, "acme", "pro", "2025-02-27 10:00:00", served="gpt-4o", tokens=(100000, 50000), cost="1.0",
         latency_ms=100),
    # After the range, half a minute into an hour (a range ending inside that hour leaves it out).
    _row(16, "acme", "pro", "2025-03-12 10:00:30", served="gpt-4o", tokens=(100, 50), cost="0.00075",
         latency_ms=90),
]

# January: one batch, then the same batch again (a retried sink insert).
JANUARY = [
    _row(11, "acme", "pro", "2025-01-10 10:00:00", served="gpt-4o", tokens=(1000, 500), cost="0.0075",
         latency_ms=100),
    _row(12, "beta", "free", "2025-01-10 11:00:00", decision="refused", reason="rate_limit_requests",
         requested="mock-small", status=429, latency_ms=1),
    _row(13, "beta", "free", "2025-01-11 08:00:00", reason="fallback", requested="gpt-4o-mini",
         served="mock-small", tokens=(1000, 1000), cost="0.0005", latency_ms=300),
    _row(14, "cito", "enterprise", "2025-01-12 15:00:00", reason="upstream_error", served="gpt-4o-mini",
         status=502, latency_ms=50),
    _row(15, "cito", "enterprise", "2025-01-12 16:00:00", decision="refused", reason="queued",
         requested="gpt-4o-mini", status=429, latency_ms=30000),
]
JANUARY_MONTH = 202501

# April: what a spreadsheet and a person must read right. delta spent $0.0000216 of a
# $0.10 budget (0.0216 %, through one API key); the other customer ids are text a
# spreadsheet would run as formulas, or that CSV must quote; one amount has all 12
# decimals the ledger keeps (a binary float would round it). Two carry attribution
# (end user, project, tags).
HOSTILE_CUSTOMERS = ('=SUM(1,2)', '+cmd "quoted", x', '@evil\nline', '-2+3', 'plain, with comma')
APRIL = [
    _row(20, "delta", "pro", "2025-04-02 10:00:00", served="gpt-4o-mini", tokens=(100, 6), cost="0.0000216",
         latency_ms=80, end_user="user-7", project="checkout", tags={"team": "payments", "env": "prod"}),
    _row(21, HOSTILE_CUSTOMERS[0], "free", "2025-04-03 10:00:00", served="mock-small", tokens=(10, 10),
         cost="1.005", latency_ms=80),
    _row(22, HOSTILE_CUSTOMERS[1], "free", "2025-04-03 11:00:00", served="mock-small", tokens=(10, 10),
         cost="2.5", latency_ms=80, project="checkout", tags={"team": "search"}),
    _row(23, HOSTILE_CUSTOMERS[2], "free", "2025-04-04 09:00:00", served="mock-small", tokens=(10, 10),
         cost="0.333333333333", latency_ms=80),
    _row(24, HOSTILE_CUSTOMERS[3], "free", "2025-04-04 10:00:00", decision="refused", reason="quota_tokens",
         requested="mock-small", status=429, latency_ms=1),
    _row(25, HOSTILE_CUSTOMERS[4], "enterprise", "2025-04-05 12:00:00", served="gpt-4o", tokens=(10, 10),
         cost="98765432.123456789012", latency_ms=80),
]


def seed(path: Path) -> None:
    """Create the ledger in a new chDB directory at ``path``: March, February and April
    in one batch, January's batch twice, then January's rollups rebuilt."""
    from chdb.session import Session

    session = Session(str(path))
    try:
        for statement in migrations.DDL:
            session.query(statement)
        for batch in (ROWS + APRIL, JANUARY, JANUARY):
            session.query(schema.INSERT_EVENTS + "\n".join(json.dumps(r) for r in batch))
        for statement in schema.rollup_rebuild(JANUARY_MONTH):
            session.query(statement)
    finally:
        session.close()
